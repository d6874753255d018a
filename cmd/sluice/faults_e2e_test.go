package main

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/sluice-gw/sluice/internal/testenv"
)

// TestFaultSIGKILLMQTTAndCoAP kills the gateway with SIGKILL at 30 random
// moments while ten sensors stream at QoS 1 over MQTT and as confirmable
// CoAP POSTs, half of them untimed (only the idempotency keys keep a
// redelivered or retransmitted one from landing twice): every reading the
// broker or the gateway acknowledged lands exactly once.
func TestFaultSIGKILLMQTTAndCoAP(t *testing.T) {
	broker := testenv.StartMosquitto(t, testenv.MosquittoOptions{})
	dsn := testenv.SharedPostgres(t).NewDatabase(t)
	coapAddr := fmt.Sprintf("127.0.0.1:%d", testenv.FreeUDPPort(t))
	g := startGateway(t, gatewayConfig(t, t.TempDir(), broker.URL(), dsn, testenv.FreePort(t), coapOnly(coapAddr)))
	g.waitIngress("mqtt", 20*time.Second) // subscribed: from now on the broker keeps what it accepts for the gateway

	l := newLedger()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	base := time.Now().Add(-time.Hour).UnixMilli()
	for s := range 5 {
		ms := &mqttSensor{p: newPublisher(t, broker.Addr(), fmt.Sprintf("kill-mqtt-%d", s)),
			sensor: sensor{l: l, name: fmt.Sprintf("mk%d", s), metric: "level", timed: s%2 == 1, base: base}}
		cs := &coapSensor{c: newCoAPPeer(t, coapAddr), sensor: sensor{l: l, name: fmt.Sprintf("ck%d", s), metric: "flow", timed: s%2 == 1, base: base}}
		wg.Go(func() { ms.stream(t, stop, 20*time.Millisecond) })
		wg.Go(func() { cs.stream(t, stop, 20*time.Millisecond) })
	}
	const kills = 30
	for range kills {
		time.Sleep(time.Duration(300+rand.IntN(1200)) * time.Millisecond)
		g.kill()
		g.start()
	}
	time.Sleep(time.Second)
	close(stop)
	wg.Wait()
	if t.Failed() {
		return
	}
	ty := l.verify(t, g, dsn, fmt.Sprintf("SIGKILL x%d, MQTT and CoAP", kills), 2*time.Minute)
	if ty.acked < 1000 {
		t.Fatalf("only %d readings acknowledged: the stream hardly ran", ty.acked)
	}
}

// streamSensors starts n MQTT sensors (half untimed, half timed) that each
// publish one reading every pause; stop ends them and waits.
func streamSensors(t *testing.T, broker *testenv.Mosquitto, l *ledger, prefix string, n int, pause time.Duration) (stop func()) {
	t.Helper()
	done := make(chan struct{})
	var wg sync.WaitGroup
	base := time.Now().Add(-time.Hour).UnixMilli()
	for s := range n {
		ms := &mqttSensor{p: newPublisher(t, broker.Addr(), fmt.Sprintf("%s-pub-%d", prefix, s)),
			sensor: sensor{l: l, name: fmt.Sprintf("%s%d", prefix, s), metric: "level", timed: s%2 == 1, base: base}}
		wg.Go(func() { ms.stream(t, done, pause) })
	}
	return sync.OnceFunc(func() {
		close(done)
		wg.Wait()
	})
}

// pgFaultGateway is a gateway, a broker and a private Postgres of its own,
// which the test may stop, kill, fill up or cut off (through proxy).
type pgFaultGateway struct {
	*gatewayProc
	broker *testenv.Mosquitto
	pg     *testenv.Postgres
	dsn    string // straight to Postgres, for the test's own queries
	proxy  *testenv.Proxy
}

