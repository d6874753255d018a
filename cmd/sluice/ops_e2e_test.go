package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil/promlint"

	"github.com/sluice-gw/sluice/gateway"
	"github.com/sluice-gw/sluice/internal/testenv"
	"github.com/sluice-gw/sluice/uplink"
)

// cliResult is one run of the sluice binary as a CLI.
type cliResult struct {
	stdout, stderr string
	code           int
}

// sluiceCLI runs the binary with args, bounded in time.
func sluiceCLI(t *testing.T, args ...string) cliResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, sluiceBin, args...)
	var out, errOut syncBuffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	res := cliResult{stdout: out.String(), stderr: errOut.String()}
	var exit *exec.ExitError
	switch {
	case errors.As(err, &exit):
		res.code = exit.ExitCode()
	case err != nil:
		t.Fatalf("sluice %s: %v", strings.Join(args, " "), err)
	}
	return res
}

// expectCLI runs the binary and checks its exit status and that stdout
// holds every one of wants.
func expectCLI(t *testing.T, code int, wants []string, args ...string) cliResult {
	t.Helper()
	res := sluiceCLI(t, args...)
	if res.code != code {
		t.Fatalf("sluice %s: exit %d, want %d\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), res.code, code, res.stdout, res.stderr)
	}
	for _, w := range wants {
		if !strings.Contains(res.stdout, w) {
			t.Fatalf("sluice %s: stdout lacks %q:\n%s\nstderr:\n%s", strings.Join(args, " "), w, res.stdout, res.stderr)
		}
	}
	return res
}

// httpStatus GETs an admin path and returns the status code and body.
func httpStatus(t *testing.T, url string, header ...string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	resp, err := (&http.Client{Timeout: 10 * time.Second}).Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// adminStatus decodes /api/status.
func (g *gatewayProc) adminStatus() gateway.Status {
	g.t.Helper()
	var st gateway.Status
	if err := json.Unmarshal([]byte(g.get("/api/status")), &st); err != nil {
		g.t.Fatalf("/api/status: %v", err)
	}
	return st
}

// waitHealth waits until /api/status says health.
func (g *gatewayProc) waitHealth(health string, d time.Duration) gateway.Status {
	g.t.Helper()
	deadline := time.Now().Add(d)
	for {
		st := g.adminStatus()
		if st.Health == health {
			return st
		}
		if time.Now().After(deadline) {
			g.t.Fatalf("health %s after %s, want %s: %q", st.Health, d, health, st.Reasons)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// fleetRow reads one gateway's row from `sluice fleet --json`.
func fleetRow(t *testing.T, dsn, gatewayID string) uplink.FleetRow {
	t.Helper()
	res := expectCLI(t, 0, nil, "fleet", "--dsn", dsn, "--json")
	var rows []uplink.FleetRow
	if err := json.Unmarshal([]byte(res.stdout), &rows); err != nil {
		t.Fatalf("fleet --json: %v\n%s", err, res.stdout)
	}
	for _, r := range rows {
		if r.GatewayID == gatewayID {
			return r
		}
	}
	t.Fatalf("fleet --json has no row for %s: %s", gatewayID, res.stdout)
	return uplink.FleetRow{}
}

// publishSensors sends what the sensor-health checks look for: meter-1
// with sequence numbers 1 2 3 6 7 (two lost), pump-2 with plain values.
func publishSensors(t *testing.T, p *publisher) {
	t.Helper()
	for _, seq := range []int{1, 2, 3, 6, 7} {
		payload := fmt.Sprintf(`{"value": %d.5, "unit": "W", "seq": %d}`, seq, seq)
		if err := p.publish("sensors/meter-1/power", []byte(payload)); err != nil {
			t.Fatal(err)
		}
	}
	p.publishNumbers(t, "sensors/pump-2/flow", 0, 3)
}

var contractMetrics = []string{
	"sluice_readings_received_total", "sluice_messages_rejected_total", "sluice_readings_dropped_total",
	"sluice_redeliveries_total", "sluice_buffer_readings", "sluice_buffer_bytes", "sluice_buffer_oldest_age_seconds",
	"sluice_uplink_readings_total", "sluice_uplink_batches_total", "sluice_uplink_batch_duration_seconds",
	"sluice_uplink_up", "sluice_uplink_duplicates_skipped_total", "sluice_buffer_commit_duration_seconds",
	"sluice_dead_letters", "sluice_sensor_gaps_total", "sluice_sensors_stale",
}

// TestOpsHealthy: every endpoint and verb on a healthy gateway, sensor
// health from the edge to sluice.sensors, and the heartbeat history.
func TestOpsHealthy(t *testing.T) {
	broker := testenv.StartMosquitto(t, testenv.MosquittoOptions{})
	dsn := testenv.SharedPostgres(t).NewDatabase(t)
	g := startGateway(t, gatewayConfig(t, t.TempDir(), broker.URL(), dsn, testenv.FreePort(t), ""))
	g.waitHTTP("/readyz", 20*time.Second)
	publishSensors(t, newPublisher(t, broker.Addr(), "ops-sensors"))
	waitRows(t, dsn, 8, 30*time.Second, "SELECT count(*) FROM sluice.readings")
	base := "http://" + g.admin

	if code, body := httpStatus(t, base+"/healthz"); code != 200 || body != "ok\n" {
		t.Fatalf("/healthz = %d %q", code, body)
	}
	if code, body := httpStatus(t, base+"/readyz"); code != 200 {
		t.Fatalf("/readyz = %d %q", code, body)
	}
	st := g.waitHealth(gateway.HealthOK, 20*time.Second)
	if st.Gateway.ID != "gw-e2e" || st.Gateway.Site != "e2e" || st.Gateway.Version == "" || st.Gateway.UptimeSeconds <= 0 {
		t.Fatalf("gateway part of the status: %+v", st.Gateway)
	}
	if len(st.Ingress) != 1 || !st.Ingress[0].Up || st.Uplink.State != "up" || st.Uplink.LastSuccess.IsZero() || !st.Clock.Synced {
		t.Fatalf("ingress %+v, uplink %+v, clock %+v", st.Ingress, st.Uplink, st.Clock)
	}
	if st.Uplink.SchemaVersion != uplink.SchemaVersion() || st.Buffer.MaxBytes == 0 || len(st.BacklogHistory) == 0 {
		t.Fatalf("uplink schema %d, buffer %+v, history %d samples", st.Uplink.SchemaVersion, st.Buffer, len(st.BacklogHistory))
	}
	sensors := map[string]gateway.SensorStatus{}
	for _, s := range st.Sensors {
		sensors[s.Sensor] = s
	}
	if m := sensors["meter-1"]; m.Gaps != 2 || m.GapsFrom != "seq" || m.Readings != 5 || m.Stale {
		t.Fatalf("meter-1 = %+v, want 5 readings and 2 gaps from seq", m)
	}
	if p := sensors["pump-2"]; p.Readings != 3 || p.Gaps != 0 {
		t.Fatalf("pump-2 = %+v, want 3 readings and no gap", p)
	}

	code, text := httpStatus(t, base+"/metrics")
	if code != 200 {
		t.Fatalf("/metrics = %d", code)
	}
	problems, err := promlint.New(strings.NewReader(text)).Lint()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("/metrics lint: %s: %s", p.Metric, p.Text)
	}
	for _, name := range contractMetrics {
		if !strings.Contains(text, "\n# TYPE "+name+" ") {
			t.Errorf("/metrics lacks %s", name)
		}
	}
	if !strings.Contains(text, "\nsluice_sensor_gaps_total 2\n") || !strings.Contains(text, "\nsluice_sensors_stale 0\n") {
		t.Errorf("sensor metrics wrong:\n%s", grepLines(text, "sluice_sensor"))
	}

	expectCLI(t, 0, []string{"gw-e2e", "HEALTHY", "ok    mqtt", "sensors  2 tracked, 0 stale, 2 gaps"}, "status", "--admin", base)
	expectCLI(t, 0, []string{"HEALTHY"}, "status", "--config", g.config)
	var js gateway.Status
	if res := expectCLI(t, 0, nil, "status", "--admin", base, "--json"); json.Unmarshal([]byte(res.stdout), &js) != nil || js.Health != "ok" {
		t.Fatalf("status --json: %s", res.stdout)
	}

	doc := expectCLI(t, 0, []string{"ok    config", "ok    data dir", "is writable and fsyncs, on", "ok    disk", "warn  dsn", "ok    postgres",
		"schema v" + fmt.Sprint(uplink.SchemaVersion()), "not encrypted", "ok    clock", "ok    broker", "2 subscriptions granted",
		"ok    queue", "served by the running gateway", "0 failed"},
		"doctor", "--config", g.config, "--mosquitto-conf", filepath.Join(broker.Dir(), "mosquitto.conf"))
	t.Logf("doctor:\n%s", doc.stdout)

	// The heartbeat carries the sensors; last_seen is the server's time.
	waitRows(t, dsn, 1, 20*time.Second, `SELECT count(*) FROM sluice.sensors WHERE gateway_id = 'gw-e2e' AND sensor = 'meter-1'
		AND gaps = 2 AND readings = 5 AND NOT stale AND last_seen > now() - interval '1 minute' AND last_seen <= now()`)
	waitRows(t, dsn, 2, 20*time.Second, "SELECT count(*) FROM sluice.gateway_heartbeats WHERE gateway_id = 'gw-e2e' AND sensor_gaps = 2")
	row := fleetRow(t, dsn, "gw-e2e")
	if row.Status != "ok" || row.SensorGaps != 2 || row.SensorsStale != 0 || row.BacklogReadings != 0 || row.Site != "e2e" {
		t.Fatalf("fleet row %+v", row)
	}
	expectCLI(t, 0, []string{"GATEWAY", "gw-e2e", "1 gateways: 1 ok"}, "fleet", "--dsn", dsn)

	g.stop()
	if res := sluiceCLI(t, "status", "--admin", base); res.code != 1 || !strings.Contains(res.stderr, "cannot reach the gateway") {
		t.Fatalf("status of a stopped gateway: exit %d, stderr %q", res.code, res.stderr)
	}
}

func grepLines(text, substr string) string {
	var out []string
	for _, l := range strings.Split(text, "\n") {
		if strings.Contains(l, substr) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// TestOpsBrokerDown: a broker that is down at boot is no failed start; the
// gateway is not ready and says why, status and doctor fail, and it becomes
// ready once the broker is back.
func TestOpsBrokerDown(t *testing.T) {
	broker := testenv.StartMosquitto(t, testenv.MosquittoOptions{})
	dsn := testenv.SharedPostgres(t).NewDatabase(t)
	broker.Stop(t)
	g := startGateway(t, gatewayConfig(t, t.TempDir(), broker.URL(), dsn, testenv.FreePort(t), ""))
	base := "http://" + g.admin

	if code, body := httpStatus(t, base+"/readyz"); code != 503 || !strings.Contains(body, "mqtt") {
		t.Fatalf("/readyz with the broker down = %d %q, want 503 naming mqtt", code, body)
	}
	g.waitHTTPBody("/api/status", `"state": "disconnected"`, 20*time.Second)
	st := g.adminStatus()
	if st.Health != gateway.HealthFailing || !strings.Contains(strings.Join(st.Reasons, ";"), "MQTT: disconnected") {
		t.Fatalf("health %s, reasons %q", st.Health, st.Reasons)
	}
	res := expectCLI(t, 1, []string{"NOT WORKING", "fail  mqtt"}, "status", "--admin", base)
	if !strings.Contains(res.stderr, "gw-e2e is failing") {
		t.Fatalf("status stderr: %q", res.stderr)
	}
	expectCLI(t, 1, []string{"FAIL  broker", "unreachable", "fix: start the broker", "ok    postgres"}, "doctor", "--config", g.config)
	// The uplink still reports centrally.
	waitRows(t, dsn, 1, 20*time.Second, "SELECT count(*) FROM sluice.uplink_health WHERE gateway_id = 'gw-e2e' AND status = 'ok'")
	if row := fleetRow(t, dsn, "gw-e2e"); row.Status != "ok" {
		t.Fatalf("fleet row %+v", row)
	}

	broker.Start(t)
	g.waitHTTP("/readyz", 40*time.Second)
	expectCLI(t, 0, []string{"HEALTHY"}, "status", "--admin", base)
}

// proxiedGateway is a ready gateway whose Postgres link runs through a
// fault proxy, with its broker, its database's direct DSN and the proxy.
type proxiedGateway struct {
	*gatewayProc
	broker *testenv.Mosquitto
	dsn    string
	proxy  *testenv.Proxy
}

func startProxiedGateway(t *testing.T, extra string) proxiedGateway {
	t.Helper()
	broker := testenv.StartMosquitto(t, testenv.MosquittoOptions{})
	pg := testenv.SharedPostgres(t)
	dsn := pg.NewDatabase(t)
	proxy := testenv.StartProxy(t, pg.Addr())
	g := startGateway(t, gatewayConfig(t, t.TempDir(), broker.URL(), replaceHostPort(t, dsn, proxy.Addr()), testenv.FreePort(t), extra))
	g.waitHTTP("/readyz", 20*time.Second)
	waitRows(t, dsn, 1, 20*time.Second, "SELECT count(*) FROM sluice.gateways") // the schema is in place
	return proxiedGateway{gatewayProc: g, broker: broker, dsn: dsn, proxy: proxy}
}

// TestOpsPostgresDown: with the central database unreachable the gateway
// stays ready, says it needs attention, doctor fails on Postgres, and the
// fleet view shows the gateway stale.
func TestOpsPostgresDown(t *testing.T) {
	pgw := startProxiedGateway(t, "")
	g, broker, dsn, proxy := pgw.gatewayProc, pgw.broker, pgw.dsn, pgw.proxy
	proxy.Cut()
	p := newPublisher(t, broker.Addr(), "pgdown-sensor")
	p.publishNumbers(t, "sensors/pg-down/level", 0, 50)
	base := "http://" + g.admin
	g.waitHTTPBody("/api/status", `"state": "retrying"`, 30*time.Second)
	g.waitHTTPBody("/api/status", `"readings": 50,`, 10*time.Second)
	if st := g.adminStatus(); st.Health != gateway.HealthDegraded || st.Uplink.LastError == "" {
		t.Fatalf("health %s, uplink %+v", st.Health, st.Uplink)
	}
	if code, _ := httpStatus(t, base+"/readyz"); code != 200 {
		t.Fatalf("/readyz = %d with only Postgres down, want 200", code)
	}
	expectCLI(t, 1, []string{"NEEDS ATTENTION", "warn  uplink", "unreachable, retrying", "buffer   50 readings"}, "status", "--admin", base)
	expectCLI(t, 1, []string{"FAIL  postgres", "unreachable", "fix: check the DSN", "ok    broker"}, "doctor", "--config", g.config)
	waitRows(t, dsn, 1, 20*time.Second, "SELECT count(*) FROM sluice.uplink_health WHERE gateway_id = 'gw-e2e' AND status IN ('stale', 'offline')")
	if row := fleetRow(t, dsn, "gw-e2e"); row.Status != "stale" && row.Status != "offline" {
		t.Fatalf("fleet row %+v, want stale", row)
	}
	expectCLI(t, 0, []string{"gw-e2e", "stale"}, "fleet", "--dsn", dsn)

	proxy.Heal()
	waitRows(t, dsn, 50, 30*time.Second, "SELECT count(*) FROM sluice.readings")
	g.waitHTTPBody("/api/status", `"state": "up"`, 30*time.Second)
}

// TestOpsBufferFull: a full buffer is a red gateway in status and on the
// metrics, and the fleet view shows the backlog.
func TestOpsBufferFull(t *testing.T) {
	pgw := startProxiedGateway(t, "[buffer]\nmax_bytes = \"1MiB\"\non_full = \"reject\"\n")
	g, broker, dsn, proxy := pgw.gatewayProc, pgw.broker, pgw.dsn, pgw.proxy
	proxy.Cut()
	p := newPublisher(t, broker.Addr(), "full-ops-sensor")
	pad := strings.Repeat("y", 8000)
	for i := range 200 { // 1.6 MB of strings for a 1 MiB buffer
		if err := p.publish("sensors/full-ops/blob", []byte(fmt.Sprintf(`{"value": "%d %s"}`, i, pad))); err != nil {
			t.Fatal(err)
		}
	}
	base := "http://" + g.admin
	st := g.waitHealth(gateway.HealthFailing, 30*time.Second)
	if !st.Buffer.Full || !strings.Contains(strings.Join(st.Reasons, ";"), "buffer full") {
		t.Fatalf("buffer %+v, reasons %q", st.Buffer, st.Reasons)
	}
	expectCLI(t, 1, []string{"NOT WORKING", "fail  buffer", "held back"}, "status", "--admin", base)
	if m := g.metrics(); !regexp.MustCompile(`sluice_messages_rejected_total\{ingress="mqtt",reason="buffer_full"\} [1-9]`).MatchString(m) {
		t.Fatalf("buffer_full not counted:\n%s", grepLines(m, "buffer_full"))
	}
	if code, _ := httpStatus(t, base+"/readyz"); code != 200 {
		t.Fatalf("/readyz = %d: a full buffer is still open with its ingress up", code)
	}
	expectCLI(t, 1, []string{"FAIL  postgres", "ok    disk"}, "doctor", "--config", g.config)
	// A thin link back: the heartbeat (its own connection, a few hundred
	// bytes) gets through while the backlog (1 MB) is still on its way, so
	// the fleet view sees the backlog instead of racing its upload.
	proxy.SetBandwidth(16 << 10)
	proxy.Heal()
	waitRows(t, dsn, 1, 30*time.Second, "SELECT count(*) FROM sluice.gateway_heartbeats WHERE gateway_id = 'gw-e2e' AND backlog_readings > 0")
	expectCLI(t, 0, []string{"gw-e2e"}, "fleet", "--dsn", dsn)
	proxy.SetBandwidth(0)
	// Held messages come in as the uplink makes room; none is lost. (The
	// burst-and-silence sensor may well show stale now: that is not asserted.)
	waitRows(t, dsn, 200, 90*time.Second, "SELECT count(*) FROM sluice.readings")
	g.waitHTTPBody("/api/status", `"full": false`, 20*time.Second)
}

// TestOpsAdminToken: an admin endpoint off loopback needs a token file; with
// one, every endpoint but /healthz asks for it, and status sends it.
func TestOpsAdminToken(t *testing.T) {
	broker := testenv.StartMosquitto(t, testenv.MosquittoOptions{})
	dsn := testenv.SharedPostgres(t).NewDatabase(t)
	port := testenv.FreePort(t)
	dir := t.TempDir()
	open := strings.Replace(gatewayConfig(t, t.TempDir(), broker.URL(), dsn, port, ""),
		fmt.Sprintf(`listen = "127.0.0.1:%d"`, port), fmt.Sprintf(`listen = "0.0.0.0:%d"`, port), 1)
	bad := filepath.Join(dir, "open.toml")
	if err := os.WriteFile(bad, []byte(open), 0o600); err != nil {
		t.Fatal(err)
	}
	res := sluiceCLI(t, "run", "--config", bad)
	if res.code != 2 || !strings.Contains(res.stderr, "admin.token_file: required") {
		t.Fatalf("run with an open admin and no token: exit %d, stderr %q", res.code, res.stderr)
	}

	const token = "field-tech-token-42"
	tokenFile := filepath.Join(dir, "admin-token")
	if err := os.WriteFile(tokenFile, []byte(token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	guarded := strings.Replace(open, "[log]", fmt.Sprintf("token_file = %q\n\n[log]", tokenFile), 1)
	g := startGateway(t, guarded)
	base := fmt.Sprintf("http://127.0.0.1:%d", port)
	for _, path := range []string{"/readyz", "/api/status", "/metrics", "/"} {
		if code, body := httpStatus(t, base+path); code != 401 || strings.Contains(body, token) {
			t.Fatalf("GET %s without the token = %d", path, code)
		}
		if code, body := httpStatus(t, base+path, "Authorization", "Bearer "+token); code != 200 && !(path == "/readyz" && code == 503) {
			t.Fatalf("GET %s with the token = %d %q", path, code, body)
		}
	}
	if code, _ := httpStatus(t, base+"/healthz"); code != 200 {
		t.Fatalf("/healthz needs no token, got %d", code)
	}
	g.waitHTTPBodyAuth(base+"/api/status", token, `"health": "ok"`)
	expectCLI(t, 0, []string{"HEALTHY"}, "status", "--config", g.config)
	expectCLI(t, 0, []string{"HEALTHY"}, "status", "--admin", base, "--token-file", tokenFile)
	if res := sluiceCLI(t, "status", "--admin", base); res.code != 1 || !strings.Contains(res.stderr, "401") {
		t.Fatalf("status without the token: exit %d, stderr %q", res.code, res.stderr)
	}
	if _, body := httpStatus(t, base+"/api/status", "Authorization", "Bearer "+token); strings.Contains(body, token) || strings.Contains(body, "password") {
		t.Fatalf("/api/status shows a secret:\n%s", body)
	}
}

// waitHTTPBodyAuth is waitHTTPBody with a bearer token.
func (g *gatewayProc) waitHTTPBodyAuth(url, token, want string) {
	g.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	body := ""
	for time.Now().Before(deadline) {
		_, body = httpStatus(g.t, url, "Authorization", "Bearer "+token)
		if strings.Contains(body, want) {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	g.t.Fatalf("%s never contained %q:\n%s", url, want, body)
}

// TestOpsSdNotify: READY=1 arrives although the broker is down at boot,
// WATCHDOG=1 comes on time while WATCHDOG_USEC is set, STOPPING=1 at
// SIGTERM, on a NOTIFY_SOCKET the test listens on.
func TestOpsSdNotify(t *testing.T) {
	broker := testenv.StartMosquitto(t, testenv.MosquittoOptions{})
	dsn := testenv.SharedPostgres(t).NewDatabase(t)
	broker.Stop(t)
	sock := filepath.Join(t.TempDir(), "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	t.Setenv("NOTIFY_SOCKET", sock)
	t.Setenv("WATCHDOG_USEC", "400000") // 0.4 s: a ping every 0.2 s
	g := startGateway(t, gatewayConfig(t, t.TempDir(), broker.URL(), dsn, testenv.FreePort(t), ""))

	var got []string
	read := func(want string, within time.Duration) {
		t.Helper()
		_ = conn.SetReadDeadline(time.Now().Add(within))
		buf := make([]byte, 4096)
		for {
			n, err := conn.Read(buf)
			if err != nil {
				t.Fatalf("no %s within %s (got %q): %v", want, within, got, err)
			}
			for _, m := range strings.Split(strings.TrimSpace(string(buf[:n])), "\n") {
				got = append(got, m)
				if m == want {
					return
				}
			}
		}
	}
	read("READY=1", 10*time.Second)
	if code, _ := httpStatus(t, "http://"+g.admin+"/readyz"); code != 503 {
		t.Fatalf("/readyz = %d: READY=1 was sent with the broker down, but the gateway is not ready for sensors", code)
	}
	start := time.Now()
	read("WATCHDOG=1", 2*time.Second)
	read("WATCHDOG=1", 2*time.Second)
	if took := time.Since(start); took > 1500*time.Millisecond {
		t.Fatalf("two watchdog pings took %s, want about 0.4 s", took)
	}
	_ = g.cmd.Process.Signal(syscall.SIGTERM)
	read("STOPPING=1", 10*time.Second)
	<-g.exited
	if got[0] != "READY=1" {
		t.Fatalf("first message %q, want READY=1", got[0])
	}
}

// TestOpsReloadOnSIGHUP: SIGHUP changes the log level and the MQTT
// subscriptions at once (a new filter is subscribed and its readings land, a
// removed one is unsubscribed and its messages no longer stored), names the
// changes that need a restart, and keeps the running config when the new
// one is broken.
func TestOpsReloadOnSIGHUP(t *testing.T) {
	broker := testenv.StartMosquitto(t, testenv.MosquittoOptions{})
	dsn := testenv.SharedPostgres(t).NewDatabase(t)
	cfg := strings.Replace(gatewayConfig(t, t.TempDir(), broker.URL(), dsn, testenv.FreePort(t), ""), `level = "debug"`, `level = "warn"`, 1)
	g := startGateway(t, cfg)
	g.waitHTTP("/readyz", 20*time.Second)
	if strings.Contains(g.out.String(), "level=INFO") {
		t.Fatalf("info lines at level warn:\n%s", g.out.String())
	}
	pub := newPublisher(t, broker.Addr(), "reload-pub")
	if err := pub.publish("packs/before", []byte(`[{"n":"level","v":1}]`)); err != nil {
		t.Fatal(err)
	}
	waitRows(t, dsn, 1, 20*time.Second, "SELECT count(*) FROM sluice.readings WHERE value = 1")

	next := strings.Replace(strings.Replace(cfg, `level = "warn"`, `level = "info"`, 1), `batch_wait = "100ms"`, `batch_wait = "200ms"`, 1)
	next = strings.Replace(next, "topic = \"packs/+\"\npattern = \"packs/{sensor}\"", "topic = \"tanks/+/+\"\npattern = \"tanks/{sensor}/{metric}\"", 1)
	if err := os.WriteFile(g.config, []byte(next), 0o600); err != nil {
		t.Fatal(err)
	}
	_ = g.cmd.Process.Signal(syscall.SIGHUP)
	waitOutput(t, g, "reload: log level changed")
	waitOutput(t, g, `msg="reload: mqtt.subscribe applied" added=tanks/+/+ removed=packs/+ state=connected`)
	waitOutput(t, g, "keys=uplink.batch_wait") // alone: the subscriptions need no restart
	waitOutput(t, g, "msg=\"reload done\"")
	if err := pub.publish("packs/after", []byte(`[{"n":"level","v":2}]`)); err != nil {
		t.Fatal(err)
	}
	// The entry keeps format = "senml" from the one it replaced.
	if err := pub.publish("tanks/t1/level", []byte(`[{"v":3}]`)); err != nil {
		t.Fatal(err)
	}
	waitRows(t, dsn, 1, 20*time.Second, "SELECT count(*) FROM sluice.readings WHERE value = 3")
	time.Sleep(500 * time.Millisecond) // the removed filter's message had as long as the new one's
	if n := queryInt(t, dsn, "SELECT count(*) FROM sluice.readings"); n != 2 {
		t.Fatalf("%d readings stored, want 2: the one before the reload and the one on the new filter", n)
	}

	if err := os.WriteFile(g.config, []byte(next+"\nbogus_key = 1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_ = g.cmd.Process.Signal(syscall.SIGHUP)
	waitOutput(t, g, "reload refused")
	if code, _ := httpStatus(t, "http://"+g.admin+"/readyz"); code != 200 {
		t.Fatalf("gateway not ready after a refused reload: %d", code)
	}
}

func waitOutput(t *testing.T, g *gatewayProc, want string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(g.out.String(), want) {
		if time.Now().After(deadline) {
			t.Fatalf("gateway output lacks %q:\n%s", want, g.out.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestOpsDoctorFindsProblems: doctor explains a downgraded subscription, a
// broker queue that puts the session at risk, a data dir in RAM and a bad
// config, each with its fix, and exits 1.
func TestOpsDoctorFindsProblems(t *testing.T) {
	dir := t.TempDir()
	broker := testenv.StartMosquitto(t, testenv.MosquittoOptions{MaxQueued: -1, ExtraConf: []string{"max_qos 0"}})
	dsn := testenv.SharedPostgres(t).NewDatabase(t)
	dataDir := t.TempDir()
	if fi, err := os.Stat("/dev/shm"); err == nil && fi.IsDir() {
		dataDir, _ = os.MkdirTemp("/dev/shm", "sluice-doctor-")
		t.Cleanup(func() { os.RemoveAll(dataDir) })
	}
	path := filepath.Join(dir, "sluice.toml")
	if err := os.WriteFile(path, []byte(gatewayConfig(t, dataDir, broker.URL(), dsn, testenv.FreePort(t), "")), 0o600); err != nil {
		t.Fatal(err)
	}
	res := expectCLI(t, 1, []string{"FAIL  broker", "subscriptions downgraded: sensors/+/+ (QoS 0 granted, 1 asked), packs/+", "fix: remove max_qos",
		"warn  queue", "max_queued_messages 1000:", "fix: install mosquitto/gateway.conf",
		"warn  postgres", fmt.Sprintf("schema v0, this build needs v%d -- fix: run `sluice migrate", uplink.SchemaVersion())},
		"doctor", "--config", path, "--mosquitto-conf", filepath.Join(broker.Dir(), "mosquitto.conf"))
	if strings.HasPrefix(dataDir, "/dev/shm") && !strings.Contains(res.stdout, "FAIL  data dir") {
		t.Fatalf("a data dir on tmpfs passed:\n%s", res.stdout)
	}

	if err := os.WriteFile(path, []byte("[gateway]\nclock = \"sometimes\"\n[bogus]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	res = expectCLI(t, 1, []string{"FAIL  config", "gateway.clock", "bogus", "fix: correct the key"}, "doctor", "--config", path)
	if strings.Contains(res.stdout, "postgres  ") {
		t.Fatalf("doctor went on past a bad config:\n%s", res.stdout)
	}
	if res := sluiceCLI(t, "doctor"); res.code != 2 {
		t.Fatalf("doctor without --config: exit %d, want 2", res.code)
	}
}

// chromiumBin finds the browser, or skips (fails under SLUICE_REQUIRE_SERVICES)
// as testenv does for its servers.
func chromiumBin(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	if testenv.Require() {
		t.Fatal("chromium is not installed (Debian package chromium); ./test.sh installs it")
	}
	t.Skip("SKIP LOUDLY: chromium is not installed (Debian package chromium); ./test.sh installs it")
	return ""
}

// headless runs Chromium on url with extra flags, bounded in time, with a
// fresh profile and no network beyond the gateway, and returns stdout.
func headless(t *testing.T, bin, url string, extra ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	args := append([]string{"--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
		"--disable-background-networking", "--disable-component-update", "--disable-sync",
		"--disable-dev-shm-usage", "--user-data-dir=" + t.TempDir(),
		// Virtual time runs the page's first fetch and render before the
		// dump, and ends before its 5 s refresh.
		"--virtual-time-budget=3000"}, extra...)
	cmd := exec.CommandContext(ctx, bin, append(args, url)...)
	var out, errOut syncBuffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	if err := cmd.Run(); err != nil {
		t.Fatalf("chromium %s: %v\n%s", url, err, errOut.String())
	}
	return out.String()
}

// TestOpsStatusPageInChromium loads the status page of a running gateway in
// a real headless Chromium: the page's script renders the plain-language
// states, the sparkline and the sensor table; a screenshot is kept.
func TestOpsStatusPageInChromium(t *testing.T) {
	bin := chromiumBin(t)
	pgw := startProxiedGateway(t, "")
	g, broker, dsn, proxy := pgw.gatewayProc, pgw.broker, pgw.dsn, pgw.proxy
	p := newPublisher(t, broker.Addr(), "page-sensors")
	publishSensors(t, p)
	waitRows(t, dsn, 8, 30*time.Second, "SELECT count(*) FROM sluice.readings")
	g.waitHealth(gateway.HealthOK, 20*time.Second)
	url := "http://" + g.admin + "/"

	dom := headless(t, bin, url, "--dump-dom")
	for _, want := range []string{
		`data-health="ok"`, ">Healthy<", `<header id="head" class="ok">`,
		`data-part="mqtt" data-level="ok"`, `data-part="uplink" data-level="ok"`, `data-part="sensors" data-level="ok"`,
		`data-sensor="meter-1"`, `>2 sensors reporting<`, `<p id="conn" class="">Updated `,
	} {
		if !strings.Contains(dom, want) {
			t.Fatalf("healthy page lacks %s:\n%s", want, dom)
		}
	}
	if !regexp.MustCompile(`<tr class="" data-sensor="meter-1"><td>meter-1</td><td>reporting</td><td>\d+s ago</td><td class="num">[0-9.]+</td><td class="num">–</td><td class="num" title="from seq">2</td><td class="num">5</td></tr>`).MatchString(dom) {
		t.Fatalf("sensor row of meter-1 wrong:\n%s", grepLines(dom, "meter-1"))
	}

	// The central database goes away and a backlog builds: amber.
	proxy.Cut()
	p.publishNumbers(t, "sensors/pump-2/flow", 100, 120)
	g.waitHTTPBody("/api/status", `"state": "retrying"`, 30*time.Second)
	dom = headless(t, bin, url, "--dump-dom")
	for _, want := range []string{
		`data-health="degraded"`, ">Needs attention<", `<header id="head" class="warn">`,
		`data-part="uplink" data-level="warn"`, "central database unreachable, retrying", `data-part="mqtt" data-level="ok"`,
		`<b>20</b><span>readings waiting</span>`, `<polyline points=`, `<p id="conn" class="">Updated `,
	} {
		if !strings.Contains(dom, want) {
			t.Fatalf("degraded page lacks %s:\n%s", want, dom)
		}
	}
	if m := regexp.MustCompile(`data-points="(\d+)"`).FindStringSubmatch(dom); m == nil || m[1] == "0" {
		t.Fatalf("no sparkline points:\n%s", grepLines(dom, "svg"))
	}

	shot := filepath.Join(t.TempDir(), "status-page.png")
	headless(t, bin, url, "--screenshot="+shot, "--window-size=412,1200", "--hide-scrollbars")
	png, err := os.ReadFile(shot)
	if err != nil || len(png) < 10_000 || string(png[1:4]) != "PNG" {
		t.Fatalf("screenshot %s: %d bytes, %v", shot, len(png), err)
	}
	t.Logf("screenshot of the degraded page: %s (%d bytes)", shot, len(png))
	if keep := os.Getenv("SLUICE_KEEP_SCREENSHOT"); keep != "" {
		_ = os.WriteFile(keep, png, 0o644)
	}
}

// TestOpsLogFormatFlag: --log-format json makes every log line a JSON object
// with the stable keys, whatever the config says.
func TestOpsLogFormatFlag(t *testing.T) {
	broker := testenv.StartMosquitto(t, testenv.MosquittoOptions{})
	dsn := testenv.SharedPostgres(t).NewDatabase(t)
	path := filepath.Join(t.TempDir(), "sluice.toml")
	if err := os.WriteFile(path, []byte(gatewayConfig(t, t.TempDir(), broker.URL(), dsn, testenv.FreePort(t), "format = \"text\"\n")), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, sluiceBin, "run", "--config", path, "--log-format", "json")
	var out syncBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(out.String(), `"msg":"mqtt subscribed"`) {
		if time.Now().After(deadline) {
			t.Fatalf("no JSON log line saying mqtt subscribed:\n%s", out.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("sluice run: %v\n%s", err, out.String())
	}
	for _, line := range strings.Split(strings.TrimSpace(out.String()), "\n") {
		var rec map[string]any
		if err := json.Unmarshal([]byte(line), &rec); err != nil || rec["msg"] == nil || rec["level"] == nil {
			t.Fatalf("not a JSON log line: %q", line)
		}
	}
}
