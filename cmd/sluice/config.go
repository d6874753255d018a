package main

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/BurntSushi/toml"

	"github.com/sluice-gw/sluice/buffer"
	firmwareprofiles "github.com/sluice-gw/sluice/firmware-profiles"
	"github.com/sluice-gw/sluice/gateway"
	"github.com/sluice-gw/sluice/gateway/senml"
	"github.com/sluice-gw/sluice/uplink"
)

// Config is the TOML file: one struct per section, keys as documented. It
// is only a mapping onto each part's options, which own their defaults and
// their validation.
type Config struct {
	Profile string         `toml:"profile"`
	Build   BuildSection   `toml:"build"`
	Gateway GatewaySection `toml:"gateway"`
	Ingest  IngestSection  `toml:"ingest"`
	MQTT    MQTTSection    `toml:"mqtt"`
	CoAP    CoAPSection    `toml:"coap"`
	Buffer  BufferSection  `toml:"buffer"`
	Uplink  UplinkSection  `toml:"uplink"`
	Admin   AdminSection   `toml:"admin"`
	Log     LogSection     `toml:"log"`
	Runtime RuntimeSection `toml:"runtime"`
}

// BuildSection is the board's build target; it is read from profiles by the
// cross-build and ignored at run time.
type BuildSection struct {
	GOOS   string `toml:"goos"`
	GOARCH string `toml:"goarch"`
	GOARM  string `toml:"goarm"`
}

// GatewaySection is [gateway].
type GatewaySection struct {
	ID      string `toml:"id"`       // (default: the hostname)
	Site    string `toml:"site"`     // (default "default")
	DataDir string `toml:"data_dir"` // (default "/var/lib/sluice")
	Clock   string `toml:"clock"`    // auto | trusted | untrusted (default "auto")
}

// IngestSection is [ingest].
type IngestSection struct {
	MaxPayload Size      `toml:"max_payload"` // (default 64KiB)
	MaxFuture  Duration  `toml:"max_future"`  // (default 10m)
	Oldest     Timestamp `toml:"oldest"`      // (default 2000-01-01T00:00:00Z)
}

// MQTTSection is [mqtt].
type MQTTSection struct {
	Broker         string             `toml:"broker"` // "" turns MQTT off
	ClientID       string             `toml:"client_id"`
	Username       string             `toml:"username"`
	PasswordFile   string             `toml:"password_file"`
	CAFile         string             `toml:"ca_file"`
	CertFile       string             `toml:"cert_file"`
	KeyFile        string             `toml:"key_file"`
	SessionExpiry  Duration           `toml:"session_expiry"`  // (default 24h)
	KeepAlive      Duration           `toml:"keep_alive"`      // (default 30s)
	ReceiveMaximum int                `toml:"receive_maximum"` // (default 256)
	AckInterval    Duration           `toml:"ack_interval"`    // (default 1ms)
	Subscribe      []SubscribeSection `toml:"subscribe"`
}

// SubscribeSection is one [[mqtt.subscribe]].
type SubscribeSection struct {
	Topic    string `toml:"topic"`
	Pattern  string `toml:"pattern"`
	Format   string `toml:"format"`   // auto | senml | json | value (default "auto")
	QoS      *int64 `toml:"qos"`      // (default 1)
	Priority string `toml:"priority"` // alarm | telemetry (default "telemetry")
}

// CoAPSection is [coap].
type CoAPSection struct {
	Listen     string `toml:"listen"`
	DTLSListen string `toml:"dtls_listen"`
	PSKFile    string `toml:"psk_file"`
	CAFile     string `toml:"ca_file"`
	CertFile   string `toml:"cert_file"`
	KeyFile    string `toml:"key_file"`
}

// BufferSection is [buffer].
type BufferSection struct {
	MaxBytes       Size     `toml:"max_bytes"`       // (default 256MiB)
	MaxAge         Duration `toml:"max_age"`         // (default 0: none)
	MinFreeDisk    Size     `toml:"min_free_disk"`   // (default 64MiB)
	OnFull         string   `toml:"on_full"`         // drop-oldest | reject (default "drop-oldest")
	CommitInterval Duration `toml:"commit_interval"` // (default 2ms)
}

