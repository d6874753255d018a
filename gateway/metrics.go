package gateway

import (
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
)

// ingestMetrics are the ingress series of the contract.
type ingestMetrics struct {
	received     *prometheus.CounterVec
	rejected     *prometheus.CounterVec
	redeliveries *prometheus.CounterVec
	// Totals for the heartbeat, kept beside the vectors so reading them needs
	// no walk over label values.
	readingsIn, rejectedIn atomic.Int64
}

func newIngestMetrics(reg prometheus.Registerer) *ingestMetrics {
	m := &ingestMetrics{
		received: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sluice_readings_received_total",
			Help: "Readings made durable in the buffer and acknowledged to their source.",
		}, []string{"ingress"}),
		rejected: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sluice_messages_rejected_total",
			Help: "Messages refused whole, by ingress and reason.",
		}, []string{"ingress", "reason"}),
		redeliveries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sluice_redeliveries_total",
			Help: "Redelivered messages recognised by their idempotency key and not stored again.",
		}, []string{"ingress"}),
	}
	for _, ing := range []string{IngressMQTT, IngressCoAP} {
		m.received.WithLabelValues(ing)
		m.redeliveries.WithLabelValues(ing)
		for _, r := range Reasons {
			m.rejected.WithLabelValues(ing, string(r))
		}
	}
	if reg != nil {
		reg.MustRegister(m.received, m.rejected, m.redeliveries)
	}
	return m
}

func (m *ingestMetrics) totals() (readingsIn, rejected int64) {
	return m.readingsIn.Load(), m.rejectedIn.Load()
}
