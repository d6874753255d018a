package main

import (
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sluice-gw/sluice/internal/testenv"
)

// TestPipelineExactlyOnce: 20 sensors publish 20,000 readings at QoS 1
// through a real MQTT client; every one lands in Postgres exactly once.
func TestPipelineExactlyOnce(t *testing.T) {
	broker := testenv.StartMosquitto(t, testenv.MosquittoOptions{})
	dsn := testenv.SharedPostgres(t).NewDatabase(t)
	g := startGateway(t, gatewayConfig(t, t.TempDir(), broker.URL(), dsn, testenv.FreePort(t), ""))
	g.waitHTTP("/readyz", 20*time.Second)

	var wg sync.WaitGroup
	var failed atomic.Int64
	base := time.Now().Add(-time.Hour).UnixMilli()
	for s := range 20 {
		wg.Go(func() {
			p := newPublisher(t, broker.Addr(), fmt.Sprintf("sensor-%d", s))
			if s < 10 {
				// Flat JSON, one timed reading a message, with the sensor's sequence number.
				for i := range 1000 {
					payload := fmt.Sprintf(`{"value": %d, "unit": "V", "ts": %d, "seq": %d}`, i, base+int64(i), i)
					if err := p.publish(fmt.Sprintf("sensors/feeder-%d/voltage", s), []byte(payload)); err != nil {
						failed.Add(1)
					}
				}
				return
			}
			// SenML packs of 10 untimed records: the gateway stamps them.
			for pack := range 100 {
				recs := make([]string, 10)
				for r := range recs {
					recs[r] = fmt.Sprintf(`{"n":"flow","u":"m3/s","v":%d}`, pack*10+r)
				}
				recs[0] = fmt.Sprintf(`{"bn":"pipe-%d:",`, s) + recs[0][1:]
				payload := "[" + strings.Join(recs, ",") + "]"
				if err := p.publish(fmt.Sprintf("packs/pipe-%d", s), []byte(payload)); err != nil {
					failed.Add(1)
				}
			}
		})
	}
	wg.Wait()
	if failed.Load() > 0 {
		t.Fatalf("%d publishes were not acknowledged by the broker", failed.Load())
	}
	waitRows(t, dsn, 20000, 90*time.Second, "SELECT count(*) FROM sluice.readings")
	time.Sleep(500 * time.Millisecond) // anything extra would show now
	if n := queryInt(t, dsn, "SELECT count(*) FROM sluice.readings"); n != 20000 {
		t.Fatalf("%d rows, want exactly 20000", n)
	}
	if n := queryInt(t, dsn, "SELECT count(DISTINCT (sensor, value)) FROM sluice.readings"); n != 20000 {
		t.Fatalf("%d distinct (sensor, value), want 20000", n)
	}
	if n := queryInt(t, dsn, "SELECT count(*) FROM sluice.readings WHERE sensor_seq IS NOT NULL"); n != 10000 {
		t.Fatalf("%d rows with sensor_seq, want 10000", n)
	}
	if n := queryInt(t, dsn, "SELECT count(*) FROM sluice.readings WHERE sensor = 'pipe-15' AND metric = 'flow' AND unit = 'm3/s'"); n != 1000 {
		t.Fatalf("pipe-15 has %d rows, want 1000", n)
	}
	waitRows(t, dsn, 1, 10*time.Second, "SELECT count(*) FROM sluice.uplink_health WHERE gateway_id = 'gw-e2e' AND status = 'ok' AND backlog_readings = 0")
}