// UplinkSection is [uplink].
type UplinkSection struct {
	DSN          string   `toml:"dsn"`
	DSNFile      string   `toml:"dsn_file"`
	BatchSize    int      `toml:"batch_size"`    // (default 5000)
	BatchWait    Duration `toml:"batch_wait"`    // (default 1s)
	Heartbeat    Duration `toml:"heartbeat"`     // (default 30s)
	LagAlert     Duration `toml:"lag_alert"`     // (default 60s)
	BackoffMax   Duration `toml:"backoff_max"`   // (default 60s)
	MaxRate      float64  `toml:"max_rate"`      // (default 0: unlimited)
	FlushTimeout Duration `toml:"flush_timeout"` // (default 10s)
}

// AdminSection is [admin].
type AdminSection struct {
	Listen    string `toml:"listen"`     // (default "127.0.0.1:9180")
	TokenFile string `toml:"token_file"` // required when listen is not loopback
}

// LogSection is [log].
type LogSection struct {
	Level  string `toml:"level"`  // debug | info | warn | error (default "info")
	Format string `toml:"format"` // text | json (default "text")
}

// RuntimeSection is [runtime]: how the Go runtime spends memory against
// CPU. The environment (GOGC, GOMEMLIMIT) wins over both keys.
type RuntimeSection struct {
	MemoryLimit Size `toml:"memory_limit"` // GOMEMLIMIT (default 20MiB; profiles raise it)
	GCPercent   int  `toml:"gc_percent"`   // GOGC (default 400)
}

// Runtime defaults. Almost all of what the gateway allocates is garbage at
// once (paho's packet buffers, decoded readings), and its live heap is 1 to
// 6 MiB, so collecting at GOGC's usual 100 ran the collector 80 times a
// second at full MQTT ingest and cost a quarter of the CPU. A collection at
// five times the live heap, or when the runtime's memory reaches the limit,
// whichever comes first, keeps the resident set of a busy gateway near the
// limit and spends far less on collecting (bench/README.md).
const (
	defaultMemoryLimit = 20 << 20
	defaultGCPercent   = 400
)

// Defaults that belong to the config file itself, not to a part.
const (
	defaultDataDir = "/var/lib/sluice"
	defaultSite    = "default"
	defaultAdmin   = "127.0.0.1:9180"
)

// configFlags are the --config and --profile flags shared by the commands
// that read a gateway config.
type configFlags struct {
	Config  string `help:"Config file." type:"path" placeholder:"FILE"`
	Profile string `help:"Firmware profile to layer under the config (e.g. dev)." placeholder:"NAME"`
}

// load reads the layered config; verb names the command in the usage error.
func (f configFlags) load(verb string) (*Config, error) {
	if f.Config == "" && f.Profile == "" {
		return nil, usageError{fmt.Errorf("%s: give --config FILE or --profile NAME", verb)}
	}
	return LoadConfig(f.Config, f.Profile)
}

// ConfigError lists every problem of a config, one "key: problem" each.
type ConfigError struct{ Problems []error }

func (e *ConfigError) Error() string { return strings.TrimSpace(errorLines(e.Problems)) }