// startPGFaultGateway starts the parts; with viaProxy the gateway reaches
// Postgres through a fault proxy. Every commit gets its time recorded
// (track_commit_timestamp), so a test can measure rows per second.
func startPGFaultGateway(t *testing.T, opts testenv.PostgresOptions, viaProxy bool, uplinkKeys ...string) *pgFaultGateway {
	t.Helper()
	opts.ExtraConf = append(opts.ExtraConf, "track_commit_timestamp = on")
	f := &pgFaultGateway{broker: testenv.StartMosquitto(t, testenv.MosquittoOptions{}), pg: testenv.StartPostgres(t, opts)}
	f.dsn = f.pg.NewDatabase(t)
	gwDSN := f.dsn
	if viaProxy {
		f.proxy = testenv.StartProxy(t, f.pg.Addr())
		gwDSN = replaceHostPort(t, f.dsn, f.proxy.Addr())
	}
	cfg := gatewayConfig(t, t.TempDir(), f.broker.URL(), gwDSN, testenv.FreePort(t), "")
	f.gatewayProc = startGateway(t, withKeys(t, cfg, "uplink", uplinkKeys...))
	f.waitIngress("mqtt", 20*time.Second)
	waitRows(t, f.dsn, 1, 20*time.Second, "SELECT count(*) FROM sluice.gateways") // the schema is in place
	return f
}

// health is the gateway's row of sluice.uplink_health, "" when unreadable.
func (f *pgFaultGateway) health() string {
	var status string
	rows := queryStrings(f.dsn, "SELECT status FROM sluice.uplink_health WHERE gateway_id = 'gw-e2e'")
	if len(rows) == 1 {
		status = rows[0]
	}
	return status
}

// backlogWatch samples the gateway's backlog and central health once a
// second while a fault lasts, and checks the backlog stays within its
// bounds: nothing dropped, never more bytes than max_bytes.
type backlogWatch struct {
	maxReadings, maxBytes int64
	health                map[string]bool // uplink_health states seen
	uplink                map[string]bool // the gateway's own uplink states seen
	lastError             string
}

func (f *pgFaultGateway) watch(t *testing.T, d time.Duration, health func() string) backlogWatch {
	t.Helper()
	w := backlogWatch{health: map[string]bool{}, uplink: map[string]bool{}}
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(time.Second) {
		st := f.adminStatus()
		w.maxReadings = max(w.maxReadings, st.Buffer.Readings)
		w.maxBytes = max(w.maxBytes, st.Buffer.Bytes)
		w.uplink[st.Uplink.State] = true
		if st.Uplink.LastError != "" {
			w.lastError = st.Uplink.LastError
		}
		if h := health(); h != "" {
			w.health[h] = true
		}
		var dropped int64
		for _, n := range st.Buffer.Dropped {
			dropped += n
		}
		if dropped != 0 || st.Buffer.Bytes > st.Buffer.MaxBytes {
			t.Fatalf("backlog out of bounds: %+v", st.Buffer)
		}
	}
	t.Logf("during the fault: backlog up to %d readings (%d bytes), uplink_health %v, uplink %v, last error %q",
		w.maxReadings, w.maxBytes, keys(w.health), keys(w.uplink), w.lastError)
	return w
}

func keys(m map[string]bool) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// commitRate measures how fast rows reached sluice.readings after since:
// the most committed in any one-second window, and the mean over the span
// from the first commit to the last (without the first batch, which the
// rate limiter lets through as its burst), from the commit timestamps.
func commitRate(t *testing.T, pg *testenv.Postgres, dsn string, since time.Time) (peak1s, mean float64, rows int64) {
	t.Helper()
	commits := pg.QueryRows(t, dsn, `SELECT pg_xact_commit_timestamp(xmin) AS at, count(*) FROM sluice.readings
WHERE pg_xact_commit_timestamp(xmin) >= $1 GROUP BY 1 ORDER BY 1`, since)
	at := func(i int) time.Time { return commits[i][0].(time.Time) }
	n := func(i int) int64 { return commits[i][1].(int64) }
	for i := range commits {
		rows += n(i)
		var window int64
		for j := i; j < len(commits) && at(j).Sub(at(i)) < time.Second; j++ {
			window += n(j)
		}
		peak1s = max(peak1s, float64(window))
	}
	if len(commits) > 1 {
		span := at(len(commits) - 1).Sub(at(0)).Seconds()
		mean = float64(rows-n(0)) / span // the first batch is the bucket's burst
	}
	return peak1s, mean, rows
}

