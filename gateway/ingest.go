// Package gateway faces sensors and technicians: MQTT and CoAP ingress,
// payload decoding and the admin endpoint. It sees the uplink only through
// interfaces it declares itself.
package gateway

import (
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/sluice-gw/sluice/buffer"
	"github.com/sluice-gw/sluice/gateway/senml"
)

// Reason is why a message was rejected: a fixed set, used as a metric label.
type Reason string

// Rejection reasons of the contract.
const (
	ReasonMalformed          = Reason(senml.ReasonMalformed)
	ReasonTooLarge    Reason = "too_large"
	ReasonBadValue           = Reason(senml.ReasonBadValue)
	ReasonBadTime            = Reason(senml.ReasonBadTime)
	ReasonUnsupported        = Reason(senml.ReasonUnsupportedFormat)
	ReasonForbidden   Reason = "forbidden"
	ReasonBufferFull  Reason = "buffer_full"
)

// Reasons lists every rejection reason.
var Reasons = []Reason{ReasonMalformed, ReasonTooLarge, ReasonBadValue, ReasonBadTime, ReasonUnsupported, ReasonForbidden, ReasonBufferFull}

// Ingress names, the metric label of each way in.
const (
	IngressMQTT = "mqtt"
	IngressCoAP = "coap"
)

// Rejection is a message refused whole, with the reason and a short
// diagnostic that is safe to send back to the device.
type Rejection struct {
	Reason Reason
	Msg    string
}

func (r *Rejection) Error() string { return string(r.Reason) + ": " + r.Msg }

// Appender is the buffer as the ingresses see it; *buffer.Buffer implements
// it. AppendAsync must be safe for concurrent use and may block while many
// appends wait; the Pending is done once the message is durable or refused.
type Appender interface {
	AppendAsync(buffer.Message) *buffer.Pending
}

// IngestOptions are the [ingest] section: limits that apply to every ingress.
type IngestOptions struct {
	// MaxPayload bounds one MQTT message or CoAP request body (default 64 KiB).
	MaxPayload int
	// MaxFuture: a sensor time further ahead than this is rejected (default 10m).
	MaxFuture time.Duration
	// Oldest: a sensor time before this is rejected (default 2000-01-01).
	Oldest time.Time
}

// Ingest defaults.
var (
	DefaultMaxPayload = 64 << 10
	DefaultMaxFuture  = 10 * time.Minute
	DefaultOldest     = time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC)
)

func (o *IngestOptions) setDefaults() {
	if o.MaxPayload == 0 {
		o.MaxPayload = DefaultMaxPayload
	}
	if o.MaxFuture == 0 {
		o.MaxFuture = DefaultMaxFuture
	}
	if o.Oldest.IsZero() {
		o.Oldest = DefaultOldest
	}
}

// Validate returns every problem as "key: problem".
func (o IngestOptions) Validate() error {
	var errs []error
	if o.MaxPayload < 0 || o.MaxPayload > 16<<20 {
		errs = append(errs, fmt.Errorf("max_payload: %d bytes is outside 1..16MiB", o.MaxPayload))
	}
	if o.MaxFuture < 0 {
		errs = append(errs, errors.New("max_future: must not be negative"))
	}
	return errors.Join(errs...)
}

// Ingest is the decoding half shared by the ingresses: limits, decoders,
// clock stamps, counting and logging rejections.
type Ingest struct {
	opts    IngestOptions
	clock   *Clock
	log     *slog.Logger
	metrics *ingestMetrics
	tracker *Tracker

	logMu   sync.Mutex // guards lastLog, dropped
	lastLog time.Time
	dropped int

	// spare holds readings slices given back by Release, for Decode to lend
	// to the decoder: a message's readings are garbage once stored, and a
	// pack of ten is 2.6 KB.
	spare sync.Pool
}

// NewIngest builds the shared decoding half. reg may be nil.
func NewIngest(opts IngestOptions, clock *Clock, log *slog.Logger, reg prometheus.Registerer) *Ingest {
	opts.setDefaults()
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Ingest{opts: opts, clock: clock, log: log, metrics: newIngestMetrics(reg), tracker: NewTracker()}
}

