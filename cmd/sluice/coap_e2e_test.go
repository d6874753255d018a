package main

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sluice-gw/sluice/internal/testenv"
)

// needCoAPClient returns the path of a libcoap client (see needBinary).
func needCoAPClient(t *testing.T, name string) string {
	t.Helper()
	return needBinary(t, name, "libcoap3-bin")
}

// coapConfig is the [coap] section of a test config. The keys are written
// without spaces round '=': the harness takes a `listen = ` line for the
// admin address.
func coapConfig(listen, dtlsListen, pskFile string) string {
	return fmt.Sprintf("\n[coap]\nlisten=%q\ndtls_listen=%q\npsk_file=%q\n", listen, dtlsListen, pskFile)
}

// libcoap runs one libcoap client request and returns what it printed.
func libcoap(t *testing.T, bin string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, append([]string{"-B", "10"}, args...)...).CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

// TestCoAPLibcoapExactlyOnce: libcoap's clients, which nobody on the team
// wrote, post SenML JSON to a real gateway over plain CoAP and DTLS-PSK; every
// reading they were answered 2.04 for lands in Postgres exactly once, and a
// post for a sensor the identity is not bound to is refused 4.03.
func TestCoAPLibcoapExactlyOnce(t *testing.T) {
	notls := needCoAPClient(t, "coap-client-notls")
	gnutls := needCoAPClient(t, "coap-client-gnutls")
	broker := testenv.StartMosquitto(t, testenv.MosquittoOptions{})
	dsn := testenv.SharedPostgres(t).NewDatabase(t)
	dir := t.TempDir()
	const secret = "meter-1-secret"
	psk := filepath.Join(dir, "psk")
	if err := os.WriteFile(psk, []byte("meter-1:"+hex.EncodeToString([]byte(secret))+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	port, dport := testenv.FreeUDPPort(t), testenv.FreeUDPPort(t)
	extra := coapConfig(fmt.Sprintf("127.0.0.1:%d", port), fmt.Sprintf("127.0.0.1:%d", dport), psk)
	g := startGateway(t, gatewayConfig(t, t.TempDir(), broker.URL(), dsn, testenv.FreePort(t), extra))
	g.waitHTTP("/readyz", 20*time.Second)

	const posts = 15
	base := time.Now().Add(-time.Hour).Unix()
	for i := range posts {
		// Four timed records and one untimed (stamped by the gateway) a post.
		pack := fmt.Sprintf(`[{"bn":"feeder-1:","bt":%d,"n":"voltage","u":"V","v":%d},{"n":"current","u":"A","v":%d,"t":1},`+
			`{"n":"voltage","u":"V","v":%d,"t":2},{"n":"current","u":"A","v":%d,"t":3},{"n":"seq","v":%d,"t":0}]`,
			base+int64(10*i), i, i, i, i, i)
		out, err := libcoap(t, notls, "-m", "post", "-t", "110", "-e", pack, fmt.Sprintf("coap://127.0.0.1:%d/s/feeder-1", port))
		if err != nil || out != "" {
			t.Fatalf("coap-client-notls post %d: %v: %s", i, err, out)
		}
		pack = strings.ReplaceAll(pack, "feeder-1:", "meter-1:")
		out, err = libcoap(t, gnutls, "-m", "post", "-t", "110", "-u", "meter-1", "-k", secret, "-e", pack,
			fmt.Sprintf("coaps://127.0.0.1:%d/s/meter-1", dport))
		if err != nil || out != "" {
			t.Fatalf("coap-client-gnutls post %d: %v: %s", i, err, out)
		}
	}
	// Untimed plain numbers through the path's metric.
	for i := range posts {
		out, err := libcoap(t, gnutls, "-m", "put", "-t", "0", "-u", "meter-1", "-k", secret, "-e", fmt.Sprint(1000+i),
			fmt.Sprintf("coaps://127.0.0.1:%d/s/meter-1/pulses", dport))
		if err != nil || out != "" {
			t.Fatalf("coap-client-gnutls put %d: %v: %s", i, err, out)
		}
	}
	// Refused: another sensor's name, a wrong key.
	out, _ := libcoap(t, gnutls, "-m", "post", "-t", "0", "-u", "meter-1", "-k", secret, "-e", "1",
		fmt.Sprintf("coaps://127.0.0.1:%d/s/feeder-1/x", dport))
	if !strings.Contains(out, "4.03") {
		t.Errorf("post for an unbound sensor: %q, want 4.03", out)
	}
	out, _ = libcoap(t, gnutls, "-B", "3", "-m", "post", "-t", "0", "-u", "meter-1", "-k", "wrong", "-e", "1",
		fmt.Sprintf("coaps://127.0.0.1:%d/s/meter-1/x", dport))
	if strings.Contains(out, "2.04") {
		t.Errorf("a wrong key was accepted: %q", out)
	}

	want := int64(2*posts*5 + posts)
	waitRows(t, dsn, want, 60*time.Second, "SELECT count(*) FROM sluice.readings")
	time.Sleep(500 * time.Millisecond) // anything extra would show now
	if n := queryInt(t, dsn, "SELECT count(*) FROM sluice.readings"); n != want {
		t.Fatalf("%d rows, want exactly %d", n, want)
	}
	for _, c := range []struct {
		sql  string
		want int64
	}{
		{"SELECT count(*) FROM sluice.readings WHERE sensor = 'feeder-1'", posts * 5},
		{"SELECT count(*) FROM sluice.readings WHERE sensor = 'meter-1' AND metric IN ('voltage', 'current', 'seq')", posts * 5},
		{"SELECT count(DISTINCT value) FROM sluice.readings WHERE sensor = 'meter-1' AND metric = 'pulses'", posts},
		{"SELECT count(*) FROM sluice.readings WHERE sensor = 'feeder-1' AND metric = 'x'", 0},
	} {
		if n := queryInt(t, dsn, c.sql); n != c.want {
			t.Errorf("%s = %d, want %d", c.sql, n, c.want)
		}
	}
	metrics := g.metrics()
	for _, line := range []string{
		fmt.Sprintf(`sluice_readings_received_total{ingress="coap"} %d`, want),
		`sluice_messages_rejected_total{ingress="coap",reason="forbidden"} 1`,
	} {
		if !strings.Contains(metrics, line) {
			t.Errorf("metrics lack %q", line)
		}
	}
}

// TestCoAPPSKFileReadableByOthers: a psk_file that other users can read is
// refused at start, with a line naming the key and the fix.
func TestCoAPPSKFileReadableByOthers(t *testing.T) {
	dir := t.TempDir()
	psk := filepath.Join(dir, "psk")
	if err := os.WriteFile(psk, []byte("meter-1:00112233\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(psk, 0o644); err != nil { // past the umask
		t.Fatal(err)
	}
	cfg := gatewayConfig(t, filepath.Join(dir, "data"), "mqtt://127.0.0.1:1", "postgres://x@127.0.0.1:1/x", testenv.FreePort(t),
		coapConfig(fmt.Sprintf("127.0.0.1:%d", testenv.FreeUDPPort(t)), fmt.Sprintf("127.0.0.1:%d", testenv.FreeUDPPort(t)), psk))
	path := filepath.Join(dir, "sluice.toml")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, sluiceBin, "run", "--config", path).CombinedOutput()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 2 {
		t.Fatalf("sluice run with a readable psk_file: %v, want exit status 2\n%s", err, out)
	}
	want := "coap.psk_file: " + psk + " is readable by other users (mode 0644): chmod 600 it"
	if !strings.Contains(string(out), want) {
		t.Fatalf("output lacks %q:\n%s", want, out)
	}
}
