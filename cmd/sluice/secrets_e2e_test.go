package main

import (
	"encoding/hex"
	"fmt"
	"net/http"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sluice-gw/sluice/internal/testenv"
)

// TestSecuritySecretsNeverShown: a gateway logging at debug level, given
// every kind of secret it takes, each from a file (the database password in
// dsn_file, the broker password, a CoAP pre-shared key, the admin token),
// and exercised along each path that handles them (a DTLS handshake with a
// wrong key, admin requests with a wrong token, good traffic both ways),
// shows none of them, nor a wrong guess, in its log, /api/status, /metrics,
// the status page, `sluice status` or `sluice config show`.
func TestSecuritySecretsNeverShown(t *testing.T) {
	gnutls := needCoAPClient(t, "coap-client-gnutls")
	const (
		pgSecret    = "pg-S3cret-4711"
		mqttSecret  = "mq-S3cret-0815"
		pskSecret   = "psk-S3cret-42"
		tokenSecret = "adm-S3cret-1234"
		wrongPSK    = "psk-Wr0ng-guess"
		wrongToken  = "adm-Wr0ng-guess"
	)
	pwfile := filepath.Join(t.TempDir(), "mosquitto.passwd")
	if out, err := exec.Command("mosquitto_passwd", "-c", "-b", pwfile, "sluice-gw", mqttSecret).CombinedOutput(); err != nil {
		t.Fatalf("mosquitto_passwd: %v\n%s", err, out)
	}
	broker := testenv.StartMosquitto(t, testenv.MosquittoOptions{ExtraConf: []string{"password_file " + pwfile}})
	pg := testenv.SharedPostgres(t)
	role := "gw_secrets_" + strings.ToLower(strings.ReplaceAll(t.Name(), "/", "_"))
	pg.Query(t, "", fmt.Sprintf("CREATE ROLE %s LOGIN SUPERUSER PASSWORD '%s'", role, pgSecret))
	t.Cleanup(func() { pg.Query(t, "", "DROP ROLE IF EXISTS "+role) }) // after the database, which cleans up first
	dsn := pg.NewDatabase(t)
	db := strings.SplitN(dsn[strings.LastIndex(dsn, "/")+1:], "?", 2)[0]
	dsnFile := secretFile(t, "dsn", fmt.Sprintf("postgres://%s:%s@%s/%s?sslmode=disable", role, pgSecret, pg.Addr(), db))
	pskFile := secretFile(t, "psk", "meter-7:"+hex.EncodeToString([]byte(pskSecret)))
	tokenFile := secretFile(t, "token", tokenSecret)
	dport := testenv.FreeUDPPort(t)

	cfg := strings.Replace(gatewayConfig(t, t.TempDir(), broker.URL(), "", testenv.FreePort(t),
		fmt.Sprintf("\n[coap]\ndtls_listen=%q\npsk_file=%q\n", fmt.Sprintf("127.0.0.1:%d", dport), pskFile)),
		"[uplink]\ndsn = \"\"", "[uplink]\ndsn_file = "+strconvQuote(dsnFile), 1)
	cfg = strings.Replace(cfg, "client_id = \"sluice-e2e\"",
		"client_id = \"sluice-e2e\"\nusername = \"sluice-gw\"\npassword_file = "+strconvQuote(secretFile(t, "mqtt-pw", mqttSecret)), 1)
	cfg = strings.Replace(cfg, "[log]", "token_file = "+strconvQuote(tokenFile)+"\n\n[log]", 1)
	g := startGateway(t, cfg)
	base := "http://" + g.admin
	bearer := func(tok string) []string { return []string{"Authorization", "Bearer " + tok} }
	deadline := time.Now().Add(30 * time.Second)
	for {
		code, body := httpStatus(t, base+"/api/status", bearer(tokenSecret)...)
		if code == http.StatusOK && strings.Count(body, `"up": true`) == 2 {
			break // MQTT and CoAP up
		}
		if time.Now().After(deadline) {
			t.Fatalf("not both ingresses up: %d %s", code, body)
		}
		time.Sleep(100 * time.Millisecond)
	}

	// Good traffic both ways, a wrong key, a wrong token.
	p := newPublisher(t, broker.Addr(), "secrets-sensor")
	if err := p.publish("sensors/meter-8/level", []byte("1")); err != nil {
		t.Fatal(err)
	}
	url := fmt.Sprintf("coaps://127.0.0.1:%d/s/meter-7/level", dport)
	if out, err := libcoap(t, gnutls, "-m", "post", "-t", "0", "-u", "meter-7", "-k", pskSecret, "-e", "2", url); err != nil || out != "" {
		t.Fatalf("DTLS post with the right key: %v: %s", err, out)
	}
	if out, _ := libcoap(t, gnutls, "-B", "3", "-m", "post", "-t", "0", "-u", "meter-7", "-k", wrongPSK, "-e", "3", url); strings.Contains(out, "2.04") {
		t.Fatalf("a wrong key was accepted: %s", out)
	}
	for _, path := range []string{"/api/status", "/metrics", "/"} {
		if code, _ := httpStatus(t, base+path, bearer(wrongToken)...); code != http.StatusUnauthorized {
			t.Fatalf("GET %s with a wrong token = %d", path, code)
		}
	}
	waitRows(t, dsn, 2, 30*time.Second, "SELECT count(*) FROM sluice.readings")

	shown := map[string]string{}
	for _, path := range []string{"/api/status", "/metrics", "/"} {
		_, shown["GET "+path] = httpStatus(t, base+path, bearer(tokenSecret)...)
	}
	shown["sluice status"] = expectCLI(t, 0, nil, "status", "--config", g.config).stdout
	show := sluiceCLI(t, "config", "show", "--config", g.config)
	shown["sluice config show"] = show.stdout + show.stderr
	g.stop()
	shown["the log"] = g.out.String()
	for where, text := range shown {
		if text == "" {
			t.Fatalf("%s: nothing to check", where)
		}
		for _, secret := range []string{pgSecret, mqttSecret, pskSecret, hex.EncodeToString([]byte(pskSecret)), tokenSecret, wrongPSK, wrongToken} {
			if strings.Contains(text, secret) {
				t.Errorf("%s shows a secret (%q)", where, secret)
			}
		}
	}
}
