package testenv_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/sluice-gw/sluice/internal/testenv"
)

func TestMain(m *testing.M) { testenv.Main(m) }

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// --- Postgres -------------------------------------------------------------------

func TestSharedPostgresNewDatabase(t *testing.T) {
	pg := testenv.SharedPostgres(t)
	if again := testenv.SharedPostgres(t); again != pg {
		t.Fatal("SharedPostgres started a second server")
	}
	a, b := pg.NewDatabase(t), pg.NewDatabase(t)
	if a == b {
		t.Fatalf("two NewDatabase calls gave the same DSN %s", a)
	}
	for _, dsn := range []string{a, b} {
		cfg, err := pgconn.ParseConfig(dsn)
		if err != nil {
			t.Fatal(err)
		}
		if cfg.Host != "127.0.0.1" || cfg.User == "" || cfg.Password == "" || fmt.Sprint(cfg.Port) != strings.Split(pg.Addr(), ":")[1] {
			t.Errorf("DSN %s: want user and password on %s", dsn, pg.Addr())
		}
	}

	pg.Query(t, a, "CREATE TABLE readings (name text, value float8)")
	pg.Query(t, a, "INSERT INTO readings VALUES ($1, $2), ($3, $4)", "pump:flow", 1.5, "pump:pressure", 2.25)
	rows := pg.QueryRows(t, a, "SELECT name, value FROM readings ORDER BY name")
	want := [][]any{{"pump:flow", 1.5}, {"pump:pressure", 2.25}}
	if fmt.Sprint(rows) != fmt.Sprint(want) {
		t.Errorf("rows = %v, want %v", rows, want)
	}
	// The second database is another one: it has no such table.
	if got := pg.QueryRows(t, b, "SELECT to_regclass('readings') IS NULL"); got[0][0] != true {
		t.Errorf("database b sees database a's table")
	}
	// Several statements in one call (no args).
	pg.Query(t, b, "CREATE TABLE x (v int); INSERT INTO x VALUES (1); INSERT INTO x VALUES (2)")
	if got := pg.QueryRows(t, b, "SELECT count(*) FROM x"); got[0][0] != int64(2) {
		t.Errorf("count = %v, want 2", got[0][0])
	}
}

func TestSharedPostgresDropsDatabaseInCleanup(t *testing.T) {
	pg := testenv.SharedPostgres(t)
	var dsn string
	t.Run("owner", func(t *testing.T) {
		dsn = pg.NewDatabase(t)
		// A connection the test forgot to close does not keep the database alive.
		conn, err := pgx.Connect(ctxT(t), dsn)
		if err != nil {
			t.Fatal(err)
		}
		_ = conn
	})
	name := dsn[strings.LastIndexByte(dsn, '/')+1 : strings.IndexByte(dsn, '?')]
	got := pg.QueryRows(t, "", "SELECT count(*) FROM pg_database WHERE datname = $1", name)
	if got[0][0] != int64(0) {
		t.Errorf("database %s still exists after its test ended", name)
	}
}

func TestSharedPostgresParallelDatabases(t *testing.T) {
	pg := testenv.SharedPostgres(t)
	for i := range 8 {
		t.Run(fmt.Sprint(i), func(t *testing.T) {
			t.Parallel()
			dsn := pg.NewDatabase(t)
			pg.Query(t, dsn, "CREATE TABLE t (v int)")
			pg.Query(t, dsn, "INSERT INTO t VALUES ($1)", i)
			if got := pg.QueryRows(t, dsn, "SELECT v FROM t"); got[0][0] != int32(i) {
				t.Errorf("got %v, want %d", got, i)
			}
		})
	}
}

func TestPostgresStopStartKill(t *testing.T) {
	pg := testenv.StartPostgres(t, testenv.PostgresOptions{})
	dsn := pg.NewDatabase(t)
	addr := pg.Addr()
	ctx := ctxT(t)
	pg.Query(t, dsn, "CREATE TABLE t (v int)")
	pg.Query(t, dsn, "INSERT INTO t VALUES (1)")

	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())

	pg.Stop(t)
	if _, err := conn.Exec(ctx, "SELECT 1"); err == nil {
		t.Fatal("a connection survived Stop")
	}
	if _, err := pgx.Connect(ctx, dsn); err == nil {
		t.Fatal("connected to a stopped server")
	}
	pg.Stop(t) // stopping a stopped server is fine

	pg.Start(t)
	if pg.Addr() != addr {
		t.Fatalf("restarted on %s, want %s", pg.Addr(), addr)
	}
	pg.Query(t, dsn, "INSERT INTO t VALUES (2)")

	conn2, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn2.Close(context.Background())
	pg.Kill(t)
	if _, err := conn2.Exec(ctx, "SELECT 1"); err == nil {
		t.Fatal("a connection survived Kill")
	}
	pg.Start(t)
	// Committed before the kill means there after it: a private server keeps
	// synchronous_commit on.
	if got := pg.QueryRows(t, dsn, "SELECT count(*) FROM t"); got[0][0] != int64(2) {
		t.Errorf("after Kill and Start: %v rows, want 2", got[0][0])
	}
	if !strings.Contains(pg.Log(), "not properly shut down") {
		t.Errorf("no crash recovery in the log after Kill:\n%s", pg.Log())
	}
}

