package gateway

import (
	"encoding/hex"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sluice-gw/sluice/buffer"
)

// ClockMode says how far the gateway trusts its wall clock.
type ClockMode string

// Clock modes of [gateway] clock.
const (
	// ClockAuto trusts the clock once the kernel says it is synchronised or
	// the central database's clock agrees with it.
	ClockAuto ClockMode = "auto"
	// ClockTrusted: an RTC- or GPS-disciplined board.
	ClockTrusted ClockMode = "trusted"
	// ClockUntrusted never trusts the wall clock.
	ClockUntrusted ClockMode = "untrusted"
)

// serverAgreement is how close the wall clock must be to the central
// server's, beyond half the round trip, to count as synchronised.
const serverAgreement = time.Second

// Clock stamps readings: a wall time that never repeats a microsecond, whether
// that time can be trusted, and, while it cannot, the boot and the monotonic
// time since boot, so that the reading can be restamped once it can.
type Clock struct {
	mode ClockMode
	boot buffer.BootID

	mu   sync.Mutex // guards last
	last int64      // last microsecond handed out

	kernelChecked atomic.Int64 // unix nanos of the last adjtimex check
	kernelSynced  atomic.Bool
	serverSynced  atomic.Bool
	serverOffset  atomic.Int64 // server minus local, nanoseconds, from the last sample
	wallNow       func() time.Time
	monoNow       func() time.Duration
	kernelState   func() (bool, error)
}

// NewClock returns a clock in the given mode for this boot.
func NewClock(mode ClockMode) *Clock {
	c := &Clock{mode: mode, wallNow: time.Now, monoNow: bootTime, kernelState: kernelSynchronised}
	c.boot, _ = readBootID()
	return c
}

// Stamp is the clock's view at one moment.
type Stamp struct {
	Wall   time.Time     // unique to the microsecond
	Synced bool          // whether Wall can be trusted
	Mono   time.Duration // time since boot; zero when Synced (not needed then)
}

// Now returns a stamp whose wall time no earlier call returned. The time
// since boot is read only while the clock is untrusted, the one case that
// needs it: CLOCK_BOOTTIME has no vDSO fast path, and a system call per
// message was 5% of the gateway's CPU at full MQTT ingest.
func (c *Clock) Now() Stamp {
	s := Stamp{Synced: c.Synced()}
	if !s.Synced {
		s.Mono = c.monoNow()
	}
	s.Wall = c.next(c.wallNow())
	return s
}

// next returns t's microsecond, or the one after the last handed out.
func (c *Clock) next(t time.Time) time.Time {
	us := t.UnixMicro()
	c.mu.Lock()
	if us <= c.last {
		us = c.last + 1
	}
	c.last = us
	c.mu.Unlock()
	return time.UnixMicro(us).UTC()
}

// Synced reports whether the wall clock is trusted now.
func (c *Clock) Synced() bool {
	switch c.mode {
	case ClockTrusted:
		return true
	case ClockUntrusted:
		return false
	}
	if c.serverSynced.Load() {
		return true
	}
	// adjtimex is cheap but not free: look at most once a second.
	now := time.Now().UnixNano()
	if now-c.kernelChecked.Load() > int64(time.Second) {
		c.kernelChecked.Store(now)
		ok, err := c.kernelState()
		c.kernelSynced.Store(err == nil && ok)
	}
	return c.kernelSynced.Load()
}

// Source says what the trust rests on, for status and doctor.
func (c *Clock) Source() string {
	switch {
	case c.mode == ClockTrusted:
		return "configured trusted"
	case c.mode == ClockUntrusted:
		return "configured untrusted"
	case c.serverSynced.Load():
		return "agrees with the central database"
	case c.kernelSynced.Load():
		return "kernel synchronised (NTP)"
	}
	return "not synchronised"
}

// Boot is this boot's id.
func (c *Clock) Boot() buffer.BootID { return c.boot }

// ServerSample takes a heartbeat's clock sample: the local time at the middle
// of the round trip and the server's time. The clock counts as synchronised
// while they agree within a second plus half the round trip.
func (c *Clock) ServerSample(local, server time.Time, rtt time.Duration) {
	off := server.Sub(local)
	c.serverOffset.Store(int64(off))
	c.serverSynced.Store(off.Abs() <= serverAgreement+rtt/2)
}

// ServerOffset is the server's clock minus ours at the last sample.
func (c *Clock) ServerOffset() time.Duration { return time.Duration(c.serverOffset.Load()) }

// Stamp applies the clock to decoded readings: untimed ones get unique wall
// times, all get the receive time and trust, and gateway-stamped ones taken
// while the clock is untrusted get the boot and monotonic time to be
// restamped later.
func (c *Clock) Stamp(rs []buffer.Reading, at Stamp) {
	for i := range rs {
		r := &rs[i]
		r.Received = at.Wall
		r.ClockSynced = at.Synced
		if r.Time.IsZero() {
			r.GatewayTime = true
			if i == 0 {
				r.Time = at.Wall
			} else {
				r.Time = c.next(at.Wall)
			}
		}
		if r.GatewayTime && !at.Synced && !c.boot.IsZero() {
			r.Boot = c.boot
			r.Mono = at.Mono + r.Time.Sub(at.Wall)
		}
	}
}

// Restamp corrects the time of a reading stamped by this boot while the clock
// was untrusted, once it is trusted: wall = now - (mono now - mono then).
// Readings of other boots, or sensor-timed ones, are left as they are.
func (c *Clock) Restamp(r *buffer.Reading) {
	if !r.Restampable(c.boot) || !c.Synced() {
		return
	}
	wall := c.wallNow().Add(r.Mono - c.monoNow()).Truncate(time.Microsecond).UTC()
	shift := wall.Sub(r.Time)
	r.Time = wall
	r.Received = r.Received.Add(shift)
	r.ClockSynced = true
	r.Boot, r.Mono = buffer.BootID{}, 0
}

// bootTime is the monotonic time since boot, suspend included.
func bootTime() time.Duration {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts); err != nil {
		return 0
	}
	return time.Duration(ts.Nano())
}

// kernelSynchronised asks adjtimex whether NTP (or anything) disciplines the clock.
func kernelSynchronised() (bool, error) {
	var tx unix.Timex
	state, err := unix.Adjtimex(&tx)
	if err != nil {
		return false, fmt.Errorf("adjtimex: %w", err)
	}
	return state != unix.TIME_ERROR && tx.Status&unix.STA_UNSYNC == 0, nil
}

func readBootID() (buffer.BootID, error) {
	var id buffer.BootID
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return id, fmt.Errorf("read boot id: %w", err)
	}
	raw, err := hex.DecodeString(strings.ReplaceAll(strings.TrimSpace(string(b)), "-", ""))
	if err != nil || len(raw) != len(id) {
		return id, fmt.Errorf("parse boot id %q", b)
	}
	copy(id[:], raw)
	return id, nil
}
