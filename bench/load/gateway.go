package main

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/sluice-gw/sluice/bench"
)

// Metric names the harness reads from the gateway's /metrics.
const (
	metricReceived = "sluice_readings_received_total"
	metricUploaded = "sluice_uplink_readings_total"
	metricBuffered = "sluice_buffer_readings"
	metricRejected = "sluice_messages_rejected_total"
)

// gatewayConfig is a bench gateway's config file: the shipped defaults but
// for what a bench must set, plus the -set overrides.
type gatewayConfig struct {
	dataDir, broker, clientID, dsn string
	adminPort                      int
	set                            []string // "section.key=value", value in TOML
}

func (c gatewayConfig) render() (string, error) {
	sections := map[string]map[string]string{
		"gateway": {"id": `"gw-bench"`, "site": `"bench"`, "data_dir": fmt.Sprintf("%q", c.dataDir), "clock": `"trusted"`},
		"mqtt":    {"broker": fmt.Sprintf("%q", c.broker), "client_id": fmt.Sprintf("%q", c.clientID)},
		// Room for the millions of readings of the drain run.
		"buffer": {"max_bytes": `"2GiB"`, "min_free_disk": `"1GiB"`},
		"uplink": {"dsn": fmt.Sprintf("%q", c.dsn), "backoff_max": `"1s"`, "flush_timeout": `"1s"`},
		"admin":  {"listen": fmt.Sprintf(`"127.0.0.1:%d"`, c.adminPort)},
		"log":    {"level": `"info"`},
	}
	for _, s := range c.set {
		key, value, ok := strings.Cut(s, "=")
		section, name, ok2 := strings.Cut(key, ".")
		if !ok || !ok2 {
			return "", fmt.Errorf("-set %q: want section.key=value", s)
		}
		if sections[section] == nil {
			sections[section] = map[string]string{}
		}
		sections[section][name] = value
	}
	var b strings.Builder
	order := []string{"gateway", "mqtt", "ingest", "buffer", "uplink", "admin", "log", "runtime"}
	for _, section := range order {
		keys := sections[section]
		if keys == nil {
			continue
		}
		fmt.Fprintf(&b, "[%s]\n", section)
		names := make([]string, 0, len(keys))
		for k := range keys {
			names = append(names, k)
		}
		sort.Strings(names)
		for _, k := range names {
			fmt.Fprintf(&b, "%s = %s\n", k, keys[k])
		}
		if section == "mqtt" {
			fmt.Fprintf(&b, "\n[[mqtt.subscribe]]\ntopic = %q\npattern = %q\n", bench.FlatFilter, bench.FlatPattern)
			fmt.Fprintf(&b, "\n[[mqtt.subscribe]]\ntopic = %q\npattern = %q\nformat = \"senml\"\n", bench.SenMLFilter, bench.SenMLPattern)
		}
		b.WriteString("\n")
	}
	for section := range sections {
		if !strings.Contains(" "+strings.Join(order, " ")+" ", " "+section+" ") {
			return "", fmt.Errorf("-set: unknown section [%s]", section)
		}
	}
	return b.String(), nil
}

// gatewayProc is one run of the real sluice binary.
type gatewayProc struct {
	admin  string // http://127.0.0.1:port
	cmd    *exec.Cmd
	exited chan struct{}
	logf   *os.File
	http   *http.Client
}

// startGateway writes the config into dir and starts sluice run, with its
// output in dir/sluice.log, and waits until /readyz answers 200 (the MQTT
// subscription is granted). Call it from main's locked thread, so that the
// parent-death signal holds for the whole run.
func startGateway(bin, dir string, cfg gatewayConfig, env []string, ready string) (*gatewayProc, error) {
	text, err := cfg.render()
	if err != nil {
		return nil, err
	}
	path := filepath.Join(dir, "sluice.toml")
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		return nil, err
	}
	logf, err := os.Create(filepath.Join(dir, "sluice.log"))
	if err != nil {
		return nil, err
	}
	g := &gatewayProc{
		admin:  fmt.Sprintf("http://127.0.0.1:%d", cfg.adminPort),
		cmd:    exec.Command(bin, "run", "--config", path),
		exited: make(chan struct{}),
		logf:   logf,
		// No gzip: compressing each scrape would cost the gateway CPU the run counts.
		http: &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableCompression: true}},
	}
	g.cmd.Stdout, g.cmd.Stderr = logf, logf
	g.cmd.Env = append(os.Environ(), env...)
	g.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := g.cmd.Start(); err != nil {
		logf.Close()
		return nil, fmt.Errorf("start sluice: %w", err)
	}
	go func() {
		_ = g.cmd.Wait()
		close(g.exited)
	}()
	if err := g.waitHTTP(ready, 30*time.Second); err != nil {
		g.kill()
		return nil, fmt.Errorf("%w\n%s", err, g.logTail())
	}
	return g, nil
}

