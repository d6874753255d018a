// Command load is Sluice's load harness: it builds the sluice binary, starts
// a private Mosquitto and PostgreSQL, and measures in one run the durable
// MQTT ingest rate, the backlog drain rate, the gateway's memory and CPU,
// and beside each the ceiling of the same broker or database measured in the
// same run. It prints the figures as Markdown tables (see bench/README.md).
//
//	go run ./bench/load                 # everything, 3 repeats
//	go run ./bench/load -repeat 1 -phases ingest
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"github.com/sluice-gw/sluice/bench"
	"github.com/sluice-gw/sluice/internal/testenv"
)

type options struct {
	flatMessages    int
	senmlMessages   int
	fill            int
	repeat          int
	conns           int
	inflight        int
	phases          map[string]bool
	dataRoot        string
	out             string
	set             []string
	env             []string
	defaultsRate    float64
	defaultsUnpaced bool
	sample          time.Duration
	keep            bool
	bin             string
	perfDir         string
}

type stringList []string

func (l *stringList) String() string     { return strings.Join(*l, ",") }
func (l *stringList) Set(v string) error { *l = append(*l, v); return nil }

func main() {
	// Children get a parent-death signal, which the kernel ties to the thread
	// that forked them: keep main, which starts the gateways, on one thread.
	runtime.LockOSThread()
	if len(os.Args) == 4 && os.Args[1] == ceilingChildFlag {
		runCeilingChild(os.Args[2], os.Args[3])
		return
	}
	if len(os.Args) == 4 && os.Args[1] == rawChildFlag {
		runRawChild(os.Args[2], os.Args[3])
		return
	}
	var o options
	var phases string
	var set, env stringList
	flag.IntVar(&o.flatMessages, "flat", 200_000, "flat JSON messages (one reading each) per ingest run")
	flag.IntVar(&o.senmlMessages, "senml", 50_000, "SenML messages (10 readings each) per ingest run")
	flag.IntVar(&o.fill, "fill", 2_000_000, "readings in the buffer for the drain run")
	flag.IntVar(&o.repeat, "repeat", 3, "repeats of each ingest measurement (ceiling and gateway, interleaved)")
	flag.BoolVar(&o.defaultsUnpaced, "defaults-unpaced", true, "at Mosquitto's defaults, run the unpaced measurements (ceiling, gateway, raw subscriber); false: only the paced run")
	flag.Float64Var(&o.defaultsRate, "defaults-rate", 3000, "after the unpaced run at Mosquitto's defaults, one paced at this many msgs/s (0: none)")
	flag.IntVar(&o.conns, "conns", 4, "publisher MQTT connections")
	flag.IntVar(&o.inflight, "inflight", 64, "concurrent QoS 1 publishes per publisher connection")
	flag.StringVar(&phases, "phases", "ingest,defaults,drain", "phases to run: ingest, defaults, drain")
	flag.StringVar(&o.dataRoot, "data", os.TempDir(), "where the gateway's buffer goes (a real disk: fsync is part of the measure)")
	flag.StringVar(&o.out, "out", "", "also write the report to this file")
	flag.Var(&set, "set", "override a gateway config key, section.key=value in TOML (repeatable), e.g. -set buffer.commit_interval='\"1ms\"'")
	flag.Var(&env, "env", "set an environment variable of the gateway process, KEY=VALUE (repeatable), e.g. -env GOGC=200")
	flag.DurationVar(&o.sample, "sample", 200*time.Millisecond, "how often counters and /proc are sampled")
	flag.BoolVar(&o.keep, "keep", false, "keep the work directory (gateway logs, configs)")
	flag.StringVar(&o.perfDir, "perf", "", "record each gateway run with Linux perf (perf record -g) into this directory")
	flag.StringVar(&o.bin, "bin", "", "a sluice binary to measure (default: go build ./cmd/sluice into the work directory)")
	flag.Parse()
	o.set, o.env = set, env
	o.phases = map[string]bool{}
	for _, p := range strings.Split(phases, ",") {
		p = strings.TrimSpace(p)
		if p != "ingest" && p != "defaults" && p != "drain" {
			fmt.Fprintf(os.Stderr, "load: -phases: unknown phase %q (ingest, defaults, drain)\n", p)
			os.Exit(2)
		}
		o.phases[p] = true
	}
	os.Exit(run(o))
}