// Tracker is the per-sensor health tracker fed by every accepted message.
func (in *Ingest) Tracker() *Tracker { return in.tracker }

// Clock is the clock that stamps readings.
func (in *Ingest) Clock() *Clock { return in.clock }

// Decode turns one message into readings, or a rejection that has already
// been counted and logged. sensor and metric are the topic or path defaults.
func (in *Ingest) Decode(ingress string, f senml.Format, payload []byte, sensor, metric string) ([]buffer.Reading, *Rejection) {
	if len(payload) > in.opts.MaxPayload {
		return nil, in.Reject(ingress, &Rejection{ReasonTooLarge,
			fmt.Sprintf("payload of %d bytes is over max_payload (%d)", len(payload), in.opts.MaxPayload)})
	}
	at := in.clock.Now()
	var into []buffer.Reading
	if p, ok := in.spare.Get().(*[]buffer.Reading); ok {
		into = *p
	}
	rs, err := senml.Decode(f, payload, &senml.Context{
		Sensor: sensor, Metric: metric, Now: at.Wall,
		Oldest: in.opts.Oldest, MaxFuture: in.opts.MaxFuture, ClockSynced: at.Synced,
		Into: into,
	})
	if err != nil {
		in.Release(into)
		var se *senml.Error
		if errors.As(err, &se) {
			return nil, in.Reject(ingress, &Rejection{Reason(se.Reason), se.Msg})
		}
		return nil, in.Reject(ingress, &Rejection{ReasonMalformed, err.Error()})
	}
	in.clock.Stamp(rs, at)
	return rs, nil
}

// Release gives back the readings of a message that Decode returned, once
// the ingress is done with them (stored and counted, or refused): nothing
// may use them afterwards.
func (in *Ingest) Release(rs []buffer.Reading) {
	if cap(rs) == 0 || cap(rs) > 256 {
		return // nothing to lend, or a rare giant the pool should not keep
	}
	clear(rs[:cap(rs)]) // drop what the readings point to
	rs = rs[:0]
	in.spare.Put(&rs)
}

// Accepted counts readings that are durable and acknowledged.
func (in *Ingest) Accepted(ingress string, rs []buffer.Reading) {
	in.metrics.received.WithLabelValues(ingress).Add(float64(len(rs)))
	in.metrics.readingsIn.Add(int64(len(rs)))
	in.tracker.Observe(rs)
}

// Redelivered counts a redelivery recognised by its idempotency key.
func (in *Ingest) Redelivered(ingress string) {
	in.metrics.redeliveries.WithLabelValues(ingress).Inc()
}

// Reject counts a rejection and logs it, at most a few lines a second so a
// misbehaving sensor cannot flood the journal. It returns r.
func (in *Ingest) Reject(ingress string, r *Rejection) *Rejection {
	in.metrics.rejected.WithLabelValues(ingress, string(r.Reason)).Inc()
	in.metrics.rejectedIn.Add(1)
	in.logMu.Lock()
	defer in.logMu.Unlock()
	if time.Since(in.lastLog) < rejectLogInterval {
		in.dropped++
		return r
	}
	in.log.Warn("message rejected", "ingress", ingress, "reason", string(r.Reason), "err", r.Msg, "suppressed", in.dropped)
	in.lastLog, in.dropped = time.Now(), 0
	return r
}

const rejectLogInterval = 200 * time.Millisecond

// Counts are totals since start, for the heartbeat.
func (in *Ingest) Counts() (readingsIn, rejected int64) {
	return in.metrics.totals()
}

// ingressState is an ingress's state and last error, for status.
type ingressState struct {
	mu      sync.Mutex
	state   string
	lastErr string
}

func (s *ingressState) get() (state, lastErr string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.state, s.lastErr
}

// set records state and, when err is not nil, err as the last error; it
// reports whether the state changed.
func (s *ingressState) set(state string, err error) (changed bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	changed = s.state != state
	s.state = state
	if err != nil {
		s.lastErr = err.Error()
	}
	return changed
}
