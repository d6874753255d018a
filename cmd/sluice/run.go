package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"runtime/debug"
	"sync"
	"syscall"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"golang.org/x/sys/unix"

	"github.com/sluice-gw/sluice/buffer"
	"github.com/sluice-gw/sluice/gateway"
	"github.com/sluice-gw/sluice/uplink"
)

type runCmd struct {
	configFlags
}

func (r *runCmd) Run() error {
	cfg, err := r.load("run")
	if err != nil {
		return err
	}
	log := newLogger(cfg.Log, os.Stderr)
	if cfg.Runtime.MemoryLimit.Bytes > 0 && os.Getenv("GOMEMLIMIT") == "" {
		debug.SetMemoryLimit(cfg.Runtime.MemoryLimit.Bytes)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return runGateway(ctx, cfg, log)
}

func newLogger(c LogSection, w *os.File) *slog.Logger {
	var level slog.Level
	_ = level.UnmarshalText([]byte(c.Level))
	opts := &slog.HandlerOptions{Level: level}
	if c.Format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

// gatewayParts are the running pieces, built by assemble and supervised by runGateway.
type gatewayParts struct {
	cfg    *Config
	log    *slog.Logger
	buf    *buffer.Buffer
	clock  *gateway.Clock
	ingest *gateway.Ingest
	mqtt   *gateway.MQTT
	up     *uplink.Uplink
	admin  *gateway.Admin
	reg    *prometheus.Registry
	start  time.Time
}

// assemble builds every part from the config. What it opened is closed by
// parts.close, also after a failed start.
func assemble(cfg *Config, log *slog.Logger) (*gatewayParts, error) {
	p := &gatewayParts{cfg: cfg, log: log, start: time.Now(), reg: prometheus.NewRegistry()}
	p.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))

	dsn, err := cfg.resolveDSN()
	if err != nil {
		return nil, &ConfigError{[]error{err}}
	}
	mqttOpts, errs := cfg.mqttOptions(true)
	if len(errs) > 0 {
		return nil, &ConfigError{errs}
	}

	commit := gateway.NewCommitHistogram(p.reg)
	bopts := cfg.bufferOptions()
	bopts.Logger = log.With("component", "buffer")
	bopts.OnCommit = func(d time.Duration, _ int) { commit.Observe(d.Seconds()) }
	p.buf, err = buffer.Open(bopts)
	if err != nil {
		return nil, err
	}
	if rec := p.buf.Recovered(); rec != nil {
		log.Warn("buffer was recovered from a damaged file", "moved_to", rec.MovedTo, "readings", rec.LostReadings, "at", rec.At)
	}
	p.reg.MustRegister(gateway.NewBufferCollector(p.buf.Stats))

	p.clock = gateway.NewClock(gateway.ClockMode(cfg.Gateway.Clock))
	p.ingest = gateway.NewIngest(cfg.ingestOptions(), p.clock, log.With("component", "ingest"), p.reg)
	if mqttOpts.Broker != "" {
		p.mqtt, err = gateway.NewMQTT(mqttOpts, cfg.Gateway.ID, p.ingest, p.buf, log.With("component", "mqtt"))
		if err != nil {
			p.close()
			return nil, err
		}
	}

	uopts := cfg.uplinkOptions(dsn)
	uopts.Logger = log.With("component", "uplink")
	uopts.Registerer = p.reg
	uopts.Restamp = p.clock.Restamp
	uopts.OnServerTime = p.clock.ServerSample
	uopts.Report = p.report
	p.up, err = uplink.New(uopts, p.buf)
	if err != nil {
		p.close()
		return nil, err
	}

	p.admin, err = gateway.NewAdmin(gateway.AdminOptions{Listen: cfg.Admin.Listen}, p.reg, p.status, p.ready, log.With("component", "admin"))
	if err != nil {
		p.close()
		return nil, err
	}
	return p, nil
}

func (p *gatewayParts) close() {
	if p.up != nil {
		p.up.Close()
	}
	if p.buf != nil {
		if err := p.buf.Close(); err != nil {
			p.log.Error("close buffer", "err", err)
		}
	}
}

// report gathers the heartbeat's gateway figures.
func (p *gatewayParts) report() uplink.Report {
	in, rej := p.ingest.Counts()
	return uplink.Report{ReadingsIn: in, Rejected: rej, ClockSynced: p.clock.Synced(), DiskFreeBytes: diskFree(p.cfg.Gateway.DataDir)}
}

func diskFree(dir string) int64 {
	var fs unix.Statfs_t
	if err := unix.Statfs(dir, &fs); err != nil {
		return -1
	}
	return int64(fs.Bavail) * int64(fs.Bsize)
}

// ready: the buffer is open and at least one ingress is up.
func (p *gatewayParts) ready() error {
	if p.mqtt != nil {
		if st, lastErr := p.mqtt.State(); st != gateway.StateConnected {
			return fmt.Errorf("mqtt %s: %s", st, lastErr)
		}
		return nil
	}
	return errors.New("no ingress is up")
}

