package sim

import (
	"encoding/json"
	"math"
	"reflect"
	"strings"
	"testing"
	"time"
)

var midnight = time.Date(2026, 6, 1, 0, 0, 0, 0, time.UTC)

// day runs one sensor of each kind through a day at one report a minute and
// returns, per sensor, its first metric's values by minute.
func day(t *testing.T, faultsPerHour float64) map[Kind][]float64 {
	t.Helper()
	sensors, err := New(Options{Seed: 7, Sensors: len(Kinds), Interval: time.Minute, Start: midnight, FaultsPerHour: faultsPerHour})
	if err != nil {
		t.Fatal(err)
	}
	out := map[Kind][]float64{}
	for range 24 * 60 {
		for _, s := range sensors {
			out[s.Kind] = append(out[s.Kind], s.Next().Values[0].Value)
		}
	}
	return out
}

// at is the value at hour h of a day sampled by minute.
func at(vals []float64, h float64) float64 { return vals[int(h*60)] }

func argmax(vals []float64) int {
	best := 0
	for i, v := range vals {
		if v > vals[best] {
			best = i
		}
	}
	return best
}

func TestKindsFollowPlausibleDailyCurves(t *testing.T) {
	vals := day(t, 0)
	for _, tc := range []struct {
		kind   Kind
		lo, hi float64 // every value of a fault-free day is inside
		shape  func(v []float64) bool
		what   string
	}{
		{Feeder, 218, 242, func(v []float64) bool { return at(v, 19) < at(v, 3)-5 }, "voltage sags at the evening peak"},
		{Transformer, 10, 80, func(v []float64) bool { p := argmax(v) / 60; return p >= 19 && p <= 23 }, "oil peaks hours after the 19:00 load peak"},
		{Fibre, 3.5, 14.5, func(v []float64) bool { return math.Abs(at(v, 3)-at(v, 15)) < 1 }, "attenuation stays near the span loss"},
		{Pipe, 0, 60, func(v []float64) bool { return at(v, 7) > 3*at(v, 3) }, "flow peaks in the morning"},
		{Pressure, 2.5, 6.6, func(v []float64) bool { return at(v, 7) < at(v, 3)-1 }, "pressure drops with demand"},
		{Reservoir, 0.3, 7.8, func(v []float64) bool { return at(v, 5.9) > at(v, 22) }, "pumps fill it at night"},
		{Pump, -5, 70, func(v []float64) bool { return at(v, 7.5) > at(v, 3)+20 }, "motor hot while the morning peak runs it"},
	} {
		t.Run(string(tc.kind), func(t *testing.T) {
			v := vals[tc.kind]
			if len(v) != 24*60 {
				t.Fatalf("%d values", len(v))
			}
			for i, x := range v {
				if x < tc.lo || x > tc.hi || math.IsNaN(x) {
					t.Fatalf("minute %d: %v outside [%v, %v]", i, x, tc.lo, tc.hi)
				}
			}
			if !tc.shape(v) {
				t.Errorf("daily curve wrong: %s (03:00 %.2f, 07:00 %.2f, 15:00 %.2f, 19:00 %.2f)",
					tc.what, at(v, 3), at(v, 7), at(v, 15), at(v, 19))
			}
		})
	}
}

func TestFrequencyStaysNearFifty(t *testing.T) {
	sensors, err := New(Options{Seed: 3, Sensors: 1, Interval: time.Second, Start: midnight})
	if err != nil {
		t.Fatal(err)
	}
	for range 3600 {
		r := sensors[0].Next()
		if f := r.Values[1]; f.Metric != "frequency" || f.Unit != "Hz" || math.Abs(f.Value-50) > 0.15 {
			t.Fatalf("%s at %s: %+v", r.Sensor, r.Time, f)
		}
	}
}

func TestFaultsHappenAndShow(t *testing.T) {
	sensors, err := New(Options{Seed: 11, Sensors: len(Kinds), Interval: time.Second, Start: midnight, FaultsPerHour: 30})
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for range 4 * 3600 {
		for _, s := range sensors {
			r := s.Next()
			if r.Fault == "" {
				continue
			}
			seen[string(s.Kind)+"/"+r.Fault] = true
			v := r.Values[0].Value
			switch r.Fault {
			case "fibre_cut":
				if v < 40 {
					t.Fatalf("fibre cut reads %v dB", v)
				}
			case "voltage_sag":
				if v > 200 {
					t.Fatalf("voltage sag reads %v V", v)
				}
			}
		}
	}
	for _, want := range []string{"feeder/voltage_sag", "feeder/under_frequency", "transformer/cooling_failure", "fibre/macrobend",
		"fibre/fibre_cut", "pipe/burst", "pressure/burst", "pressure/water_hammer", "reservoir/gauge_stuck", "pump/bearing_wear"} {
		if !seen[want] {
			t.Errorf("fault %s never happened in 4 simulated hours at 30 an hour", want)
		}
	}
}

