package main

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"github.com/sluice-gw/sluice/bench"
	"github.com/sluice-gw/sluice/buffer"
	"github.com/sluice-gw/sluice/internal/testenv"
	"github.com/sluice-gw/sluice/uplink"
)

// drainResult is the backlog phase: the raw COPY ceiling, the buffer filled
// with millions of readings, the gateway holding them (uplink cut) while it
// takes more in, and the drain once the uplink is back.
type drainResult struct {
	fill               int
	fillTook           time.Duration
	copyBefore         float64 // raw COPY rows/s measured before the backlog is made
	copyAfter          float64 // and after the drain: the machine is shared
	copyRows           int64   // rows of each COPY ceiling run
	idleAnon           int64   // RssAnon with the backlog buffered, idle
	ingest             ingestResult
	drained            int64
	drainPerSec        float64 // steady, 10%..90%
	drainWall          time.Duration
	drainCPU           time.Duration
	drainAnon, drainHW int64
	rows               int64
	load               string
}

func (b *bencher) drain() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	id := b.next()
	n := b.o.fill
	extra := b.o.flatMessages
	w := bench.Workload{Shape: bench.Flat, Start: time.Now().Add(-time.Duration(n+extra) * time.Millisecond).Add(-time.Minute)}
	res := &drainResult{fill: n}

	// The ceiling: the same rows COPYed straight into the same table shape,
	// in batches of the uplink's batch size, before and after the drain.
	res.copyRows, res.copyBefore = b.copyCeiling(ctx, w, n)

	// The backlog, as an outage leaves it.
	dir := filepath.Join(b.work, fmt.Sprintf("run%02d", id))
	start := time.Now()
	filled, err := bench.FillBuffer(ctx, buffer.Options{Dir: dir, MaxBytes: 2 << 30, MinFreeDisk: 1 << 30, GatewayID: "gw-bench", Site: "bench"}, w, n)
	if err != nil {
		b.h.Fatalf("%v", err)
	}
	res.fillTook = time.Since(start)
	b.r.logf("buffer filled with %d readings in %s", filled, res.fillTook.Round(time.Millisecond))

	// The gateway holding the backlog with its uplink cut: idle, then at full ingest.
	proxy := testenv.StartProxy(b.h, b.pg.Addr())
	proxy.Cut()
	dsn := b.newDatabase(id)
	g := b.startGateway(dir, id, strings.Replace(dsn, b.pg.Addr(), proxy.Addr(), 1), nil)
	time.Sleep(2 * time.Second)
	idle, err := bench.ReadProc(g.pid())
	if err != nil {
		b.h.Fatalf("%v", err)
	}
	res.idleAnon = idle.RssAnon
	res.ingest = b.ingestInto(ctx, g, w, filled, extra, id)
	if err := g.stop(); err != nil {
		b.r.logf("run %d: %v", id, err)
	}

	// The drain: the uplink back, straight to Postgres.
	total := int64(filled) + res.ingest.received
	g = b.startGateway(dir, id, dsn, nil)
	stopPerf := b.perf(g, id)
	wt := g.watch(b.o.sample)
	before, _ := bench.ReadProc(g.pid())
	if err := waitFor(30*time.Minute, g.exited, "the backlog drained", func() bool { return int64(wt.uploaded.Last()) >= total }); err != nil {
		b.h.Fatalf("drain: %v (uploaded %.0f of %d)\n%s", err, wt.uploaded.Last(), total, g.logTail())
	}
	after, _ := bench.ReadProc(g.pid())
	stopPerf()
	usage, err := wt.stop()
	if err != nil {
		b.r.logf("run %d: watch: %v", id, err)
	}
	res.drained = int64(wt.uploaded.Last())
	res.drainPerSec, err = wt.uploaded.Rate(0.1*float64(total), 0.9*float64(total))
	if err != nil {
		b.r.logf("drain rate: %v", err)
	}
	t0, _ := wt.uploaded.Crossed(1)
	t1, _ := wt.uploaded.Crossed(float64(total))
	res.drainWall = t1.Sub(t0)
	res.drainCPU = after.CPU - before.CPU
	res.drainAnon, res.drainHW = usage.PeakRssAnon, usage.VmHWM
	if err := g.stop(); err != nil {
		b.r.logf("run %d: %v", id, err)
	}
	b.endSession(id)
	res.rows, err = bench.CountRows(ctx, dsn)
	if err != nil {
		b.h.Fatalf("%v", err)
	}
	res.load = loadavg()
	b.r.logf("drain %d rows: %.0f rows/s steady, %s first to last, CPU %.2f µs/row, RssAnon peak %.1f MiB, rows %d, load %s",
		total, res.drainPerSec, res.drainWall.Round(time.Millisecond), float64(res.drainCPU.Microseconds())/float64(total),
		mib(res.drainAnon), res.rows, res.load)
	b.dropDatabase(id)
	_, res.copyAfter = b.copyCeiling(ctx, w, n)
	b.r.drain = res
}