// TestSIGKILLDuringStream kills the gateway at random moments while sensors
// stream untimed and timed readings; every reading the broker acknowledged
// lands exactly once.
func TestSIGKILLDuringStream(t *testing.T) {
	broker := testenv.StartMosquitto(t, testenv.MosquittoOptions{})
	dsn := testenv.SharedPostgres(t).NewDatabase(t)
	g := startGateway(t, gatewayConfig(t, t.TempDir(), broker.URL(), dsn, testenv.FreePort(t), ""))
	g.waitHTTP("/readyz", 20*time.Second) // subscribed: from now on the broker keeps what it accepts for the gateway

	const sensors = 10
	var acked [sensors]atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	base := time.Now().Add(-time.Hour).UnixMilli()
	for s := range sensors {
		wg.Go(func() {
			p := newPublisher(t, broker.Addr(), fmt.Sprintf("kill-sensor-%d", s))
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				var payload string
				if s%2 == 0 {
					payload = fmt.Sprint(i) // untimed plain number: only the redelivery key prevents a duplicate
				} else {
					payload = fmt.Sprintf(`{"value": %d, "ts": %d}`, i, base+int64(i))
				}
				if err := p.publish(fmt.Sprintf("sensors/k%d/level", s), []byte(payload)); err != nil {
					t.Errorf("publish: %v", err)
					return
				}
				acked[s].Store(int64(i + 1))
				time.Sleep(time.Millisecond)
			}
		})
	}
	kills := 8
	if testing.Short() {
		kills = 3
	}
	for range kills {
		time.Sleep(time.Duration(200+rand.IntN(1300)) * time.Millisecond)
		g.kill()
		time.Sleep(time.Duration(rand.IntN(300)) * time.Millisecond)
		g.start()
	}
	close(stop)
	wg.Wait()
	var total int64
	for s := range sensors {
		total += acked[s].Load()
	}
	waitRowsOr(t, dsn, total, 90*time.Second, "SELECT count(*) FROM sluice.readings", func() {
		for s := range sensors {
			t.Logf("sensor k%d: missing %s", s, missingValues(t, dsn, fmt.Sprintf("k%d", s), acked[s].Load()))
		}
	})
	time.Sleep(time.Second)
	if n := queryInt(t, dsn, "SELECT count(*) FROM sluice.readings"); n != total {
		for s := range sensors {
			t.Logf("sensor k%d: doubled %s", s, doubledValues(t, dsn, fmt.Sprintf("k%d", s)))
		}
		t.Fatalf("%d rows, broker acknowledged %d readings", n, total)
	}
	if n := queryInt(t, dsn, "SELECT count(*) FROM (SELECT sensor, value FROM sluice.readings GROUP BY 1, 2 HAVING count(*) > 1) d"); n != 0 {
		t.Fatalf("%d readings stored twice", n)
	}
	for s := range sensors {
		want := acked[s].Load()
		if n := queryInt(t, dsn, "SELECT count(*) FROM sluice.readings WHERE sensor = $1 AND value < $2", fmt.Sprintf("k%d", s), want); n != want {
			t.Errorf("sensor k%d: %d of its %d acknowledged readings stored", s, n, want)
		}
	}
	t.Logf("%d readings through %d SIGKILLs, none lost, none doubled", total, kills)
}

// TestPostgresCutUnderLoad cuts the link to Postgres while readings arrive:
// the backlog grows, uplink_health shows the gateway stale, and after the
// cut heals everything drains exactly once.
func TestPostgresCutUnderLoad(t *testing.T) {
	broker := testenv.StartMosquitto(t, testenv.MosquittoOptions{})
	pg := testenv.SharedPostgres(t)
	dsn := pg.NewDatabase(t)
	proxy := testenv.StartProxy(t, pg.Addr())
	g := startGateway(t, gatewayConfig(t, t.TempDir(), broker.URL(), replaceHostPort(t, dsn, proxy.Addr()), testenv.FreePort(t), ""))
	g.waitHTTP("/readyz", 20*time.Second)
	p := newPublisher(t, broker.Addr(), "cut-sensor")
	publish := func(from, to int) {
		for i := from; i < to; i++ {
			if err := p.publish("sensors/cut/pressure", []byte(fmt.Sprintf(`{"value": %d, "unit": "bar"}`, i))); err != nil {
				t.Fatalf("publish: %v", err)
			}
		}
	}
	publish(0, 500)
	waitRows(t, dsn, 500, 30*time.Second, "SELECT count(*) FROM sluice.readings")

	proxy.Cut()
	publish(500, 3000)
	// Heartbeats cannot arrive: after two missed ones the fleet view says stale.
	waitRows(t, dsn, 1, 20*time.Second, "SELECT count(*) FROM sluice.uplink_health WHERE gateway_id = 'gw-e2e' AND status IN ('stale', 'offline')")
	if n := queryInt(t, dsn, "SELECT count(*) FROM sluice.readings"); n >= 3000 {
		t.Fatalf("%d rows while the link was cut", n)
	}
	proxy.Heal()
	waitRows(t, dsn, 3000, 60*time.Second, "SELECT count(*) FROM sluice.readings")
	waitRows(t, dsn, 1, 20*time.Second, "SELECT count(*) FROM sluice.uplink_health WHERE gateway_id = 'gw-e2e' AND status = 'ok' AND backlog_readings = 0")
	if n := queryInt(t, dsn, "SELECT count(*) FROM sluice.readings"); n != 3000 {
		t.Fatalf("%d rows after the cut healed, want exactly 3000", n)
	}
}