func TestGaugeStuckRepeatsItself(t *testing.T) {
	sensors, err := New(Options{Seed: 5, Sensors: 6, Interval: time.Second, Start: midnight, FaultsPerHour: 60})
	if err != nil {
		t.Fatal(err)
	}
	s := sensors[5]
	if s.Kind != Reservoir {
		t.Fatalf("sensor 5 is a %s", s.Kind)
	}
	var prev Report
	repeats := 0
	for range 2 * 3600 {
		r := s.Next()
		if r.Fault == "gauge_stuck" && prev.Fault == "gauge_stuck" {
			if r.Values[0].Value != prev.Values[0].Value {
				t.Fatalf("a stuck gauge changed: %v -> %v", prev.Values[0].Value, r.Values[0].Value)
			}
			repeats++
		}
		prev = r
	}
	if repeats == 0 {
		t.Fatal("the gauge never stuck")
	}
}

func TestSequenceTimeAndDropouts(t *testing.T) {
	start := midnight.Add(1500 * time.Microsecond) // truncated to the millisecond
	sensors, err := New(Options{Seed: 1, Sensors: 3, Interval: 250 * time.Millisecond, Start: start, Dropout: 0.1})
	if err != nil {
		t.Fatal(err)
	}
	lost := 0
	const n = 4000
	for i := range n {
		r := sensors[2].Next()
		if r.Seq != int64(i+1) {
			t.Fatalf("report %d has seq %d", i, r.Seq)
		}
		if want := midnight.Add(time.Millisecond + time.Duration(i)*250*time.Millisecond); !r.Time.Equal(want) {
			t.Fatalf("report %d at %s, want %s", i, r.Time, want)
		}
		if r.Lost {
			lost++
		}
	}
	if lost < n*7/100 || lost > n*13/100 {
		t.Fatalf("%d of %d reports lost at a 10%% dropout", lost, n)
	}
}

func TestNamesAreDealtRoundRobin(t *testing.T) {
	sensors, err := New(Options{Seed: 1, Sensors: 9, Interval: time.Second, Start: midnight})
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, s := range sensors {
		names = append(names, s.Name)
	}
	want := "feeder-1 transformer-1 fibre-1 pipe-1 pressure-1 reservoir-1 pump-1 feeder-2 transformer-2"
	if got := strings.Join(names, " "); got != want {
		t.Fatalf("names %s, want %s", got, want)
	}
}

func run(t *testing.T, o Options, ticks int) []Report {
	t.Helper()
	sensors, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	var out []Report
	for range ticks {
		for _, s := range sensors {
			out = append(out, s.Next())
		}
	}
	return out
}

func TestDeterministicForASeed(t *testing.T) {
	o := Options{Seed: 42, Sensors: 10, Interval: 100 * time.Millisecond, Start: midnight.Add(9 * time.Hour), FaultsPerHour: 120, Dropout: 0.05}
	a, b := run(t, o, 2000), run(t, o, 2000)
	if !reflect.DeepEqual(a, b) {
		t.Fatal("two runs with the same seed differ")
	}
	o.Seed = 43
	if c := run(t, o, 2000); reflect.DeepEqual(a, c) {
		t.Fatal("another seed gives the same reports")
	}
	// More sensors leave the first ones as they were.
	o.Seed, o.Sensors = 42, 12
	more := run(t, o, 2000)
	for i := range 2000 {
		for s := range 10 {
			if !reflect.DeepEqual(a[i*10+s], more[i*12+s]) {
				t.Fatalf("tick %d sensor %d changed when sensors were added", i, s)
			}
		}
	}
}

func TestValidateNamesEveryProblem(t *testing.T) {
	err := Options{Sensors: 0, Interval: time.Microsecond, FaultsPerHour: -1, Dropout: 1}.Validate()
	for _, want := range []string{"sensors:", "interval:", "faults:", "dropout:", "start:"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("problems %v lack %q", err, want)
		}
	}
	if err := (Options{Sensors: 1, Interval: time.Millisecond, Start: midnight}).Validate(); err != nil {
		t.Errorf("valid options refused: %v", err)
	}
}

func TestEncode(t *testing.T) {
	r := Report{Sensor: "feeder-1", Seq: 17, Time: time.UnixMilli(1764547200123), Values: []Value{{"voltage", "V", 229.8}}}
	for _, tc := range []struct {
		format Format
		want   string
		cf     uint16
	}{
		{FlatJSON, `{"sensor":"feeder-1","metric":"voltage","value":229.8,"unit":"V","ts":1764547200123,"seq":17}`, 50},
		{SenML, `[{"bn":"feeder-1:","n":"voltage","u":"V","v":229.8,"t":1764547200.123}]`, 110},
	} {
		t.Run(string(tc.format), func(t *testing.T) {
			got := tc.format.Encode(r, r.Values[0])
			if string(got) != tc.want {
				t.Fatalf("got  %s\nwant %s", got, tc.want)
			}
			if !json.Valid(got) || tc.format.ContentFormat() != tc.cf {
				t.Fatalf("invalid JSON or content-format %d", tc.format.ContentFormat())
			}
		})
	}
	if _, err := ParseFormat("xml"); err == nil {
		t.Fatal("xml accepted")
	}
	if got := Topic("sensors/{sensor}/{metric}", "pipe-2", "flow"); got != "sensors/pipe-2/flow" {
		t.Fatalf("topic %s", got)
	}
}