// LoadConfig reads the profile layer (profileFlag, else the file's profile
// key) and the file over it. path may be "" for a profile alone. Every
// problem comes back at once in a *ConfigError.
func LoadConfig(path, profileFlag string) (*Config, error) {
	var fileTable map[string]any
	if path != "" {
		data, err := os.ReadFile(path)
		if err != nil {
			return nil, &ConfigError{[]error{fmt.Errorf("config: %w", err)}}
		}
		if fileTable, err = decodeTOML(data); err != nil {
			return nil, &ConfigError{[]error{fmt.Errorf("config %s: %w", path, err)}}
		}
	}
	profile := profileFlag
	if p, ok := fileTable["profile"].(string); ok && profile == "" {
		profile = p
	}
	var cfg Config
	var problems []error
	if profile != "" {
		text, ok := firmwareprofiles.Read(profile)
		if !ok {
			return nil, &ConfigError{[]error{fmt.Errorf("profile: %q is not one of %s", profile, strings.Join(firmwareprofiles.Names(), ", "))}}
		}
		pt, err := decodeTOML(text)
		if err != nil {
			return nil, &ConfigError{[]error{fmt.Errorf("profile %s: %w", profile, err)}}
		}
		for _, e := range mapValues(&cfg, pt) {
			problems = append(problems, fmt.Errorf("profile %s: %w", profile, e))
		}
	}
	// dsn and dsn_file are one setting in two forms: the file's choice
	// replaces the profile's, rather than clashing with it.
	if up, ok := fileTable["uplink"].(map[string]any); ok {
		if _, ok := up["dsn"]; ok {
			cfg.Uplink.DSNFile = ""
		}
		if _, ok := up["dsn_file"]; ok {
			cfg.Uplink.DSN = ""
		}
	}
	problems = append(problems, mapValues(&cfg, fileTable)...)
	cfg.Profile = profile
	cfg.setDefaults()
	// Validate too when values failed to map, so every problem shows at
	// once; a key that failed to map is not reported a second time.
	bad := map[string]bool{}
	for _, p := range problems {
		key, _, _ := strings.Cut(p.Error(), ":")
		bad[key] = true
	}
	for _, p := range cfg.validate() {
		if key, _, _ := strings.Cut(p.Error(), ":"); !bad[key] {
			problems = append(problems, p)
		}
	}
	if len(problems) > 0 {
		sort.Slice(problems, func(i, j int) bool { return problems[i].Error() < problems[j].Error() })
		return nil, &ConfigError{problems}
	}
	return &cfg, nil
}

func decodeTOML(data []byte) (map[string]any, error) {
	var m map[string]any
	if _, err := toml.Decode(string(data), &m); err != nil {
		return nil, err
	}
	return m, nil
}

func (c *Config) setDefaults() {
	if c.Gateway.ID == "" {
		c.Gateway.ID, _ = os.Hostname()
	}
	if c.Gateway.Site == "" {
		c.Gateway.Site = defaultSite
	}
	if c.Gateway.DataDir == "" {
		c.Gateway.DataDir = defaultDataDir
	}
	if c.Gateway.Clock == "" {
		c.Gateway.Clock = string(gateway.ClockAuto)
	}
	if c.Admin.Listen == "" {
		c.Admin.Listen = defaultAdmin
	}
	if c.Log.Level == "" {
		c.Log.Level = "info"
	}
	if c.Log.Format == "" {
		c.Log.Format = "text"
	}
	c.setPartDefaults()
}