// TestFaultPostgresOutagePacedCatchUp cuts the link to Postgres for three
// minutes while ten sensors stream: the backlog grows within its bounds,
// uplink_health goes stale, and after the link heals the backlog drains at
// no more than max_rate and everything lands exactly once.
func TestFaultPostgresOutagePacedCatchUp(t *testing.T) {
	const maxRate = 1500
	const outage = 3 * time.Minute
	f := startPGFaultGateway(t, testenv.PostgresOptions{}, true, fmt.Sprintf("max_rate = %d", maxRate))
	l := newLedger()
	stop := streamSensors(t, f.broker, l, "out", 10, 50*time.Millisecond)
	defer stop()
	time.Sleep(3 * time.Second)
	f.proxy.Cut()
	w := f.watch(t, outage, f.health)
	if !w.health["stale"] && !w.health["offline"] {
		t.Fatalf("uplink_health never showed the gateway stale during the outage: %v", keys(w.health))
	}
	if !w.uplink["retrying"] || w.maxReadings < 10000 {
		t.Fatalf("the gateway's uplink states %v, backlog up to %d: the outage did not show", keys(w.uplink), w.maxReadings)
	}
	healed := time.Now()
	f.proxy.Heal()
	// The sensors go on; the backlog drains while new readings arrive.
	for deadline := time.Now().Add(time.Minute); f.adminStatus().Buffer.Readings > 200; time.Sleep(200 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("backlog not drained a minute after the link healed: %+v", f.adminStatus().Buffer)
		}
	}
	drained := time.Since(healed)
	stop()
	l.verify(t, f.gatewayProc, f.dsn, fmt.Sprintf("Postgres unreachable for %s (proxy cut)", outage), time.Minute)
	peak, mean, rows := commitRate(t, f.pg, f.dsn, healed)
	t.Logf("RELIABILITY catch-up: backlog %d readings drained in %s; %d rows since the heal, peak %.0f rows in 1 s, mean %.0f rows/s (max_rate %d)",
		w.maxReadings, drained.Round(100*time.Millisecond), rows, peak, mean, maxRate)
	// Paced batches are a tenth of max_rate and the token bucket's burst is
	// one batch, so at most 1.1 x max_rate are admitted in any second; a
	// little slack for commits that bunch up behind a slow one.
	if peak > 1.3*maxRate || mean > maxRate*1.1 {
		t.Fatalf("catch-up not paced: peak %.0f rows in 1 s, mean %.0f rows/s, max_rate %d", peak, mean, maxRate)
	}
	waitRows(t, f.dsn, 1, 20*time.Second, "SELECT count(*) FROM sluice.uplink_health WHERE gateway_id = 'gw-e2e' AND status = 'ok'")
}

// TestFaultPostgresSlowLink puts 200 ms of latency each way and a 64 KB/s
// cap on the link to Postgres for 15 s while ten sensors stream: uploads
// fall behind (uplink_health says lagging), the backlog stays within its
// bounds, and once the link is fast again everything lands exactly once.
func TestFaultPostgresSlowLink(t *testing.T) {
	f := startPGFaultGateway(t, testenv.PostgresOptions{}, true, `lag_alert = "2s"`)
	l := newLedger()
	stop := streamSensors(t, f.broker, l, "slow", 10, 50*time.Millisecond)
	defer stop()
	time.Sleep(2 * time.Second)
	f.proxy.SetLatency(200 * time.Millisecond)
	f.proxy.SetBandwidth(64 << 10)
	w := f.watch(t, 15*time.Second, f.health)
	if !w.health["lagging"] {
		t.Fatalf("uplink_health never said lagging on the slow link: %v", keys(w.health))
	}
	f.proxy.SetLatency(0)
	f.proxy.SetBandwidth(0)
	time.Sleep(time.Second)
	stop()
	l.verify(t, f.gatewayProc, f.dsn, "slow link to Postgres (200 ms each way, 64 KB/s) for 15 s", time.Minute)
	waitRows(t, f.dsn, 1, 20*time.Second, "SELECT count(*) FROM sluice.uplink_health WHERE gateway_id = 'gw-e2e' AND status = 'ok'")
}

