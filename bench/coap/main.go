// Command coap measures the CoAP ingress: confirmable POSTs of 10-record
// SenML JSON from 64 concurrent clients, against a real `sluice run` process
// (durability on: every 2.04 waits for its fsync) and, in the same run,
// against a bare go-coap server that answers 2.04 without storing anything
// (the ceiling). For each it reports requests/s, readings/s and p50/p99
// latency at the peak, then p99 at half the peak rate.
//
//	go run ./bench/coap [-rounds 3] [-duration 5s] [-clients 64] [-records 10] [-client raw|go-coap]
//
// It stays out of the gateway: nothing here is linked into the sluice binary.
package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/mux"
	coapNet "github.com/plgd-dev/go-coap/v3/net"
	"github.com/plgd-dev/go-coap/v3/options"
	"github.com/plgd-dev/go-coap/v3/udp"
)

func main() {
	duration := flag.Duration("duration", 5*time.Second, "length of each measured phase")
	rounds := flag.Int("rounds", 3, "rounds of phases, alternating between the ceiling and sluice")
	clients := flag.Int("clients", 64, "concurrent clients, each on its own UDP socket")
	records := flag.Int("records", 10, "SenML records per request")
	sluice := flag.String("sluice", "", "sluice binary (default: built from ./cmd/sluice)")
	client := flag.String("client", "go-coap", "load client: go-coap (go-coap's client) or raw (a minimal CoAP client over one UDP socket, lighter on the CPU)")
	commitInterval := flag.Duration("commit-interval", 0, "the gateway's buffer.commit_interval (0: its default)")
	var env envList
	flag.Var(&env, "env", "NAME=VALUE in the gateway's environment, e.g. GOGC=400 (repeatable)")
	bare := flag.String("bare-listen", "", "internal: serve the bare ceiling on this address")
	series := flag.Float64("series", 0, "instead of the comparison: load sluice alone at this many requests/s for -rounds phases and print each phase's latency (does it drift as the buffer grows?)")
	flag.Parse()
	if *bare != "" {
		serveBare(*bare)
		return
	}
	log.SetFlags(0)
	if *client != "go-coap" && *client != "raw" {
		log.Fatalf("-client %q: want go-coap or raw", *client)
	}
	gw := gatewaySettings{bin: *sluice, commitInterval: *commitInterval, env: env, series: *series}
	if err := run(*duration, *rounds, *clients, *records, *client, gw); err != nil {
		log.Fatal(err)
	}
}

type envList []string

func (l *envList) String() string { return strings.Join(*l, " ") }
func (l *envList) Set(v string) error {
	if !strings.Contains(v, "=") {
		return fmt.Errorf("%q: want NAME=VALUE", v)
	}
	*l = append(*l, v)
	return nil
}

// gatewaySettings is what the command line changes about the measured gateway.
type gatewaySettings struct {
	bin            string
	commitInterval time.Duration
	env            []string
	series         float64 // requests/s of a -series run; 0: the comparison
}

// serveBare is the ceiling: go-coap answering every request 2.04 at once.
func serveBare(addr string) {
	l, err := coapNet.NewListenUDP("udp", addr)
	if err != nil {
		log.Fatal(err)
	}
	r := mux.NewRouter()
	r.DefaultHandleFunc(func(w mux.ResponseWriter, _ *mux.Message) {
		_ = w.SetResponse(codes.Changed, message.TextPlain, nil)
	})
	srv := udp.NewServer(options.WithMux(r), options.WithErrors(func(error) {}))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	go func() {
		<-ctx.Done()
		srv.Stop()
	}()
	if err := srv.Serve(l); err != nil {
		log.Fatal(err)
	}
}

type result struct {
	requests, failed int64
	elapsed          time.Duration
	lat              []time.Duration // sorted
}

func (r result) rate() float64 { return float64(r.requests) / r.elapsed.Seconds() }

