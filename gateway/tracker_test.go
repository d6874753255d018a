package gateway

import (
	"fmt"
	"math"
	"testing"
	"time"

	"github.com/sluice-gw/sluice/buffer"
)

// fakeTime is a clock the test moves by hand.
type fakeTime struct{ t time.Time }

func (f *fakeTime) now() time.Time      { return f.t }
func (f *fakeTime) add(d time.Duration) { f.t = f.t.Add(d) }
func newFakeTime() *fakeTime            { return &fakeTime{t: time.Date(2025, 6, 1, 12, 0, 0, 0, time.UTC)} }
func reading(sensor string) buffer.Reading {
	return buffer.Reading{Sensor: sensor, Name: sensor + ":m"}
}
func seqReading(sensor string, seq int64) buffer.Reading {
	r := reading(sensor)
	r.SensorSeq, r.HasSensorSeq = seq, true
	return r
}

func testTracker(opts trackerOptions) (*Tracker, *fakeTime) {
	ft := newFakeTime()
	tr := newTracker(opts)
	tr.now = ft.now
	return tr, ft
}

func sensor(t *testing.T, tr *Tracker, name string) SensorStatus {
	t.Helper()
	for _, s := range tr.Sensors() {
		if s.Sensor == name {
			return s
		}
	}
	t.Fatalf("sensor %q not tracked", name)
	return SensorStatus{}
}

func TestTrackerSequenceGaps(t *testing.T) {
	cases := []struct {
		name string
		seqs []int64
		gaps int64
	}{
		{"in order", []int64{1, 2, 3, 4}, 0},
		{"two lost", []int64{1, 2, 5, 6}, 2},
		{"reordered late one counts nothing", []int64{1, 3, 2, 4}, 1},
		{"duplicate", []int64{1, 2, 2, 3}, 0},
		{"restart from zero", []int64{5000, 5001, 0, 1, 2}, 0},
		{"lost after restart", []int64{5000, 0, 3}, 2},
		{"first seq anything", []int64{77}, 0},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			tr, ft := testTracker(trackerOptions{})
			for _, s := range c.seqs {
				tr.Observe([]buffer.Reading{seqReading("s1", s)})
				ft.add(time.Second)
			}
			got := sensor(t, tr, "s1")
			if got.Gaps != c.gaps || got.GapsFrom != "seq" {
				t.Fatalf("gaps = %d from %s, want %d from seq", got.Gaps, got.GapsFrom, c.gaps)
			}
			if got.Readings != int64(len(c.seqs)) {
				t.Fatalf("readings = %d, want %d", got.Readings, len(c.seqs))
			}
		})
	}
}

func TestTrackerIntervalGaps(t *testing.T) {
	cases := []struct {
		name    string
		pauses  []time.Duration // between reports, after 8 regular ones 10 s apart
		gaps    int64
		stale   bool
		metrics int // readings (metrics) a report sends as separate messages
	}{
		{"regular", []time.Duration{10 * time.Second}, 0, false, 1},
		{"jitter is no gap", []time.Duration{13 * time.Second, 7 * time.Second}, 0, false, 1},
		{"one missed", []time.Duration{20 * time.Second}, 1, false, 1},
		{"three missed", []time.Duration{40 * time.Second}, 3, false, 1},
		{"outage is stale, not gaps", []time.Duration{10 * time.Minute}, 0, false, 1},
		{"several metrics a report", []time.Duration{10 * time.Second, 20 * time.Second}, 1, false, 3},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			tr, ft := testTracker(trackerOptions{})
			report := func() {
				for m := range c.metrics {
					tr.Observe([]buffer.Reading{{Sensor: "pump", Name: fmt.Sprintf("pump:m%d", m)}})
					ft.add(5 * time.Millisecond)
				}
			}
			report()
			for range 8 {
				ft.add(10*time.Second - time.Duration(c.metrics)*5*time.Millisecond)
				report()
			}
			if got := sensor(t, tr, "pump"); got.IntervalSeconds < 9.9 || got.IntervalSeconds > 10.1 {
				t.Fatalf("interval = %.3fs, want 10s", got.IntervalSeconds)
			}
			for _, p := range c.pauses {
				ft.add(p)
				report()
			}
			got := sensor(t, tr, "pump")
			if got.Gaps != c.gaps || got.GapsFrom != "interval" {
				t.Fatalf("gaps = %d from %s, want %d from interval", got.Gaps, got.GapsFrom, c.gaps)
			}
			if got.Stale != c.stale {
				t.Fatalf("stale = %v, want %v", got.Stale, c.stale)
			}
		})
	}
}

