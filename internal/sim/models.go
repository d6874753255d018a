package sim

import (
	"math"
	"math/rand/v2"
	"time"
)

// feeder: the voltage at a feeder's far end sags as the load rises (230 V
// nominal, +4% at the tap, -7% at full load); the grid frequency wanders
// around 50 Hz as an Ornstein-Uhlenbeck process (a 2-minute memory, 25 mHz).
type feeder struct {
	freqDev float64 // Hz off 50
}

func newFeeder(rng *rand.Rand) *feeder { return &feeder{freqDev: rng.NormFloat64() * 0.025} }

func (*feeder) metrics() []metric {
	return []metric{{"voltage", "V", 1}, {"frequency", "Hz", 3}}
}

func (*feeder) faults() []faultSpec {
	return []faultSpec{
		// A fault elsewhere on the network pulls the voltage down for seconds.
		{name: "voltage_sag", minDur: time.Second, maxDur: 4 * time.Second, minMag: 0.15, maxMag: 0.4},
		// A large generator trips: frequency drops, then recovers.
		{name: "under_frequency", minDur: 20 * time.Second, maxDur: time.Minute, minMag: 0.15, maxMag: 0.5},
	}
}

func (f *feeder) sample(t time.Time, dt time.Duration, fault activeFault, rng *rand.Rand) []float64 {
	const tau, sigma = 120.0, 0.025
	if dt > 0 {
		decay := math.Exp(-dt.Seconds() / tau)
		f.freqDev = f.freqDev*decay + sigma*math.Sqrt(1-decay*decay)*rng.NormFloat64()
	}
	volts := 230*(1.04-0.07*electricLoad(hourOfDay(t))) + rng.NormFloat64()*0.5
	freq := 50 + f.freqDev + rng.NormFloat64()*0.003
	switch fault.spec.name {
	case "voltage_sag":
		volts *= 1 - fault.magnitude
	case "under_frequency":
		freq -= fault.magnitude * math.Exp(-fault.elapsed(t).Seconds()/15)
	}
	return []float64{volts, freq}
}

// transformer: top-oil temperature follows ambient plus a rise that grows
// with the load (about load^1.6, 45 K at full load), through a three-hour
// thermal time constant: it lags the load curve by hours.
type transformer struct {
	oil float64 // °C
}

const transformerTau = 3 * time.Hour

func newTransformer(start time.Time) *transformer {
	return &transformer{oil: transformerTarget(hourOfDay(start), 0)}
}

func transformerTarget(h, extra float64) float64 {
	return ambient(h) + 45*math.Pow(electricLoad(h), 1.6) + extra
}

func (*transformer) metrics() []metric { return []metric{{"temperature", "Cel", 1}} }

func (*transformer) faults() []faultSpec {
	// The cooling fans stop: the oil heats towards a higher level, slowly.
	return []faultSpec{{name: "cooling_failure", minDur: 10 * time.Minute, maxDur: 40 * time.Minute, minMag: 12, maxMag: 25}}
}

func (x *transformer) sample(t time.Time, dt time.Duration, fault activeFault, rng *rand.Rand) []float64 {
	extra := 0.0
	if fault.spec.name == "cooling_failure" {
		extra = fault.magnitude
	}
	x.oil = lag(x.oil, transformerTarget(hourOfDay(t), extra), dt, transformerTau)
	return []float64{x.oil + rng.NormFloat64()*0.15}
}

// fibre: a link's attenuation is its span loss (4-14 dB) plus a small
// temperature swing; a bend adds decibels, a cut pins the receiver at its
// floor.
type fibre struct {
	span float64 // dB
}

func newFibre(rng *rand.Rand) *fibre { return &fibre{span: between(rng, 4, 14)} }

func (*fibre) metrics() []metric { return []metric{{"attenuation", "dB", 2}} }

func (*fibre) faults() []faultSpec {
	return []faultSpec{
		{name: "macrobend", minDur: 2 * time.Minute, maxDur: 20 * time.Minute, minMag: 2, maxMag: 8},
		{name: "fibre_cut", minDur: time.Minute, maxDur: 10 * time.Minute, minMag: 45, maxMag: 45},
	}
}

func (f *fibre) sample(t time.Time, _ time.Duration, fault activeFault, rng *rand.Rand) []float64 {
	v := f.span + 0.15*math.Cos(2*math.Pi*(hourOfDay(t)-15)/24) + rng.NormFloat64()*0.03
	switch fault.spec.name {
	case "macrobend":
		v += fault.magnitude
	case "fibre_cut":
		v = fault.magnitude + rng.NormFloat64()*0.1
	}
	return []float64{v}
}

// pipe: flow in a main follows the town's demand (peak 15-60 l/s); a burst
// adds the water it loses.
type pipe struct {
	peak float64 // l/s
}

func newPipe(rng *rand.Rand) *pipe { return &pipe{peak: between(rng, 15, 60)} }

