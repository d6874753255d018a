package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"
	"github.com/jackc/pgx/v5"

	"github.com/sluice-gw/sluice/internal/testenv"
)

// sluiceBin is the gateway binary built once for the process tests.
var sluiceBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "sluice-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	sluiceBin = filepath.Join(dir, "sluice")
	args := []string{"build", "-o", sluiceBin}
	if raceEnabled {
		args = append(args, "-race")
	}
	build := exec.Command("go", append(args, ".")...)
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build sluice:", err)
		os.Exit(1)
	}
	code := testenv.Run(m)
	os.RemoveAll(dir)
	os.Exit(code)
}

// syncBuffer collects a process's output for failure messages.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// gatewayProc is a real sluice process.
type gatewayProc struct {
	t      *testing.T
	config string
	admin  string
	cmd    *exec.Cmd
	out    *syncBuffer
	exited chan struct{}
}

// gatewayConfig is the usual test config; extra is appended verbatim.
func gatewayConfig(t *testing.T, dataDir, brokerURL, dsn string, adminPort int, extra string) string {
	t.Helper()
	return fmt.Sprintf(`
[gateway]
id = "gw-e2e"
site = "e2e"
data_dir = %q
clock = "trusted"

[mqtt]
broker = %q
client_id = "sluice-e2e"

[[mqtt.subscribe]]
topic = "sensors/+/+"
pattern = "sensors/{sensor}/{metric}"

[[mqtt.subscribe]]
topic = "packs/+"
pattern = "packs/{sensor}"
format = "senml"

[uplink]
dsn = %q
batch_wait = "100ms"
heartbeat = "1s"
backoff_max = "1s"
flush_timeout = "3s"

[admin]
listen = "127.0.0.1:%d"

[log]
level = "debug"
%s`, dataDir, brokerURL, dsn, adminPort, extra)
}

func startGateway(t *testing.T, configText string) *gatewayProc {
	t.Helper()
	path := filepath.Join(t.TempDir(), "sluice.toml")
	if err := os.WriteFile(path, []byte(configText), 0o600); err != nil {
		t.Fatal(err)
	}
	g := &gatewayProc{t: t, config: path, out: &syncBuffer{}}
	if m, err := decodeTOML([]byte(configText)); err == nil {
		if admin, ok := m["admin"].(map[string]any); ok {
			g.admin, _ = admin["listen"].(string)
		}
	}
	if g.admin == "" {
		t.Fatalf("test config has no [admin] listen:\n%s", configText)
	}
	g.start()
	t.Cleanup(func() {
		g.stop()
		if t.Failed() {
			t.Logf("gateway output:\n%s", g.out.String())
		}
	})
	return g
}

func (g *gatewayProc) start() {
	g.t.Helper()
	g.cmd = exec.Command(sluiceBin, "run", "--config", g.config)
	g.cmd.Stdout, g.cmd.Stderr = g.out, g.out
	g.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := g.cmd.Start(); err != nil {
		g.t.Fatal(err)
	}
	g.exited = make(chan struct{})
	go func(cmd *exec.Cmd, exited chan struct{}) {
		_ = cmd.Wait()
		close(exited)
	}(g.cmd, g.exited)
	g.waitHTTP("/healthz", 20*time.Second)
}

// waitHTTP waits until the admin endpoint answers 200 on path.
func (g *gatewayProc) waitHTTP(path string, d time.Duration) {
	g.t.Helper()
	deadline := time.Now().Add(d)
	for {
		resp, err := http.Get("http://" + g.admin + path)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		select {
		case <-g.exited:
			g.t.Fatalf("gateway exited during start:\n%s", g.out.String())
		default:
		}
		if time.Now().After(deadline) {
			g.t.Fatalf("gateway %s not answering 200 within %s:\n%s", path, d, g.out.String())
		}
		time.Sleep(25 * time.Millisecond)
	}
}

