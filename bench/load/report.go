package main

import (
	"fmt"
	"io"
	"os"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/sluice-gw/sluice/bench"
)

// report collects the results and writes them as Markdown.
type report struct {
	opts               options
	start, end         time.Time
	loadStart, loadEnd string
	scrapeCPU          time.Duration // gateway CPU of one /metrics scrape
	ingest             []ingestResult
	drain              *drainResult
}

// logf prints progress to stderr as the run goes.
func (r *report) logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "%s  %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, args...))
}

func (r *report) add(res ingestResult) { r.ingest = append(r.ingest, res) }

// group is the results of one kind of run over the repeats.
func (r *report) group(broker string, shape bench.Shape, kind string) []ingestResult {
	var out []ingestResult
	for _, x := range r.ingest {
		if x.broker == broker && x.shape == shape && x.kind == kind {
			out = append(out, x)
		}
	}
	return out
}

func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func pick(rs []ingestResult, f func(ingestResult) float64) []float64 {
	out := make([]float64, len(rs))
	for i, x := range rs {
		out[i] = f(x)
	}
	return out
}

func maxOf(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	return slices.Max(xs)
}

func verdict(ok bool) string {
	if ok {
		return "met"
	}
	return "**not met**"
}

func (r *report) write(w io.Writer) {
	o := r.opts
	fmt.Fprintf(w, "## Run of %s\n\n", r.start.UTC().Format("2006-01-02 15:04 UTC"))
	fmt.Fprintf(w, "- machine: %d cores (%s/%s), %s; load average %s at start, %s at end; %s wall\n",
		runtime.NumCPU(), runtime.GOOS, runtime.GOARCH, runtime.Version(), r.loadStart, r.loadEnd, r.end.Sub(r.start).Round(time.Second))
	fmt.Fprintf(w, "- publishers: %d paho connections x %d concurrent QoS 1 publishes; %d flat messages, %d SenML packs per run; %d repeats\n",
		o.conns, o.inflight, o.flatMessages, o.senmlMessages, o.repeat)
	fmt.Fprintln(w, "- brokers: Mosquitto with the shipped settings (mosquitto/gateway.conf: 1,000 in flight, 1,000,000 queued), and with its defaults (20, 1,000) for the defaults rows; PostgreSQL private to the run (fsync off: the ceiling shares it)")
	if r.scrapeCPU > 0 {
		fmt.Fprintf(w, "- the harness samples the gateway's /metrics and /proc every %s; one scrape costs the gateway %s of CPU (included in the CPU figures)\n",
			o.sample, r.scrapeCPU.Round(time.Microsecond))
	}
	if len(o.env) > 0 {
		fmt.Fprintf(w, "- gateway environment: %s\n", strings.Join(o.env, ", "))
	}
	if len(o.set) > 0 {
		fmt.Fprintf(w, "- gateway config overrides: %s\n", strings.Join(o.set, ", "))
	}
	fmt.Fprintln(w)

	if len(r.ingest) > 0 {
		r.writeIngest(w)
	}
	if r.drain != nil {
		r.writeDrain(w)
	}
	r.writeTargets(w)
}