func (*pipe) metrics() []metric { return []metric{{"flow", "l/s", 2}} }

func (*pipe) faults() []faultSpec {
	return []faultSpec{{name: "burst", minDur: 5 * time.Minute, maxDur: time.Hour, minMag: 0.3, maxMag: 0.8}}
}

func (p *pipe) sample(t time.Time, _ time.Duration, fault activeFault, rng *rand.Rand) []float64 {
	v := p.peak * waterDemand(hourOfDay(t)) * (1 + rng.NormFloat64()*0.03)
	if fault.spec.name == "burst" {
		v += fault.magnitude * p.peak
	}
	return []float64{max(0, v)}
}

// pressure: a node's pressure is its static head (4.5-6.5 bar) less the
// friction loss, which grows with the square of the demand; a burst drops
// it, a closing valve rings (water hammer).
type pressure struct {
	static float64 // bar
}

func newPressure(rng *rand.Rand) *pressure { return &pressure{static: between(rng, 4.5, 6.5)} }

func (*pressure) metrics() []metric { return []metric{{"pressure", "bar", 3}} }

func (*pressure) faults() []faultSpec {
	return []faultSpec{
		{name: "burst", minDur: 5 * time.Minute, maxDur: time.Hour, minMag: 1, maxMag: 2.5},
		{name: "water_hammer", minDur: 5 * time.Second, maxDur: 15 * time.Second, minMag: 0.8, maxMag: 2},
	}
}

func (p *pressure) sample(t time.Time, _ time.Duration, fault activeFault, rng *rand.Rand) []float64 {
	d := waterDemand(hourOfDay(t))
	v := p.static - 1.8*d*d + rng.NormFloat64()*0.03
	switch fault.spec.name {
	case "burst":
		v -= fault.magnitude
	case "water_hammer":
		e := fault.elapsed(t).Seconds()
		v += fault.magnitude * math.Sin(2*math.Pi*e/1.2) * math.Exp(-e/5)
	}
	return []float64{max(0, v)}
}

// reservoir: the level integrates inflow minus outflow. Pumps fill it on the
// night tariff (22:00-06:00, 0.45 m/h); the town draws it down with its
// demand (3.6 m a day in all), so it swings a few metres a day within 0.3-7.8 m.
// A stuck gauge repeats its last reading.
type reservoir struct {
	level    float64 // m, the true level
	reported float64 // the last value the gauge gave
}

func newReservoir(rng *rand.Rand) *reservoir { return &reservoir{level: between(rng, 3, 5)} }

func (*reservoir) metrics() []metric { return []metric{{"level", "m", 3}} }

func (*reservoir) faults() []faultSpec {
	return []faultSpec{{name: "gauge_stuck", minDur: 2 * time.Minute, maxDur: 15 * time.Minute}}
}

func (r *reservoir) sample(t time.Time, dt time.Duration, fault activeFault, rng *rand.Rand) []float64 {
	h := hourOfDay(t)
	inflow := 0.0
	if h >= 22 || h < 6 {
		inflow = 0.45
	}
	// waterDemand averages about 0.45 over a day: 0.15 m/h at the average.
	outflow := 0.15 * waterDemand(h) / 0.45
	r.level = min(7.8, max(0.3, r.level+(inflow-outflow)*dt.Hours()))
	if fault.spec.name == "gauge_stuck" && fault.elapsed(t) > 0 {
		return []float64{r.reported}
	}
	r.reported = r.level + rng.NormFloat64()*0.004
	return []float64{r.reported}
}

// pump: a booster pump runs while demand is above its threshold; its motor
// heats towards 38 K over ambient with a 15-minute time constant and cools
// back when it stops. A worn bearing runs hotter.
type pump struct {
	temp      float64 // °C
	threshold float64 // demand above which it runs
}

const pumpTau = 15 * time.Minute

func newPump(start time.Time, rng *rand.Rand) *pump {
	p := &pump{threshold: between(rng, 0.35, 0.55)}
	p.temp = p.target(hourOfDay(start), 0)
	return p
}

func (p *pump) target(h, extra float64) float64 {
	if waterDemand(h) > p.threshold {
		return ambient(h) + 38 + extra
	}
	return ambient(h) + extra/3
}

func (*pump) metrics() []metric { return []metric{{"temperature", "Cel", 1}} }

func (*pump) faults() []faultSpec {
	return []faultSpec{{name: "bearing_wear", minDur: 10 * time.Minute, maxDur: time.Hour, minMag: 15, maxMag: 30}}
}

func (p *pump) sample(t time.Time, dt time.Duration, fault activeFault, rng *rand.Rand) []float64 {
	extra := 0.0
	if fault.spec.name == "bearing_wear" {
		extra = fault.magnitude
	}
	p.temp = lag(p.temp, p.target(hourOfDay(t), extra), dt, pumpTau)
	return []float64{p.temp + rng.NormFloat64()*0.2}
}