// waitHTTPBody waits until the admin endpoint's body contains want.
func (g *gatewayProc) waitHTTPBody(path, want string, d time.Duration) {
	g.t.Helper()
	deadline := time.Now().Add(d)
	last := ""
	for time.Now().Before(deadline) {
		last = g.get(path)
		if strings.Contains(last, want) {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	g.t.Fatalf("%s never contained %q; last answer:\n%s", path, want, last)
}

// get returns the body of an admin endpoint ("" on error).
func (g *gatewayProc) get(path string) string {
	resp, err := http.Get("http://" + g.admin + path)
	if err != nil {
		return ""
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// metrics is the gateway's /metrics text.
func (g *gatewayProc) metrics() string { return g.get("/metrics") }

// kill SIGKILLs the process, as a power cut would stop it.
func (g *gatewayProc) kill() {
	_ = g.cmd.Process.Signal(syscall.SIGKILL)
	<-g.exited
}

// stop asks for the ordered shutdown and waits for it.
func (g *gatewayProc) stop() {
	if g.cmd == nil || g.cmd.Process == nil {
		return
	}
	select {
	case <-g.exited:
		return
	default:
	}
	_ = g.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-g.exited:
	case <-time.After(30 * time.Second):
		g.t.Errorf("gateway did not stop within 30 s of SIGTERM")
		g.kill()
	}
}

// publisher is a sensor-side MQTT client that publishes at QoS 1 and
// remembers every message the broker acknowledged.
type publisher struct {
	t   *testing.T
	cli *paho.Client
}

func newPublisher(t *testing.T, addr, id string) *publisher {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	cli := paho.NewClient(paho.ClientConfig{Conn: conn})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := cli.Connect(ctx, &paho.Connect{ClientID: id, CleanStart: true, KeepAlive: 30}); err != nil {
		t.Fatalf("publisher connect: %v", err)
	}
	t.Cleanup(func() { _ = cli.Disconnect(&paho.Disconnect{}) })
	return &publisher{t: t, cli: cli}
}

// publish sends one QoS 1 message and reports whether the broker acknowledged it.
func (p *publisher) publish(topic string, payload []byte) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := p.cli.Publish(ctx, &paho.Publish{Topic: topic, QoS: 1, Payload: payload})
	return err
}

// publishNumbers publishes the plain numbers from .. to-1 to topic at QoS 1,
// one message each, and fails the test on the first error.
func (p *publisher) publishNumbers(t *testing.T, topic string, from, to int) {
	t.Helper()
	for i := from; i < to; i++ {
		if err := p.publish(topic, []byte(strconv.Itoa(i))); err != nil {
			t.Fatal(err)
		}
	}
}

func queryInt(t *testing.T, dsn, sql string, args ...any) int64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	var n int64
	if err := conn.QueryRow(ctx, sql, args...).Scan(&n); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	return n
}

// waitRows waits until the query's count reaches want.
func waitRows(t *testing.T, dsn string, want int64, d time.Duration, sql string) {
	t.Helper()
	waitRowsOr(t, dsn, want, d, sql, nil)
}

// waitRowsOr is waitRows that calls explain before failing.
func waitRowsOr(t *testing.T, dsn string, want int64, d time.Duration, sql string, explain func()) {
	t.Helper()
	deadline := time.Now().Add(d)
	var n int64
	for time.Now().Before(deadline) {
		n = queryIntSoft(dsn, sql)
		if n >= want {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	if explain != nil {
		explain()
	}
	t.Fatalf("%s = %d after %s, want %d", sql, n, d, want)
}

// missingValues lists the values 0..upTo-1 a sensor has no row for, as ranges.
func missingValues(t *testing.T, dsn, sensor string, upTo int64) string {
	t.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return err.Error()
	}
	defer conn.Close(ctx)
	rows, err := conn.Query(ctx, `SELECT g FROM generate_series(0, $2 - 1) g
WHERE NOT EXISTS (SELECT 1 FROM sluice.readings r WHERE r.sensor = $1 AND r.value = g) ORDER BY g`, sensor, upTo)
	if err != nil {
		return err.Error()
	}
	vals, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	if err != nil {
		return err.Error()
	}
	return fmt.Sprint(vals)
}

func queryIntSoft(dsn, sql string) int64 {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return -1
	}
	defer conn.Close(context.Background())
	var n int64
	if err := conn.QueryRow(ctx, sql).Scan(&n); err != nil {
		return -1
	}
	return n
}

// replaceHostPort points dsn at another host:port (a fault proxy).
func replaceHostPort(t *testing.T, dsn, hostport string) string {
	t.Helper()
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("postgres://%s:%s@%s/%s?sslmode=disable", cfg.User, cfg.Password, hostport, cfg.Database)
}

// doubledValues lists a sensor's values stored more than once.
func doubledValues(t *testing.T, dsn, sensor string) string {
	t.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return err.Error()
	}
	defer conn.Close(ctx)
	rows, err := conn.Query(ctx, `SELECT value::bigint FROM sluice.readings WHERE sensor = $1 GROUP BY value HAVING count(*) > 1 ORDER BY value`, sensor)
	if err != nil {
		return err.Error()
	}
	vals, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	if err != nil {
		return err.Error()
	}
	if len(vals) == 0 {
		return "[]"
	}
	var detail []string
	rows, err = conn.Query(ctx, `SELECT ts::text || ' recv ' || received_at::text FROM sluice.readings WHERE sensor = $1 AND value = $2`, sensor, vals[0])
	if err == nil {
		detail, _ = pgx.CollectRows(rows, pgx.RowTo[string])
	}
	return fmt.Sprint(vals, " first: ", detail)
}

// asExit reports whether err is a process's non-zero exit.
func asExit(err error, ee **exec.ExitError) bool { return errors.As(err, ee) }