func (r result) pct(p float64) time.Duration {
	if len(r.lat) == 0 {
		return 0
	}
	return r.lat[min(len(r.lat)-1, int(p*float64(len(r.lat))))]
}

func run(d time.Duration, rounds, clients, records int, client string, gs gatewaySettings) error {
	sluiceBin := gs.bin
	dir, err := os.MkdirTemp("", "sluice-bench-coap-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	if sluiceBin == "" {
		sluiceBin = filepath.Join(dir, "sluice")
		build := exec.Command("go", "build", "-o", sluiceBin, "./cmd/sluice")
		build.Stdout, build.Stderr = os.Stderr, os.Stderr
		if err := build.Run(); err != nil {
			return fmt.Errorf("build sluice (run from the repository root): %w", err)
		}
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}

	// Both servers run from the start; the phases alternate between them
	// (ceiling, sluice, ceiling, sluice...), so that what else runs on a
	// shared machine falls on both alike.
	bareAddr := freeUDP()
	bareProc, err := startProc(exec.Command(self, "-bare-listen", bareAddr))
	if err != nil {
		return err
	}
	defer stopProc(bareProc)

	gwAddr, admin := freeUDP(), freeTCP()
	cfg := fmt.Sprintf(`
[gateway]
id = "bench"
data_dir = %q
clock = "trusted"

[coap]
listen = %q

[buffer]
max_bytes = "4GiB"
min_free_disk = "1GiB"
%s

[uplink]
## Nothing listens here: the readings stay in the buffer, durable, and the
## uplink only retries now and then.
dsn = "postgres://bench@127.0.0.1:9/bench?sslmode=disable&connect_timeout=1"
backoff_max = "60s"

[admin]
listen = %q

[log]
level = "warn"
`, filepath.Join(dir, "data"), gwAddr, commitSetting(gs.commitInterval), admin)
	cfgPath := filepath.Join(dir, "sluice.toml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		return err
	}
	gwCmd := exec.Command(sluiceBin, "run", "--config", cfgPath)
	gwCmd.Env = append(os.Environ(), gs.env...)
	gw, err := startProc(gwCmd)
	if err != nil {
		return err
	}
	defer stopProc(gw)
	if err := waitReady("http://" + admin + "/readyz"); err != nil {
		return err
	}
	log.Printf("ceiling: bare go-coap server on %s; gateway: sluice run, CoAP on %s, buffer in %s, environment %q", bareAddr, gwAddr, dir, gs.env)

	var seq atomic.Int64
	if gs.series > 0 {
		fmt.Printf("\n%d %s clients at %.0f requests/s, %d phases of %s\n\n| phase | requests/s | p50 | p99 | p99.9 | failed | commits |\n| ---: | ---: | ---: | ---: | ---: | ---: | --- |\n",
			clients, client, gs.series, rounds, d)
		for r := range rounds {
			_, before, _ := commitHistogram("http://" + admin + "/metrics")
			res, err := phase(client, gwAddr, d, clients, records, &seq, gs.series)
			if err != nil {
				return err
			}
			fmt.Printf("| %d | %.0f | %s | %s | %s | %d | %s |\n", r+1, res.rate(), ms(res.pct(0.5)), ms(res.pct(0.99)), ms(res.pct(0.999)), res.failed,
				commitQuantiles("http://"+admin+"/metrics", before))
		}
		fmt.Printf("\nsluice group commits (write + fsync) during its run: %s\n", commitQuantiles("http://"+admin+"/metrics"))
		return nil
	}
	addrs := []string{bareAddr, gwAddr}
	var peaks, halves [2][]result
	for r := range rounds {
		for i, addr := range addrs {
			if r == 0 {
				if _, err := phase(client, addr, d/5, clients, records, &seq, 0); err != nil { // warm-up
					return err
				}
			}
			res, err := phase(client, addr, d, clients, records, &seq, 0)
			if err != nil {
				return err
			}
			if res.requests == 0 {
				return fmt.Errorf("%s: no request succeeded", addr)
			}
			peaks[i] = append(peaks[i], res)
		}
	}
	for range rounds {
		for i, addr := range addrs {
			res, err := phase(client, addr, d, clients, records, &seq, median(peaks[i])/2)
			if err != nil {
				return err
			}
			halves[i] = append(halves[i], res)
		}
	}
	commits := commitQuantiles("http://" + admin + "/metrics")

	fmt.Printf("\n%d %s clients, confirmable POSTs of %d-record SenML JSON, %d rounds of %s phases, ceiling and sluice alternating\n\n",
		clients, client, records, rounds, d)
	fmt.Printf("| server | requests/s (median) | readings/s | p50 | p99 | failed | p99 at half the peak rate (requests/s) |\n")
	fmt.Printf("| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n")
	for i, name := range []string{"bare go-coap (ceiling)", "sluice, durable"} {
		peak, half := pool(peaks[i]), pool(halves[i])
		fmt.Printf("| %s | %.0f | %.0f | %s | %s | %d | %s (%.0f) |\n", name, median(peaks[i]), median(peaks[i])*float64(records),
			ms(peak.pct(0.50)), ms(peak.pct(0.99)), peak.failed+half.failed, ms(half.pct(0.99)), half.rate())
	}
	fmt.Printf("\nper round, sluice / ceiling:")
	for r := range rounds {
		fmt.Printf(" %.0f%%", 100*peaks[1][r].rate()/peaks[0][r].rate())
	}
	fmt.Printf("\nsluice group commits (write + fsync) during its run: %s\n", commits)
	fmt.Printf("\nsluice reaches %.0f%% of the ceiling, medians (target: at least 50%%); p99 at half its peak rate %s (target: under 20 ms)\n",
		100*median(peaks[1])/median(peaks[0]), ms(pool(halves[1]).pct(0.99)))
	return nil
}

