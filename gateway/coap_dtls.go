package gateway

import (
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"sync/atomic"

	piondtls "github.com/pion/dtls/v3"
	"github.com/pion/logging"
	"github.com/plgd-dev/go-coap/v3/mux"
	udpClient "github.com/plgd-dev/go-coap/v3/udp/client"
)

// dtlsAuth identifies DTLS peers, by PSK identity from the current table or
// by a client certificate verified against ca_file, and decides which
// sensors each may post for.
type dtlsAuth struct {
	psk  atomic.Pointer[PSKTable]
	opts CoAPOptions
	log  *slog.Logger
	cert *tls.Certificate
	cas  *x509.CertPool

	mu       sync.Mutex // guards served and sessions
	served   map[string][sha256.Size]byte
	sessions map[*udpClient.Conn]*dtlsPeer
}

// dtlsPeer is who a DTLS session belongs to, found once after its handshake.
type dtlsPeer struct {
	identity string
	byCert   bool              // identified by certificate (its CommonName), not PSK
	digest   [sha256.Size]byte // PSK: the digest of the key the handshake used
}

// peerKey holds a DTLS session's *dtlsPeer in its connection's context.
type peerKey struct{}

// peerOf is the DTLS peer of a connection, nil for plain UDP.
func peerOf(conn mux.Conn) *dtlsPeer {
	p, _ := conn.Context().Value(peerKey{}).(*dtlsPeer)
	return p
}

func newDTLSAuth(opts CoAPOptions, log *slog.Logger) (*dtlsAuth, error) {
	a := &dtlsAuth{opts: opts, log: log, served: map[string][sha256.Size]byte{}, sessions: map[*udpClient.Conn]*dtlsPeer{}}
	a.psk.Store(opts.PSK)
	if opts.CertFile != "" {
		cert, err := tls.LoadX509KeyPair(opts.CertFile, opts.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("load cert_file/key_file: %w", err)
		}
		a.cert = &cert
	}
	if opts.CAFile != "" {
		pem, err := os.ReadFile(opts.CAFile)
		if err != nil {
			return nil, fmt.Errorf("read ca_file: %w", err)
		}
		a.cas = x509.NewCertPool()
		if !a.cas.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("ca_file %s: no PEM certificate in it", opts.CAFile)
		}
	}
	return a, nil
}

// serverOptions configure the DTLS listener: PSK when psk_file is set,
// the gateway's certificate when cert_file is, and client certificates
// verified against ca_file (required when there is no PSK to fall back on).
func (a *dtlsAuth) serverOptions() []piondtls.ServerOption {
	var opts []piondtls.ServerOption
	var suites []piondtls.CipherSuiteID
	if a.opts.PSKFile != "" {
		opts = append(opts, piondtls.WithPSK(a.pskFor))
		suites = append(suites, pskSuites...)
	}
	if a.cert != nil {
		opts = append(opts, piondtls.WithCertificates(*a.cert))
		suites = append(suites, certSuites...)
	}
	opts = append(opts, piondtls.WithCipherSuites(suites...),
		// pion writes its own warnings to stderr unless given a logger.
		piondtls.WithLoggerFactory(&logging.DefaultLoggerFactory{Writer: pionLog{a.log}, DefaultLogLevel: logging.LogLevelWarn}))
	if a.cas != nil {
		auth := piondtls.RequireAndVerifyClientCert
		if a.opts.PSKFile != "" {
			auth = piondtls.VerifyClientCertIfGiven
		}
		opts = append(opts, piondtls.WithClientCAs(a.cas), piondtls.WithClientAuth(auth))
	}
	return opts
}

// Cipher suites offered. pion offers no PSK suite unless told; the first
// of each list is the one RFC 7252 §9.1.3 makes mandatory for CoAP.
var (
	pskSuites = []piondtls.CipherSuiteID{
		piondtls.TLS_PSK_WITH_AES_128_CCM_8,
		piondtls.TLS_PSK_WITH_AES_128_CCM,
		piondtls.TLS_PSK_WITH_AES_128_GCM_SHA256,
		piondtls.TLS_ECDHE_PSK_WITH_AES_128_CBC_SHA256,
		piondtls.TLS_PSK_WITH_AES_128_CBC_SHA256,
	}
	certSuites = []piondtls.CipherSuiteID{
		piondtls.TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8,
		piondtls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
		piondtls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
		piondtls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
		piondtls.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
	}
)