// setPartDefaults fills unset keys with the defaults the parts own, so that
// `config show` prints the config that really runs.
func (c *Config) setPartDefaults() {
	setSize := func(z *Size, def int64) {
		if z.Bytes == 0 {
			z.Bytes = def
		}
	}
	setDur := func(d *Duration, def time.Duration) {
		if d.Duration == 0 {
			d.Duration = def
		}
	}
	setSize(&c.Ingest.MaxPayload, int64(gateway.DefaultMaxPayload))
	setDur(&c.Ingest.MaxFuture, gateway.DefaultMaxFuture)
	if c.Ingest.Oldest.IsZero() {
		c.Ingest.Oldest.Time = gateway.DefaultOldest
	}
	if c.MQTT.ClientID == "" && c.Gateway.ID != "" {
		c.MQTT.ClientID = "sluice-" + c.Gateway.ID
	}
	setDur(&c.MQTT.SessionExpiry, gateway.DefaultSessionExpiry)
	setDur(&c.MQTT.KeepAlive, gateway.DefaultKeepAlive)
	setDur(&c.MQTT.AckInterval, gateway.DefaultAckInterval)
	if c.MQTT.ReceiveMaximum == 0 {
		c.MQTT.ReceiveMaximum = gateway.DefaultReceiveMaximum
	}
	for i := range c.MQTT.Subscribe {
		s := &c.MQTT.Subscribe[i]
		s.Format = defaultString(s.Format, "auto")
		s.Priority = defaultString(s.Priority, string(buffer.ClassTelemetry))
		if s.QoS == nil {
			one := int64(1)
			s.QoS = &one
		}
	}
	setSize(&c.Buffer.MaxBytes, buffer.DefaultMaxBytes)
	setSize(&c.Buffer.MinFreeDisk, buffer.DefaultMinFreeDisk)
	setDur(&c.Buffer.CommitInterval, buffer.DefaultCommitInterval)
	c.Buffer.OnFull = defaultString(c.Buffer.OnFull, string(buffer.DropOldest))
	if c.Uplink.BatchSize == 0 {
		c.Uplink.BatchSize = uplink.DefaultBatchSize
	}
	setDur(&c.Uplink.BatchWait, uplink.DefaultBatchWait)
	setDur(&c.Uplink.Heartbeat, uplink.DefaultHeartbeat)
	setDur(&c.Uplink.LagAlert, uplink.DefaultLagAlert)
	setDur(&c.Uplink.BackoffMax, uplink.DefaultBackoffMax)
	setDur(&c.Uplink.FlushTimeout, uplink.DefaultFlushTimeout)
	setSize(&c.Runtime.MemoryLimit, defaultMemoryLimit)
	if c.Runtime.GCPercent == 0 {
		c.Runtime.GCPercent = defaultGCPercent
	}
}

// validate checks the file-level keys and runs each part's Validate,
// prefixing its keys with the section.
func (c *Config) validate() []error {
	var errs []error
	add := func(section string, err error) {
		if err == nil {
			return
		}
		for _, e := range unjoin(err) {
			errs = append(errs, fmt.Errorf("%s.%w", section, e))
		}
	}
	if c.Gateway.ID == "" {
		errs = append(errs, errors.New("gateway.id: empty, and the hostname could not be read"))
	}
	switch gateway.ClockMode(c.Gateway.Clock) {
	case gateway.ClockAuto, gateway.ClockTrusted, gateway.ClockUntrusted:
	default:
		errs = append(errs, fmt.Errorf("gateway.clock: %q is not one of auto, trusted, untrusted", c.Gateway.Clock))
	}
	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		errs = append(errs, fmt.Errorf("log.level: %q is not one of debug, info, warn, error", c.Log.Level))
	}
	switch c.Log.Format {
	case "text", "json":
	default:
		errs = append(errs, fmt.Errorf("log.format: %q is not one of text, json", c.Log.Format))
	}
	if c.Runtime.MemoryLimit.Bytes < 8<<20 {
		errs = append(errs, fmt.Errorf("runtime.memory_limit: %d bytes is below 8MiB, where the collector would run without pause", c.Runtime.MemoryLimit.Bytes))
	}
	if c.Runtime.GCPercent < 25 || c.Runtime.GCPercent > 10000 {
		errs = append(errs, fmt.Errorf("runtime.gc_percent: %d is outside 25..10000", c.Runtime.GCPercent))
	}
	if c.Uplink.DSN != "" && c.Uplink.DSNFile != "" {
		errs = append(errs, errors.New("uplink.dsn: set dsn or dsn_file, not both"))
	}
	if c.Uplink.DSN == "" && c.Uplink.DSNFile == "" {
		errs = append(errs, errors.New("uplink.dsn: no central database: set dsn_file (or dsn)"))
	}
	if _, _, err := net.SplitHostPort(c.Admin.Listen); err != nil {
		errs = append(errs, fmt.Errorf("admin.listen: %q is not host:port", c.Admin.Listen))
	} else if c.Admin.TokenFile == "" && !gateway.IsLoopback(c.Admin.Listen) {
		errs = append(errs, fmt.Errorf("admin.token_file: required when admin.listen (%s) is not a loopback address: every endpoint but /healthz then needs the token", c.Admin.Listen))
	}
	if c.MQTT.Broker == "" && c.CoAP.Listen == "" && c.CoAP.DTLSListen == "" {
		errs = append(errs, errors.New("mqtt.broker: no ingress: set [mqtt] broker or [coap] listen"))
	}
	mqttOpts, mqttErrs := c.mqttOptions(false)
	errs = append(errs, mqttErrs...)
	add("mqtt", mqttOpts.Validate())
	coapOpts, coapErrs := c.coapOptions(false)
	errs = append(errs, coapErrs...)
	add("coap", coapOpts.Validate())
	add("ingest", c.ingestOptions().Validate())
	add("buffer", c.bufferOptions().Validate())
	up := c.uplinkOptions("")
	up.DSN = "" // the DSN is checked when it is read, without echoing it
	add("uplink", up.Validate())
	return errs
}

