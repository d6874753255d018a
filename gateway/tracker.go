package gateway

import (
	"math"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/sluice-gw/sluice/buffer"
)

// Tracker follows each sensor's health from the readings it sends: when it
// was last heard, how fast it reports, the reports it missed and whether it
// has gone quiet. It is fed for every accepted message, so Observe costs one
// map lookup and a few arithmetic operations per sensor in the message.
//
// Gaps come from the sensor's own sequence numbers (flat JSON "seq") when it
// sends them: a jump from 7 to 10 is two lost reports, a step back is a
// restart or a reordering and counts nothing. A sensor without sequence
// numbers is judged by its reporting interval, learned as the median of its
// recent inter-arrival times: a silence of k intervals is k-1 missed reports,
// as long as it stays below the stale threshold; a longer silence is an
// outage, shown as stale rather than counted as lost packets. Messages that
// arrive within a quarter interval of each other (one sensor publishing
// several metrics at once) are one report.
//
// Memory is bounded: at most DefaultMaxSensors sensors are tracked (about 250 bytes
// each). A new sensor beyond the cap takes the place of the one silent the
// longest if that one is stale; otherwise it is not tracked and counted in
// Untracked.
type Tracker struct {
	opts trackerOptions
	now  func() time.Time

	mu        sync.Mutex // guards sensors, untracked, gaps, noEvictTill
	sensors   map[string]*sensorState
	untracked int64
	gaps      int64 // sum over sensors, kept beside them for the metric
	// noEvictTill: the last eviction scan found no stale sensor; a flood of
	// new names does not scan the whole map again before this time.
	noEvictTill time.Time

	gapsDesc, staleDesc *prometheus.Desc
}

// trackerOptions bound the tracker. The zero value of a field means its default.
type trackerOptions struct {
	// MaxSensors is the most sensors tracked at once (default 4096).
	MaxSensors int
	// StaleIntervals: a sensor silent for this many of its intervals is stale (default 5).
	StaleIntervals int
	// StaleUnknown: a sensor whose interval is not learned yet is stale after
	// this much silence (default 10m).
	StaleUnknown time.Duration
}

// Tracker defaults, each with the reason for its number.
const (
	// DefaultMaxSensors covers a large site with room to spare in about 1 MiB.
	DefaultMaxSensors = 4096
	// DefaultStaleIntervals tolerates a few lost reports before calling a sensor stale.
	DefaultStaleIntervals = 5
	// DefaultStaleUnknown: without a learned interval, ten quiet minutes are suspicious.
	DefaultStaleUnknown = 10 * time.Minute

	// intervalSamples is how many inter-arrival times the median looks at.
	intervalSamples = 15
	// minSamples: an interval is trusted only after this many samples.
	minSamples = 5
	// minCoalesce: arrivals closer than this are one report even before the
	// interval is learned (a burst of one sensor's metrics).
	minCoalesce = 100 * time.Millisecond
	// rateWindow is the time constant of the decaying reading rate.
	rateWindow = 5 * time.Minute
)

type sensorState struct {
	firstSeen, lastSeen time.Time
	lastReport          time.Time // start of the last report (burst)
	readings, gaps      int64
	lastSeq             int64
	hasSeq              bool
	rate                float64 // decaying readings per second at rateAt
	rateAt              time.Time
	samples             [intervalSamples]int32 // inter-arrival times in milliseconds, a ring
	nSamples, next      uint8
	interval            time.Duration // median of samples, 0 until learned
}

// NewTracker returns an empty tracker with the default bounds.
func NewTracker() *Tracker { return newTracker(trackerOptions{}) }

func newTracker(opts trackerOptions) *Tracker {
	if opts.MaxSensors <= 0 {
		opts.MaxSensors = DefaultMaxSensors
	}
	if opts.StaleIntervals <= 0 {
		opts.StaleIntervals = DefaultStaleIntervals
	}
	if opts.StaleUnknown <= 0 {
		opts.StaleUnknown = DefaultStaleUnknown
	}
	return &Tracker{
		opts:      opts,
		now:       time.Now,
		sensors:   map[string]*sensorState{},
		gapsDesc:  prometheus.NewDesc("sluice_sensor_gaps_total", "Reports sensors missed, from their sequence numbers or their reporting interval.", nil, nil),
		staleDesc: prometheus.NewDesc("sluice_sensors_stale", "Sensors silent for longer than their stale threshold.", nil, nil),
	}
}