// pionLog puts pion's log lines into the gateway's log, at debug level
// like go-coap's errors: they are about a device's handshake.
type pionLog struct{ log *slog.Logger }

func (w pionLog) Write(p []byte) (int, error) {
	w.log.Debug("dtls library message", "detail", strings.TrimSpace(string(p)))
	return len(p), nil
}

// pskFor is the handshake's key lookup. It remembers which key it handed
// out for the identity, so that a session whose handshake straddled a
// reload is found out when it starts.
func (a *dtlsAuth) pskFor(identity []byte) ([]byte, error) {
	e, ok := a.psk.Load().entry(string(identity))
	if !ok {
		return nil, fmt.Errorf("unknown psk identity %q", clip(string(identity)))
	}
	a.mu.Lock()
	a.served[string(identity)] = e.digest
	a.mu.Unlock()
	return e.key, nil
}

// onNewConn runs once a handshake is done, before the session's first
// request: it finds the peer and keeps the session for reload.
func (a *dtlsAuth) onNewConn(cc *udpClient.Conn) {
	p := &dtlsPeer{}
	if dc, ok := cc.NetConn().(*piondtls.Conn); ok {
		if st, ok := dc.ConnectionState(); ok {
			switch {
			case len(st.IdentityHint) > 0:
				p.identity = string(st.IdentityHint)
			case len(st.PeerCertificates) > 0:
				if cert, err := x509.ParseCertificate(st.PeerCertificates[0]); err == nil {
					p.identity, p.byCert = cert.Subject.CommonName, true
				}
			}
		}
	}
	cc.SetContextValue(peerKey{}, p)
	a.mu.Lock()
	if !p.byCert && p.identity != "" {
		p.digest = a.served[p.identity]
		// A reload between this handshake's key lookup and now changed the key.
		if e, ok := a.psk.Load().entry(p.identity); !ok || e.digest != p.digest {
			a.mu.Unlock()
			a.log.Info("dtls session closed: its key was replaced while it was being made", "identity", p.identity)
			_ = cc.Close()
			return
		}
	}
	a.sessions[cc] = p
	a.mu.Unlock()
	cc.AddOnClose(func() {
		a.mu.Lock()
		delete(a.sessions, cc)
		a.mu.Unlock()
	})
}

// reload installs t and closes the sessions of identities that t removes or
// gives another key.
func (a *dtlsAuth) reload(t *PSKTable) (kept, closed int) {
	a.psk.Store(t)
	var drop []*udpClient.Conn
	a.mu.Lock()
	for cc, p := range a.sessions {
		if p.byCert {
			continue
		}
		if e, ok := t.entry(p.identity); ok && e.digest == p.digest {
			kept++
			continue
		}
		drop = append(drop, cc)
	}
	a.mu.Unlock()
	for _, cc := range drop {
		_ = cc.Close()
	}
	a.log.Info("psk reloaded", "identities", t.Len(), "sessions_kept", kept, "sessions_closed", len(drop))
	return kept, len(drop)
}

// authorise decides whether peer may post for sensor; a refusal is counted.
func (c *CoAP) authorise(p *dtlsPeer, sensor string) *Rejection {
	var err error
	switch {
	case p.identity == "":
		err = errors.New("the DTLS session has no identity")
	case p.byCert:
		if sensor != p.identity {
			err = fmt.Errorf("certificate %q may not post for sensor %q", clip(p.identity), clip(sensor))
		}
	default:
		e, ok := c.auth.psk.Load().entry(p.identity)
		switch {
		case !ok || e.digest != p.digest:
			err = fmt.Errorf("identity %q was revoked", clip(p.identity))
		case !e.allows(sensor):
			err = fmt.Errorf("identity %q may not post for sensor %q", clip(p.identity), clip(sensor))
		}
	}
	if err == nil {
		return nil
	}
	return c.in.Reject(IngressCoAP, &Rejection{ReasonForbidden, err.Error()})
}