// TestFaultPostgresRestartAndCrash stops Postgres (fast shutdown) and later
// kills it with every backend (SIGKILL, crash recovery on start) while ten
// sensors stream; a batch in flight at the kill is either committed or not,
// and the watermark or the retry makes it land once either way.
func TestFaultPostgresRestartAndCrash(t *testing.T) {
	f := startPGFaultGateway(t, testenv.PostgresOptions{}, false)
	l := newLedger()
	stop := streamSensors(t, f.broker, l, "rs", 10, 50*time.Millisecond)
	defer stop()
	time.Sleep(2 * time.Second)
	f.pg.Stop(t)
	f.watch(t, 5*time.Second, func() string { return "" })
	f.pg.Start(t)
	time.Sleep(3 * time.Second)
	f.pg.Kill(t)
	w := f.watch(t, 5*time.Second, func() string { return "" })
	if !w.uplink["retrying"] {
		t.Fatalf("the gateway's uplink never noticed Postgres gone: %v", keys(w.uplink))
	}
	f.pg.Start(t)
	time.Sleep(2 * time.Second)
	stop()
	l.verify(t, f.gatewayProc, f.dsn, "Postgres stopped 5 s, then killed (SIGKILL) 5 s", time.Minute)
}

// TestFaultPostgresTooManyConnections fills every connection slot of
// Postgres (max_connections reached) and throws the gateway's connections
// out: Postgres refuses it (SQLSTATE 53300, an overload answer) for 10 s
// while ten sensors stream; once slots are free again everything lands.
func TestFaultPostgresTooManyConnections(t *testing.T) {
	f := startPGFaultGateway(t, testenv.PostgresOptions{MaxConnections: 8}, false)
	l := newLedger()
	stop := streamSensors(t, f.broker, l, "mc", 10, 50*time.Millisecond)
	defer stop()
	time.Sleep(2 * time.Second)
	held := f.occupyConnections(t)
	w := f.watch(t, 10*time.Second, func() string { return "" })
	if !strings.Contains(w.lastError, "53300") {
		t.Fatalf("the gateway was not refused for too many connections; last error %q", w.lastError)
	}
	for _, c := range held {
		c.Close(context.Background())
	}
	time.Sleep(time.Second)
	stop()
	l.verify(t, f.gatewayProc, f.dsn, "Postgres max_connections reached for 10 s", time.Minute)
	waitRows(t, f.dsn, 1, 30*time.Second, "SELECT count(*) FROM sluice.uplink_health WHERE gateway_id = 'gw-e2e' AND status = 'ok'")
}

// occupyConnections takes every free connection slot, then terminates the
// gateway's backends and takes their slots too, until the gateway holds
// none. The first connection returned is the test's to query with.
func (f *pgFaultGateway) occupyConnections(t *testing.T) []*pgx.Conn {
	t.Helper()
	var held []*pgx.Conn
	t.Cleanup(func() {
		for _, c := range held {
			c.Close(context.Background())
		}
	})
	fill := func() {
		for {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			c, err := pgx.Connect(ctx, f.dsn)
			cancel()
			if err != nil {
				if !strings.Contains(err.Error(), "53300") {
					t.Fatalf("occupy a connection: %v", err)
				}
				return
			}
			held = append(held, c)
		}
	}
	ctx := context.Background()
	for attempt := 0; ; attempt++ {
		fill()
		if len(held) == 0 {
			t.Fatal("no connection slot could be taken")
		}
		var gateway int
		if err := held[0].QueryRow(ctx, `SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
WHERE application_name LIKE 'sluice %'`).Scan(&gateway); err != nil {
			t.Fatal(err)
		}
		if gateway == 0 {
			return held
		}
		if attempt == 20 {
			t.Fatalf("the gateway kept winning a connection slot back")
		}
		// Terminated backends take a moment to free their slots.
		time.Sleep(50 * time.Millisecond)
	}
}