func TestTrackerStale(t *testing.T) {
	tr, ft := testTracker(trackerOptions{})
	for range 10 {
		tr.Observe([]buffer.Reading{reading("a"), reading("a")})
		tr.Observe([]buffer.Reading{reading("b")})
		ft.add(2 * time.Second)
	}
	tr.Observe([]buffer.Reading{reading("once")})
	ft.add(9 * time.Second) // a and b are 11 s quiet: over 5 intervals of 2 s
	tr.Observe([]buffer.Reading{reading("b")})
	if got := sensor(t, tr, "a"); !got.Stale {
		t.Fatalf("a silent 11 s at a 2 s interval is not stale: %+v", got)
	}
	if got := sensor(t, tr, "b"); got.Stale {
		t.Fatalf("b just reported but is stale: %+v", got)
	}
	if got := sensor(t, tr, "once"); got.Stale {
		t.Fatalf("a sensor without a learned interval is stale after 9 s: %+v", got)
	}
	if n := tr.stale(); n != 1 {
		t.Fatalf("stale() = %d, want 1", n)
	}
	if first := tr.Sensors()[0]; first.Sensor != "a" {
		t.Fatalf("stale sensors sort first, got %q first", first.Sensor)
	}
	ft.add(DefaultStaleUnknown)
	if got := sensor(t, tr, "once"); !got.Stale {
		t.Fatalf("a sensor without a learned interval silent for %s is not stale", DefaultStaleUnknown)
	}
}

func TestTrackerCap(t *testing.T) {
	tr, ft := testTracker(trackerOptions{MaxSensors: 2, StaleUnknown: time.Minute})
	tr.Observe([]buffer.Reading{reading("a")})
	ft.add(30 * time.Second)
	tr.Observe([]buffer.Reading{reading("b")})
	tr.Observe([]buffer.Reading{reading("c")})
	if n := len(tr.Sensors()); n != 2 || tr.Untracked() != 1 {
		t.Fatalf("%d sensors tracked and %d untracked, want 2 and 1", n, tr.Untracked())
	}
	ft.add(45 * time.Second) // a is stale now, b is not
	tr.Observe([]buffer.Reading{reading("c")})
	names := []string{}
	for _, s := range tr.Sensors() {
		names = append(names, s.Sensor)
	}
	if fmt.Sprint(names) != "[b c]" {
		t.Fatalf("tracked %v, want the stale a replaced by c", names)
	}
}

func TestTrackerRate(t *testing.T) {
	tr, ft := testTracker(trackerOptions{})
	for range 120 { // two minutes at 2 readings a second
		tr.Observe([]buffer.Reading{reading("r"), reading("r")})
		ft.add(time.Second)
	}
	if got := sensor(t, tr, "r").PerMinute; math.Abs(got-120) > 6 {
		t.Fatalf("per minute = %.1f, want about 120", got)
	}
	ft.add(30 * time.Minute)
	if got := sensor(t, tr, "r").PerMinute; got > 1 {
		t.Fatalf("per minute after 30 quiet minutes = %.2f, want near 0", got)
	}
}

func BenchmarkTrackerObserve(b *testing.B) {
	tr := NewTracker()
	msgs := make([][]buffer.Reading, 1000)
	for i := range msgs {
		msgs[i] = []buffer.Reading{seqReading(fmt.Sprintf("sensor-%d", i), 1)}
	}
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		tr.Observe(msgs[i%len(msgs)])
	}
}
