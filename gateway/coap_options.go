package gateway

import (
	"errors"
	"fmt"
	"net"
	"strconv"
)

// CoAPOptions are the [coap] section. The zero value of a field means its default.
type CoAPOptions struct {
	// Listen is the UDP host:port of plain CoAP; "" turns it off.
	Listen string
	// DTLSListen is the UDP host:port of CoAP over DTLS; "" turns it off.
	DTLSListen string
	// PSKFile names the pre-shared key file, for messages; PSK is its parsed
	// content (the caller reads the file, refusing one other users can read).
	PSKFile string
	PSK     *PSKTable
	// CAFile verifies client certificates; CertFile and KeyFile are the
	// gateway's own certificate for certificate handshakes.
	CAFile, CertFile, KeyFile string
}

// Enabled reports whether a CoAP listener is configured.
func (o CoAPOptions) Enabled() bool { return o.Listen != "" || o.DTLSListen != "" }

// Validate returns every problem as "key: problem". It reads no file: a
// psk_file's content is checked when it is read.
func (o CoAPOptions) Validate() error {
	var errs []error
	add := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	for _, l := range []struct{ key, addr string }{{"listen", o.Listen}, {"dtls_listen", o.DTLSListen}} {
		if l.addr == "" {
			continue
		}
		if err := validUDPAddr(l.addr); err != nil {
			add("%s: %v", l.key, err)
		}
	}
	if o.Listen != "" && o.Listen == o.DTLSListen {
		add("dtls_listen: %q is also listen: DTLS needs a port of its own", o.DTLSListen)
	}
	if o.DTLSListen != "" && o.PSKFile == "" && o.CAFile == "" {
		add("dtls_listen: set psk_file or ca_file, so that devices can be identified")
	}
	if o.DTLSListen == "" {
		for _, f := range []struct{ key, val string }{{"psk_file", o.PSKFile}, {"ca_file", o.CAFile}, {"cert_file", o.CertFile}} {
			if f.val != "" {
				add("%s: set, but dtls_listen is empty", f.key)
			}
		}
	}
	if (o.CertFile == "") != (o.KeyFile == "") {
		add("cert_file: cert_file and key_file go together")
	}
	if o.CAFile != "" && o.CertFile == "" {
		add("ca_file: verifying device certificates needs the gateway's own cert_file and key_file")
	}
	return errors.Join(errs...)
}

func validUDPAddr(addr string) error {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%q is not host:port", addr)
	}
	if n, err := strconv.Atoi(port); err != nil || n < 0 || n > 65535 {
		return fmt.Errorf("%q: port %q is not a number 0..65535", addr, port)
	}
	if host != "" && net.ParseIP(host) == nil && host != "localhost" {
		return fmt.Errorf("%q: host must be an IP address", addr)
	}
	return nil
}
