package gateway

import (
	"fmt"
	"strings"
	"testing"
)

func TestCoAPOptionsValidate(t *testing.T) {
	cases := []struct {
		name string
		opts CoAPOptions
		want []string // one "key: problem" line each; none for valid options
	}{
		{"off", CoAPOptions{}, nil},
		{"plain", CoAPOptions{Listen: "0.0.0.0:5683"}, nil},
		{"dtls with psk", CoAPOptions{DTLSListen: ":5684", PSKFile: "psk"}, nil},
		{"dtls with certificates", CoAPOptions{DTLSListen: "[::]:5684", CAFile: "ca", CertFile: "c", KeyFile: "k"}, nil},
		{"bad addresses", CoAPOptions{Listen: "5683", DTLSListen: "example.org:x"}, []string{
			`listen: "5683" is not host:port`,
			`dtls_listen: "example.org:x": port "x" is not a number`,
			"dtls_listen: set psk_file or ca_file",
		}},
		{"host name", CoAPOptions{Listen: "gateway.local:5683"}, []string{`listen: "gateway.local:5683": host must be an IP address`}},
		{"same port twice", CoAPOptions{Listen: ":5683", DTLSListen: ":5683", PSKFile: "p"}, []string{"dtls_listen: \":5683\" is also listen"}},
		{"dtls files without dtls", CoAPOptions{Listen: ":5683", PSKFile: "p", CAFile: "c", CertFile: "c", KeyFile: "k"}, []string{
			"psk_file: set, but dtls_listen is empty", "ca_file: set, but dtls_listen is empty", "cert_file: set, but dtls_listen is empty",
		}},
		{"cert without key", CoAPOptions{DTLSListen: ":5684", PSKFile: "p", CertFile: "c"}, []string{"cert_file: cert_file and key_file go together"}},
		{"ca without own certificate", CoAPOptions{DTLSListen: ":5684", CAFile: "c"}, []string{"ca_file: verifying device certificates needs the gateway's own cert_file"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := c.opts.Validate()
			var got []string
			if err != nil {
				got = strings.Split(err.Error(), "\n")
			}
			if len(got) != len(c.want) {
				t.Fatalf("problems:\n%s\nwant %d: %q", strings.Join(got, "\n"), len(c.want), c.want)
			}
			for i, w := range c.want {
				if !strings.HasPrefix(got[i], w) {
					t.Errorf("problem %d: %q, want it to start %q", i, got[i], w)
				}
			}
		})
	}
}

func ExampleParsePSK() {
	t, err := ParsePSK(`
# identity:hexkey binds the identity to the sensor of its name
feeder-1:00112233445566778899aabbccddeeff
# identity:hexkey:sensors binds it to those
hub-7:0102030405060708:tank-1,tank-2
`)
	if err != nil {
		fmt.Println(err)
		return
	}
	hub, _ := t.entry("hub-7")
	fmt.Println(t.Len(), hub.allows("tank-2"), hub.allows("hub-7"))
	_, err = ParsePSK("meter-1:not-hex\n")
	fmt.Println(err)
	// Output:
	// 2 true false
	// line 1: the key of "meter-1" is not hex digits in pairs
}