func (g *gatewayProc) pid() int { return g.cmd.Process.Pid }

// waitHTTP waits until path answers 200.
func (g *gatewayProc) waitHTTP(path string, d time.Duration) error {
	deadline := time.Now().Add(d)
	for {
		resp, err := g.http.Get(g.admin + path)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case <-g.exited:
			return errors.New("sluice exited during start")
		default:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("sluice %s did not answer 200 within %s", path, d)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// metrics reads the counters the harness follows.
func (g *gatewayProc) metrics(ctx context.Context) (map[string]float64, error) {
	return bench.Scrape(ctx, g.http, g.admin+"/metrics", metricReceived, metricUploaded, metricBuffered, metricRejected)
}

// stop sends SIGTERM (the ordered shutdown) and waits.
func (g *gatewayProc) stop() error {
	defer g.logf.Close()
	_ = g.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-g.exited:
		return nil
	case <-time.After(30 * time.Second):
		g.kill()
		return errors.New("sluice did not stop within 30 s of SIGTERM; killed")
	}
}

func (g *gatewayProc) kill() {
	_ = g.cmd.Process.Signal(syscall.SIGKILL)
	<-g.exited
}

func (g *gatewayProc) logTail() string {
	b, err := os.ReadFile(g.logf.Name())
	if err != nil {
		return err.Error()
	}
	if len(b) > 4096 {
		b = b[len(b)-4096:]
	}
	return "--- sluice log (" + g.logf.Name() + "), last lines ---\n" + string(b)
}

// watch follows a running gateway: its counters and its /proc entries,
// every interval, until stop.
type watch struct {
	received, uploaded bench.Series
	buffered           bench.Series
	rejected           float64
	sampler            *bench.Sampler
	stopc, done        chan struct{}
	err                error
}

func (g *gatewayProc) watch(every time.Duration) *watch {
	w := &watch{sampler: bench.StartSampler(g.pid(), every), stopc: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			m, err := g.metrics(ctx)
			cancel()
			now := time.Now()
			if err != nil {
				w.err = err
			} else {
				w.received.Add(now, m[metricReceived])
				w.uploaded.Add(now, m[metricUploaded])
				w.buffered.Add(now, m[metricBuffered])
				w.rejected = m[metricRejected]
			}
			select {
			case <-w.stopc:
				return
			case <-g.exited:
				w.err = errors.New("sluice exited")
				return
			case <-t.C:
			}
		}
	}()
	return w
}

// stop ends the watch and returns the process usage seen.
func (w *watch) stop() (bench.Usage, error) {
	close(w.stopc)
	<-w.done
	u, err := w.sampler.Stop()
	return u, errors.Join(w.err, err)
}

// stallAfter is how long a counter may stand still before waitProgress gives up.
const stallAfter = 10 * time.Second

// waitProgress waits until value reaches target, polling every 20 ms; it
// gives up when the process exits, after d, or when value has not moved for
// stallAfter (messages the broker dropped never come).
func waitProgress(d time.Duration, exited <-chan struct{}, what string, value func() float64, target float64) error {
	last, moved := value(), time.Now()
	return waitFor(d, exited, what, func() bool {
		v := value()
		if v != last {
			last, moved = v, time.Now()
		}
		return v >= target || time.Since(moved) > stallAfter
	})
}

// waitFor polls cond every 20 ms until it holds, the process exits, or d passes.
func waitFor(d time.Duration, exited <-chan struct{}, what string, cond func() bool) error {
	deadline := time.Now().Add(d)
	for !cond() {
		select {
		case <-exited:
			return fmt.Errorf("waiting for %s: the process exited", what)
		default:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s did not happen within %s", what, d)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return nil
}