func (r *report) writeIngest(w io.Writer) {
	fmt.Fprintln(w, "### MQTT ingest (QoS 1, durable: acknowledged only after the bbolt commit)")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "Rates are steady-state: from 10% to 90% of the run's readings durable. CPU is the gateway's utime+stime from the first publish until every reading was durable and (uplink up) uploaded, over the readings.")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "| rep | broker | payload | run | msgs/s | readings/s | ceiling msgs/s | ratio | publishers msgs/s | CPU µs/reading | idle CPU | syscalls/msg | disk B/reading | peak RssAnon MiB | VmHWM MiB | longest stall ms | acked msgs | rows | load |")
	fmt.Fprintln(w, "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
	all := r.ingest
	if r.drain != nil {
		all = append(slices.Clone(all), r.drain.ingest)
	}
	for _, x := range all {
		ratio, cpu, anon, hw, rows, idle, sys, disk, stall := "", "", "", "", "", "", "", "", ""
		if x.kind != "ceiling" && x.ceiling > 0 {
			ratio = fmt.Sprintf("%.0f%%", 100*x.msgsPerSec/x.ceiling)
		}
		if x.cpu > 0 {
			cpu = fmt.Sprintf("%.2f", x.cpuPerReading())
		}
		if x.syscalls > 0 {
			sys = fmt.Sprintf("%.2f", float64(x.syscalls)/float64(x.messages))
		}
		if x.gateway() {
			if x.idleCPU > 0 {
				idle = fmt.Sprintf("%.1f%%", 100*x.idleCPU.Seconds())
			}
			if x.syscalls > 0 {
				disk = fmt.Sprintf("%.0f", float64(x.diskWrites)/float64(x.readings))
			}
			anon = fmt.Sprintf("%.1f", mib(x.peakAnon))
			if x.stall > 0 {
				stall = fmt.Sprint(x.stall.Milliseconds())
			}
			hw = fmt.Sprintf("%.1f", mib(x.vmHWM))
		}
		if x.rows >= 0 {
			rows = fmt.Sprint(x.rows)
		}
		ceiling := ""
		if x.ceiling > 0 {
			ceiling = fmt.Sprintf("%.0f", x.ceiling)
		}
		fmt.Fprintf(w, "| %d | %s | %s | %s | %.0f | %.0f | %s | %s | %.0f | %s | %s | %s | %s | %s | %s | %s | %d | %s | %s |\n",
			x.rep+1, x.broker, x.shape, x.kind, x.msgsPerSec, x.readingsPerSec, ceiling, ratio, x.publishPerSec,
			cpu, idle, sys, disk, anon, hw, stall, x.acked, rows, x.load)
	}
	fmt.Fprintln(w)
	// Medians over the repeats.
	fmt.Fprintln(w, "Medians over the repeats:")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "| broker | payload | run | msgs/s | readings/s | ratio to ceiling | CPU µs/reading | max peak RssAnon MiB | lost (acked readings - rows) |")
	fmt.Fprintln(w, "|---|---|---|---:|---:|---:|---:|---:|---:|")
	for _, broker := range []string{"shipped", "defaults"} {
		for _, shape := range []bench.Shape{bench.Flat, bench.SenML10} {
			kinds := []string{"ceiling", bareKind, cSubKind, rawKind, "uplink up", "uplink cut"}
			if r.opts.defaultsRate > 0 {
				kinds = append(kinds, fmt.Sprintf("uplink up, paced %.0f msgs/s", r.opts.defaultsRate))
			}
			for _, kind := range kinds {
				g := r.group(broker, shape, kind)
				if len(g) == 0 {
					continue
				}
				ratio, cpu, anon, lost := "", "", "", ""
				if kind != "ceiling" && g[0].ceiling > 0 {
					ratio = fmt.Sprintf("%.0f%%", 100*median(pick(g, func(x ingestResult) float64 { return x.msgsPerSec / x.ceiling })))
				}
				if g[0].gateway() {
					anon = fmt.Sprintf("%.1f", mib(int64(maxOf(pick(g, func(x ingestResult) float64 { return float64(x.peakAnon) })))))
				}
				if g[0].cpu > 0 {
					cpu = fmt.Sprintf("%.2f", median(pick(g, ingestResult.cpuPerReading)))
				}
				if strings.HasPrefix(kind, "uplink up") {
					lost = fmt.Sprintf("%.0f", maxOf(pick(g, lostReadings)))
				}
				fmt.Fprintf(w, "| %s | %s | %s | %.0f | %.0f | %s | %s | %s | %s |\n", broker, shape, kind,
					median(pick(g, func(x ingestResult) float64 { return x.msgsPerSec })),
					median(pick(g, func(x ingestResult) float64 { return x.readingsPerSec })), ratio, cpu, anon, lost)
			}
		}
	}
	fmt.Fprintln(w)
}