// TestThroughPgBouncer runs the whole pipeline with the uplink going through
// PgBouncer in transaction pooling mode.
func TestThroughPgBouncer(t *testing.T) {
	broker := testenv.StartMosquitto(t, testenv.MosquittoOptions{})
	pg := testenv.SharedPostgres(t)
	dsn := pg.NewDatabase(t)
	bouncer := testenv.StartPgBouncer(t, pg, dsn)
	g := startGateway(t, gatewayConfig(t, t.TempDir(), broker.URL(), bouncer, testenv.FreePort(t), ""))
	g.waitHTTP("/readyz", 20*time.Second)
	p := newPublisher(t, broker.Addr(), "bouncer-sensor")
	p.publishNumbers(t, "sensors/tank-1/level", 0, 2000)
	waitRows(t, dsn, 2000, 60*time.Second, "SELECT count(*) FROM sluice.readings")
	if n := queryInt(t, dsn, "SELECT count(DISTINCT value) FROM sluice.readings"); n != 2000 {
		t.Fatalf("%d distinct values, want 2000", n)
	}
}

// TestShutdownFlushesAndRestartResumes: SIGTERM gives the uplink its bounded
// flush; what it cannot upload (Postgres unreachable) stays buffered and is
// uploaded by the next start, exactly once.
func TestShutdownFlushesAndRestartResumes(t *testing.T) {
	broker := testenv.StartMosquitto(t, testenv.MosquittoOptions{})
	pg := testenv.SharedPostgres(t)
	dsn := pg.NewDatabase(t)
	proxy := testenv.StartProxy(t, pg.Addr())
	cfg := gatewayConfig(t, t.TempDir(), broker.URL(), replaceHostPort(t, dsn, proxy.Addr()), testenv.FreePort(t),
		"[buffer]\ncommit_interval = \"1ms\"\n")
	g := startGateway(t, cfg)
	g.waitHTTP("/readyz", 20*time.Second)
	p := newPublisher(t, broker.Addr(), "flush-sensor")
	waitRows(t, dsn, 1, 20*time.Second, "SELECT count(*) FROM sluice.gateways") // schema in place

	proxy.Cut()
	p.publishNumbers(t, "sensors/flush/level", 0, 1000)
	start := time.Now()
	g.stop()
	if took := time.Since(start); took > 10*time.Second {
		t.Fatalf("shutdown took %s with the database unreachable; flush_timeout is 3s", took)
	}
	if !strings.Contains(g.out.String(), "readings stay buffered for the next start") {
		t.Fatalf("shutdown did not report the readings left buffered:\n%s", g.out.String())
	}
	if n := queryInt(t, dsn, "SELECT count(*) FROM sluice.readings"); n != 0 {
		t.Fatalf("%d rows although the link was cut", n)
	}
	proxy.Heal()
	g.start()
	waitRows(t, dsn, 1000, 30*time.Second, "SELECT count(*) FROM sluice.readings")

	// With the database reachable, SIGTERM uploads what is buffered before exiting.
	g.stop()
	for i := 1000; i < 1500; i++ {
		if err := p.publish("sensors/flush/level", []byte(fmt.Sprint(i))); err != nil {
			t.Fatal(err)
		}
	}
	g.start()
	g.waitHTTP("/readyz", 20*time.Second)
	time.Sleep(300 * time.Millisecond)
	g.stop()
	if n := queryInt(t, dsn, "SELECT count(*) FROM sluice.readings"); n != 1500 {
		t.Fatalf("%d rows after the flush at shutdown, want 1500", n)
	}
	if n := queryInt(t, dsn, "SELECT count(DISTINCT value) FROM sluice.readings"); n != 1500 {
		t.Fatalf("%d distinct values, want 1500", n)
	}
}

