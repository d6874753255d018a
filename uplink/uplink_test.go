package uplink

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/sluice-gw/sluice/buffer"
	"github.com/sluice-gw/sluice/internal/testenv"
)

func TestMain(m *testing.M) { testenv.Main(m) }

var t0 = time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)

func reading(sensor string, i int) buffer.Reading {
	ts := t0.Add(time.Duration(i) * time.Millisecond)
	return buffer.Reading{
		Name: sensor + ":v", Sensor: sensor, Metric: "v", Unit: "V",
		Time: ts, Kind: buffer.KindNumber, Number: float64(i), Received: ts, ClockSynced: true,
	}
}

func openBuffer(t *testing.T) *buffer.Buffer {
	t.Helper()
	b, err := buffer.Open(buffer.Options{Dir: t.TempDir(), CommitInterval: time.Microsecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.Close() })
	return b
}

func fill(t *testing.T, b *buffer.Buffer, sensor string, n int) {
	t.Helper()
	for start := 0; start < n; start += 500 {
		var rs []buffer.Reading
		for i := start; i < min(start+500, n); i++ {
			rs = append(rs, reading(sensor, i))
		}
		if _, err := b.Append(context.Background(), buffer.Message{Class: buffer.ClassTelemetry, Readings: rs}); err != nil {
			t.Fatal(err)
		}
	}
}

func newUplink(t *testing.T, dsn string, b Source, mod func(*Options)) *Uplink {
	t.Helper()
	o := Options{DSN: dsn, GatewayID: "gw-test", Site: "site-a", BatchSize: 1000, BatchWait: 10 * time.Millisecond,
		Heartbeat: time.Second, BackoffMax: 500 * time.Millisecond}
	if mod != nil {
		mod(&o)
	}
	u, err := New(o, b)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(u.Close)
	return u
}

func count(t *testing.T, dsn, sql string, args ...any) int64 {
	t.Helper()
	conn, err := pgx.Connect(context.Background(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	var n int64
	if err := conn.QueryRow(context.Background(), sql, args...).Scan(&n); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	return n
}

// runUntil runs the uplink until cond holds or the deadline passes.
func runUntil(t *testing.T, u *Uplink, d time.Duration, cond func() bool) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = u.Run(ctx) }()
	defer func() { cancel(); <-done }()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("condition not reached within %s; uplink status %+v", d, u.Status())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestUploadExactlyOnce(t *testing.T) {
	dsn := testenv.SharedPostgres(t).NewDatabase(t)
	b := openBuffer(t)
	fill(t, b, "s1", 5000)
	u := newUplink(t, dsn, b, nil)
	runUntil(t, u, 30*time.Second, func() bool { return b.Stats().Readings == 0 })
	if n := count(t, dsn, "SELECT count(*) FROM sluice.readings"); n != 5000 {
		t.Fatalf("%d rows, want 5000", n)
	}
	if n := count(t, dsn, "SELECT acked_seq FROM sluice.streams"); n != 5000 {
		t.Fatalf("watermark %d, want 5000", n)
	}
	if err := u.Heartbeat(context.Background()); err != nil {
		t.Fatal(err)
	}
	if n := count(t, dsn, "SELECT count(*) FROM sluice.gateways WHERE gateway_id = 'gw-test' AND backlog_readings = 0 AND uploaded_total = 5000"); n != 1 {
		t.Fatalf("heartbeat row missing or wrong: %d", n)
	}
	st := u.Status()
	if st.State != StateUp || st.Uploaded != 5000 || st.SchemaVersion != SchemaVersion() {
		t.Fatalf("status %+v", st)
	}
}

// ackFails is a Source whose first Ack fails: the batch committed centrally
// but stays in the buffer, as after a crash between COMMIT and Ack.
type ackFails struct {
	*buffer.Buffer
	mu     sync.Mutex
	failed bool
}

func (a *ackFails) Ack(stream [16]byte, upTo uint64, dead []buffer.DeadLetter) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if !a.failed {
		a.failed = true
		return errors.New("simulated crash before the local ack")
	}
	return a.Buffer.Ack(stream, upTo, dead)
}