// againstRep is each run's msgs/s over that of the run of kind in the same
// repeat and shape.
func (r *report) againstRep(runs []ingestResult, kind string) []float64 {
	var out []float64
	for _, x := range runs {
		for _, y := range r.group(x.broker, x.shape, kind) {
			if y.rep == x.rep && y.msgsPerSec > 0 {
				out = append(out, x.msgsPerSec/y.msgsPerSec)
			}
		}
	}
	return out
}

// lostReadings is what the broker acknowledged to the publishers but
// Postgres does not have.
func lostReadings(x ingestResult) float64 { return float64(x.ackedReadings() - x.rows) }

func (r *report) writeDrain(w io.Writer) {
	d := r.drain
	copyRate := d.copyCeiling()
	total := int64(d.fill) + d.ingest.received
	fmt.Fprintln(w, "### Backlog drain (buffer to Postgres)")
	fmt.Fprintln(w)
	fmt.Fprintf(w, "| what | figure |\n|---|---:|\n")
	fmt.Fprintf(w, "| ceiling: raw pgx CopyFrom of %d rows into sluice.readings, 5,000 rows a COPY, mean of before and after | %.0f rows/s (%.0f before, %.0f after) |\n",
		d.copyRows, copyRate, d.copyBefore, d.copyAfter)
	fmt.Fprintf(w, "| buffer filled (buffer.Append, 1,000 readings a transaction) | %d readings in %s |\n", d.fill, d.fillTook.Round(time.Millisecond))
	fmt.Fprintf(w, "| gateway RssAnon, idle, %d readings buffered, uplink cut | %.1f MiB |\n", d.fill, mib(d.idleAnon))
	fmt.Fprintf(w, "| gateway at full flat ingest on top of that backlog, uplink cut | %.0f readings/s, peak RssAnon %.1f MiB |\n", d.ingest.readingsPerSec, mib(d.ingest.peakAnon))
	fmt.Fprintf(w, "| drain, steady (10%%..90%% of %d rows) | **%.0f rows/s = %.0f%% of the COPY ceiling** |\n", total, d.drainPerSec, 100*d.drainPerSec/copyRate)
	fmt.Fprintf(w, "| drain, first to last row | %s (%.0f rows/s) |\n", d.drainWall.Round(time.Millisecond), float64(total)/d.drainWall.Seconds())
	fmt.Fprintf(w, "| gateway CPU while draining | %.2f µs/row |\n", float64(d.drainCPU.Microseconds())/float64(total))
	fmt.Fprintf(w, "| gateway peak RssAnon / VmHWM while draining | %.1f MiB / %.1f MiB |\n", mib(d.drainAnon), mib(d.drainHW))
	fmt.Fprintf(w, "| rows in Postgres after the drain | %d of %d |\n", d.rows, total)
	fmt.Fprintf(w, "| load average after | %s |\n", d.load)
	fmt.Fprintln(w)
}