// unjoin splits an errors.Join result back into its problems.
func unjoin(err error) []error {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		return j.Unwrap()
	}
	return []error{err}
}

func (c *Config) ingestOptions() gateway.IngestOptions {
	return gateway.IngestOptions{
		MaxPayload: int(c.Ingest.MaxPayload.Bytes),
		MaxFuture:  c.Ingest.MaxFuture.Duration,
		Oldest:     c.Ingest.Oldest.Time,
	}
}

// mqttOptions maps [mqtt]; with secrets it also reads password_file.
func (c *Config) mqttOptions(secrets bool) (gateway.MQTTOptions, []error) {
	var errs []error
	o := gateway.MQTTOptions{
		Broker:         c.MQTT.Broker,
		ClientID:       c.MQTT.ClientID,
		Username:       c.MQTT.Username,
		CAFile:         c.MQTT.CAFile,
		CertFile:       c.MQTT.CertFile,
		KeyFile:        c.MQTT.KeyFile,
		SessionExpiry:  c.MQTT.SessionExpiry.Duration,
		KeepAlive:      c.MQTT.KeepAlive.Duration,
		ReceiveMaximum: c.MQTT.ReceiveMaximum,
		AckInterval:    c.MQTT.AckInterval.Duration,
	}
	for i, s := range c.MQTT.Subscribe {
		f, err := senml.ParseFormat(defaultString(s.Format, "auto"))
		if err != nil {
			errs = append(errs, fmt.Errorf("mqtt.subscribe[%d].format: %v", i, err))
		}
		qos := int64(1)
		if s.QoS != nil {
			qos = *s.QoS
		}
		if qos < 0 || qos > 2 {
			errs = append(errs, fmt.Errorf("mqtt.subscribe[%d].qos: %d is not 0, 1 or 2", i, qos))
			qos = 1
		}
		o.Subscriptions = append(o.Subscriptions, gateway.Subscription{
			Topic: s.Topic, Pattern: s.Pattern, Format: f, QoS: byte(qos), Priority: buffer.Class(s.Priority),
		})
	}
	if secrets && c.MQTT.PasswordFile != "" {
		pw, err := readSecret(c.MQTT.PasswordFile)
		if err != nil {
			errs = append(errs, fmt.Errorf("mqtt.password_file: %w", err))
		}
		o.Password = strings.TrimRight(pw, "\r\n")
	}
	return o, errs
}

// coapOptions maps [coap]; with secrets it also reads and parses psk_file.
func (c *Config) coapOptions(secrets bool) (gateway.CoAPOptions, []error) {
	o := gateway.CoAPOptions{
		Listen:     c.CoAP.Listen,
		DTLSListen: c.CoAP.DTLSListen,
		PSKFile:    c.CoAP.PSKFile,
		CAFile:     c.CoAP.CAFile,
		CertFile:   c.CoAP.CertFile,
		KeyFile:    c.CoAP.KeyFile,
	}
	if !secrets || c.CoAP.PSKFile == "" || c.CoAP.DTLSListen == "" {
		return o, nil
	}
	t, err := c.coapPSK()
	if err != nil {
		return o, []error{err}
	}
	o.PSK = t
	return o, nil
}

