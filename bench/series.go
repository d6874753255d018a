package bench

import (
	"fmt"
	"sync"
	"time"
)

// Series is a counter sampled over time, such as readings received. It is
// safe for concurrent use.
type Series struct {
	mu  sync.Mutex // guards pts
	pts []point
}

type point struct {
	at time.Time
	v  float64
}

// Add records the counter's value v at time at; times must not go back.
func (s *Series) Add(at time.Time, v float64) {
	s.mu.Lock()
	s.pts = append(s.pts, point{at, v})
	s.mu.Unlock()
}

// Len is the number of samples.
func (s *Series) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.pts)
}

// Last is the latest value (0 when empty).
func (s *Series) Last() float64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.pts) == 0 {
		return 0
	}
	return s.pts[len(s.pts)-1].v
}

// Crossed is when the counter first reached v, interpolated between the
// samples around it.
func (s *Series) Crossed(v float64) (time.Time, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, p := range s.pts {
		if p.v < v {
			continue
		}
		if i == 0 || p.v == s.pts[i-1].v {
			return p.at, true
		}
		prev := s.pts[i-1]
		f := (v - prev.v) / (p.v - prev.v)
		return prev.at.Add(time.Duration(f * float64(p.at.Sub(prev.at)))), true
	}
	return time.Time{}, false
}

// Rate is the counter's rate per second while it rose from lo to hi: the
// steady part of a run, without its start and its tail.
func (s *Series) Rate(lo, hi float64) (float64, error) {
	t0, ok0 := s.Crossed(lo)
	t1, ok1 := s.Crossed(hi)
	if !ok0 || !ok1 {
		return 0, fmt.Errorf("the counter never went from %.0f to %.0f (last %.0f)", lo, hi, s.Last())
	}
	d := t1.Sub(t0).Seconds()
	if d <= 0 {
		return 0, fmt.Errorf("the counter went from %.0f to %.0f between two samples: sample more often", lo, hi)
	}
	return (hi - lo) / d, nil
}

// LongestFlat is the longest time the counter stood still after its first
// rise and before it reached v: from the sample at which it rose to the
// sample at which it rose again, so as precise as the sampling. A counter
// rising at every sample gives the sample interval.
func (s *Series) LongestFlat(v float64) time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	var longest time.Duration
	var rose time.Time // the sample at which the counter last rose
	for i := 1; i < len(s.pts); i++ {
		p := s.pts[i]
		if p.v == s.pts[i-1].v {
			continue
		}
		if !rose.IsZero() {
			longest = max(longest, p.at.Sub(rose))
		}
		if p.v >= v {
			break
		}
		rose = p.at
	}
	return longest
}
