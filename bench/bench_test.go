package bench

import (
	"testing"
	"time"
)

// TestWorkloadReadings: every message decodes as the gateway decodes it, to
// the promised number of readings, each with its own natural key, so that a
// row count is a reading count.
func TestWorkloadReadings(t *testing.T) {
	start := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	for _, shape := range []Shape{Flat, SenML10} {
		t.Run(shape.String(), func(t *testing.T) {
			w := Workload{Shape: shape, Sensors: 7, Start: start}
			const n = 2500
			rs, err := w.Readings(0, n, start.Add(time.Hour))
			if err != nil {
				t.Fatal(err)
			}
			if len(rs) != n*w.ReadingsPer() {
				t.Fatalf("%d readings from %d messages, want %d", len(rs), n, n*w.ReadingsPer())
			}
			type key struct {
				name, unit string
				ts         time.Time
			}
			seen := make(map[key]bool, len(rs))
			for i, r := range rs {
				k := key{r.Name, r.Unit, r.Time}
				if seen[k] {
					t.Fatalf("reading %d repeats the natural key %v", i, k)
				}
				seen[k] = true
			}
			if got := rs[len(rs)-1].Time; !got.Equal(start.Add((n - 1) * time.Millisecond)) {
				t.Errorf("last message's time %s, want %s", got, start.Add((n-1)*time.Millisecond))
			}
		})
	}
}

func TestSeriesRate(t *testing.T) {
	var s Series
	t0 := time.Unix(1000, 0)
	// 100 a second after a slow start, sampled every 200 ms.
	s.Add(t0, 0)
	s.Add(t0.Add(time.Second), 10)
	for i := 1; i <= 10; i++ {
		s.Add(t0.Add(time.Second+time.Duration(i)*200*time.Millisecond), 10+float64(20*i))
	}
	rate, err := s.Rate(50, 190)
	if err != nil {
		t.Fatal(err)
	}
	if rate < 99.9 || rate > 100.1 {
		t.Errorf("rate %.2f/s, want 100", rate)
	}
	at, ok := s.Crossed(20)
	if want := t0.Add(1100 * time.Millisecond); !ok || !at.Equal(want) {
		t.Errorf("Crossed(20) = %s %v, want %s", at, ok, want)
	}
	if _, err := s.Rate(50, 500); err == nil {
		t.Error("a rate up to a value never reached did not fail")
	}
}
