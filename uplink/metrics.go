package uplink

import "github.com/prometheus/client_golang/prometheus"

// metrics are the uplink's series of the contract.
type metrics struct {
	readings      prometheus.Counter
	batches       *prometheus.CounterVec
	batchDuration prometheus.Histogram
	up            prometheus.Gauge
	duplicates    prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		readings: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "sluice_uplink_readings_total",
			Help: "Readings inserted into the central database.",
		}),
		batches: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sluice_uplink_batches_total",
			Help: "Upload transactions by result (ok, error, dead_letter).",
		}, []string{"result"}),
		batchDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "sluice_uplink_batch_duration_seconds",
			Help:    "Duration of one upload transaction.",
			Buckets: prometheus.ExponentialBuckets(0.002, 2.5, 10),
		}),
		up: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "sluice_uplink_up",
			Help: "1 when the last attempt to reach the central database succeeded.",
		}),
		duplicates: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "sluice_uplink_duplicates_skipped_total",
			Help: "Readings not inserted because the database already had them (watermark or natural key).",
		}),
	}
	for _, r := range []string{"ok", "error", "dead_letter"} {
		m.batches.WithLabelValues(r)
	}
	if reg != nil {
		reg.MustRegister(m.readings, m.batches, m.batchDuration, m.up, m.duplicates)
	}
	return m
}