func run(o options) (code int) {
	work, err := os.MkdirTemp(o.dataRoot, "sluice-bench-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "load:", err)
		return 1
	}
	h := newHarness("bench", work)
	defer func() {
		if r := recover(); r != nil {
			f, ok := r.(fatal)
			if !ok {
				panic(r)
			}
			fmt.Fprintln(os.Stderr, "load: FAILED:", f.msg)
			code = 1
		}
		h.runCleanups()
		if o.keep || code != 0 {
			fmt.Fprintln(os.Stderr, "load: work directory kept:", work)
		} else {
			os.RemoveAll(work)
		}
	}()
	r := &report{opts: o, start: time.Now(), loadStart: loadavg()}
	out := io.Writer(os.Stdout)
	r.logf("load average at start: %s", r.loadStart)

	bin := o.bin
	if bin == "" {
		bin = filepath.Join(work, "sluice")
		build := exec.Command("go", "build", "-o", bin, "github.com/sluice-gw/sluice/cmd/sluice")
		build.Stdout, build.Stderr = os.Stderr, os.Stderr
		if err := build.Run(); err != nil {
			h.Fatalf("go build sluice: %v", err)
		}
	}
	pg := testenv.StartPostgres(h, testenv.PostgresOptions{})
	b := &bencher{h: h, o: o, r: r, bin: bin, work: work, pg: pg}

	shipped := func() *testenv.Mosquitto {
		if b.shipped == nil {
			b.shipped = testenv.StartMosquitto(h, testenv.MosquittoOptions{})
		}
		return b.shipped
	}
	if o.phases["ingest"] {
		b.broker = shipped()
		for rep := range o.repeat {
			for _, shape := range []bench.Shape{bench.Flat, bench.SenML10} {
				if b.messages(shape) > 0 {
					b.ingestSet(rep, shape)
				}
			}
		}
	}
	if o.phases["defaults"] {
		b.broker = testenv.StartMosquitto(h, testenv.MosquittoOptions{MaxInflight: -1, MaxQueued: -1})
		for rep := range o.repeat {
			b.defaultsSet(rep)
		}
	}
	if o.phases["drain"] {
		b.broker = shipped()
		b.drain()
	}
	r.loadEnd = loadavg()
	r.end = time.Now()
	if o.out != "" {
		f, err := os.Create(o.out)
		if err != nil {
			h.Fatalf("create %s: %v", o.out, err)
		}
		defer f.Close()
		out = io.MultiWriter(out, f)
	}
	r.write(out)
	return 0
}

// loadavg is the first three fields of /proc/loadavg.
func loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

// bencher runs the measurements.
type bencher struct {
	h       *harness
	o       options
	r       *report
	bin     string
	work    string
	pg      *testenv.Postgres
	shipped *testenv.Mosquitto // with mosquitto/gateway.conf's settings
	broker  *testenv.Mosquitto // the one the current phase uses
	rate    float64            // publishers' msgs/s (0: unpaced)
	runs    int
}

// next names a run's directory, client id, database.
func (b *bencher) next() int { b.runs++; return b.runs }

func (b *bencher) messages(shape bench.Shape) int {
	n := b.o.flatMessages
	if shape == bench.SenML10 {
		n = b.o.senmlMessages
	}
	if b.rate > 0 {
		n = min(n, int(pacedFor.Seconds()*b.rate)) // a paced run is bounded in time
	}
	return n
}

// pacedFor bounds the length of a paced run.
const pacedFor = 20 * time.Second