func (r *report) writeTargets(w io.Writer) {
	fmt.Fprintln(w, "### Targets")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "| target | measured | verdict |")
	fmt.Fprintln(w, "|---|---|---|")
	flat := r.group("shipped", bench.Flat, "uplink up")
	senml := r.group("shipped", bench.SenML10, "uplink up")
	if len(flat) > 0 {
		ratio := median(pick(flat, func(x ingestResult) float64 { return x.msgsPerSec / x.ceiling }))
		fmt.Fprintf(w, "| (1) flat JSON >= 85%% of the QoS 1 pass-through ceiling | %.0f%% (median of %d) | %s |\n", 100*ratio, len(flat), verdict(ratio >= 0.85))
		for _, ref := range []struct{ kind, what string }{
			{rawKind, "a raw subscriber process (rawsub.go: one goroutine, no allocation per message, batched PUBACKs, same repeat)"},
			{cSubKind, "Mosquitto's C client (mosquitto_sub, a process of its own that prints each topic, same repeat)"},
		} {
			if c := r.againstRep(flat, ref.kind); len(c) > 0 {
				ratio := median(c)
				fmt.Fprintf(w, "| (1) the same against %s | %.0f%% (median of %d) | %s |\n", ref.what, 100*ratio, len(c), verdict(ratio >= 0.85))
			}
		}
	}
	if len(flat) > 0 && len(senml) > 0 {
		x := median(pick(senml, func(x ingestResult) float64 { return x.readingsPerSec })) /
			median(pick(flat, func(x ingestResult) float64 { return x.readingsPerSec }))
		fmt.Fprintf(w, "| (2) SenML packs of 10 >= 5x the readings/s of (1) | %.1fx | %s |\n", x, verdict(x >= 5))
	}
	for _, g := range []struct {
		name   string
		shape  bench.Shape
		uplink []ingestResult
	}{{"flat JSON", bench.Flat, flat}, {"SenML 10", bench.SenML10, senml}} {
		if len(g.uplink) == 0 {
			continue
		}
		c := median(pick(g.uplink, ingestResult.cpuPerReading))
		var refs []string
		for _, k := range []struct{ name, kind string }{{"paho", bareKind}, {"mosquitto_sub", cSubKind}, {"raw", rawKind}} {
			if runs := r.group("shipped", g.shape, k.kind); len(runs) > 0 {
				refs = append(refs, fmt.Sprintf("%s %.2f µs", k.name, median(pick(runs, ingestResult.cpuPerReading))))
			}
		}
		fmt.Fprintf(w, "| (3) CPU <= 8 µs per reading (%s, ingest + upload) | %.2f µs (subscriber processes that only acknowledge: %s) | %s |\n",
			g.name, c, strings.Join(refs, ", "), verdict(c <= 8))
	}
	if d := r.drain; d != nil {
		ratio := d.drainPerSec / d.copyCeiling()
		fmt.Fprintf(w, "| (4) drain >= 50%% of the raw COPY ceiling | %.0f%% | %s |\n", 100*ratio, verdict(ratio >= 0.5))
	}
	var peak int64
	for _, x := range r.ingest {
		if x.gateway() {
			peak = max(peak, x.peakAnon)
		}
	}
	if d := r.drain; d != nil {
		peak = max(peak, d.idleAnon, d.ingest.peakAnon, d.drainAnon)
	}
	if peak > 0 {
		fmt.Fprintf(w, "| (5) RssAnon <= 24 MiB at full ingest and with millions buffered | %.1f MiB (highest sample of every gateway run) | %s |\n", mib(peak), verdict(peak <= 24<<20))
	}
	if def := r.group("defaults", bench.Flat, "uplink up"); len(def) > 0 {
		lost := maxOf(pick(def, lostReadings))
		ratio := median(pick(def, func(x ingestResult) float64 { return x.msgsPerSec / x.ceiling }))
		subLost := func(kind string) float64 {
			return maxOf(pick(r.group("defaults", bench.Flat, kind), func(x ingestResult) float64 { return float64(x.ackedReadings() - x.received) }))
		}
		fmt.Fprintf(w, "| (e) Mosquitto defaults (20 in flight, 1,000 queued), publishers unpaced (%.0f msgs/s): nothing lost | %.0f lost (acked - rows, worst of %d); gateway at %.0f%% of that broker's ceiling; subscribers doing nothing lost up to %.0f (the ceiling's, in this process) and %.0f (the raw subscriber process) | %s |\n",
			median(pick(def, func(x ingestResult) float64 { return x.publishPerSec })), lost, len(def), 100*ratio, subLost("ceiling"), subLost(rawKind), verdict(lost == 0))
	}
	if r.opts.defaultsRate > 0 {
		if def := r.group("defaults", bench.Flat, fmt.Sprintf("uplink up, paced %.0f msgs/s", r.opts.defaultsRate)); len(def) > 0 {
			lost := maxOf(pick(def, lostReadings))
			fmt.Fprintf(w, "| (e) Mosquitto defaults, publishers paced at %.0f msgs/s: nothing lost | %.0f lost (worst of %d) | %s |\n",
				r.opts.defaultsRate, lost, len(def), verdict(lost == 0))
		}
	}
	fmt.Fprintln(w)
}
