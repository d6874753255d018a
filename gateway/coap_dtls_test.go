package gateway

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	piondtls "github.com/pion/dtls/v3"
	dtlsnet "github.com/pion/dtls/v3/pkg/net"
	"github.com/plgd-dev/go-coap/v3/dtls"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/options"
	udpClient "github.com/plgd-dev/go-coap/v3/udp/client"

	"github.com/sluice-gw/sluice/internal/testenv"
)

const (
	keyFeeder = "0102030405060708090a0b0c0d0e0f10"
	keyHub    = "a1a2a3a4a5a6a7a8"
)

func mustPSK(t *testing.T, text string) *PSKTable {
	t.Helper()
	tbl, err := ParsePSK(text)
	if err != nil {
		t.Fatal(err)
	}
	return tbl
}

func (e *coapEnv) dialPSK(identity, hexKey string) (*udpClient.Conn, error) {
	key, err := hex.DecodeString(hexKey)
	if err != nil {
		e.t.Fatal(err)
	}
	return dialDTLS(e.t, e.dtls,
		piondtls.WithPSK(func([]byte) ([]byte, error) { return key, nil }),
		piondtls.WithPSKIdentityHint([]byte(identity)),
		piondtls.WithCipherSuites(piondtls.TLS_PSK_WITH_AES_128_CCM_8),
	)
}

// dialDTLS makes a DTLS session with a bounded handshake (go-coap's Dial
// would leave it to the first request, unbounded) and wraps it in a client.
func dialDTLS(t *testing.T, addr string, opts ...piondtls.ClientOption) (*udpClient.Conn, error) {
	t.Helper()
	raddr, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := net.DialUDP("udp", nil, raddr)
	if err != nil {
		t.Fatal(err)
	}
	dc, err := piondtls.ClientWithOptions(dtlsnet.PacketConnFromConn(conn), raddr, opts...)
	if err != nil {
		conn.Close()
		return nil, err
	}
	// A refused handshake is not always told to the client (a wrong key
	// just goes unanswered), so a short bound keeps those cases quick.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := dc.HandshakeContext(ctx); err != nil {
		dc.Close()
		conn.Close()
		return nil, err
	}
	cc := dtls.Client(dc, options.WithCloseSocket())
	t.Cleanup(func() {
		_ = cc.Close()
		conn.Close()
	})
	return cc, nil
}

func pskSetup(t *testing.T) coapSetup {
	return coapSetup{opts: CoAPOptions{
		Listen: "auto", DTLSListen: "auto", PSKFile: "psk",
		PSK: mustPSK(t, "# devices\nfeeder-1:"+keyFeeder+"\n\nhub-7:"+keyHub+":tank-1,tank-2\n"),
	}}
}

func TestCoAPDTLSPSK(t *testing.T) {
	e := startCoAP(t, pskSetup(t))
	feeder, err := e.dialPSK("feeder-1", keyFeeder)
	if err != nil {
		t.Fatalf("handshake with a listed identity: %v", err)
	}
	hub, err := e.dialPSK("hub-7", keyHub)
	if err != nil {
		t.Fatalf("handshake with a listed identity: %v", err)
	}
	cases := []struct {
		name string
		cc   *udpClient.Conn
		req  request
		code codes.Code
	}{
		{"own sensor", feeder, request{codes.POST, "/s/feeder-1", 110, nil, senmlPack}, codes.Changed},
		{"other sensor in the path", feeder, request{codes.POST, "/s/feeder-2/voltage", 0, nil, "1"}, codes.Forbidden},
		{"other sensor in the payload", feeder, request{codes.POST, "/s/feeder-1", 110, nil, `[{"bn":"feeder-2:","n":"v","v":1}]`}, codes.Forbidden},
		{"other sensor in a flat object", feeder, request{codes.POST, "/s/feeder-1", 50, nil, `{"sensor":"feeder-2","metric":"v","value":1}`}, codes.Forbidden},
		{"bound sensor", hub, request{codes.POST, "/a/tank-2/level", 0, nil, "4"}, codes.Changed},
		{"own name not bound", hub, request{codes.POST, "/s/hub-7/x", 0, nil, "4"}, codes.Forbidden},
		{"unbound sensor", hub, request{codes.POST, "/s/tank-3/level", 0, nil, "4"}, codes.Forbidden},
	}
	stored := int64(0)
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			before, forbidden := e.stored(), e.rejected(ReasonForbidden)
			got := do(t, c.cc, c.req)
			if got.code != c.code {
				t.Fatalf("code %v (%s), want %v", got.code, got.body, c.code)
			}
			if c.code == codes.Forbidden {
				if e.stored() != before || e.rejected(ReasonForbidden) != forbidden+1 {
					t.Fatalf("forbidden post: %d stored, forbidden counted %v", e.stored()-before, e.rejected(ReasonForbidden)-forbidden)
				}
				if !strings.Contains(got.body, "may not post") {
					t.Errorf("diagnostic %q", got.body)
				}
			}
			stored = e.stored()
		})
	}
	if stored != 3 {
		t.Errorf("%d readings stored, want 3", stored)
	}

	for _, bad := range []struct{ name, identity, key string }{
		{"wrong key", "feeder-1", keyHub},
		{"unknown identity", "feeder-9", keyFeeder},
	} {
		t.Run(bad.name, func(t *testing.T) {
			if _, err := e.dialPSK(bad.identity, bad.key); err == nil {
				t.Fatalf("handshake with %s succeeded", bad.name)
			}
		})
	}
	// Plain UDP stays open alongside, without identities.
	if got := do(t, e.dial(), request{codes.POST, "/s/anyone/x", 0, nil, "1"}); got.code != codes.Changed {
		t.Errorf("plain UDP next to DTLS: %v", got.code)
	}
}