func (b *bencher) workload(shape bench.Shape) bench.Workload {
	n := b.messages(shape)
	// Times in the recent past, one per ms, so that they all pass max_future.
	return bench.Workload{Shape: shape, Start: time.Now().Add(-time.Duration(n) * time.Millisecond).Add(-time.Minute)}
}

func (b *bencher) publisher(w bench.Workload, id int) *bench.Publisher {
	return bench.NewPublisher(bench.PublishOptions{
		Addr: b.broker.Addr(), Conns: b.o.conns, InFlight: b.o.inflight, Rate: b.rate,
		ClientID: fmt.Sprintf("bench-pub-%d", id),
	}, w)
}

// ingestSet is one repeat of the ingest measurements of a shape: the
// ceiling, the gateway uploading, the gateway with the uplink cut.
//
// The machine is shared, so the ceiling is measured before and after the
// gateway runs and each gateway run is set against the mean of the two.
func (b *bencher) ingestSet(rep int, shape bench.Shape) {
	before := b.ceiling(shape)
	bare := b.bareProcess(shape)
	up := b.gatewayIngest(shape, false, "shipped")
	cut := b.gatewayIngest(shape, true, "shipped")
	cSub, cSubOK := b.cSubProcess(shape)
	raw := b.rawProcess(shape)
	after := b.ceiling(shape)
	runs := []ingestResult{bare, up, cut, raw}
	if cSubOK {
		runs = append(runs, cSub)
	}
	b.addSet(rep, before, after, runs...)
}

// addSet adds one repeat's runs to the report, each set against the mean of
// the ceilings measured before and after them.
func (b *bencher) addSet(rep int, before, after ingestResult, runs ...ingestResult) {
	ceil := (before.msgsPerSec + after.msgsPerSec) / 2
	before.rep, after.rep = rep, rep
	b.r.add(before)
	for _, x := range runs {
		x.rep, x.ceiling = rep, ceil
		b.r.add(x)
	}
	b.r.add(after)
}

// defaultsSet is one repeat at Mosquitto's default settings: flat JSON,
// the ceiling and the gateway uploading, counting what could be lost.
func (b *bencher) defaultsSet(rep int) {
	if b.o.defaultsUnpaced {
		b.defaultsUnpaced(rep)
	}
	if b.o.defaultsRate > 0 {
		b.rate = b.o.defaultsRate
		defer func() { b.rate = 0 }()
		paced := b.gatewayIngest(bench.Flat, false, "defaults")
		paced.rep, paced.kind = rep, fmt.Sprintf("uplink up, paced %.0f msgs/s", b.rate)
		b.r.add(paced)
	}
}

// defaultsUnpaced is the unpaced part of defaultsSet.
func (b *bencher) defaultsUnpaced(rep int) {
	before := b.ceiling(bench.Flat)
	up := b.gatewayIngest(bench.Flat, false, "defaults")
	raw := b.rawProcess(bench.Flat)
	after := b.ceiling(bench.Flat)
	before.broker, after.broker, raw.broker = "defaults", "defaults", "defaults"
	b.addSet(rep, before, after, up, raw)
}

// ingestResult is one ingest run.
type ingestResult struct {
	rep      int
	kind     string // "ceiling", bareKind, cSubKind, rawKind, "uplink up", "uplink cut"
	broker   string // "shipped" or "defaults"
	shape    bench.Shape
	messages int
	readings int64 // expected: messages × readings per message

	msgsPerSec, readingsPerSec float64 // steady, 10%..90% of the run
	publishPerSec              float64 // the publishers' acknowledged rate
	ceiling                    float64 // the paired ceiling's msgs/s
	acked, refused             int64   // broker PUBACKs to the publishers
	rows                       int64   // rows in Postgres at the end (-1: not uploaded)
	received                   int64   // the gateway's sluice_readings_received_total at the end
	rejected                   float64

	cpu        time.Duration // gateway CPU from the first publish until all was durable (and uploaded)
	cpuIngest  time.Duration // gateway CPU from the first publish until all was durable
	peakAnon   int64
	vmHWM      int64
	load       string
	wallIngest time.Duration
	idleCPU    time.Duration // gateway CPU per second of idling before the run
	diskWrites int64         // bytes the gateway wrote to storage over the run
	syscalls   int64         // read and write syscalls of the gateway over the run
	stall      time.Duration // the longest time no reading became durable, mid-run (±1 sample)
}

