package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sluice-gw/sluice/internal/testenv"
)

// secretFile writes a 0600 secret file and returns its path.
func secretFile(t *testing.T, name, content string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(path, []byte(content+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestMQTTOverTLSWithClientCertificate: the gateway reaches a Mosquitto TLS
// listener that requires a client certificate and a password, with the
// password and the database password from files, and neither secret shows up
// in its logs.
func TestMQTTOverTLSWithClientCertificate(t *testing.T) {
	ca := testenv.NewCA(t, "sluice-test-ca")
	srv := ca.Issue(t, "broker", "127.0.0.1")
	cli := ca.Issue(t, "sluice-gw")
	const mqttSecret, pgSecret = "mq-Secr3t-1234", "pg-Secr3t-9876"
	pwfile := filepath.Join(t.TempDir(), "mosquitto.passwd")
	if out, err := exec.Command("mosquitto_passwd", "-c", "-b", pwfile, "sluice-gw", mqttSecret).CombinedOutput(); err != nil {
		t.Fatalf("mosquitto_passwd: %v\n%s", err, out)
	}
	tlsPort := testenv.FreePort(t)
	broker := testenv.StartMosquitto(t, testenv.MosquittoOptions{ExtraConf: []string{
		"password_file " + pwfile,
		"listener " + strconv.Itoa(tlsPort) + " 127.0.0.1",
		"cafile " + ca.CertFile,
		"certfile " + srv.CertFile,
		"keyfile " + srv.KeyFile,
		"require_certificate true",
	}})
	pg := testenv.SharedPostgres(t)
	// The role first: cleanups run last-in first-out, and the database the
	// role's objects live in must be dropped before the role.
	role := "gw_" + strings.ReplaceAll(strings.ToLower(t.Name()), "/", "_")
	pg.Query(t, "", fmt.Sprintf("CREATE ROLE %s LOGIN SUPERUSER PASSWORD '%s'", role, pgSecret))
	t.Cleanup(func() { pg.Query(t, "", "DROP ROLE IF EXISTS "+role) })
	dsn := pg.NewDatabase(t)
	db := dsn[strings.LastIndex(dsn, "/")+1:]
	db = strings.SplitN(db, "?", 2)[0]
	dsnFile := secretFile(t, "dsn", fmt.Sprintf("postgres://%s:%s@%s/%s?sslmode=disable", role, pgSecret, pg.Addr(), db))
	mqttPW := secretFile(t, "mqtt-password", mqttSecret)

	cfg := strings.Replace(gatewayConfig(t, t.TempDir(), fmt.Sprintf("mqtts://127.0.0.1:%d", tlsPort), "", testenv.FreePort(t), ""),
		"[uplink]\ndsn = \"\"", "[uplink]\ndsn_file = "+strconvQuote(dsnFile), 1)
	cfg = strings.Replace(cfg, "client_id = \"sluice-e2e\"", fmt.Sprintf(
		"client_id = \"sluice-e2e\"\nusername = \"sluice-gw\"\npassword_file = %s\nca_file = %s\ncert_file = %s\nkey_file = %s",
		strconvQuote(mqttPW), strconvQuote(ca.CertFile), strconvQuote(cli.CertFile), strconvQuote(cli.KeyFile)), 1)
	g := startGateway(t, cfg)
	g.waitHTTP("/readyz", 20*time.Second)
	p := newPublisher(t, broker.Addr(), "tls-sensor")
	p.publishNumbers(t, "sensors/tls/voltage", 0, 100)
	waitRows(t, dsn, 100, 30*time.Second, "SELECT count(*) FROM sluice.readings")
	g.stop()
	for _, secret := range []string{mqttSecret, pgSecret} {
		if strings.Contains(g.out.String(), secret) {
			t.Errorf("the gateway logged a secret (%q)", secret)
		}
	}
	if strings.Contains(g.get("/api/status"), pgSecret) {
		t.Error("the status shows the database password")
	}
}

// TestMQTTWrongPasswordIsRefused: a broker that refuses the credentials
// leaves the gateway running, not ready, and saying why.
func TestMQTTWrongPasswordIsRefused(t *testing.T) {
	pwfile := filepath.Join(t.TempDir(), "mosquitto.passwd")
	if out, err := exec.Command("mosquitto_passwd", "-c", "-b", pwfile, "sluice-gw", "right").CombinedOutput(); err != nil {
		t.Fatalf("mosquitto_passwd: %v\n%s", err, out)
	}
	broker := testenv.StartMosquitto(t, testenv.MosquittoOptions{ExtraConf: []string{"password_file " + pwfile}})
	dsn := testenv.SharedPostgres(t).NewDatabase(t)
	cfg := strings.Replace(gatewayConfig(t, t.TempDir(), broker.URL(), dsn, testenv.FreePort(t), ""),
		"client_id = \"sluice-e2e\"", "client_id = \"sluice-e2e\"\nusername = \"sluice-gw\"\npassword_file = "+strconvQuote(secretFile(t, "pw", "wrong")), 1)
	g := startGateway(t, cfg)
	g.waitHTTPBody("/api/status", "broker refused the connection", 20*time.Second)
	if resp := g.get("/readyz"); !strings.Contains(resp, "not ready") {
		t.Fatalf("/readyz = %q with the broker refusing the gateway", resp)
	}
}

// TestWorldReadableSecretIsRefused: a password file others can read stops
// the start with exit status 2 and a line naming the key and the fix.
func TestWorldReadableSecretIsRefused(t *testing.T) {
	pw := filepath.Join(t.TempDir(), "pw")
	if err := os.WriteFile(pw, []byte("x\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := gatewayConfig(t, t.TempDir(), "mqtt://127.0.0.1:1", "postgres://u@127.0.0.1:1/db", testenv.FreePort(t), "")
	cfg = strings.Replace(cfg, "client_id = \"sluice-e2e\"", "client_id = \"sluice-e2e\"\nusername = \"u\"\npassword_file = "+strconvQuote(pw), 1)
	path := filepath.Join(t.TempDir(), "sluice.toml")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(sluiceBin, "run", "--config", path).CombinedOutput()
	var ee *exec.ExitError
	if !asExit(err, &ee) || ee.ExitCode() != exitUsage {
		t.Fatalf("exit %v, want status %d; output:\n%s", err, exitUsage, out)
	}
	if !strings.Contains(string(out), "mqtt.password_file:") || !strings.Contains(string(out), "chmod 600") {
		t.Fatalf("output does not name the key and the fix:\n%s", out)
	}
}

func strconvQuote(s string) string { return strconv.Quote(s) }

// TestPostgresVerifyFullWithClientCertificate: the uplink reaches a Postgres
// that accepts only TLS with a client certificate (pg_hba "cert"), verifying
// the server's certificate and name (sslmode=verify-full).
func TestPostgresVerifyFullWithClientCertificate(t *testing.T) {
	ca := testenv.NewCA(t, "pg-test-ca")
	srv := ca.Issue(t, "postgres-server", "127.0.0.1")
	cli := ca.Issue(t, testenv.PostgresUser) // cert auth: the CN is the role
	caPEM, err := os.ReadFile(ca.CertFile)
	if err != nil {
		t.Fatal(err)
	}
	pg := testenv.StartPostgres(t, testenv.PostgresOptions{
		Files: map[string][]byte{
			"server.crt": srv.CertPEM, "server.key": srv.KeyPEM, "root.crt": caPEM,
			"pg_hba.conf": []byte("local all all trust\n" +
				"hostssl all all 127.0.0.1/32 cert\n" +
				"hostnossl all all 127.0.0.1/32 scram-sha-256\n"),
		},
		ExtraConf: []string{"ssl = on", "ssl_cert_file = 'server.crt'", "ssl_key_file = 'server.key'", "ssl_ca_file = 'root.crt'"},
	})
	plain := pg.NewDatabase(t)
	db := strings.SplitN(plain[strings.LastIndex(plain, "/")+1:], "?", 2)[0]
	tlsDSN := fmt.Sprintf("postgres://%s@%s/%s?sslmode=verify-full&sslrootcert=%s&sslcert=%s&sslkey=%s",
		testenv.PostgresUser, pg.Addr(), db, ca.CertFile, cli.CertFile, cli.KeyFile)
	broker := testenv.StartMosquitto(t, testenv.MosquittoOptions{})
	g := startGateway(t, gatewayConfig(t, t.TempDir(), broker.URL(), tlsDSN, testenv.FreePort(t), ""))
	g.waitHTTP("/readyz", 20*time.Second)
	p := newPublisher(t, broker.Addr(), "pg-tls-sensor")
	p.publishNumbers(t, "sensors/pgtls/flow", 0, 50)
	waitRows(t, plain, 50, 30*time.Second, "SELECT count(*) FROM sluice.readings")
	if n := queryInt(t, plain, "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE s.ssl AND s.client_dn LIKE '%"+testenv.PostgresUser+"%' AND a.application_name LIKE 'sluice %'"); n == 0 {
		t.Fatal("the gateway's connection is not TLS with its client certificate")
	}

	// A gateway that trusts another CA refuses the server.
	g.stop()
	other := testenv.NewCA(t, "other-ca")
	bad := strings.Replace(tlsDSN, "sslrootcert="+ca.CertFile, "sslrootcert="+other.CertFile, 1)
	g2 := startGateway(t, gatewayConfig(t, t.TempDir(), broker.URL(), bad, testenv.FreePort(t), ""))
	g2.waitHTTPBody("/api/status", "certificate", 30*time.Second)
}