// Observe records the readings of one accepted message. It is safe for
// concurrent use and does not block beyond a short lock.
func (t *Tracker) Observe(rs []buffer.Reading) {
	if len(rs) == 0 {
		return
	}
	now := t.now()
	t.mu.Lock()
	defer t.mu.Unlock()
	// Readings of one message mostly share a sensor: take each sensor once.
	for i := range rs {
		if i > 0 && rs[i].Sensor == rs[i-1].Sensor {
			continue
		}
		n, seq, hasSeq := 0, int64(0), false
		for j := i; j < len(rs) && rs[j].Sensor == rs[i].Sensor; j++ {
			n++
			if rs[j].HasSensorSeq && (!hasSeq || rs[j].SensorSeq > seq) {
				seq, hasSeq = rs[j].SensorSeq, true
			}
		}
		s := t.sensorLocked(rs[i].Sensor, now)
		if s == nil {
			continue
		}
		t.gaps += s.observe(now, n, seq, hasSeq, t.staleAfter(s))
	}
}

// sensorLocked finds or makes a sensor's state; nil when over the cap.
func (t *Tracker) sensorLocked(name string, now time.Time) *sensorState {
	if s := t.sensors[name]; s != nil {
		return s
	}
	if len(t.sensors) >= t.opts.MaxSensors && !t.evictStaleLocked(now) {
		t.untracked++
		return nil
	}
	s := &sensorState{firstSeen: now}
	t.sensors[name] = s
	return s
}

// evictStaleLocked forgets the sensor silent the longest, if it is stale.
func (t *Tracker) evictStaleLocked(now time.Time) bool {
	if now.Before(t.noEvictTill) {
		return false
	}
	var oldest string
	var at time.Time
	for name, s := range t.sensors {
		if oldest == "" || s.lastSeen.Before(at) {
			oldest, at = name, s.lastSeen
		}
	}
	if oldest == "" || now.Sub(at) <= t.staleAfter(t.sensors[oldest]) {
		t.noEvictTill = now.Add(time.Second)
		return false
	}
	delete(t.sensors, oldest)
	return true
}

// staleAfter is the silence after which s is stale.
func (t *Tracker) staleAfter(s *sensorState) time.Duration {
	if s.interval == 0 {
		return t.opts.StaleUnknown
	}
	return time.Duration(t.opts.StaleIntervals) * s.interval
}

// observe takes one message of n readings and returns the gaps it revealed.
func (s *sensorState) observe(now time.Time, n int, seq int64, hasSeq bool, staleAfter time.Duration) (gaps int64) {
	defer func() { s.gaps += gaps }()
	first := s.readings == 0
	s.readings += int64(n)
	s.addRate(now, float64(n))
	if hasSeq {
		if s.hasSeq && seq > s.lastSeq+1 {
			gaps = seq - s.lastSeq - 1
		}
		if !s.hasSeq || seq > s.lastSeq || s.lastSeq-seq > 1000 {
			s.lastSeq = seq // a large step back is a restarted sensor
		}
		s.hasSeq = true
	}
	if first {
		s.lastSeen, s.lastReport = now, now
		return gaps
	}
	since := now.Sub(s.lastReport)
	s.lastSeen = now
	if since < max(minCoalesce, s.interval/4) {
		return gaps // the same report
	}
	s.lastReport = now
	if !s.hasSeq && s.interval > 0 && since > s.interval*3/2 && since <= staleAfter {
		gaps += int64(math.Round(float64(since)/float64(s.interval))) - 1
	}
	if since <= staleAfter || s.interval == 0 {
		s.addSample(since)
	}
	return gaps
}

