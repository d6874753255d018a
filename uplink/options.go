package uplink

import (
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/sluice-gw/sluice/buffer"
)

// Options configure the uplink. The zero value of a field means its default.
type Options struct {
	// DSN is the Postgres connection string (from dsn or dsn_file).
	DSN string
	// GatewayID, Site, Profile and Version identify the gateway centrally.
	GatewayID, Site, Profile, Version string
	// BatchSize is the most readings in one upload transaction (default 5000).
	BatchSize int
	// BatchWait is how long a partial batch waits for more readings (default 1s).
	BatchWait time.Duration
	// Heartbeat is the interval of the gateway row upsert, sent even when idle (default 30s).
	Heartbeat time.Duration
	// LagAlert is the backlog age at which uplink_health says lagging (default 60s).
	LagAlert time.Duration
	// BackoffMax caps the retry delay; the uplink never gives up (default 60s).
	BackoffMax time.Duration
	// MaxRate caps readings/s uploaded, e.g. when catching up (default 0: unlimited).
	MaxRate float64
	// FlushTimeout bounds the upload at shutdown (default 10s).
	FlushTimeout time.Duration
	// PartitionDaysAhead is how many daily partitions to keep created ahead (default 7).
	PartitionDaysAhead int

	// Report gathers the gateway's counters for the heartbeat (nil: zeros).
	Report func() Report
	// Restamp may correct a gateway-stamped time before upload once the clock
	// is trusted (nil: none).
	Restamp func(*buffer.Reading)
	// OnServerTime receives each heartbeat's clock sample: the local time at
	// the middle of the round trip, the server's time and the round trip.
	OnServerTime func(local, server time.Time, rtt time.Duration)
	// Logger receives state changes (nil: discard).
	Logger *slog.Logger
	// Registerer registers the uplink's metrics (nil: not registered).
	Registerer prometheus.Registerer
	// ConnConfig, when set, adjusts the parsed connection config (tests, TLS files).
	ConnConfig func(*pgx.ConnConfig) error
}

// Defaults, each with the reason for its number.
const (
	// DefaultBatchSize amortises a transaction's round trips over many rows
	// while keeping one batch's memory small on a gateway.
	DefaultBatchSize = 5000
	// DefaultBatchWait keeps the central copy within about a second of the edge.
	DefaultBatchWait = time.Second
	// DefaultHeartbeat is often enough that a dead gateway shows within minutes.
	DefaultHeartbeat = 30 * time.Second
	// DefaultLagAlert flags a backlog older than two heartbeats.
	DefaultLagAlert = 60 * time.Second
	// DefaultBackoffMax stops a fleet from hammering a database that is down.
	DefaultBackoffMax = 60 * time.Second
	// DefaultFlushTimeout fits inside systemd's stop timeout with room to spare.
	DefaultFlushTimeout = 10 * time.Second
	// DefaultPartitionDaysAhead keeps a week of partitions ready.
	DefaultPartitionDaysAhead = 7
)

func (o *Options) setDefaults() {
	if o.BatchSize == 0 {
		o.BatchSize = DefaultBatchSize
	}
	if o.BatchWait == 0 {
		o.BatchWait = DefaultBatchWait
	}
	if o.Heartbeat == 0 {
		o.Heartbeat = DefaultHeartbeat
	}
	if o.LagAlert == 0 {
		o.LagAlert = DefaultLagAlert
	}
	if o.BackoffMax == 0 {
		o.BackoffMax = DefaultBackoffMax
	}
	if o.FlushTimeout == 0 {
		o.FlushTimeout = DefaultFlushTimeout
	}
	if o.PartitionDaysAhead == 0 {
		o.PartitionDaysAhead = DefaultPartitionDaysAhead
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Report == nil {
		o.Report = func() Report { return Report{} }
	}
}

// Validate returns every problem, each as "key: problem" with the config
// key of the [uplink] section. It does not connect.
func (o Options) Validate() error {
	var errs []error
	if o.DSN != "" {
		if _, err := pgx.ParseConfig(o.DSN); err != nil {
			// The parse error may quote the DSN; keep the password out of it.
			errs = append(errs, errors.New("dsn: not a valid Postgres connection string"))
		}
	}
	if o.BatchSize < 0 || o.BatchSize > 100_000 {
		errs = append(errs, fmt.Errorf("batch_size: %d is outside 1..100000", o.BatchSize))
	}
	checkDur := func(key string, d, lo, hi time.Duration) {
		if d != 0 && (d < lo || d > hi) {
			errs = append(errs, fmt.Errorf("%s: %s is outside %s..%s", key, d, lo, hi))
		}
	}
	checkDur("batch_wait", o.BatchWait, time.Millisecond, time.Hour)
	checkDur("heartbeat", o.Heartbeat, time.Second, 24*time.Hour)
	checkDur("lag_alert", o.LagAlert, time.Second, 30*24*time.Hour)
	checkDur("backoff_max", o.BackoffMax, 100*time.Millisecond, time.Hour)
	checkDur("flush_timeout", o.FlushTimeout, time.Millisecond, time.Hour)
	if o.MaxRate < 0 {
		errs = append(errs, fmt.Errorf("max_rate: must not be negative"))
	}
	if o.GatewayID == "" {
		errs = append(errs, errors.New("id: the gateway id must not be empty"))
	}
	return errors.Join(errs...)
}

// Report is what the heartbeat carries besides the buffer's own figures.
type Report struct {
	ReadingsIn    int64 // readings accepted since start
	Rejected      int64 // messages rejected since start
	ClockSynced   bool
	DiskFreeBytes int64          // -1 when unknown
	Sensors       []SensorReport // per-sensor health, upserted into sluice.sensors
}
