package bench

import (
	"testing"
	"time"
)

func TestSeriesLongestFlat(t *testing.T) {
	t0 := time.Date(2026, 12, 7, 0, 0, 0, 0, time.UTC)
	series := func(vs ...float64) *Series {
		var s Series
		for i, v := range vs {
			s.Add(t0.Add(time.Duration(i)*100*time.Millisecond), v)
		}
		return &s
	}
	for _, tc := range []struct {
		name string
		s    *Series
		v    float64
		want time.Duration
	}{
		{"rising at every sample", series(0, 1, 2, 3, 4), 4, 100 * time.Millisecond},
		{"idle before the first rise does not count", series(0, 0, 0, 0, 1, 2, 3), 3, 100 * time.Millisecond},
		{"a pause of three samples", series(0, 1, 2, 2, 2, 2, 3, 4), 4, 400 * time.Millisecond},
		{"the longest of two pauses", series(0, 1, 1, 2, 3, 3, 3, 4), 4, 300 * time.Millisecond},
		{"the tail after v does not count", series(0, 1, 2, 3, 3, 3, 3, 3), 3, 100 * time.Millisecond},
		{"never rose", series(0, 0, 0), 1, 0},
		{"empty", series(), 1, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := tc.s.LongestFlat(tc.v); got != tc.want {
				t.Fatalf("LongestFlat(%v) = %v, want %v", tc.v, got, tc.want)
			}
		})
	}
}