// idleCPU is the gateway's CPU per second while nothing happens (its timers).
func (b *bencher) idleCPU(g *gatewayProc) time.Duration {
	const d = time.Second
	before, err := bench.ReadProc(g.pid())
	if err != nil {
		b.h.Fatalf("%v", err)
	}
	time.Sleep(d)
	after, err := bench.ReadProc(g.pid())
	if err != nil {
		b.h.Fatalf("%v", err)
	}
	return after.CPU - before.CPU
}

// scrapeCPU is the gateway CPU one /metrics scrape costs, which every run's
// CPU figure includes once per sample interval.
func (b *bencher) scrapeCPU(ctx context.Context, g *gatewayProc) time.Duration {
	const n = 100
	before, err := bench.ReadProc(g.pid())
	if err != nil {
		b.h.Fatalf("%v", err)
	}
	start := time.Now()
	for range n {
		if _, err := g.metrics(ctx); err != nil {
			b.h.Fatalf("scrape: %v", err)
		}
	}
	took := time.Since(start)
	after, err := bench.ReadProc(g.pid())
	if err != nil {
		b.h.Fatalf("%v", err)
	}
	idle := b.idleCPU(g) // subtract the timers' share of the same time
	return max(0, (after.CPU-before.CPU-time.Duration(float64(idle)*took.Seconds()))/n)
}

// ceiling measures the bare subscriber's pass-through of a shape, with the
// subscriber in this process: the ceiling the gateway's rates are set
// against. The harness's publishers keep this process's threads busy, so the
// subscriber's goroutines hand messages to each other without waking
// threads; that is the highest pass-through of this broker we have seen.
func (b *bencher) ceiling(shape bench.Shape) ingestResult {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	id := b.next()
	sub, err := bench.Subscribe(ctx, bench.SubscriberOptions{
		Addr: b.broker.Addr(), ClientID: fmt.Sprintf("bench-ceiling-%d", id),
		Filters: []string{bench.FlatFilter, bench.SenMLFilter},
	})
	if err != nil {
		b.h.Fatalf("ceiling subscriber: %v", err)
	}
	defer sub.Close()
	res := b.passThrough(ctx, id, shape, sub.Received, nil)
	b.r.logf("ceiling %-16s %8.0f msgs/s (publishers %6.0f msgs/s)  load %s", shape, res.msgsPerSec, res.publishPerSec, res.load)
	return res
}

const (
	bareKind = "bare subscriber process"
	cSubKind = "mosquitto_sub process"
	rawKind  = "raw subscriber process"
)

// rawProcess measures the raw subscriber (rawsub.go) in a process of its own.
func (b *bencher) rawProcess(shape bench.Shape) ingestResult {
	return b.subscriberProcess(shape, rawKind, childStarter(rawChildFlag), b.endClientSession)
}

// endClientSession removes a subscriber's persistent session from the broker.
func (b *bencher) endClientSession(clientID string) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := bench.EndSession(ctx, b.broker.Addr(), clientID); err != nil {
		b.h.Fatalf("%v", err)
	}
}

// bareProcess measures the same bare subscriber in a process of its own, as
// the gateway runs: its CPU per message is what paho alone costs there.
func (b *bencher) bareProcess(shape bench.Shape) ingestResult {
	return b.subscriberProcess(shape, bareKind, childStarter(ceilingChildFlag), nil)
}