func TestResendAfterCommitIsSkippedByWatermark(t *testing.T) {
	dsn := testenv.SharedPostgres(t).NewDatabase(t)
	b := openBuffer(t)
	// Untimed-looking readings with equal times would collide on the natural
	// key; here every reading is distinct, so only the watermark can skip.
	fill(t, b, "s1", 300)
	src := &ackFails{Buffer: b}
	u := newUplink(t, dsn, src, nil)
	runUntil(t, u, 30*time.Second, func() bool { return b.Stats().Readings == 0 })
	if n := count(t, dsn, "SELECT count(*) FROM sluice.readings"); n != 300 {
		t.Fatalf("%d rows, want 300", n)
	}
	if got := testMetric(t, u.metrics.duplicates); got != 300 {
		t.Fatalf("duplicates skipped = %v, want the whole resent batch (300)", got)
	}
}

func TestNaturalKeyDropsRedeliveredReading(t *testing.T) {
	dsn := testenv.SharedPostgres(t).NewDatabase(t)
	b := openBuffer(t)
	// The same measurement twice, as a broker redelivery would bring it.
	for range 2 {
		if _, err := b.Append(context.Background(), buffer.Message{Class: buffer.ClassTelemetry, Readings: []buffer.Reading{reading("s1", 7)}}); err != nil {
			t.Fatal(err)
		}
	}
	u := newUplink(t, dsn, b, nil)
	runUntil(t, u, 30*time.Second, func() bool { return b.Stats().Readings == 0 })
	if n := count(t, dsn, "SELECT count(*) FROM sluice.readings"); n != 1 {
		t.Fatalf("%d rows, want 1", n)
	}
}

// TestDirectCopyFallsBackOnDuplicates: a batch is copied straight into
// sluice.readings; one that holds readings already there is rolled back to
// its savepoint and sent the ON CONFLICT way, as are the next batches, and
// every reading lands once.
func TestDirectCopyFallsBackOnDuplicates(t *testing.T) {
	dsn := testenv.SharedPostgres(t).NewDatabase(t)
	b := openBuffer(t)
	u := newUplink(t, dsn, b, nil)
	rows := func() int64 { return count(t, dsn, "SELECT count(*) FROM sluice.readings") }

	fill(t, b, "s1", 1000)
	runUntil(t, u, 30*time.Second, func() bool { return b.Stats().Readings == 0 })
	if n := rows(); n != 1000 {
		t.Fatalf("%d rows after the first batch, want 1000", n)
	}
	if left := u.conflictWay.Load(); left != 0 {
		t.Fatalf("a batch without duplicates switched to the ON CONFLICT way (%d batches)", left)
	}

	// Readings 500..1499: the first half is already stored.
	var rs []buffer.Reading
	for i := 500; i < 1500; i++ {
		rs = append(rs, reading("s1", i))
	}
	if _, err := b.Append(context.Background(), buffer.Message{Class: buffer.ClassTelemetry, Readings: rs}); err != nil {
		t.Fatal(err)
	}
	runUntil(t, u, 30*time.Second, func() bool { return b.Stats().Readings == 0 })
	if n := rows(); n != 1500 {
		t.Fatalf("%d rows after the batch with duplicates, want 1500", n)
	}
	if got := testMetric(t, u.metrics.duplicates); got != 500 {
		t.Fatalf("duplicates skipped = %v, want 500", got)
	}
	if left := u.conflictWay.Load(); left != conflictBatches {
		t.Fatalf("after a duplicate: %d batches left the ON CONFLICT way, want %d", left, conflictBatches)
	}

	fill(t, b, "s2", 1000)
	runUntil(t, u, 30*time.Second, func() bool { return b.Stats().Readings == 0 })
	if n := rows(); n != 2500 {
		t.Fatalf("%d rows at the end, want 2500", n)
	}
	if left := u.conflictWay.Load(); left != conflictBatches-1 {
		t.Fatalf("the batch after a duplicate did not go the ON CONFLICT way (%d left)", left)
	}
	if n := count(t, dsn, "SELECT count(*) FROM (SELECT name, ts FROM sluice.readings GROUP BY name, ts HAVING count(*) > 1) d"); n != 0 {
		t.Fatalf("%d readings stored twice", n)
	}
}

