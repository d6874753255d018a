package gateway

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/sluice-gw/sluice/buffer"
)

// BufferCollector exports the buffer's figures at scrape time from its
// in-memory stats, so the hot path pays nothing for them.
type BufferCollector struct {
	stats func() buffer.Stats

	readings, bytes, oldest, dead, dropped *prometheus.Desc
}

// NewBufferCollector reads stats on every scrape.
func NewBufferCollector(stats func() buffer.Stats) *BufferCollector {
	return &BufferCollector{
		stats:    stats,
		readings: prometheus.NewDesc("sluice_buffer_readings", "Unsent readings in the buffer.", nil, nil),
		bytes:    prometheus.NewDesc("sluice_buffer_bytes", "Accounted size of the unsent readings.", nil, nil),
		oldest:   prometheus.NewDesc("sluice_buffer_oldest_age_seconds", "Age of the oldest unsent reading (0 when none).", nil, nil),
		dead:     prometheus.NewDesc("sluice_dead_letters", "Readings the central database refused, kept aside.", nil, nil),
		dropped:  prometheus.NewDesc("sluice_readings_dropped_total", "Readings dropped unsent, by reason (buffer_full, max_age).", []string{"reason"}, nil),
	}
}

// Describe implements prometheus.Collector.
func (c *BufferCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.readings
	ch <- c.bytes
	ch <- c.oldest
	ch <- c.dead
	ch <- c.dropped
}

// Collect implements prometheus.Collector.
func (c *BufferCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.stats()
	age := 0.0
	if !st.Oldest.IsZero() {
		age = max(0, time.Since(st.Oldest).Seconds())
	}
	ch <- prometheus.MustNewConstMetric(c.readings, prometheus.GaugeValue, float64(st.Readings))
	ch <- prometheus.MustNewConstMetric(c.bytes, prometheus.GaugeValue, float64(st.Bytes))
	ch <- prometheus.MustNewConstMetric(c.oldest, prometheus.GaugeValue, age)
	ch <- prometheus.MustNewConstMetric(c.dead, prometheus.GaugeValue, float64(st.DeadLetters))
	for _, r := range buffer.DropReasons {
		ch <- prometheus.MustNewConstMetric(c.dropped, prometheus.CounterValue, float64(st.Dropped[r]), r.String())
	}
}

// NewCommitHistogram is sluice_buffer_commit_duration_seconds, fed by the
// buffer's OnCommit hook.
func NewCommitHistogram(reg prometheus.Registerer) prometheus.Histogram {
	h := prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "sluice_buffer_commit_duration_seconds",
		Help:    "Duration of one buffer group commit (write and fsync).",
		Buckets: prometheus.ExponentialBuckets(0.0001, 2.5, 10),
	})
	if reg != nil {
		reg.MustRegister(h)
	}
	return h
}
