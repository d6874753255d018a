// Package sim models the sensors of energy-grid and water networks for
// `sluice simulate`: each kind follows a plausible daily curve with noise,
// occasional faults and lost reports, deterministically for a seed.
// It does no I/O and reads no clock: reports out, the caller sends them.
package sim

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"time"
)

// Kind is a sensor model.
type Kind string

// The sensor kinds, in the order sensors are dealt out.
const (
	Feeder      Kind = "feeder"      // medium-voltage feeder: voltage (V), frequency (Hz)
	Transformer Kind = "transformer" // distribution transformer: top-oil temperature (Cel)
	Fibre       Kind = "fibre"       // fibre link: signal attenuation (dB)
	Pipe        Kind = "pipe"        // water main: flow (l/s)
	Pressure    Kind = "pressure"    // network node: pressure (bar)
	Reservoir   Kind = "reservoir"   // service reservoir: level (m)
	Pump        Kind = "pump"        // booster pump: motor temperature (Cel)
)

// Kinds lists every kind in dealing order: sensor i is Kinds[i%len(Kinds)].
var Kinds = []Kind{Feeder, Transformer, Fibre, Pipe, Pressure, Reservoir, Pump}

// Options describe a simulated sensor field. There are no hidden defaults:
// the command sets them.
type Options struct {
	Seed     uint64        // the same seed and options give the same reports
	Sensors  int           // how many sensors; kinds are dealt round-robin
	Interval time.Duration // between two reports of one sensor
	Start    time.Time     // time of every sensor's first report
	// FaultsPerHour is how often a sensor starts a fault (a voltage sag, a
	// burst main, a stuck level gauge), per sensor and hour of simulated time.
	FaultsPerHour float64
	// Dropout is the probability that a report is lost on the way (radio
	// loss): its sequence number is used, nothing is sent.
	Dropout float64
}

// Validate returns every problem with the options.
func (o Options) Validate() error {
	var errs []error
	if o.Sensors < 1 {
		errs = append(errs, fmt.Errorf("sensors: %d, want at least 1", o.Sensors))
	}
	if o.Interval < time.Millisecond {
		errs = append(errs, fmt.Errorf("interval: %s, want at least 1ms (readings are timed to the millisecond)", o.Interval))
	}
	if o.FaultsPerHour < 0 || math.IsNaN(o.FaultsPerHour) || math.IsInf(o.FaultsPerHour, 0) {
		errs = append(errs, fmt.Errorf("faults: %v per hour, want a number of 0 or more", o.FaultsPerHour))
	}
	if !(o.Dropout >= 0 && o.Dropout < 1) {
		errs = append(errs, fmt.Errorf("dropout: %v, want a probability in [0, 1)", o.Dropout))
	}
	if o.Start.IsZero() {
		errs = append(errs, errors.New("start: not set"))
	}
	return errors.Join(errs...)
}

// Value is one measured quantity of a report.
type Value struct {
	Metric string
	Unit   string // SenML unit
	Value  float64
}

// Report is what a sensor measured at one tick.
type Report struct {
	Sensor string
	Seq    int64     // the sensor's own sequence number: 1, 2, 3... one per report
	Time   time.Time // to the millisecond
	Values []Value
	Lost   bool   // dropped on the way: nothing is sent
	Fault  string // the fault in progress, "" when none
}

// Sensor is one simulated device. Its reports come in order from Next; a
// Sensor is not safe for concurrent use.
type Sensor struct {
	Name string
	Kind Kind

	model    model
	rng      *rand.Rand
	interval time.Duration
	start    time.Time
	faultP   float64 // probability of a new fault at one tick
	dropout  float64
	tick     int64
	fault    activeFault
}

// activeFault is a fault in progress.
type activeFault struct {
	spec      faultSpec
	started   time.Time
	until     time.Time
	magnitude float64 // drawn from spec's range when the fault starts
}

func (f activeFault) on() bool { return f.spec.name != "" }

// elapsed is the time since the fault started.
func (f activeFault) elapsed(t time.Time) time.Duration { return t.Sub(f.started) }

// faultSpec is one way a kind of sensor goes wrong.
type faultSpec struct {
	name           string
	minDur         time.Duration
	maxDur         time.Duration
	minMag, maxMag float64
}

// model is a kind's physics: its metrics and how they evolve.
type model interface {
	metrics() []metric
	faults() []faultSpec
	// sample advances the state to t (dt after the previous sample, 0 at the
	// first) and returns one value per metric, before rounding.
	sample(t time.Time, dt time.Duration, f activeFault, rng *rand.Rand) []float64
}

// metric names a quantity and how precisely the sensor reports it.
type metric struct {
	name     string
	unit     string
	decimals int
}