// median is the median request rate of rs.
func median(rs []result) float64 {
	rates := make([]float64, len(rs))
	for i, r := range rs {
		rates[i] = r.rate()
	}
	slices.Sort(rates)
	return rates[len(rates)/2]
}

// pool merges the phases of one server for its latency percentiles.
func pool(rs []result) result {
	var p result
	for _, r := range rs {
		p.requests += r.requests
		p.failed += r.failed
		p.elapsed += r.elapsed
		p.lat = append(p.lat, r.lat...)
	}
	slices.Sort(p.lat)
	return p
}

// commitHistogram reads the gateway's commit histogram: bucket bounds and
// cumulative counts.
func commitHistogram(url string) (les, cum []float64, err error) {
	resp, err := http.Get(url)
	if err != nil {
		return nil, nil, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line, ok := strings.CutPrefix(sc.Text(), `sluice_buffer_commit_duration_seconds_bucket{le="`)
		if !ok {
			continue
		}
		le, count, _ := strings.Cut(line, `"} `)
		l, err1 := strconv.ParseFloat(le, 64)
		c, err2 := strconv.ParseFloat(count, 64)
		if err1 == nil && err2 == nil {
			les, cum = append(les, l), append(cum, c)
		}
	}
	return les, cum, sc.Err()
}

// commitQuantiles reads the gateway's commit histogram and gives its count
// and the buckets that hold the median and the 99th percentile; since, when
// not nil, is an earlier reading to subtract.
func commitQuantiles(url string, since ...[]float64) string {
	les, cum, err := commitHistogram(url)
	if err != nil {
		return err.Error()
	}
	for _, s := range since {
		for i := range min(len(s), len(cum)) {
			cum[i] -= s[i]
		}
	}
	if len(cum) == 0 || cum[len(cum)-1] == 0 {
		return "no commits seen"
	}
	total := cum[len(cum)-1]
	at := func(q float64) string {
		for i := range cum {
			if cum[i] >= q*total {
				return fmt.Sprintf("<= %g ms", les[i]*1000)
			}
		}
		return "?"
	}
	return fmt.Sprintf("%.0f commits, p50 %s, p99 %s", total, at(0.5), at(0.99))
}

