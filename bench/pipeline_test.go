package bench

import (
	"context"
	"fmt"
	"runtime/pprof"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/sluice-gw/sluice/buffer"
	"github.com/sluice-gw/sluice/gateway"
	"github.com/sluice-gw/sluice/gateway/senml"
	"github.com/sluice-gw/sluice/internal/testenv"
	"github.com/sluice-gw/sluice/uplink"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// pipeline is the gateway's data path wired in this process as cmd/sluice
// wires it (MQTT ingress, buffer, uplink, their metrics), against a real
// Mosquitto and Postgres, so that a CPU profile of a benchmark shows where a
// reading's time goes. The load generator runs in the same process under the
// pprof label role=publisher: `go tool pprof -tagignore role=publisher`
// leaves the gateway alone in the profile.
type pipeline struct {
	broker *testenv.Mosquitto
	dsn    string
	buf    *buffer.Buffer
	in     *gateway.Ingest
	up     *uplink.Uplink
	next   int // the next message index to publish
}

func startPipeline(b *testing.B, withUplink bool) *pipeline {
	b.Helper()
	p := &pipeline{broker: testenv.StartMosquitto(b, testenv.MosquittoOptions{})}
	p.dsn = testenv.SharedPostgres(b).NewDatabase(b)
	reg := prometheus.NewRegistry()
	commit := gateway.NewCommitHistogram(reg)
	var err error
	p.buf, err = buffer.Open(buffer.Options{Dir: b.TempDir(), MaxBytes: 1 << 30, GatewayID: "gw-bench", Site: "bench",
		OnCommit: func(d time.Duration, _ int) { commit.Observe(d.Seconds()) }})
	if err != nil {
		b.Fatal(err)
	}
	reg.MustRegister(gateway.NewBufferCollector(p.buf.Stats))
	p.in = gateway.NewIngest(gateway.IngestOptions{}, gateway.NewClock(gateway.ClockTrusted), nil, reg)
	m, err := gateway.NewMQTT(gateway.MQTTOptions{
		Broker: p.broker.URL(),
		Subscriptions: []gateway.Subscription{
			{Topic: FlatFilter, Pattern: FlatPattern, Format: senml.FormatAuto, QoS: 1},
			{Topic: SenMLFilter, Pattern: SenMLPattern, Format: senml.FormatSenMLJSON, QoS: 1},
		},
	}, "gw-bench", p.in, p.buf, nil)
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { _ = m.Run(ctx) })
	if withUplink {
		p.up, err = uplink.New(uplink.Options{DSN: p.dsn, GatewayID: "gw-bench", Site: "bench", Registerer: reg}, p.buf)
		if err != nil {
			b.Fatal(err)
		}
		wg.Go(func() { _ = p.up.Run(ctx) })
	}
	b.Cleanup(func() {
		cancel()
		wg.Wait()
		if p.up != nil {
			p.up.Close()
		}
		if err := p.buf.Close(); err != nil {
			b.Error(err)
		}
	})
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if st, _ := m.State(); st == gateway.StateConnected {
			break
		}
		if time.Now().After(deadline) {
			st, lastErr := m.State()
			b.Fatalf("mqtt ingress not connected within 10 s: %s %s", st, lastErr)
		}
	}
	return p
}

// ingest publishes n messages of shape and waits until the gateway has
// acknowledged every reading (and, with the uplink, uploaded it).
func (p *pipeline) ingest(b *testing.B, shape Shape, n int) {
	b.Helper()
	w := Workload{Shape: shape, Start: time.Now().Add(-time.Hour)}
	in0, _ := p.in.Counts()
	want := in0 + int64(n*w.ReadingsPer())
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	var err error
	pprof.Do(ctx, pprof.Labels("role", "publisher"), func(ctx context.Context) {
		err = NewPublisher(PublishOptions{Addr: p.broker.Addr(), ClientID: fmt.Sprintf("pub-%d", p.next)}, w).Run(ctx, p.next, n)
	})
	p.next += n
	if err != nil {
		b.Fatal(err)
	}
	for {
		in, _ := p.in.Counts()
		done := in >= want
		if done && p.up != nil {
			done = p.buf.Stats().Readings == 0
		}
		if done {
			return
		}
		if ctx.Err() != nil {
			b.Fatalf("the gateway took %d of %d readings in", in-in0, want-in0)
		}
		time.Sleep(time.Millisecond)
	}
}

// BenchmarkPipeline measures the in-process data path from MQTT to the
// buffer (durable and acknowledged), with and without the uplink to
// Postgres, for each payload shape. b.N is messages: run it with a fixed
// count, e.g. -benchtime 100000x, and -cpuprofile to see where time goes.
func BenchmarkPipeline(b *testing.B) {
	for _, withUplink := range []bool{true, false} {
		name := "uplink"
		if !withUplink {
			name = "no-uplink"
		}
		b.Run(name, func(b *testing.B) {
			p := startPipeline(b, withUplink)
			for _, shape := range []Shape{Flat, SenML10} {
				b.Run(shapeName(shape), func(b *testing.B) {
					p.ingest(b, shape, b.N)
					per := Workload{Shape: shape}.ReadingsPer()
					b.ReportMetric(float64(b.N*per)/b.Elapsed().Seconds(), "readings/s")
					b.ReportMetric(0, "ns/op")
				})
			}
		})
	}
}

func shapeName(s Shape) string {
	if s == SenML10 {
		return "senml10"
	}
	return "flat"
}

// BenchmarkDrain measures the uplink emptying a backlog of b.N flat
// readings into Postgres, beside the raw COPY ceiling of the same rows on the
// same server. b.N is readings: run it with e.g. -benchtime 200000x.
func BenchmarkDrain(b *testing.B) {
	w := Workload{Shape: Flat, Start: time.Now().Add(-time.Hour)}
	b.Run("uplink", func(b *testing.B) {
		b.StopTimer()
		opts := buffer.Options{Dir: b.TempDir(), MaxBytes: 2 << 30, GatewayID: "gw-bench", Site: "bench"}
		if _, err := FillBuffer(context.Background(), opts, w, b.N); err != nil {
			b.Fatal(err)
		}
		buf, err := buffer.Open(opts)
		if err != nil {
			b.Fatal(err)
		}
		defer buf.Close()
		dsn := testenv.SharedPostgres(b).NewDatabase(b)
		if err := Migrate(context.Background(), dsn); err != nil {
			b.Fatal(err)
		}
		up, err := uplink.New(uplink.Options{DSN: dsn, GatewayID: "gw-bench", Site: "bench"}, buf)
		if err != nil {
			b.Fatal(err)
		}
		defer up.Close()
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		b.StartTimer()
		if err := up.Flush(ctx); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		if n := buf.Stats().Readings; n != 0 {
			b.Fatalf("%d readings left in the buffer", n)
		}
		b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "rows/s")
		b.ReportMetric(0, "ns/op")
	})
	b.Run("copy-ceiling", func(b *testing.B) {
		b.StopTimer()
		dsn := testenv.SharedPostgres(b).NewDatabase(b)
		if err := Migrate(context.Background(), dsn); err != nil {
			b.Fatal(err)
		}
		rows, took, err := CopyCeiling(context.Background(), dsn, "gw-bench", "bench", w, b.N, uplink.DefaultBatchSize)
		if err != nil {
			b.Fatal(err)
		}
		b.ReportMetric(float64(rows)/took.Seconds(), "rows/s")
		b.ReportMetric(0, "ns/op")
	})
}