// publishEach publishes values from..to-1 for every sensor, one message each.
func publishEach(t *testing.T, sensors []*mqttSensor, from, to int64) {
	t.Helper()
	for v := from; v < to; v++ {
		for _, s := range sensors {
			if err := s.send(v); err != nil {
				t.Fatalf("%s value %d: %v", s.name, v, err)
			}
		}
	}
}

// waitIngressDown waits until the named ingress is no longer up.
func (g *gatewayProc) waitIngressDown(name string, d time.Duration) {
	g.t.Helper()
	deadline := time.Now().Add(d)
	for {
		for _, in := range g.adminStatus().Ingress {
			if in.Name == name && !in.Up {
				return
			}
		}
		if time.Now().After(deadline) {
			g.t.Fatalf("ingress %s still up after %s", name, d)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestFaultBrokerOutage kills the local broker twice while the gateway is
// subscribed (it reaches the broker through a fault proxy, so the test
// decides when it may come back):
//   - with the broker's store saved, as its autosave leaves it: readings
//     published while the gateway is still away are queued in its
//     persistent session and arrive once it reconnects;
//   - with the store lost: the session is gone, and the gateway subscribes
//     again on its own (SUBACK checked: the ingress is up again) before new
//     readings are published.
func TestFaultBrokerOutage(t *testing.T) {
	broker := testenv.StartMosquitto(t, testenv.MosquittoOptions{})
	bproxy := testenv.StartProxy(t, broker.Addr())
	dsn := testenv.SharedPostgres(t).NewDatabase(t)
	g := startGateway(t, gatewayConfig(t, t.TempDir(), "mqtt://"+bproxy.Addr(), dsn, testenv.FreePort(t), ""))
	g.waitIngress("mqtt", 20*time.Second)
	l := newLedger()
	base := time.Now().Add(-time.Hour).UnixMilli()
	sensors := func(round int) []*mqttSensor {
		var out []*mqttSensor
		for s := range 4 {
			out = append(out, &mqttSensor{p: newPublisher(t, broker.Addr(), fmt.Sprintf("bo-%d-%d", round, s)),
				sensor: sensor{l: l, name: fmt.Sprintf("bo%d", s), metric: "level", timed: s%2 == 1, base: base}})
		}
		return out
	}
	publishEach(t, sensors(0), 0, 100)
	l.waitLanded(t, dsn, 30*time.Second)

	// Outage 1: the store saved, the broker killed, down for 3 s.
	broker.Save(t)
	broker.Kill(t)
	bproxy.Cut() // the gateway stays away until the test says so
	g.waitIngressDown("mqtt", 20*time.Second)
	time.Sleep(3 * time.Second)
	broker.Start(t)
	publishEach(t, sensors(1), 100, 200) // queued for the gateway's session
	g.waitIngressDown("mqtt", time.Second)
	healed := time.Now()
	bproxy.Heal()
	g.waitIngress("mqtt", 60*time.Second)
	t.Logf("outage 1: the gateway was back and subscribed %s after the link returned", time.Since(healed).Round(10*time.Millisecond))
	l.waitLanded(t, dsn, 30*time.Second)

	// Outage 2: the store lost with the broker, so the session is gone.
	broker.Kill(t)
	if err := os.Remove(filepath.Join(broker.Dir(), "mosquitto.db")); err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	g.waitIngressDown("mqtt", 20*time.Second)
	time.Sleep(3 * time.Second)
	broker.Start(t)
	g.waitIngress("mqtt", 60*time.Second) // connected without a session, subscribed again, SUBACK granted
	// First connect: no session yet; outage 1: the saved session; outage 2: none.
	if got := regexp.MustCompile(`session_present=(true|false)`).FindAllString(g.out.String(), -1); !slices.Equal(got,
		[]string{"session_present=false", "session_present=true", "session_present=false"}) {
		t.Fatalf("sessions the gateway found on its connections: %v, want none, kept, lost", got)
	}
	publishEach(t, sensors(2), 200, 300)
	l.verify(t, g, dsn, "broker killed twice (store kept, store lost), 3 s each", time.Minute)
}

// TestFaultPoisonReading makes Postgres refuse one reading for its content
// (a CHECK constraint added while the gateway runs, SQLSTATE 23514): the
// batch is bisected until that one reading is isolated in the dead letters,
// the rest of its batch lands and the queue keeps moving. Stopped, the
// gateway's buffer exports the dead letter with its error; with the
// constraint gone, requeue and a restart land it, exactly once.
func TestFaultPoisonReading(t *testing.T) {
	broker := testenv.StartMosquitto(t, testenv.MosquittoOptions{})
	pg := testenv.SharedPostgres(t)
	dsn := pg.NewDatabase(t)
	data := t.TempDir()
	g := startGateway(t, gatewayConfig(t, data, broker.URL(), dsn, testenv.FreePort(t), ""))
	g.waitIngress("mqtt", 20*time.Second)
	waitRows(t, dsn, 1, 20*time.Second, "SELECT count(*) FROM sluice.gateways") // the schema is in place
	pg.Query(t, dsn, "ALTER TABLE sluice.readings ADD CONSTRAINT no_666 CHECK (value IS DISTINCT FROM 666)")

	l := newLedger()
	s := &packSensor{p: newPublisher(t, broker.Addr(), "poison-pub"), l: l, name: "po", base: time.Now().Add(-time.Hour).UnixMilli()}
	s.send(t, 10) // values 0..999 in ten packs of 100, one batch or a few
	poison := map[string][]int64{"po": {666}}
	l.waitLandedExcept(t, dsn, poison, time.Minute)
	s.send(t, 10) // the queue moves on
	ty := l.waitLandedExcept(t, dsn, poison, time.Minute)
	g.waitBufferEmpty(30 * time.Second)
	if st := g.adminStatus(); st.Buffer.DeadLetters != 1 {
		t.Fatalf("%d dead letters, want the one poison reading", st.Buffer.DeadLetters)
	}
	m := g.metrics()
	if metricValue(m, "sluice_dead_letters") != 1 || metricValue(m, `sluice_uplink_batches_total{result="dead_letter"}`) != 1 {
		t.Fatalf("dead letters not counted:\n%s", grepLines(m, "dead"))
	}
	t.Logf("RELIABILITY poison reading: %s; the one lost is the dead letter", ty)

	// The dead letter, exported with its error while the gateway is stopped.
	g.stop()
	out := filepath.Join(t.TempDir(), "dead.jsonl")
	expectCLI(t, 0, nil, "buffer", "export", "--data-dir", data, "--dead-only", "-o", out)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) != 1 || !strings.Contains(lines[0], `"n":"po:level"`) || !strings.Contains(lines[0], `"v":666`) ||
		!strings.Contains(lines[0], "no_666") || !strings.Contains(lines[0], "23514") {
		t.Fatalf("export of the dead letters:\n%s", b)
	}
	expectCLI(t, 0, []string{"dead        1 letters"}, "buffer", "inspect", "--data-dir", data)

	// Fixed centrally, requeued locally: it lands, once.
	pg.Query(t, dsn, "ALTER TABLE sluice.readings DROP CONSTRAINT no_666")
	expectCLI(t, 0, []string{"requeued 1 dead letters"}, "buffer", "requeue", "--data-dir", data)
	g.start()
	l.verify(t, g, dsn, "poison reading requeued after the fix", time.Minute)
	if st := g.adminStatus(); st.Buffer.DeadLetters != 0 {
		t.Fatalf("%d dead letters after the requeue", st.Buffer.DeadLetters)
	}
}

// setClock rewrites the clock mode in a started gateway's config, for its
// next start.
func (g *gatewayProc) setClock(mode string) {
	g.t.Helper()
	b, err := os.ReadFile(g.config)
	if err != nil {
		g.t.Fatal(err)
	}
	cfg := regexp.MustCompile(`(?m)^clock = ".*"$`).ReplaceAllString(string(b), fmt.Sprintf("clock = %q", mode))
	if err := os.WriteFile(g.config, []byte(cfg), 0o600); err != nil {
		g.t.Fatal(err)
	}
}

// TestFaultClockRestampedOnceTrusted: a gateway without a trusted clock
// (clock = "untrusted", as a board without RTC boots) stamps untimed
// readings and resolves relative SenML times with the boot id and the
// monotonic time beside them, and rejects a sensor time of 1979 (bad_time).
// Its role may not insert readings yet, so they stay buffered while the
// heartbeat gets through. Restarted with clock = "auto", the gateway trusts
// its clock once Postgres agrees with it; only then is the insert granted,
// and every buffered reading lands restamped, clock_synced true, at a time
// within the seconds it was taken. A later run that never trusts its
// clock uploads its readings flagged clock_synced false. None is at 1970.
//
// The host clock is right here, so this proves the mechanism and the
// flags, not a correction by hours: that needs a seam to start the
// gateway's wall clock at an offset (see docs/RELIABILITY.md).
func TestFaultClockRestampedOnceTrusted(t *testing.T) {
	broker := testenv.StartMosquitto(t, testenv.MosquittoOptions{})
	pg := testenv.SharedPostgres(t)
	role := fmt.Sprintf("gw_clock_%d", rand.IntN(1e9))
	pg.Query(t, "", fmt.Sprintf("CREATE ROLE %s LOGIN PASSWORD 'clock-pw'", role))
	t.Cleanup(func() { pg.Query(t, "", "DROP ROLE IF EXISTS "+role) }) // after the database, which cleans up first
	dsn := pg.NewDatabase(t)
	db := strings.SplitN(dsn[strings.LastIndex(dsn, "/")+1:], "?", 2)[0]
	expectCLI(t, 0, nil, "migrate", "--dsn", dsn)
	// The README's grants for a gateway role, but no INSERT on readings yet.
	pg.Query(t, dsn, fmt.Sprintf(`GRANT USAGE ON SCHEMA sluice TO %[1]s;
GRANT SELECT ON sluice.readings TO %[1]s;
GRANT SELECT, INSERT, UPDATE ON sluice.streams, sluice.gateways, sluice.sensors TO %[1]s;
GRANT INSERT ON sluice.gateway_heartbeats TO %[1]s;
GRANT SELECT ON sluice.schema_migrations TO %[1]s;
GRANT TEMPORARY ON DATABASE %[2]s TO %[1]s;`, role, db))
	gwDSN := fmt.Sprintf("postgres://%s:clock-pw@%s/%s?sslmode=disable", role, pg.Addr(), db)
	data := t.TempDir()
	cfg := strings.Replace(gatewayConfig(t, data, broker.URL(), gwDSN, testenv.FreePort(t), ""), `clock = "trusted"`, `clock = "untrusted"`, 1)
	g := startGateway(t, cfg)
	g.waitIngress("mqtt", 20*time.Second)

	l := newLedger()
	p := newPublisher(t, broker.Addr(), "clock-pub")
	untimed := &mqttSensor{p: p, sensor: sensor{l: l, name: "ck", metric: "level"}}
	taken := time.Now()
	for v := range int64(50) {
		if err := untimed.send(v); err != nil {
			t.Fatal(err)
		}
		// Relative SenML time: two seconds before the gateway's now.
		l.sent("cr", v)
		if err := p.publish("packs/cr", fmt.Appendf(nil, `[{"n":"level","v":%d,"t":-2}]`, v)); err != nil {
			t.Fatal(err)
		}
		l.acked("cr", v)
	}
	if err := p.publish("packs/cr", []byte(`[{"n":"level","v":999,"t":300000000}]`)); err != nil { // 1979
		t.Fatal(err)
	}
	takenEnd := time.Now()
	g.waitBufferAtLeast(100, 20*time.Second)
	if n := metricValue(g.metrics(), `sluice_messages_rejected_total{ingress="mqtt",reason="bad_time"}`); n != 1 {
		t.Fatalf("%v bad_time rejections, want the reading of 1979", n)
	}
	waitRows(t, dsn, 1, 20*time.Second, "SELECT count(*) FROM sluice.gateways WHERE gateway_id = 'gw-e2e' AND NOT clock_synced")
	if st := g.adminStatus(); st.Clock.Synced || !strings.Contains(st.Uplink.LastError, "42501") {
		t.Fatalf("clock %+v, uplink error %q: want untrusted, and uploads refused", st.Clock, st.Uplink.LastError)
	}
	g.stop()

	// Trusted once Postgres agrees; then the uploads may go.
	g.setClock("auto")
	g.start()
	deadline := time.Now().Add(30 * time.Second)
	for !g.adminStatus().Clock.Synced {
		if time.Now().After(deadline) {
			t.Fatalf("clock = auto never trusted the clock: %+v", g.adminStatus().Clock)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if n := queryInt(t, dsn, "SELECT count(*) FROM sluice.readings"); n != 0 {
		t.Fatalf("%d readings uploaded without the insert grant", n)
	}
	pg.Query(t, dsn, fmt.Sprintf("GRANT INSERT ON sluice.readings TO %s", role))
	ty := l.verify(t, g, dsn, "untrusted clock, then trusted: restamped", time.Minute)
	if n := queryInt(t, dsn, "SELECT count(*) FROM sluice.readings WHERE clock_synced"); n != int64(ty.stored) {
		t.Fatalf("%d of %d readings restamped (clock_synced)", n, ty.stored)
	}
	for _, c := range []struct {
		sensor     string
		from, till time.Time
	}{
		{"ck", taken, takenEnd},
		{"cr", taken.Add(-2 * time.Second), takenEnd.Add(-2 * time.Second)},
	} {
		q := fmt.Sprintf(`SELECT count(*) FROM sluice.readings WHERE sensor = '%s'
AND ts BETWEEN '%s'::timestamptz - interval '1 second' AND '%s'::timestamptz + interval '1 second'`,
			c.sensor, c.from.Format(time.RFC3339Nano), c.till.Format(time.RFC3339Nano))
		if n := queryInt(t, dsn, q); n != 50 {
			t.Fatalf("%d of %s's 50 readings restamped within the seconds they were taken", n, c.sensor)
		}
	}

	// A run that never trusts its clock: flagged, not restamped.
	g.stop()
	g.setClock("untrusted")
	g.start()
	g.waitIngress("mqtt", 20*time.Second)
	lf := newLedger()
	flagged := &mqttSensor{p: p, sensor: sensor{l: lf, name: "cf", metric: "level"}}
	for v := range int64(20) {
		if err := flagged.send(v); err != nil {
			t.Fatal(err)
		}
	}
	lf.verify(t, g, dsn, "clock never trusted: flagged", time.Minute)
	if n := queryInt(t, dsn, "SELECT count(*) FROM sluice.readings WHERE sensor = 'cf' AND NOT clock_synced AND ts > now() - interval '5 minutes'"); n != 20 {
		t.Fatalf("%d of 20 readings of an untrusted run stored flagged clock_synced = false", n)
	}
	if n := queryInt(t, dsn, "SELECT count(*) FROM sluice.readings WHERE ts < '2000-01-01'"); n != 0 {
		t.Fatalf("%d readings stored before 2000", n)
	}
}