func ms(d time.Duration) string { return fmt.Sprintf("%.2f ms", float64(d.Microseconds())/1000) }

// phase loads addr for d from new sockets: back to back when rate is 0,
// else at rate requests/s. go-coap keeps each peer's responses for
// EXCHANGE_LIFETIME (247 s) and walks that cache on every datagram from the
// peer, so a client that has sent thousands of requests would measure the
// walk, not the server.
func phase(client, addr string, d time.Duration, clients, records int, seq *atomic.Int64, rate float64) (result, error) {
	conns := make([]poster, clients)
	defer func() {
		for _, cc := range conns {
			if cc != nil {
				cc.close()
			}
		}
	}()
	for i := range conns {
		cc, err := dial(client, addr)
		if err != nil {
			return result{}, err
		}
		conns[i] = cc
	}
	return load(conns, records, seq, d, rate), nil
}

// load posts from every client for d: back to back when rate is 0, else
// each client on a fixed schedule that together makes rate requests/s.
func load(conns []poster, records int, seq *atomic.Int64, d time.Duration, rate float64) result {
	var (
		mu  sync.Mutex
		res result
		wg  sync.WaitGroup
	)
	start := time.Now()
	end := start.Add(d)
	for i, cc := range conns {
		wg.Go(func() {
			var lat []time.Duration
			var failed int64
			var interval time.Duration
			next := start
			if rate > 0 {
				interval = time.Duration(float64(time.Second) * float64(len(conns)) / rate)
				next = start.Add(interval * time.Duration(i) / time.Duration(len(conns)))
			}
			body := make([]byte, 0, 64*records)
			path := fmt.Sprintf("/s/bench-%d", i)
			for {
				if rate > 0 {
					if wait := time.Until(next); wait > 0 {
						time.Sleep(wait)
					}
					next = next.Add(interval)
				}
				if time.Now().After(end) {
					break
				}
				body = pack(body[:0], i, seq.Add(1), records)
				t0 := time.Now()
				code, err := cc.post(path, body)
				el := time.Since(t0)
				if err != nil || code != codes.Changed {
					failed++
					continue
				}
				lat = append(lat, el)
			}
			mu.Lock()
			res.lat = append(res.lat, lat...)
			res.failed += failed
			mu.Unlock()
		})
	}
	wg.Wait()
	res.elapsed = time.Since(start)
	res.requests = int64(len(res.lat))
	slices.Sort(res.lat)
	return res
}

// baseTime is the SenML base time of every pack: far enough back that a
// second per reading never reaches the future.
var baseTime = time.Now().Add(-200 * 24 * time.Hour).Unix()

// pack is one request's SenML: records readings of one sensor, each with its
// own time (n numbers the request), so that none is a duplicate of another.
func pack(b []byte, client int, n int64, records int) []byte {
	b = fmt.Appendf(b, `[{"bn":"bench-%d:","bt":%d,"bu":"V"`, client, baseTime)
	for r := range records {
		if r > 0 {
			b = append(b, ",{"...)
		} else {
			b = append(b, ',')
		}
		b = fmt.Appendf(b, `"n":"v","t":%d,"v":%d.5}`, n*int64(records)+int64(r), r)
	}
	return append(b, ']')
}

func startProc(cmd *exec.Cmd) (*exec.Cmd, error) {
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", cmd.Path, err)
	}
	return cmd, nil
}

func stopProc(cmd *exec.Cmd) {
	_ = cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		_ = cmd.Process.Kill()
		<-done
	}
}

func waitReady(url string) error {
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if resp, err := http.Get(url); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("%s not ready within 30 s", strings.TrimSuffix(url, "/readyz"))
}

func freeUDP() string {
	c, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	return c.LocalAddr().String()
}

func freeTCP() string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func commitSetting(d time.Duration) string {
	if d == 0 {
		return ""
	}
	return fmt.Sprintf("commit_interval = %q", d)
}