func TestPostgresMaxConnectionsAndFiles(t *testing.T) {
	pg := testenv.StartPostgres(t, testenv.PostgresOptions{
		MaxConnections: 3,
		ExtraConf:      []string{"include_if_exists = 'extra.conf'"},
		Files:          map[string][]byte{"extra.conf": []byte("application_name = 'from_file'\n")},
	})
	ctx := ctxT(t)
	var conns []*pgx.Conn
	defer func() {
		for _, c := range conns {
			c.Close(context.Background())
		}
	}()
	for range 3 {
		c, err := pgx.Connect(ctx, pg.AdminDSN())
		if err != nil {
			t.Fatalf("connection %d of 3: %v", len(conns)+1, err)
		}
		conns = append(conns, c)
	}
	_, err := pgx.Connect(ctx, pg.AdminDSN())
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "53300" {
		t.Fatalf("4th connection: %v, want SQLSTATE 53300 too_many_connections", err)
	}
	var name string
	if err := conns[0].QueryRow(ctx, "SHOW application_name").Scan(&name); err != nil || name != "from_file" {
		t.Errorf("application_name = %q, %v: ExtraConf or Files not applied", name, err)
	}
}

func TestPostgresSSL(t *testing.T) {
	server := testenv.NewCA(t, "test ca").Issue(t, "127.0.0.1", "127.0.0.1")
	crt, key := server.CertPEM, server.KeyPEM
	pg := testenv.StartPostgres(t, testenv.PostgresOptions{
		ExtraConf: []string{"ssl = on", "ssl_cert_file = 'server.crt'", "ssl_key_file = 'server.key'"},
		Files:     map[string][]byte{"server.crt": crt, "server.key": key},
	})
	dsn := strings.Replace(pg.AdminDSN(), "sslmode=disable", "sslmode=require", 1)
	got := pg.QueryRows(t, dsn, "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
	if len(got) != 1 || got[0][0] != true {
		t.Errorf("connection with sslmode=require: pg_stat_ssl.ssl = %v, want true", got)
	}
}

func TestSharedPostgresRefusesFaults(t *testing.T) {
	// Stop on the shared server fails the test that tries: run it on a stand-in TB.
	pg := testenv.SharedPostgres(t)
	ft := &fatalRecorder{TB: t}
	done := make(chan struct{})
	go func() {
		defer close(done)
		pg.Stop(ft)
	}()
	<-done
	if !strings.Contains(ft.msg, "shared Postgres") {
		t.Fatalf("Stop on the shared server: %q", ft.msg)
	}
	pg.Query(t, "", "SELECT 1") // still up
}

// fatalRecorder records Fatal instead of ending the test; the caller runs the code
// under test on its own goroutine, which Fatalf ends.
type fatalRecorder struct {
	testing.TB
	msg string
}

func (f *fatalRecorder) Helper() {}
func (f *fatalRecorder) Fatalf(format string, args ...any) {
	f.msg = fmt.Sprintf(format, args...)
	runtime.Goexit()
}

// --- PgBouncer ------------------------------------------------------------------

func TestPgBouncerTransactionMode(t *testing.T) {
	pg := testenv.SharedPostgres(t)
	dsn := pg.NewDatabase(t)
	bdsn := testenv.StartPgBouncer(t, pg, dsn)
	if bdsn == dsn {
		t.Fatal("the bouncer DSN is the server's")
	}
	ctx := ctxT(t)

	cfg, err := pgx.ParseConfig(bdsn)
	if err != nil {
		t.Fatal(err)
	}
	cfg.DefaultQueryExecMode = pgx.QueryExecModeExec // what transaction pooling needs
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(ctx, "CREATE TABLE t (v int)"); err != nil {
		t.Fatal(err)
	}
	tx, err := conn.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		if _, err := tx.Exec(ctx, "INSERT INTO t VALUES ($1)", i); err != nil {
			t.Fatal(err)
		}
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	// Written through the bouncer, visible on the server itself.
	if got := pg.QueryRows(t, dsn, "SELECT sum(v) FROM t"); got[0][0] != int64(3) {
		t.Errorf("sum = %v, want 3", got[0][0])
	}

	// The admin console says which pooling mode runs.
	admin, err := pgx.ParseConfig(strings.Replace(bdsn, "/"+cfg.Database+"?", "/pgbouncer?", 1))
	if err != nil {
		t.Fatal(err)
	}
	admin.DefaultQueryExecMode = pgx.QueryExecModeSimpleProtocol
	aconn, err := pgx.ConnectConfig(ctx, admin)
	if err != nil {
		t.Fatal(err)
	}
	defer aconn.Close(context.Background())
	rows, err := aconn.Query(ctx, "SHOW CONFIG")
	if err != nil {
		t.Fatal(err)
	}
	mode := ""
	for rows.Next() {
		vals, err := rows.Values()
		if err != nil {
			t.Fatal(err)
		}
		if vals[0] == "pool_mode" {
			mode = fmt.Sprint(vals[1])
		}
	}
	if rows.Err() != nil || mode != "transaction" {
		t.Errorf("pool_mode = %q (%v), want transaction", mode, rows.Err())
	}
}

// --- Mosquitto ------------------------------------------------------------------

// mqttClient connects an MQTT v5 client; received messages go to msgs.
func mqttClient(t *testing.T, addr, id string, cleanStart bool, msgs chan<- string) (*paho.Client, *paho.Connack) {
	t.Helper()
	ctx := ctxT(t)
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	expiry := uint32(3600)
	c := paho.NewClient(paho.ClientConfig{
		ClientID: id,
		Conn:     conn,
		OnPublishReceived: []func(paho.PublishReceived) (bool, error){
			func(pr paho.PublishReceived) (bool, error) {
				if msgs != nil {
					msgs <- pr.Packet.Topic + "=" + string(pr.Packet.Payload)
				}
				return true, nil
			},
		},
	})
	ack, err := c.Connect(ctx, &paho.Connect{
		ClientID:   id,
		CleanStart: cleanStart,
		KeepAlive:  30,
		Properties: &paho.ConnectProperties{SessionExpiryInterval: &expiry},
	})
	if err != nil {
		t.Fatalf("connect %s: %v", id, err)
	}
	t.Cleanup(func() { _ = c.Disconnect(&paho.Disconnect{}) })
	return c, ack
}

func subscribe(t *testing.T, c *paho.Client, topic string) {
	t.Helper()
	sa, err := c.Subscribe(ctxT(t), &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: topic, QoS: 1}}})
	if err != nil || len(sa.Reasons) != 1 || sa.Reasons[0] != 1 {
		t.Fatalf("subscribe %s: %v %+v", topic, err, sa)
	}
}