func (p *gatewayParts) status() gateway.Status {
	cfg := p.cfg
	st := p.buf.Stats()
	us := p.up.Status()
	s := gateway.Status{
		Gateway: gateway.GatewayStatus{ID: cfg.Gateway.ID, Site: cfg.Gateway.Site, Profile: cfg.Profile,
			Version: version, UptimeSeconds: time.Since(p.start).Seconds()},
		Buffer: gateway.BufferStatus{Readings: st.Readings, Bytes: st.Bytes, MaxBytes: st.MaxBytes, FileBytes: st.FileBytes,
			DeadLetters: st.DeadLetters, Full: st.Full, Dropped: map[string]int64{}},
		Uplink: gateway.UplinkStatus{State: string(us.State), LastSuccess: us.LastSuccess, LastUpload: us.LastUpload,
			LastHeartbeat: us.LastHeartbeat, LastError: us.LastError, SchemaVersion: us.SchemaVersion, Uploaded: us.Uploaded},
		Clock: gateway.ClockStatus{Synced: p.clock.Synced(), Source: p.clock.Source(), Mode: cfg.Gateway.Clock,
			OffsetSeconds: p.clock.ServerOffset().Seconds()},
		Sensors: p.ingest.Tracker().Sensors(),
		Health:  "ok",
	}
	for r, n := range st.Dropped {
		s.Buffer.Dropped[r.String()] = n
	}
	if !st.Oldest.IsZero() {
		s.Buffer.OldestAgeSeconds = time.Since(st.Oldest).Seconds()
		s.Uplink.LagSeconds = s.Buffer.OldestAgeSeconds
	}
	if rec := p.buf.Recovered(); rec != nil {
		s.Buffer.Recovered = &gateway.RecoveryStatus{At: rec.At, MovedTo: rec.MovedTo, Reason: rec.Reason, LostReadings: rec.LostReadings}
	}
	if p.mqtt != nil {
		state, lastErr := p.mqtt.State()
		s.Ingress = append(s.Ingress, gateway.IngressStatus{Name: gateway.IngressMQTT, State: state, LastError: lastErr})
	}
	if err := p.ready(); err != nil {
		s.Health = "failing"
		s.Reasons = append(s.Reasons, err.Error())
	}
	if us.State == uplink.StateRetrying {
		if s.Health == "ok" {
			s.Health = "degraded"
		}
		s.Reasons = append(s.Reasons, "uplink: "+us.LastError)
	}
	if st.Full {
		s.Health = "failing"
		s.Reasons = append(s.Reasons, "buffer full")
	}
	return s
}

// runGateway runs the parts until ctx is done or one fails, then shuts down
// in order: stop ingress (no new appends) -> in-flight appends commit and are
// acknowledged -> the uplink gets flush_timeout to upload -> bbolt closes last.
func runGateway(ctx context.Context, cfg *Config, log *slog.Logger) error {
	p, err := assemble(cfg, log)
	if err != nil {
		return err
	}
	defer p.close()
	log.Info("sluice starting", "version", version, "gateway_id", cfg.Gateway.ID, "site", cfg.Gateway.Site,
		"profile", cfg.Profile, "data_dir", cfg.Gateway.DataDir, "admin", p.admin.Addr(),
		"buffered", p.buf.Stats().Readings)

	failed := make(chan error, 4)
	var ingressWG, uplinkWG, adminWG sync.WaitGroup
	ingressCtx, stopIngress := context.WithCancel(context.Background())
	uplinkCtx, stopUplink := context.WithCancel(context.Background())
	adminCtx, stopAdmin := context.WithCancel(context.Background())
	defer stopIngress()
	defer stopUplink()
	defer stopAdmin()
	start := func(wg *sync.WaitGroup, name string, run func(context.Context) error, ctx context.Context) {
		wg.Go(func() {
			if err := run(ctx); err != nil {
				failed <- fmt.Errorf("%s: %w", name, err)
			}
		})
	}
	if p.mqtt != nil {
		start(&ingressWG, "mqtt", p.mqtt.Run, ingressCtx)
	}
	start(&uplinkWG, "uplink", p.up.Run, uplinkCtx)
	start(&adminWG, "admin", p.admin.Run, adminCtx)

	// READY=1: the buffer is open and the ingress listeners are started (a
	// broker that is down is being retried, not a failed start).
	notify(log, daemon.SdNotifyReady)
	var watchdog <-chan time.Time
	if interval, err := daemon.SdWatchdogEnabled(false); err == nil && interval > 0 {
		t := time.NewTicker(interval / 2)
		defer t.Stop()
		watchdog = t.C
	}
	var runErr error
supervise:
	for {
		select {
		case <-ctx.Done():
			log.Info("sluice shutting down")
			break supervise
		case runErr = <-failed:
			log.Error("sluice stopping after a failure", "err", runErr)
			break supervise
		case <-watchdog:
			notify(log, daemon.SdNotifyWatchdog)
		}
	}
	notify(log, daemon.SdNotifyStopping)

	stopIngress()
	ingressWG.Wait()
	stopUplink()
	uplinkWG.Wait()
	fctx, cancel := context.WithTimeout(context.Background(), p.up.FlushTimeout())
	ferr := p.up.Flush(fctx)
	cancel()
	left := p.buf.Stats().Readings
	if ferr != nil && left > 0 {
		log.Warn("shutdown flush incomplete; readings stay buffered for the next start", "readings", left, "err", ferr)
	} else {
		log.Info("shutdown flush done", "readings", left)
	}
	stopAdmin()
	adminWG.Wait()
	return runErr
}

// notify sends a state to systemd when it supervises us ($NOTIFY_SOCKET).
func notify(log *slog.Logger, state string) {
	if _, err := daemon.SdNotify(false, state); err != nil {
		log.Warn("systemd notify failed", "state", state, "err", err)
	}
}
