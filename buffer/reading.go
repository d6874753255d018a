package buffer

import (
	"encoding/hex"
	"fmt"
	"math"
	"time"
)

// Kind says which value field of a Reading holds its value.
type Kind uint8

// Kinds of value. KindNone is a SenML record that carries only a sum.
const (
	KindNone Kind = iota
	KindNumber
	KindString
	KindBool
	KindData
	kindLimit
)

func (k Kind) String() string {
	switch k {
	case KindNone:
		return "none"
	case KindNumber:
		return "number"
	case KindString:
		return "string"
	case KindBool:
		return "bool"
	case KindData:
		return "data"
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// BootID names one boot of the gateway (the kernel's boot_id).
type BootID [16]byte

// IsZero reports whether the id is unset.
func (b BootID) IsZero() bool { return b == BootID{} }

func (b BootID) String() string { return hex.EncodeToString(b[:]) }

// Reading is one measurement, resolved: its identity is (site, Name, Unit, Time),
// where the site belongs to the gateway, not to the reading.
type Reading struct {
	Name   string // resolved SenML name (base name + name)
	Sensor string // convenience: the base name without its trailing separator
	Metric string // convenience: the rest of the name
	Unit   string // "" when none

	// Time is UTC with microsecond precision, the precision Postgres keeps.
	Time time.Time

	Kind   Kind
	Number float64
	Text   string
	Bool   bool
	Data   []byte

	Sum    float64
	HasSum bool

	SensorSeq    int64 // the sensor's own sequence number
	HasSensorSeq bool

	Received    time.Time // when the gateway took the message in
	ClockSynced bool      // whether the gateway clock was trusted at Received

	// GatewayTime is set when Time came from the gateway clock: the record had
	// no time, or a time relative to now (SenML times below 2^28).
	GatewayTime bool
	// Boot and Mono locate a gateway-stamped time on the boot's monotonic clock
	// while the wall clock is not trusted, so the time can be restamped once it is.
	Boot BootID
	Mono time.Duration
}

// Restampable reports whether the reading's time may be corrected once the
// clock of boot is trusted.
func (r *Reading) Restampable(boot BootID) bool {
	return r.GatewayTime && !r.ClockSynced && !r.Boot.IsZero() && r.Boot == boot
}

// Valid reports the first property of r that the buffer cannot store.
func (r *Reading) Valid() error {
	switch {
	case r.Name == "":
		return fmt.Errorf("reading has no name")
	case r.Kind >= kindLimit:
		return fmt.Errorf("reading %q: unknown value kind %d", r.Name, r.Kind)
	case r.Kind == KindNone && !r.HasSum:
		return fmt.Errorf("reading %q has neither value nor sum", r.Name)
	case r.Kind == KindNumber && !finite(r.Number):
		return fmt.Errorf("reading %q: value %v is not finite", r.Name, r.Number)
	case r.HasSum && !finite(r.Sum):
		return fmt.Errorf("reading %q: sum %v is not finite", r.Name, r.Sum)
	case r.Time.IsZero():
		return fmt.Errorf("reading %q has no time", r.Name)
	case r.Time.Before(minTime) || r.Time.After(maxTime) || r.Received.Before(minTime) || r.Received.After(maxTime):
		return fmt.Errorf("reading %q: time %s outside years 1..9999", r.Name, r.Time.Format(time.RFC3339))
	}
	return nil
}

// The times a reading may carry: what RFC 3339 can write, well inside both
// the encoding and Postgres's timestamptz.
var (
	minTime = time.Date(1, 1, 1, 0, 0, 0, 0, time.UTC)
	maxTime = time.Date(9999, 12, 31, 23, 59, 59, 999999000, time.UTC)
)

func finite(f float64) bool { return !math.IsNaN(f) && !math.IsInf(f, 0) }

// Record is a stored reading with its place in a stream.
type Record struct {
	Seq uint64
	Reading
}
