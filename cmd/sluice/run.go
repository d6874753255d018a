package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
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
	LogFormat string `help:"Log format, overriding [log] format (json suits journald's structured fields)." enum:",text,json" default:"" name:"log-format" placeholder:"text|json"`
}

func (r *runCmd) Run() error {
	load := func() (*Config, error) {
		cfg, err := r.load("run")
		if err == nil && r.LogFormat != "" {
			cfg.Log.Format = r.LogFormat
		}
		return cfg, err
	}
	cfg, err := load()
	if err != nil {
		return err
	}
	level := new(slog.LevelVar)
	log := newLogger(cfg.Log, level, os.Stderr)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return runGateway(ctx, cfg, log, &reloader{load: load, level: level})
}

// newLogger logs to w (stderr: journald under systemd) at a level that
// SIGHUP may change through level.
func newLogger(c LogSection, level *slog.LevelVar, w *os.File) *slog.Logger {
	level.Set(logLevel(c.Level))
	opts := &slog.HandlerOptions{Level: level}
	if c.Format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

func logLevel(s string) slog.Level {
	var l slog.Level
	_ = l.UnmarshalText([]byte(s))
	return l
}

// reloader re-reads the config on SIGHUP and applies what can change while
// running; everything else is logged as needing a restart.
type reloader struct {
	load  func() (*Config, error)
	level *slog.LevelVar
}

func (rl *reloader) reload(p *gatewayParts) {
	next, err := rl.load()
	if err != nil {
		p.log.Error("reload refused: the config has problems; keeping the running one", "err", err)
		return
	}
	if next.Log.Level != p.cfg.Log.Level {
		rl.level.Set(logLevel(next.Log.Level))
		p.cfg.Log.Level = next.Log.Level
		p.log.Info("reload: log level changed", "level", next.Log.Level)
	}
	// Reloadable keys are applied here; the rest of a changed config only
	// takes effect at the next start.
	var restart []string
	for _, key := range configDiff(p.cfg, next) {
		if key != "log.level" && key != "coap.psk_file" && key != "mqtt.subscribe" {
			restart = append(restart, key)
		}
	}
	// The PSK file is re-read even when its name is unchanged: its keys are
	// what a reload is for. Sessions of unchanged identities stay up.
	if p.coap != nil && next.CoAP.PSKFile != "" && next.CoAP.DTLSListen != "" {
		if t, err := next.coapPSK(); err != nil {
			p.log.Error("reload: psk_file refused, keeping the old keys", "err", err)
		} else {
			kept, closed := p.coap.ReloadPSK(t)
			p.log.Info("reload: psk_file applied", "sessions_kept", kept, "sessions_closed", closed)
		}
	}
	if p.mqtt != nil && !reflect.DeepEqual(p.cfg.MQTT.Subscribe, next.MQTT.Subscribe) {
		rl.reloadSubscriptions(p, next)
	}
	if len(restart) > 0 {
		p.log.Warn("reload: these changes need a restart (systemctl restart sluice)", "keys", strings.Join(restart, ","))
	}
	p.log.Info("reload done")
}

func (rl *reloader) reloadSubscriptions(p *gatewayParts, next *Config) {
	opts, errs := next.mqttOptions(false)
	if len(errs) > 0 {
		p.log.Error("reload: mqtt.subscribe refused, keeping the old subscriptions", "err", errors.Join(errs...))
		return
	}
	added, removed, err := p.mqtt.ReloadSubscriptions(opts.Subscriptions)
	if err != nil && added == nil && removed == nil {
		p.log.Error("reload: mqtt.subscribe refused, keeping the old subscriptions", "err", err)
		return
	}
	p.cfg.MQTT.Subscribe = next.MQTT.Subscribe
	if err != nil {
		p.log.Warn("reload: mqtt.subscribe applied, but the broker did not take all of it", "err", err)
	}
	state, lastErr := p.mqtt.State()
	p.log.Info("reload: mqtt.subscribe applied", "added", strings.Join(added, ","), "removed", strings.Join(removed, ","), "state", state, "last_error", lastErr)
}

// configDiff lists the keys ("section.key") whose values differ.
func configDiff(a, b *Config) []string {
	var keys []string
	av, bv := reflect.ValueOf(a).Elem(), reflect.ValueOf(b).Elem()
	for i := range av.NumField() {
		f := av.Type().Field(i)
		section := strings.Split(f.Tag.Get("toml"), ",")[0]
		if f.Type.Kind() != reflect.Struct {
			if !reflect.DeepEqual(av.Field(i).Interface(), bv.Field(i).Interface()) {
				keys = append(keys, section)
			}
			continue
		}
		for j := range f.Type.NumField() {
			if !reflect.DeepEqual(av.Field(i).Field(j).Interface(), bv.Field(i).Field(j).Interface()) {
				keys = append(keys, section+"."+strings.Split(f.Type.Field(j).Tag.Get("toml"), ",")[0])
			}
		}
	}
	return keys
}

// gatewayParts are the running pieces, built by assemble and supervised by runGateway.
type gatewayParts struct {
	cfg    *Config
	log    *slog.Logger
	buf    *buffer.Buffer
	clock  *gateway.Clock
	ingest *gateway.Ingest
	mqtt   *gateway.MQTT
	coap   *gateway.CoAP
	up     *uplink.Uplink
	admin  *gateway.Admin
	reg    *prometheus.Registry
	start  time.Time
	// stopping is set when shutdown begins: /readyz says so from then on.
	stopping atomic.Bool
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
	coapOpts, coapErrs := cfg.coapOptions(true)
	if errs = append(errs, coapErrs...); len(errs) > 0 {
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
	p.reg.MustRegister(p.ingest.Tracker())
	if mqttOpts.Broker != "" {
		p.mqtt, err = gateway.NewMQTT(mqttOpts, cfg.Gateway.ID, p.ingest, p.buf, log.With("component", "mqtt"))
		if err != nil {
			p.close()
			return nil, err
		}
	}
	if coapOpts.Enabled() {
		p.coap, err = gateway.NewCoAP(coapOpts, p.ingest, p.buf, log.With("component", "coap"))
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

	adminOpts := gateway.AdminOptions{Listen: cfg.Admin.Listen, Backlog: func() int64 { return p.buf.Stats().Readings }}
	if cfg.Admin.TokenFile != "" {
		tok, err := readSecret(cfg.Admin.TokenFile)
		if err != nil {
			p.close()
			return nil, &ConfigError{[]error{fmt.Errorf("admin.token_file: %w", err)}}
		}
		adminOpts.Token = strings.TrimSpace(tok)
	}
	p.admin, err = gateway.NewAdmin(adminOpts, p.reg, p.status, p.ready, log.With("component", "admin"))
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

// report gathers the heartbeat's gateway figures and sensor health.
func (p *gatewayParts) report() uplink.Report {
	in, rej := p.ingest.Counts()
	r := uplink.Report{ReadingsIn: in, Rejected: rej, ClockSynced: p.clock.Synced(), DiskFreeBytes: diskFree(p.cfg.Gateway.DataDir)}
	for _, s := range p.ingest.Tracker().Sensors() {
		r.Sensors = append(r.Sensors, uplink.SensorReport{Sensor: s.Sensor, LastSeenAge: s.AgeSeconds, Readings: s.Readings, Gaps: s.Gaps, Stale: s.Stale})
	}
	return r
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
	if p.stopping.Load() {
		return errors.New("shutting down")
	}
	var down []string
	for _, in := range p.ingresses() {
		if in.Up {
			return nil
		}
		down = append(down, fmt.Sprintf("%s %s%s", in.Name, in.State, errSuffix(in.LastError)))
	}
	if len(down) == 0 {
		return errors.New("no ingress is configured")
	}
	return fmt.Errorf("no ingress is up: %s", strings.Join(down, "; "))
}

// ingresses are the ways in and their states.
func (p *gatewayParts) ingresses() []gateway.IngressStatus {
	var out []gateway.IngressStatus
	if p.mqtt != nil {
		state, lastErr := p.mqtt.State()
		out = append(out, gateway.IngressStatus{Name: gateway.IngressMQTT, State: state, Up: state == gateway.StateConnected, LastError: lastErr})
	}
	if p.coap != nil {
		state, lastErr := p.coap.State()
		out = append(out, gateway.IngressStatus{Name: gateway.IngressCoAP, State: state, Up: state == gateway.StateListening, LastError: lastErr})
	}
	return out
}

func errSuffix(err string) string {
	if err == "" {
		return ""
	}
	return " (" + err + ")"
}

func (p *gatewayParts) status() gateway.Status {
	cfg := p.cfg
	st := p.buf.Stats()
	us := p.up.Status()
	s := gateway.Status{
		Gateway: gateway.GatewayStatus{ID: cfg.Gateway.ID, Site: cfg.Gateway.Site, Profile: cfg.Profile,
			Version: version, UptimeSeconds: time.Since(p.start).Seconds()},
		Buffer: gateway.BufferStatus{Readings: st.Readings, Bytes: st.Bytes, MaxBytes: st.MaxBytes, FileBytes: st.FileBytes,
			DeadLetters: st.DeadLetters, Full: st.Full, OnFull: cfg.Buffer.OnFull, Dropped: map[string]int64{}},
		Uplink: gateway.UplinkStatus{State: string(us.State), LastSuccess: us.LastSuccess, LastUpload: us.LastUpload,
			LastHeartbeat: us.LastHeartbeat, LastError: us.LastError, SchemaVersion: us.SchemaVersion, Uploaded: us.Uploaded,
			LagAlertSeconds: cfg.Uplink.LagAlert.Seconds()},
		Clock: gateway.ClockStatus{Synced: p.clock.Synced(), Source: p.clock.Source(), Mode: cfg.Gateway.Clock,
			OffsetSeconds: p.clock.ServerOffset().Seconds()},
		Ingress:       p.ingresses(),
		Sensors:       p.ingest.Tracker().Sensors(),
		SensorsHidden: p.ingest.Tracker().Untracked(),
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
	s.Assess(time.Now())
	return s
}

// runGateway runs the parts until ctx is done or one fails, then shuts down
// in order: stop ingress (no new appends) -> in-flight appends commit and are
// acknowledged -> the uplink gets flush_timeout to upload -> bbolt closes last.
func runGateway(ctx context.Context, cfg *Config, log *slog.Logger, rl *reloader) error {
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
	if p.coap != nil {
		start(&ingressWG, "coap", p.coap.Run, ingressCtx)
	}
	start(&uplinkWG, "uplink", p.up.Run, uplinkCtx)
	start(&adminWG, "admin", p.admin.Run, adminCtx)
	start(&adminWG, "memory", newMemoryTuner(cfg.Runtime).Run, adminCtx)

	// READY=1: the buffer is open and the ingress listeners are started (a
	// broker that is down is being retried, not a failed start).
	notify(log, daemon.SdNotifyReady)
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
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
		case <-hup:
			if rl != nil {
				log.Info("reloading the config (SIGHUP)")
				rl.reload(p)
			}
		}
	}
	p.stopping.Store(true)
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