func publish(t *testing.T, c *paho.Client, topic, payload string) {
	t.Helper()
	resp, err := c.Publish(ctxT(t), &paho.Publish{Topic: topic, QoS: 1, Payload: []byte(payload)})
	if err != nil || resp.ReasonCode != 0 {
		t.Fatalf("publish %s: %v %+v", topic, err, resp)
	}
}

func receive(t *testing.T, m *testenv.Mosquitto, msgs <-chan string, want string) {
	t.Helper()
	select {
	case got := <-msgs:
		if got != want {
			t.Fatalf("received %q, want %q", got, want)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("no message %q within 10 s; broker log:\n%s", want, m.Log())
	}
}

func TestMosquittoPublishSubscribe(t *testing.T) {
	m := testenv.StartMosquitto(t, testenv.MosquittoOptions{})
	if !strings.HasPrefix(m.URL(), "mqtt://127.0.0.1:") || !strings.HasSuffix(m.URL(), m.Addr()) {
		t.Errorf("URL %s, Addr %s", m.URL(), m.Addr())
	}
	msgs := make(chan string, 10)
	sub, _ := mqttClient(t, m.Addr(), "sub", true, msgs)
	subscribe(t, sub, "sensors/#")
	pub, _ := mqttClient(t, m.Addr(), "pub", true, nil)
	publish(t, pub, "sensors/pump1/flow", "42.5")
	receive(t, m, msgs, "sensors/pump1/flow=42.5")
	if !strings.Contains(m.Log(), "sub") {
		t.Errorf("the broker log does not show the client:\n%s", m.Log())
	}
}

func TestMosquittoSessionSurvivesStopStart(t *testing.T) {
	m := testenv.StartMosquitto(t, testenv.MosquittoOptions{})
	addr := m.Addr()
	sub, _ := mqttClient(t, addr, "gateway", false, nil)
	subscribe(t, sub, "sensors/#")
	if err := sub.Disconnect(&paho.Disconnect{}); err != nil {
		t.Fatal(err)
	}

	// Published while the subscriber is away: the broker queues it in the session.
	pub, _ := mqttClient(t, addr, "sensor", true, nil)
	publish(t, pub, "sensors/s1/temp", "21.5")

	m.Stop(t)
	if _, err := os.Stat(filepath.Join(m.Dir(), "mosquitto.db")); err != nil {
		t.Fatalf("no persistence file after Stop: %v", err)
	}
	m.Stop(t) // stopping a stopped broker is fine
	m.Start(t)
	if m.Addr() != addr {
		t.Fatalf("restarted on %s, want %s", m.Addr(), addr)
	}

	msgs := make(chan string, 10)
	_, ack := mqttClient(t, addr, "gateway", false, msgs)
	if !ack.SessionPresent {
		t.Fatalf("session not present after restart; broker log:\n%s", m.Log())
	}
	receive(t, m, msgs, "sensors/s1/temp=21.5")
}

func TestMosquittoKillLosesUnsavedSession(t *testing.T) {
	m := testenv.StartMosquitto(t, testenv.MosquittoOptions{})
	sub, _ := mqttClient(t, m.Addr(), "gateway", false, nil)
	subscribe(t, sub, "sensors/#")
	_ = sub.Disconnect(&paho.Disconnect{})
	m.Kill(t) // before any autosave: the session was never written
	m.Start(t)
	_, ack := mqttClient(t, m.Addr(), "gateway", false, nil)
	if ack.SessionPresent {
		t.Errorf("session present after Kill before any save")
	}
}

func TestMosquittoSaveThenKill(t *testing.T) {
	m := testenv.StartMosquitto(t, testenv.MosquittoOptions{})
	sub, _ := mqttClient(t, m.Addr(), "gateway", false, nil)
	subscribe(t, sub, "sensors/#")
	_ = sub.Disconnect(&paho.Disconnect{})
	pub, _ := mqttClient(t, m.Addr(), "sensor", true, nil)
	publish(t, pub, "sensors/s1/a", "saved")
	m.Save(t)
	publish(t, pub, "sensors/s1/b", "lost")
	m.Kill(t)
	m.Start(t)

	msgs := make(chan string, 10)
	_, ack := mqttClient(t, m.Addr(), "gateway", false, msgs)
	if !ack.SessionPresent {
		t.Fatalf("session saved before the kill is gone; broker log:\n%s", m.Log())
	}
	receive(t, m, msgs, "sensors/s1/a=saved")
	select {
	case got := <-msgs:
		t.Errorf("received %q, published after the last save and before the kill", got)
	case <-time.After(300 * time.Millisecond):
	}
}

func TestMosquittoOptions(t *testing.T) {
	conf := func(m *testenv.Mosquitto) string {
		b, err := os.ReadFile(filepath.Join(m.Dir(), "mosquitto.conf"))
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	shipped := testenv.StartMosquitto(t, testenv.MosquittoOptions{})
	for _, want := range []string{"max_inflight_messages 1000\n", "max_queued_messages 1000000\n", "persistence true\n", "listener " + fmt.Sprint(shipped.Port()) + " 127.0.0.1\n"} {
		if !strings.Contains(conf(shipped), want) {
			t.Errorf("shipped settings lack %q:\n%s", want, conf(shipped))
		}
	}
	port := testenv.FreePort(t)
	defaults := testenv.StartMosquitto(t, testenv.MosquittoOptions{Port: port, MaxInflight: -1, MaxQueued: 7, ExtraConf: []string{"max_keepalive 100"}})
	if defaults.Port() != port {
		t.Errorf("Port %d, want %d", defaults.Port(), port)
	}
	c := conf(defaults)
	if strings.Contains(c, "max_inflight_messages") || !strings.Contains(c, "max_queued_messages 7\n") || !strings.Contains(c, "max_keepalive 100\n") {
		t.Errorf("options not applied:\n%s", c)
	}
}

// TestMosquittoInFlightIsTheClientsReceiveMaximum pins what the gateway's
// receive_maximum rests on: Mosquitto 2.0 keeps as many QoS 1 messages in
// flight to an MQTT v5 client as the client's Receive Maximum, above
// max_inflight_messages too (DESIGN.md says a client can only lower it), and
// queues the rest.
func TestMosquittoInFlightIsTheClientsReceiveMaximum(t *testing.T) {
	m := testenv.StartMosquitto(t, testenv.MosquittoOptions{MaxInflight: -1, MaxQueued: -1}) // the defaults: 20 in flight, 1,000 queued
	ctx := ctxT(t)
	conn, err := net.Dial("tcp", m.Addr())
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	got := 0
	sub := paho.NewClient(paho.ClientConfig{ClientID: "window", Conn: conn, EnableManualAcknowledgment: true,
		OnPublishReceived: []func(paho.PublishReceived) (bool, error){func(paho.PublishReceived) (bool, error) {
			mu.Lock()
			got++
			mu.Unlock()
			return true, nil // never acknowledged
		}}})
	recvMax := uint16(300)
	if _, err := sub.Connect(ctx, &paho.Connect{ClientID: "window", CleanStart: true, KeepAlive: 30,
		Properties: &paho.ConnectProperties{ReceiveMaximum: &recvMax}}); err != nil {
		t.Fatal(err)
	}
	subscribe(t, sub, "w/#")
	pub, _ := mqttClient(t, m.Addr(), "pub", true, nil)
	for i := range 500 {
		publish(t, pub, "w/x", fmt.Sprint(i))
	}
	time.Sleep(500 * time.Millisecond) // nothing more can come: the window is full
	mu.Lock()
	defer mu.Unlock()
	if got != int(recvMax) {
		t.Fatalf("%d messages in flight to a client with Receive Maximum %d at max_inflight_messages 20", got, recvMax)
	}
}

// TestMosquittoConfMatchesShipped keeps testdata/mosquitto.conf, which the tests run,
// in step with the broker settings the repository ships.
func TestMosquittoConfMatchesShipped(t *testing.T) {
	shippedPath := filepath.Join("..", "..", "mosquitto", "gateway.conf")
	shipped, err := os.ReadFile(shippedPath)
	if errors.Is(err, os.ErrNotExist) {
		t.Skipf("%s not there", shippedPath)
	}
	if err != nil {
		t.Fatal(err)
	}
	ours, err := os.ReadFile(filepath.Join("testdata", "mosquitto.conf"))
	if err != nil {
		t.Fatal(err)
	}
	// Where the store lives and what listens are the test's own business.
	skip := []string{"persistence_location", "listener", "allow_anonymous", "user", "log_dest", "log_type"}
	settings := func(conf []byte) []string {
		var out []string
		for _, line := range strings.Split(string(conf), "\n") {
			f := strings.Fields(line)
			if len(f) == 0 || strings.HasPrefix(f[0], "#") || slices.Contains(skip, f[0]) {
				continue
			}
			out = append(out, strings.Join(f, " "))
		}
		slices.Sort(out)
		return out
	}
	if s, o := settings(shipped), settings(ours); !slices.Equal(s, o) {
		t.Errorf("testdata/mosquitto.conf drifted from %s:\nshipped: %q\ntestdata: %q", shippedPath, s, o)
	}
}

// --- ports ------------------------------------------------------------------------

func TestFreePorts(t *testing.T) {
	tcp := testenv.FreePort(t)
	ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", tcp))
	if err != nil {
		t.Fatalf("FreePort %d: %v", tcp, err)
	}
	ln.Close()
	udp := testenv.FreeUDPPort(t)
	c, err := net.ListenPacket("udp", fmt.Sprintf("127.0.0.1:%d", udp))
	if err != nil {
		t.Fatalf("FreeUDPPort %d: %v", udp, err)
	}
	c.Close()
}

// --- parallel use -------------------------------------------------------------------

func TestParallelServers(t *testing.T) {
	// Several brokers and private servers at once get their own ports and files.
	var mu sync.Mutex
	addrs := map[string]bool{}
	for i := range 4 {
		t.Run(fmt.Sprint(i), func(t *testing.T) {
			t.Parallel()
			m := testenv.StartMosquitto(t, testenv.MosquittoOptions{})
			mu.Lock()
			defer mu.Unlock()
			if addrs[m.Addr()] {
				t.Errorf("address %s handed out twice", m.Addr())
			}
			addrs[m.Addr()] = true
		})
	}
}
