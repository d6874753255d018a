package gateway

import (
	"testing"
	"time"

	"github.com/sluice-gw/sluice/buffer"
)

// testClock is a Clock with a wall clock, a monotonic clock and a kernel
// state the test sets.
func testClock(mode ClockMode, wall time.Time, kernelSynced bool) (*Clock, *time.Time, *time.Duration) {
	mono := 100 * time.Second
	c := &Clock{mode: mode, boot: buffer.BootID{9}}
	c.wallNow = func() time.Time { return wall }
	c.monoNow = func() time.Duration { return mono }
	c.kernelState = func() (bool, error) { return kernelSynced, nil }
	return c, &wall, &mono
}

func TestClockNeverRepeatsAMicrosecond(t *testing.T) {
	c, _, _ := testClock(ClockTrusted, time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC), true)
	seen := map[time.Time]bool{}
	for range 1000 {
		s := c.Now()
		if seen[s.Wall] {
			t.Fatalf("microsecond %v handed out twice", s.Wall)
		}
		seen[s.Wall] = true
	}
	// Untimed readings of one message get distinct times too.
	rs := make([]buffer.Reading, 5)
	c.Stamp(rs, c.Now())
	for _, r := range rs {
		if seen[r.Time] || r.Time.IsZero() || !r.GatewayTime {
			t.Fatalf("untimed reading stamped %v (gateway time %v)", r.Time, r.GatewayTime)
		}
		seen[r.Time] = true
	}
}

func TestClockModes(t *testing.T) {
	wall := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for _, c := range []struct {
		mode   ClockMode
		kernel bool
		want   bool
	}{
		{ClockTrusted, false, true},
		{ClockUntrusted, true, false},
		{ClockAuto, true, true},
		{ClockAuto, false, false},
	} {
		clock, _, _ := testClock(c.mode, wall, c.kernel)
		if got := clock.Synced(); got != c.want {
			t.Errorf("mode %s, kernel synced %v: Synced() = %v, want %v", c.mode, c.kernel, got, c.want)
		}
	}
}

func TestServerSampleTrustsAnAgreeingClock(t *testing.T) {
	wall := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	c, _, _ := testClock(ClockAuto, wall, false)
	c.ServerSample(wall, wall.Add(5*time.Second), 10*time.Millisecond)
	if c.Synced() {
		t.Fatal("a clock 5 s off the server's counts as synchronised")
	}
	c.ServerSample(wall, wall.Add(300*time.Millisecond), 10*time.Millisecond)
	if !c.Synced() {
		t.Fatal("a clock 0.3 s off the server's does not count as synchronised")
	}
	if c.Source() != "agrees with the central database" {
		t.Fatalf("source %q", c.Source())
	}
}

// TestRestampAfterSync: a reading stamped at 1970 while unsynchronised gets
// its true time once the clock is trusted, from the monotonic clock.
func TestRestampAfterSync(t *testing.T) {
	bootWall := time.Date(1970, 1, 1, 0, 1, 40, 0, time.UTC) // the board's idea of "now" at mono 100 s
	c, wall, mono := testClock(ClockAuto, bootWall, false)
	rs := make([]buffer.Reading, 1)
	rs[0].Name = "s:v"
	c.Stamp(rs, c.Now())
	r := rs[0]
	if r.ClockSynced || r.Boot != c.boot || r.Mono != 100*time.Second {
		t.Fatalf("unsynced stamp: %+v", r)
	}
	// 60 s later NTP steps the clock to the real time.
	*mono = 160 * time.Second
	*wall = time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	c.kernelState = func() (bool, error) { return true, nil }
	c.kernelChecked.Store(0)
	c.Restamp(&r)
	want := time.Date(2026, 11, 25, 11, 59, 0, 0, time.UTC)
	if !r.Time.Equal(want) || !r.ClockSynced || !r.Boot.IsZero() {
		t.Fatalf("restamped to %v (synced %v), want %v", r.Time, r.ClockSynced, want)
	}
	if !r.Received.Equal(want) {
		t.Fatalf("received restamped to %v, want %v", r.Received, want)
	}
	// A reading of another boot is left alone.
	other := buffer.Reading{Time: bootWall, GatewayTime: true, Boot: buffer.BootID{7}, Mono: time.Second}
	c.Restamp(&other)
	if !other.Time.Equal(bootWall) || other.ClockSynced {
		t.Fatal("a reading of another boot was restamped")
	}
	// A sensor-timed reading is left alone.
	timed := buffer.Reading{Time: bootWall, Boot: c.boot}
	c.Restamp(&timed)
	if !timed.Time.Equal(bootWall) {
		t.Fatal("a sensor-timed reading was restamped")
	}
}