// New makes the sensors: sensor i is Kinds[i%7] named kind-n, e.g. feeder-1,
// transformer-1, ..., feeder-2.
func New(o Options) ([]*Sensor, error) {
	if err := o.Validate(); err != nil {
		return nil, err
	}
	start := o.Start.Truncate(time.Millisecond)
	sensors := make([]*Sensor, o.Sensors)
	for i := range sensors {
		kind := Kinds[i%len(Kinds)]
		// One stream per sensor: adding sensors does not change the others.
		rng := rand.New(rand.NewPCG(o.Seed, uint64(i)+1))
		sensors[i] = &Sensor{
			Name:     fmt.Sprintf("%s-%d", kind, i/len(Kinds)+1),
			Kind:     kind,
			model:    newModel(kind, start, rng),
			rng:      rng,
			interval: o.Interval,
			start:    start,
			faultP:   1 - math.Exp(-o.FaultsPerHour*o.Interval.Hours()),
			dropout:  o.Dropout,
		}
	}
	return sensors, nil
}

func newModel(k Kind, start time.Time, rng *rand.Rand) model {
	switch k {
	case Feeder:
		return newFeeder(rng)
	case Transformer:
		return newTransformer(start)
	case Fibre:
		return newFibre(rng)
	case Pipe:
		return newPipe(rng)
	case Pressure:
		return newPressure(rng)
	case Reservoir:
		return newReservoir(rng)
	case Pump:
		return newPump(start, rng)
	}
	panic("sim: unknown kind " + string(k))
}

// Next returns the sensor's next report.
func (s *Sensor) Next() Report {
	t := s.start.Add(time.Duration(s.tick) * s.interval)
	dt := time.Duration(0)
	if s.tick > 0 {
		dt = s.interval
	}
	s.tick++
	if s.fault.on() && !t.Before(s.fault.until) {
		s.fault = activeFault{}
	}
	if !s.fault.on() && s.rng.Float64() < s.faultP {
		specs := s.model.faults()
		spec := specs[s.rng.IntN(len(specs))]
		s.fault = activeFault{
			spec:      spec,
			started:   t,
			until:     t.Add(spec.minDur + time.Duration(s.rng.Float64()*float64(spec.maxDur-spec.minDur))),
			magnitude: spec.minMag + s.rng.Float64()*(spec.maxMag-spec.minMag),
		}
	}
	raw := s.model.sample(t, dt, s.fault, s.rng)
	ms := s.model.metrics()
	r := Report{Sensor: s.Name, Seq: s.tick, Time: t, Values: make([]Value, len(ms)), Fault: s.fault.spec.name}
	for i, m := range ms {
		r.Values[i] = Value{Metric: m.name, Unit: m.unit, Value: round(raw[i], m.decimals)}
	}
	r.Lost = s.rng.Float64() < s.dropout
	return r
}

func round(v float64, decimals int) float64 {
	p := math.Pow10(decimals)
	return math.Round(v*p) / p
}

// --- daily curves -------------------------------------------------------------

// hourOfDay is t's time of day in hours, UTC.
func hourOfDay(t time.Time) float64 {
	h, m, s := t.UTC().Clock()
	return float64(h) + float64(m)/60 + (float64(s)+float64(t.Nanosecond())/1e9)/3600
}

// bump is a bell around centre (hours) of the given width, on the 24-hour circle.
func bump(h, centre, width float64) float64 {
	d := math.Mod(math.Abs(h-centre), 24)
	if d > 12 {
		d = 24 - d
	}
	return math.Exp(-d * d / (2 * width * width))
}

// electricLoad is a residential feeder's load per unit of its peak: 0.35 at
// night, a morning shoulder, the evening peak near 19:00.
func electricLoad(h float64) float64 {
	return min(1, 0.35+0.3*bump(h, 8, 2)+0.65*bump(h, 19, 2.5))
}

// waterDemand is a town's water demand per unit of its peak: 0.2 at 03:00,
// the morning peak near 07:00, a smaller evening one.
func waterDemand(h float64) float64 {
	return min(1, 0.2+0.8*bump(h, 7, 1.5)+0.2*bump(h, 12.5, 2)+0.5*bump(h, 19, 2))
}

// ambient is the outdoor temperature in °C: 5 at dawn, 19 mid-afternoon.
func ambient(h float64) float64 {
	return 12 + 7*math.Cos(2*math.Pi*(h-15)/24)
}

// lag moves x towards target as a first-order system of time constant tau
// would in dt: thermal inertia.
func lag(x, target float64, dt, tau time.Duration) float64 {
	return target + (x-target)*math.Exp(-dt.Seconds()/tau.Seconds())
}

// between draws uniformly from [lo, hi).
func between(rng *rand.Rand, lo, hi float64) float64 { return lo + rng.Float64()*(hi-lo) }