// cSubProcess measures Mosquitto's C client, mosquitto_sub, as a bare
// subscriber in a process of its own: the broker's pass-through to a client
// that is not paho. ok is false when mosquitto_sub is not installed.
func (b *bencher) cSubProcess(shape bench.Shape) (res ingestResult, ok bool) {
	if _, err := exec.LookPath("mosquitto_sub"); err != nil {
		b.r.logf("NOT MEASURED: the mosquitto_sub ceiling needs mosquitto_sub (Debian mosquitto-clients): %v", err)
		return ingestResult{}, false
	}
	return b.subscriberProcess(shape, cSubKind, startMosquittoSub, b.endClientSession), true
}

// subscriberProcess measures a bare subscriber process that start runs.
func (b *bencher) subscriberProcess(shape bench.Shape, kind string, start func(addr, clientID string) (*ceilingProc, error), end func(clientID string)) ingestResult {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	id := b.next()
	clientID := fmt.Sprintf("bench-sub-%d", id)
	sub, err := start(b.broker.Addr(), clientID)
	if err != nil {
		b.h.Fatalf("%s: %v", kind, err)
	}
	defer func() {
		if err := sub.stop(); err != nil {
			b.r.logf("%s: %v", kind, err)
		}
		if end != nil {
			end(clientID)
		}
	}()
	before, err := bench.ReadProc(sub.pid())
	if err != nil {
		b.h.Fatalf("%v", err)
	}
	res := b.passThrough(ctx, id, shape, sub.Received, sub.done)
	after, err := bench.ReadProc(sub.pid())
	if err != nil {
		b.h.Fatalf("%v", err)
	}
	res.kind, res.cpu, res.syscalls = kind, after.CPU-before.CPU, after.Syscalls-before.Syscalls
	b.r.logf("%-23s %-16s %8.0f msgs/s (publishers %6.0f msgs/s), CPU %5.2f µs/msg, %.2f syscalls/msg  load %s",
		kind, shape, res.msgsPerSec, res.publishPerSec, float64(res.cpu.Microseconds())/float64(res.messages),
		float64(res.syscalls)/float64(res.messages), res.load)
	return res
}

// passThrough publishes a run of shape and measures how fast received, a
// bare subscriber's count, follows. exited, when not nil, is closed if the
// subscriber's process ends: then the run fails rather than count what the
// process did not take as the broker's loss.
func (b *bencher) passThrough(ctx context.Context, id int, shape bench.Shape, received func() int64, exited <-chan struct{}) ingestResult {
	w := b.workload(shape)
	n := b.messages(shape)
	var got bench.Series
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		t := time.NewTicker(b.o.sample)
		defer t.Stop()
		for {
			got.Add(time.Now(), float64(received()))
			select {
			case <-stop:
				return
			case <-t.C:
			}
		}
	}()
	pub := b.publisher(w, id)
	start := time.Now()
	if err := pub.Run(ctx, 0, n); err != nil {
		b.h.Fatalf("publish to the bare subscriber: %v", err)
	}
	pubTook := time.Since(start)
	// A broker at its defaults drops what its queue cannot hold, even for a
	// subscriber that does nothing: then the count stops short.
	werr := waitProgress(2*time.Minute, exited, "the bare subscriber receiving every message", func() float64 { return float64(received()) }, float64(n))
	close(stop)
	<-sampled
	got.Add(time.Now(), float64(received()))
	if werr != nil {
		b.h.Fatalf("bare subscriber: %v (got %d of %d)", werr, received(), n)
	}
	if lost := int64(n) - received(); lost > 0 {
		b.r.logf("bare subscriber: the broker delivered %d of the %d messages it acknowledged (%d dropped)", received(), n, lost)
	}
	in := min(float64(n), float64(received()))
	rate, err := got.Rate(0.1*in, 0.9*in)
	if err != nil {
		b.h.Fatalf("bare subscriber rate: %v", err)
	}
	return ingestResult{kind: "ceiling", broker: "shipped", shape: shape, messages: n,
		readings: int64(n * w.ReadingsPer()), msgsPerSec: rate, readingsPerSec: rate * float64(w.ReadingsPer()),
		publishPerSec: float64(pub.Acked()) / pubTook.Seconds(), acked: pub.Acked(), refused: pub.Refused(),
		rows: -1, received: received() * int64(w.ReadingsPer()), load: loadavg()}
}