func (s *sensorState) addSample(d time.Duration) {
	s.samples[s.next] = int32(min(d.Milliseconds(), math.MaxInt32))
	s.next = (s.next + 1) % intervalSamples
	if s.nSamples < intervalSamples {
		s.nSamples++
	}
	if s.nSamples < minSamples {
		return
	}
	var sorted [intervalSamples]int32
	part := sorted[:s.nSamples]
	copy(part, s.samples[:s.nSamples])
	slices.Sort(part)
	s.interval = time.Duration(part[len(part)/2]) * time.Millisecond
}

// addRate adds n readings to the decaying rate.
func (s *sensorState) addRate(now time.Time, n float64) {
	s.rate = s.decayedRate(now) + n/rateWindow.Seconds()
	s.rateAt = now
}

// decayedRate is the decaying rate as of now, without adding anything.
func (s *sensorState) decayedRate(now time.Time) float64 {
	if s.rateAt.IsZero() {
		return 0
	}
	return s.rate * math.Exp(-now.Sub(s.rateAt).Seconds()/rateWindow.Seconds())
}

// perMinute is the reading rate, corrected for a sensor seen for less than
// the rate window (the decaying sum has not filled yet).
func (s *sensorState) perMinute(now time.Time) float64 {
	age := now.Sub(s.firstSeen).Seconds()
	if age <= 0 {
		return 0
	}
	fill := 1 - math.Exp(-age/rateWindow.Seconds())
	if fill < 1e-3 {
		return 0
	}
	return 60 * s.decayedRate(now) / fill
}

// SensorStatus is one sensor's health.
type SensorStatus struct {
	Sensor          string    `json:"sensor"`
	LastSeen        time.Time `json:"last_seen"`
	AgeSeconds      float64   `json:"age_seconds"`
	Readings        int64     `json:"readings"`
	PerMinute       float64   `json:"per_minute"`
	IntervalSeconds float64   `json:"interval_seconds"` // 0 until learned
	Gaps            int64     `json:"gaps"`
	GapsFrom        string    `json:"gaps_from"` // "seq" or "interval"
	Stale           bool      `json:"stale"`
}

// Sensors returns every tracked sensor's health: stale ones first, then by name.
func (t *Tracker) Sensors() []SensorStatus {
	now := t.now()
	t.mu.Lock()
	out := make([]SensorStatus, 0, len(t.sensors))
	for name, s := range t.sensors {
		from := "interval"
		if s.hasSeq {
			from = "seq"
		}
		age := now.Sub(s.lastSeen)
		out = append(out, SensorStatus{
			Sensor: name, LastSeen: s.lastSeen, AgeSeconds: max(0, age.Seconds()), Readings: s.readings,
			PerMinute: s.perMinute(now), IntervalSeconds: s.interval.Seconds(),
			Gaps: s.gaps, GapsFrom: from, Stale: age > t.staleAfter(s),
		})
	}
	t.mu.Unlock()
	sort.Slice(out, func(i, j int) bool {
		if out[i].Stale != out[j].Stale {
			return out[i].Stale
		}
		return out[i].Sensor < out[j].Sensor
	})
	return out
}

// Untracked counts messages of new sensors refused because MaxSensors were
// tracked and none was stale.
func (t *Tracker) Untracked() int64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.untracked
}

// stale counts the stale sensors now.
func (t *Tracker) stale() int {
	now := t.now()
	t.mu.Lock()
	defer t.mu.Unlock()
	n := 0
	for _, s := range t.sensors {
		if now.Sub(s.lastSeen) > t.staleAfter(s) {
			n++
		}
	}
	return n
}

// Describe implements prometheus.Collector.
func (t *Tracker) Describe(ch chan<- *prometheus.Desc) {
	ch <- t.gapsDesc
	ch <- t.staleDesc
}

// Collect implements prometheus.Collector: sensor ids are never labels, so
// the series are fleet-wide sums computed at scrape time.
func (t *Tracker) Collect(ch chan<- prometheus.Metric) {
	t.mu.Lock()
	gaps := t.gaps
	t.mu.Unlock()
	ch <- prometheus.MustNewConstMetric(t.gapsDesc, prometheus.CounterValue, float64(gaps))
	ch <- prometheus.MustNewConstMetric(t.staleDesc, prometheus.GaugeValue, float64(t.stale()))
}