// tryPost posts one reading with a short deadline, for sessions that should not work.
func tryPost(cc *udpClient.Conn, path string) (codes.Code, error) {
	ctx, cancel := contextWithTimeout(2 * time.Second)
	defer cancel()
	resp, err := cc.Post(ctx, path+"?m=x", 0, strings.NewReader("1"))
	if err != nil {
		return 0, err
	}
	return resp.Code(), nil
}

func TestCoAPReloadPSK(t *testing.T) {
	e := startCoAP(t, pskSetup(t))
	feeder, err := e.dialPSK("feeder-1", keyFeeder)
	if err != nil {
		t.Fatal(err)
	}
	hub, err := e.dialPSK("hub-7", keyHub)
	if err != nil {
		t.Fatal(err)
	}
	for _, cc := range []*udpClient.Conn{feeder, hub} {
		path := map[*udpClient.Conn]string{feeder: "/s/feeder-1", hub: "/s/tank-1"}[cc]
		if got := do(t, cc, request{codes.POST, path, 0, []string{"m=v"}, "1"}); got.code != codes.Changed {
			t.Fatalf("before the reload: %v", got.code)
		}
	}
	// feeder-1 keeps its key and gains a sensor; hub-7 gets a new key.
	newHub := "b1b2b3b4b5b6b7b8"
	kept, closed := e.srv.ReloadPSK(mustPSK(t, "feeder-1:"+keyFeeder+":feeder-1,feeder-9\nhub-7:"+newHub+":tank-1\n"))
	if kept != 1 || closed != 1 {
		t.Fatalf("reload kept %d and closed %d sessions, want 1 and 1", kept, closed)
	}
	if got := do(t, feeder, request{codes.POST, "/s/feeder-9", 0, []string{"m=v"}, "2"}); got.code != codes.Changed {
		t.Fatalf("unchanged identity's session after the reload, for its new sensor: %v (%s)", got.code, got.body)
	}
	if code, err := tryPost(hub, "/s/tank-1"); err == nil {
		t.Fatalf("the session of a replaced key still posts: %v", code)
	}
	if _, err := e.dialPSK("hub-7", keyHub); err == nil {
		t.Fatal("the old key still makes a session")
	}
	hub2, err := e.dialPSK("hub-7", newHub)
	if err != nil {
		t.Fatalf("the new key: %v", err)
	}
	if got := do(t, hub2, request{codes.POST, "/s/tank-1", 0, []string{"m=v"}, "3"}); got.code != codes.Changed {
		t.Fatalf("new key's session: %v", got.code)
	}
	if n := e.stored(); n != 4 {
		t.Fatalf("%d readings stored, want 4", n)
	}
}

func TestCoAPDTLSCertificates(t *testing.T) {
	ca := testenv.NewCA(t, "sluice test ca")
	gw := ca.Issue(t, "gateway", "gateway")
	meter := ca.Issue(t, "meter-5")
	e := startCoAP(t, coapSetup{opts: CoAPOptions{
		DTLSListen: "auto",
		CAFile:     ca.CertFile,
		CertFile:   gw.CertFile, KeyFile: gw.KeyFile,
	}})
	clientCert, err := tls.X509KeyPair(meter.CertPEM, meter.KeyPEM)
	if err != nil {
		t.Fatal(err)
	}
	caPEM, err := os.ReadFile(ca.CertFile)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	cc, err := dialDTLS(t, e.dtls,
		piondtls.WithCertificates(clientCert),
		piondtls.WithRootCAs(pool),
		piondtls.WithServerName("gateway"),
	)
	if err != nil {
		t.Fatalf("certificate handshake: %v", err)
	}
	if got := do(t, cc, request{codes.POST, "/s/meter-5/energy", 0, nil, "12"}); got.code != codes.Changed {
		t.Fatalf("own sensor: %v (%s)", got.code, got.body)
	}
	if got := do(t, cc, request{codes.POST, "/s/meter-6/energy", 0, nil, "12"}); got.code != codes.Forbidden {
		t.Fatalf("other sensor: %v, want 4.03", got.code)
	}
	// Without a client certificate there is no handshake (no PSK to fall back on).
	if _, err := dialDTLS(t, e.dtls, piondtls.WithRootCAs(pool), piondtls.WithServerName("gateway")); err == nil {
		t.Fatal("a client without a certificate made a session")
	}
}

func TestParsePSK(t *testing.T) {
	good := mustPSK(t, "a:00ff\n  # comment\nb:0102:s1,s2\n\n")
	if good.Len() != 2 {
		t.Fatalf("%d identities", good.Len())
	}
	if e, _ := good.entry("a"); !e.allows("a") || e.allows("b") {
		t.Errorf("a's binding: %v", e.sensors)
	}
	if e, _ := good.entry("b"); !e.allows("s1") || !e.allows("s2") || e.allows("b") {
		t.Errorf("b's binding: %v", e.sensors)
	}
	_, err := ParsePSK("a:zz\nb\nc:0102:\nd:01\nd:02\n:01\ne:01:s 1\nf:0:x\n")
	if err == nil {
		t.Fatal("bad file accepted")
	}
	for _, want := range []string{
		"line 1: the key of \"a\" is not hex",
		"line 2: want identity:hexkey",
		"line 3: the sensor list of \"c\"",
		"line 5: identity \"d\" is listed twice",
		"line 6: identity \"\" is empty",
		"line 7: the sensor list of \"e\"",
		"line 8: the key of \"f\"",
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q:\n%v", want, err)
		}
	}
	if strings.Contains(err.Error(), "zz") {
		t.Errorf("error quotes a key: %v", err)
	}
}

func contextWithTimeout(d time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), d)
}
