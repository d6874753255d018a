package gateway

import (
	"sort"
	"sync"
	"time"

	"github.com/sluice-gw/sluice/buffer"
)

// Tracker follows each sensor's health from the readings it sends.
type Tracker struct {
	mu      sync.Mutex // guards sensors
	sensors map[string]*sensorState
}

type sensorState struct {
	lastSeen time.Time
	readings int64
}

// NewTracker returns an empty tracker.
func NewTracker() *Tracker { return &Tracker{sensors: map[string]*sensorState{}} }

// Observe records accepted readings.
func (t *Tracker) Observe(rs []buffer.Reading) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for i := range rs {
		s := t.sensors[rs[i].Sensor]
		if s == nil {
			s = &sensorState{}
			t.sensors[rs[i].Sensor] = s
		}
		s.readings++
		if rs[i].Received.After(s.lastSeen) {
			s.lastSeen = rs[i].Received
		}
	}
}

// SensorStatus is one sensor's health.
type SensorStatus struct {
	Sensor   string    `json:"sensor"`
	LastSeen time.Time `json:"last_seen"`
	Readings int64     `json:"readings"`
}

// Sensors returns every sensor's health, sorted by name.
func (t *Tracker) Sensors() []SensorStatus {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make([]SensorStatus, 0, len(t.sensors))
	for name, s := range t.sensors {
		out = append(out, SensorStatus{Sensor: name, LastSeen: s.lastSeen, Readings: s.readings})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Sensor < out[j].Sensor })
	return out
}