// gatewayIngest measures the real gateway taking a shape in: uploading to
// Postgres, or with its uplink cut (a proxy that refuses connections).
func (b *bencher) gatewayIngest(shape bench.Shape, cut bool, broker string) ingestResult {
	id := b.next()
	w := b.workload(shape)
	n := b.messages(shape)
	want := int64(n * w.ReadingsPer())
	dsn := b.newDatabase(id)
	gwDSN := dsn
	if cut {
		proxy := testenv.StartProxy(b.h, b.pg.Addr())
		proxy.Cut()
		gwDSN = strings.Replace(dsn, b.pg.Addr(), proxy.Addr(), 1)
	}
	dir := filepath.Join(b.work, fmt.Sprintf("run%02d", id))
	g := b.startGateway(dir, id, gwDSN, nil)
	defer func() {
		if err := g.stop(); err != nil {
			b.r.logf("run %d: %v", id, err)
		}
		b.endSession(id)
		if !b.o.keep {
			os.RemoveAll(filepath.Join(dir, "buffer.db"))
		}
	}()

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	idle := b.idleCPU(g)
	if b.r.scrapeCPU == 0 {
		b.r.scrapeCPU = b.scrapeCPU(ctx, g)
	}
	wt := g.watch(b.o.sample)
	before, err := bench.ReadProc(g.pid())
	if err != nil {
		b.h.Fatalf("%v", err)
	}
	stopPerf := b.perf(g, id)
	pub := b.publisher(w, id)
	start := time.Now()
	perr := pub.Run(ctx, 0, n)
	pubTook := time.Since(start)
	if perr != nil {
		b.h.Fatalf("publish: %v\n%s", perr, g.logTail())
	}
	// Everything the broker acknowledged must become durable in the gateway.
	acked := pub.Acked() * int64(w.ReadingsPer())
	timeout := 2*time.Minute + time.Duration(want)*50*time.Microsecond
	if err := waitProgress(timeout, g.exited, "every acknowledged reading durable in the gateway", wt.received.Last, float64(acked)); err != nil {
		b.r.logf("run %d: %v (received %0.f of %d)", id, err, wt.received.Last(), acked)
	}
	ingested := time.Now()
	afterIngest, _ := bench.ReadProc(g.pid())
	if !cut {
		if err := waitProgress(timeout, g.exited, "every reading uploaded", wt.uploaded.Last, wt.received.Last()); err != nil {
			b.r.logf("run %d: %v (uploaded %0.f of %0.f)", id, err, wt.uploaded.Last(), wt.received.Last())
		}
	}
	after, _ := bench.ReadProc(g.pid())
	stopPerf()
	usage, werr := wt.stop()
	if werr != nil {
		b.r.logf("run %d: watch: %v", id, werr)
	}
	// The steady part of what arrived: a broker that dropped messages
	// delivers fewer than were published.
	got := min(float64(want), wt.received.Last())
	rate, err := wt.received.Rate(0.1*got, 0.9*got)
	if err != nil {
		b.r.logf("run %d: rate: %v", id, err)
	}
	res := ingestResult{kind: "uplink up", broker: broker, shape: shape, messages: n, readings: want,
		readingsPerSec: rate, msgsPerSec: rate / float64(w.ReadingsPer()),
		publishPerSec: float64(pub.Acked()) / pubTook.Seconds(), acked: pub.Acked(), refused: pub.Refused(),
		rows: -1, received: int64(wt.received.Last()), rejected: wt.rejected,
		cpu: after.CPU - before.CPU, cpuIngest: afterIngest.CPU - before.CPU,
		peakAnon: usage.PeakRssAnon, vmHWM: usage.VmHWM, load: loadavg(), wallIngest: ingested.Sub(start), idleCPU: idle,
		diskWrites: after.DiskWrites - before.DiskWrites, syscalls: after.Syscalls - before.Syscalls,
		stall: wt.received.LongestFlat(got)}
	if cut {
		res.kind = "uplink cut"
	} else {
		rows, err := bench.CountRows(ctx, dsn)
		if err != nil {
			b.h.Fatalf("%v", err)
		}
		res.rows = rows
	}
	b.r.logf("gateway %-16s %-10s %-8s %8.0f readings/s %7.0f msgs/s, CPU %5.2f µs/reading, RssAnon peak %5.1f MiB, VmHWM %5.1f MiB, disk %.0f B/reading, %.2f syscalls/msg, longest stall %s, acked %d, rows %d, load %s",
		shape, res.kind, broker, rate, res.msgsPerSec, res.cpuPerReading(), mib(res.peakAnon), mib(res.vmHWM),
		float64(res.diskWrites)/float64(want), float64(res.syscalls)/float64(n), res.stall.Round(time.Millisecond), res.acked, res.rows, res.load)
	b.dropDatabase(id)
	return res
}