// copyCeiling copies messages 0 .. n-1 of w into a fresh, migrated database
// with raw pgx CopyFrom and returns the rows and rows/s.
func (b *bencher) copyCeiling(ctx context.Context, w bench.Workload, n int) (int64, float64) {
	id := b.next()
	dsn := b.newDatabase(id)
	defer b.dropDatabase(id)
	if err := bench.Migrate(ctx, dsn); err != nil {
		b.h.Fatalf("%v", err)
	}
	rows, took, err := bench.CopyCeiling(ctx, dsn, "gw-bench", "bench", w, n, uplink.DefaultBatchSize)
	if err != nil {
		b.h.Fatalf("copy ceiling: %v", err)
	}
	rate := float64(rows) / took.Seconds()
	b.r.logf("ceiling COPY %d rows in %s: %.0f rows/s  load %s", rows, took.Round(time.Millisecond), rate, loadavg())
	return rows, rate
}

// copyCeiling is the mean of the two ceiling runs.
func (d *drainResult) copyCeiling() float64 { return (d.copyBefore + d.copyAfter) / 2 }

// ingestInto publishes messages n0 .. n0+n-1 of w to a running gateway whose
// uplink is cut and measures the ingest, as gatewayIngest does.
func (b *bencher) ingestInto(ctx context.Context, g *gatewayProc, w bench.Workload, n0, n, id int) ingestResult {
	wt := g.watch(b.o.sample)
	// Wait for the first sample: the counter starts at what an earlier run took in.
	_ = waitFor(5*time.Second, g.exited, "a first sample", func() bool { return wt.received.Len() > 0 })
	base := wt.received.Last()
	before, err := bench.ReadProc(g.pid())
	if err != nil {
		b.h.Fatalf("%v", err)
	}
	pub := b.publisher(w, id)
	start := time.Now()
	if err := pub.Run(ctx, n0, n); err != nil {
		b.h.Fatalf("publish: %v\n%s", err, g.logTail())
	}
	pubTook := time.Since(start)
	acked := float64(pub.Acked())
	if err := waitProgress(5*time.Minute, g.exited, "every acknowledged reading durable", wt.received.Last, base+acked); err != nil {
		b.r.logf("run %d: %v", id, err)
	}
	after, _ := bench.ReadProc(g.pid())
	usage, err := wt.stop()
	if err != nil {
		b.r.logf("run %d: watch: %v", id, err)
	}
	rate, err := wt.received.Rate(base+0.1*float64(n), base+0.9*float64(n))
	if err != nil {
		b.r.logf("run %d: rate: %v", id, err)
	}
	res := ingestResult{kind: "uplink cut, backlog", broker: "shipped", shape: w.Shape, messages: n, readings: int64(n),
		readingsPerSec: rate, msgsPerSec: rate, publishPerSec: acked / pubTook.Seconds(),
		acked: pub.Acked(), refused: pub.Refused(), rows: -1, received: int64(wt.received.Last() - base),
		cpu: after.CPU - before.CPU, cpuIngest: after.CPU - before.CPU,
		peakAnon: usage.PeakRssAnon, vmHWM: usage.VmHWM, load: loadavg(), wallIngest: time.Since(start),
		diskWrites: after.DiskWrites - before.DiskWrites, syscalls: after.Syscalls - before.Syscalls}
	b.r.logf("gateway %-16s %-20s %8.0f readings/s, CPU %5.2f µs/reading, RssAnon peak %5.1f MiB, VmHWM %5.1f MiB, load %s",
		w.Shape, res.kind, rate, res.cpuPerReading(), mib(res.peakAnon), mib(res.vmHWM), res.load)
	return res
}