// coapPSK reads and parses psk_file, refusing a file other users can read;
// also what a reload on SIGHUP calls.
func (c *Config) coapPSK() (*gateway.PSKTable, error) {
	text, err := readSecret(c.CoAP.PSKFile)
	if err != nil {
		return nil, fmt.Errorf("coap.psk_file: %w", err)
	}
	t, err := gateway.ParsePSK(text)
	if err != nil {
		return nil, fmt.Errorf("coap.psk_file: %s: %w", c.CoAP.PSKFile, err)
	}
	return t, nil
}

func (c *Config) bufferOptions() buffer.Options {
	return buffer.Options{
		Dir:            c.Gateway.DataDir,
		MaxBytes:       c.Buffer.MaxBytes.Bytes,
		MaxAge:         c.Buffer.MaxAge.Duration,
		MinFreeDisk:    c.Buffer.MinFreeDisk.Bytes,
		OnFull:         buffer.OnFull(c.Buffer.OnFull),
		CommitInterval: c.Buffer.CommitInterval.Duration,
		GatewayID:      c.Gateway.ID,
		Site:           c.Gateway.Site,
	}
}

// uplinkOptions maps [uplink]; dsn is the resolved connection string.
func (c *Config) uplinkOptions(dsn string) uplink.Options {
	return uplink.Options{
		DSN:          dsn,
		GatewayID:    c.Gateway.ID,
		Site:         c.Gateway.Site,
		Profile:      c.Profile,
		Version:      version,
		BatchSize:    c.Uplink.BatchSize,
		BatchWait:    c.Uplink.BatchWait.Duration,
		Heartbeat:    c.Uplink.Heartbeat.Duration,
		LagAlert:     c.Uplink.LagAlert.Duration,
		BackoffMax:   c.Uplink.BackoffMax.Duration,
		MaxRate:      c.Uplink.MaxRate,
		FlushTimeout: c.Uplink.FlushTimeout.Duration,
	}
}

// resolveDSN returns the DSN from dsn or dsn_file. A TLS client key it names
// (sslkey) is held to the same rule as a secret file: libpq refuses a key
// others can read, and so do we.
func (c *Config) resolveDSN() (string, error) {
	dsn := c.Uplink.DSN
	if c.Uplink.DSNFile != "" {
		s, err := readSecret(c.Uplink.DSNFile)
		if err != nil {
			return "", fmt.Errorf("uplink.dsn_file: %w", err)
		}
		dsn = strings.TrimSpace(s)
	}
	if key := dsnParam(dsn, "sslkey"); key != "" {
		if _, err := readSecret(key); err != nil {
			return "", fmt.Errorf("uplink.dsn: sslkey: %w", err)
		}
	}
	return dsn, nil
}

// dsnParam reads one parameter of a URL or key=value connection string.
func dsnParam(dsn, name string) string {
	if u, err := url.Parse(dsn); err == nil && (u.Scheme == "postgres" || u.Scheme == "postgresql") {
		return u.Query().Get(name)
	}
	for _, f := range strings.Fields(dsn) {
		if v, ok := strings.CutPrefix(f, name+"="); ok {
			return strings.Trim(v, "'")
		}
	}
	return ""
}

func defaultString(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

// readSecret reads a secret file. A relative name is looked up in systemd's
// $CREDENTIALS_DIRECTORY first (LoadCredential=). A file that other users
// can read is refused: a secret is only as safe as its mode.
func readSecret(name string) (string, error) {
	path := name
	if !filepath.IsAbs(name) {
		if dir := os.Getenv("CREDENTIALS_DIRECTORY"); dir != "" {
			if _, err := os.Stat(filepath.Join(dir, name)); err == nil {
				path = filepath.Join(dir, name)
			}
		}
	}
	fi, err := os.Stat(path)
	if err != nil {
		return "", err
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return "", fmt.Errorf("%s is readable by other users (mode %04o): chmod 600 it", path, perm)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	return string(b), nil
}