// TestBufferFullHoldsMessages: with on_full = "reject" a full buffer holds
// the MQTT message unacknowledged, ingest pauses, and once the uplink makes
// room everything the broker accepted lands; nothing is dropped.
func TestBufferFullHoldsMessages(t *testing.T) {
	broker := testenv.StartMosquitto(t, testenv.MosquittoOptions{})
	pg := testenv.SharedPostgres(t)
	dsn := pg.NewDatabase(t)
	proxy := testenv.StartProxy(t, pg.Addr())
	cfg := gatewayConfig(t, t.TempDir(), broker.URL(), replaceHostPort(t, dsn, proxy.Addr()), testenv.FreePort(t),
		"[buffer]\nmax_bytes = \"1MiB\"\non_full = \"reject\"\ncommit_interval = \"1ms\"\n")
	g := startGateway(t, cfg)
	g.waitHTTP("/readyz", 20*time.Second)
	waitRows(t, dsn, 1, 20*time.Second, "SELECT count(*) FROM sluice.gateways")
	proxy.Cut()
	p := newPublisher(t, broker.Addr(), "full-sensor")
	// 8000 readings of ~200 bytes: more than a 1 MiB buffer holds.
	pad := strings.Repeat("x", 150)
	const total = 8000
	for i := range total {
		payload := fmt.Sprintf(`{"value": "%d %s"}`, i, pad[:i%100+50])
		if err := p.publish("sensors/full/level", []byte(payload)); err != nil {
			t.Fatal(err)
		}
	}
	// The gateway reports itself full and holds the rest at the broker.
	g.waitHTTPBody("/api/status", `"full": true`, 20*time.Second)
	if !strings.Contains(g.metrics(), `sluice_messages_rejected_total{ingress="mqtt",reason="buffer_full"}`) {
		t.Fatal("buffer_full rejections are not counted")
	}
	proxy.Heal()
	waitRows(t, dsn, total, 120*time.Second, "SELECT count(*) FROM sluice.readings")
	if n := queryInt(t, dsn, "SELECT count(DISTINCT value_text) FROM sluice.readings"); n != total {
		t.Fatalf("%d distinct values, want %d", n, total)
	}
	if strings.Contains(g.metrics(), `sluice_readings_dropped_total{reason="buffer_full"} 1`) {
		t.Fatal("readings were dropped under on_full = reject")
	}
}

// TestBrokerRestartAndQueuedSession: messages published while the gateway is
// stopped are queued by the broker for its persistent session and arrive
// after it starts; a broker restart is ridden out by reconnecting and
// subscribing again.
func TestBrokerRestartAndQueuedSession(t *testing.T) {
	broker := testenv.StartMosquitto(t, testenv.MosquittoOptions{})
	dsn := testenv.SharedPostgres(t).NewDatabase(t)
	g := startGateway(t, gatewayConfig(t, t.TempDir(), broker.URL(), dsn, testenv.FreePort(t), ""))
	g.waitHTTP("/readyz", 20*time.Second)
	g.stop()
	p := newPublisher(t, broker.Addr(), "queued-sensor")
	p.publishNumbers(t, "sensors/queued/flow", 0, 500)
	g.start()
	waitRows(t, dsn, 500, 30*time.Second, "SELECT count(*) FROM sluice.readings")

	broker.Stop(t)
	broker.Start(t)
	g.waitHTTP("/readyz", 30*time.Second) // reconnected and subscriptions granted again
	p2 := newPublisher(t, broker.Addr(), "queued-sensor-2")
	for i := 500; i < 1000; i++ {
		if err := p2.publish("sensors/queued/flow", []byte(fmt.Sprint(i))); err != nil {
			t.Fatal(err)
		}
	}
	waitRows(t, dsn, 1000, 30*time.Second, "SELECT count(*) FROM sluice.readings")
	if n := queryInt(t, dsn, "SELECT count(DISTINCT value) FROM sluice.readings"); n != 1000 {
		t.Fatalf("%d distinct values, want 1000", n)
	}
}