func TestPoisonReadingGoesToDeadLetters(t *testing.T) {
	dsn := testenv.SharedPostgres(t).NewDatabase(t)
	b := openBuffer(t)
	fill(t, b, "s1", 100)
	poison := reading("s1", 1000)
	poison.Kind, poison.Text = buffer.KindString, "nul\x00byte" // Postgres text refuses NUL: SQLSTATE 22021
	if _, err := b.Append(context.Background(), buffer.Message{Class: buffer.ClassTelemetry, Readings: []buffer.Reading{poison}}); err != nil {
		t.Fatal(err)
	}
	fill(t, b, "s2", 100)
	u := newUplink(t, dsn, b, func(o *Options) { o.BatchSize = 5000 })
	runUntil(t, u, 30*time.Second, func() bool { return b.Stats().Readings == 0 })
	if n := count(t, dsn, "SELECT count(*) FROM sluice.readings"); n != 200 {
		t.Fatalf("%d rows, want 200 (all but the poison)", n)
	}
	if st := b.Stats(); st.DeadLetters != 1 {
		t.Fatalf("%d dead letters, want 1", st.DeadLetters)
	}
	var dead []buffer.DeadLetter
	_ = b.DeadLetters(func(d buffer.DeadLetter) error { dead = append(dead, d); return nil })
	if len(dead) != 1 || dead[0].Record.Seq != 101 || dead[0].Err == "" {
		t.Fatalf("dead letters %+v", dead)
	}
}

func TestConcurrentMigrationsApplyOnce(t *testing.T) {
	dsn := testenv.SharedPostgres(t).NewDatabase(t)
	pool, err := pgxpool.New(context.Background(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for range 8 {
		wg.Go(func() {
			if _, _, err := Migrate(context.Background(), pool); err != nil {
				errs <- err
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("concurrent migrate: %v", err)
	}
	if n := count(t, dsn, "SELECT count(*) FROM sluice.schema_migrations"); n != int64(SchemaVersion()) {
		t.Fatalf("%d migrations recorded, want %d", n, SchemaVersion())
	}
}

func TestUploadThroughPgBouncer(t *testing.T) {
	pg := testenv.SharedPostgres(t)
	dsn := pg.NewDatabase(t)
	bouncer := testenv.StartPgBouncer(t, pg, dsn)
	b := openBuffer(t)
	fill(t, b, "s1", 3000)
	fill(t, b, "s2", 3000)
	u := newUplink(t, bouncer, b, func(o *Options) { o.BatchSize = 500 })
	runUntil(t, u, 60*time.Second, func() bool { return b.Stats().Readings == 0 })
	if n := count(t, dsn, "SELECT count(*) FROM sluice.readings"); n != 6000 {
		t.Fatalf("%d rows through PgBouncer, want 6000", n)
	}
}

func TestOutageThenDrainWithinRate(t *testing.T) {
	pg := testenv.SharedPostgres(t)
	dsn := pg.NewDatabase(t)
	proxy := testenv.StartProxy(t, pg.Addr())
	proxied := replaceHost(t, dsn, proxy.Addr())
	b := openBuffer(t)
	fill(t, b, "warm", 10)
	u := newUplink(t, proxied, b, func(o *Options) { o.MaxRate = 2000; o.BatchSize = 5000 })
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = u.Run(ctx) }()
	defer func() { cancel(); <-done }()
	waitFor(t, 20*time.Second, func() bool { return b.Stats().Readings == 0 })

	proxy.Cut()
	fill(t, b, "s1", 6000)
	waitFor(t, 20*time.Second, func() bool { return u.Status().State == StateRetrying })
	backlog := b.Stats().Readings
	if backlog == 0 {
		t.Fatal("no backlog while the link is cut")
	}
	proxy.Heal()
	start := time.Now()
	waitFor(t, 60*time.Second, func() bool { return b.Stats().Readings == 0 })
	took := time.Since(start)
	if n := count(t, dsn, "SELECT count(*) FROM sluice.readings"); n != 6010 {
		t.Fatalf("%d rows after the outage, want 6010", n)
	}
	// At 2000/s a backlog takes (backlog - the burst of one 200-reading batch) / 2000 s at least.
	if least := time.Duration(float64(backlog-200) / 2000 * float64(time.Second)); took < least-100*time.Millisecond {
		t.Fatalf("drained %d readings in %s: faster than max_rate 2000/s allows (at least %s)", backlog, took, least)
	}
}

func waitFor(t *testing.T, d time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("condition not reached within %s", d)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func replaceHost(t *testing.T, dsn, hostport string) string {
	t.Helper()
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("postgres://%s:%s@%s/%s?sslmode=disable", cfg.User, cfg.Password, hostport, cfg.Database)
}

func testMetric(t *testing.T, c prometheus.Collector) float64 {
	t.Helper()
	return testutil.ToFloat64(c)
}