// gateway reports whether r is a run of the gateway (not a bare subscriber).
func (r ingestResult) gateway() bool { return strings.HasPrefix(r.kind, "uplink") }

// ackedReadings is what the broker acknowledged to the publishers, in readings.
func (r ingestResult) ackedReadings() int64 {
	return r.acked * int64(bench.Workload{Shape: r.shape}.ReadingsPer())
}

func (r ingestResult) cpuPerReading() float64 {
	if r.readings == 0 {
		return 0
	}
	return float64(r.cpu.Microseconds()) / float64(r.readings)
}

func mib(b int64) float64 { return float64(b) / (1 << 20) }

func (b *bencher) startGateway(dir string, id int, dsn string, set []string) *gatewayProc {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		b.h.Fatalf("%v", err)
	}
	cfg := gatewayConfig{
		dataDir: dir, broker: b.broker.URL(), clientID: clientID(id), dsn: dsn,
		adminPort: testenv.FreePort(b.h), set: append(append([]string{}, b.o.set...), set...),
	}
	g, err := startGateway(b.bin, dir, cfg, b.o.env, "/readyz")
	if err != nil {
		b.h.Fatalf("run %d: %v", id, err)
	}
	return g
}

// perf starts Linux perf on the gateway when -perf is set; the returned
// function stops it and writes DIR/runNN-perf.data.
func (b *bencher) perf(g *gatewayProc, id int) func() {
	if b.o.perfDir == "" {
		return func() {}
	}
	out := filepath.Join(b.o.perfDir, fmt.Sprintf("run%02d-perf.data", id))
	cmd := exec.Command("perf", "record", "-F", "999", "-g", "-p", fmt.Sprint(g.pid()), "-o", out)
	cmd.Stdout, cmd.Stderr = io.Discard, os.Stderr
	if err := cmd.Start(); err != nil {
		b.h.Fatalf("perf: %v", err)
	}
	return func() {
		_ = cmd.Process.Signal(os.Interrupt)
		_ = cmd.Wait()
	}
}

// endSession removes run id's gateway session from the broker.
func (b *bencher) endSession(id int) { b.endClientSession(clientID(id)) }

func clientID(id int) string { return fmt.Sprintf("sluice-bench-%d", id) }

func dbName(id int) string { return fmt.Sprintf("bench_%d", id) }

// newDatabase creates an empty database for run id and returns its DSN.
func (b *bencher) newDatabase(id int) string {
	b.pg.Query(b.h, "", "CREATE DATABASE "+dbName(id))
	return b.pg.DSN(dbName(id))
}

// dropDatabase frees the memory the run's rows take (the server's files are on a tmpfs).
func (b *bencher) dropDatabase(id int) {
	b.pg.Query(b.h, "", "DROP DATABASE IF EXISTS "+dbName(id)+" WITH (FORCE)")
}
