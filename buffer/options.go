package buffer

import (
	"errors"
	"fmt"
	"log/slog"
	"time"
)

// OnFull is the overflow policy when the buffer reaches a bound.
type OnFull string

// Overflow policies.
const (
	// DropOldest evicts the oldest readings of the lowest priority class
	// first, counting them as dropped.
	DropOldest OnFull = "drop-oldest"
	// Reject refuses the new message with ErrFull; the source keeps it.
	Reject OnFull = "reject"
)

// Class is a priority class. Each class is its own stream, so a higher class
// can overtake a lower one after an outage.
type Class string

// Priority classes, highest first.
const (
	ClassAlarm     Class = "alarm"
	ClassTelemetry Class = "telemetry"
)

// Classes lists the priority classes, highest first: uploaded first, evicted last.
var Classes = []Class{ClassAlarm, ClassTelemetry}

func (c Class) index() int {
	for i, k := range Classes {
		if k == c {
			return i
		}
	}
	return -1
}

// Valid reports whether c is a known class.
func (c Class) Valid() bool { return c.index() >= 0 }

// Options configure a Buffer. The zero value of a field means its default.
type Options struct {
	// Dir is the data directory; the buffer lives in Dir/buffer.db.
	Dir string
	// MaxBytes bounds the file's size on flash (default 256 MiB).
	MaxBytes int64
	// MaxAge drops readings received longer ago than this (default 0: no bound).
	MaxAge time.Duration
	// MinFreeDisk stops the file growing when the filesystem has less free space
	// than this (default 64 MiB).
	MinFreeDisk int64
	// OnFull is the overflow policy (default DropOldest).
	OnFull OnFull
	// CommitInterval is the least time between the starts of two commits: appends arriving
	// meanwhile share the next transaction and fsync. Longer saves flash wear,
	// shorter lowers latency (default 2ms).
	CommitInterval time.Duration
	// GatewayID and Site are recorded in the file so that an export carries them.
	GatewayID, Site string
	// Logger receives state changes (nil: discard).
	Logger *slog.Logger
	// OnCommit, when set, is called after every append transaction with its
	// duration and reading count, before the appends it committed return; it
	// must not block.
	OnCommit func(d time.Duration, readings int)
	// Now is the wall clock (default time.Now); tests replace it.
	Now func() time.Time
}

// Defaults, each with the reason for its number.
const (
	// DefaultMaxBytes holds about two days of 20 sensors at 1 Hz with room to spare.
	DefaultMaxBytes = 256 << 20
	// DefaultMinFreeDisk leaves the system room for logs and updates.
	DefaultMinFreeDisk = 64 << 20
	// DefaultCommitInterval caps fsyncs at 500/s, well inside flash endurance,
	// while adding at most 2 ms to an acknowledgement.
	DefaultCommitInterval = 2 * time.Millisecond
	// minMaxBytes is the smallest useful file: bbolt's own pages take some.
	minMaxBytes = 1 << 20
)

func (o *Options) setDefaults() {
	if o.MaxBytes == 0 {
		o.MaxBytes = DefaultMaxBytes
	}
	if o.MinFreeDisk == 0 {
		o.MinFreeDisk = DefaultMinFreeDisk
	}
	if o.OnFull == "" {
		o.OnFull = DropOldest
	}
	if o.CommitInterval == 0 {
		o.CommitInterval = DefaultCommitInterval
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Now == nil {
		o.Now = time.Now
	}
}

// Validate returns every problem with the options, each as "key: problem"
// with the config key of the [buffer] section.
func (o Options) Validate() error {
	var errs []error
	if o.MaxBytes != 0 && o.MaxBytes < minMaxBytes {
		errs = append(errs, fmt.Errorf("max_bytes: %d bytes is below the minimum of 1MiB", o.MaxBytes))
	}
	if o.MaxAge < 0 {
		errs = append(errs, fmt.Errorf("max_age: must not be negative"))
	}
	if o.MinFreeDisk < 0 {
		errs = append(errs, fmt.Errorf("min_free_disk: must not be negative"))
	}
	switch o.OnFull {
	case "", DropOldest, Reject:
	default:
		errs = append(errs, fmt.Errorf("on_full: %q is not one of \"drop-oldest\", \"reject\"", o.OnFull))
	}
	if o.CommitInterval < 0 || o.CommitInterval > time.Second {
		errs = append(errs, fmt.Errorf("commit_interval: %s is outside 0..1s", o.CommitInterval))
	}
	return errors.Join(errs...)
}
