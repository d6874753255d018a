package senml

import (
	"bytes"
	"encoding/json"
	"testing"
	"time"

	"github.com/sluice-gw/sluice/buffer"
)

var benchContext = &Context{
	Sensor: "pump7", Metric: "pressure",
	Now:       time.Date(2024, 5, 1, 12, 0, 0, 123456000, time.UTC),
	Oldest:    time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC),
	MaxFuture: 10 * time.Minute, ClockSynced: true,
}

func benchDecode(b *testing.B, f Format, in []byte, want int) {
	b.ReportAllocs()
	b.SetBytes(int64(len(in)))
	for b.Loop() {
		rs, err := Decode(f, in, benchContext)
		if err != nil || len(rs) != want {
			b.Fatalf("%d readings, %v", len(rs), err)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(want), "ns/reading")
}

func BenchmarkDecodeFlatJSON(b *testing.B) {
	in := []byte(`{"sensor":"pump7","metric":"pressure","value":2.5,"unit":"bar","ts":1714564800000,"seq":42}`)
	benchDecode(b, FormatAuto, in, 1)
}

// senmlPack10 is a typical pack: a base name, base time and base unit, ten
// records of three metrics over 30 s.
const senmlPack10 = `[{"bn":"urn:dev:mac:0024befffe804ff1:","bt":1.7145648e+09,"bu":"Cel","n":"temp","v":21.5},
{"n":"temp","t":10,"v":21.6},{"n":"temp","t":20,"v":21.7},{"n":"temp","t":30,"v":21.75},
{"n":"hum","u":"%RH","v":40.1},{"n":"hum","u":"%RH","t":10,"v":40.3},{"n":"hum","u":"%RH","t":20,"v":40.2},
{"n":"flow","u":"m3/s","v":0.012,"s":1234.5},{"n":"flow","u":"m3/s","t":10,"v":0.013,"s":1234.63},{"n":"door","vb":false}]`

func BenchmarkDecodeSenMLJSON10(b *testing.B) {
	benchDecode(b, FormatAuto, []byte(senmlPack10), 10)
}

// senmlPack10CBOR is senmlPack10 in CBOR, with the same base fields.
func senmlPack10CBOR() []byte {
	type rec struct {
		n, u string
		t, v float64
		hasT bool
		vb   *bool
		s    float64
	}
	no := false
	recs := []rec{
		{n: "temp", v: 21.5}, {n: "temp", t: 10, hasT: true, v: 21.6}, {n: "temp", t: 20, hasT: true, v: 21.7},
		{n: "temp", t: 30, hasT: true, v: 21.75}, {n: "hum", u: "%RH", v: 40.1}, {n: "hum", u: "%RH", t: 10, hasT: true, v: 40.3},
		{n: "hum", u: "%RH", t: 20, hasT: true, v: 40.2}, {n: "flow", u: "m3/s", v: 0.012, s: 1234.5},
		{n: "flow", u: "m3/s", t: 10, hasT: true, v: 0.013, s: 1234.63}, {n: "door", vb: &no},
	}
	b := cborHead(nil, 4, uint64(len(recs)))
	for i, r := range recs {
		pairs := 2
		if i == 0 {
			pairs += 3
		}
		if r.u != "" {
			pairs++
		}
		if r.hasT {
			pairs++
		}
		if r.s != 0 {
			pairs++
		}
		b = cborHead(b, 5, uint64(pairs))
		if i == 0 {
			b = cborText(cborLabelKey(b, -2), "urn:dev:mac:0024befffe804ff1:")
			b = cborFloat(cborLabelKey(b, -3), 1.7145648e+09)
			b = cborText(cborLabelKey(b, -4), "Cel")
		}
		b = cborText(cborLabelKey(b, 0), r.n)
		if r.u != "" {
			b = cborText(cborLabelKey(b, 1), r.u)
		}
		if r.hasT {
			b = cborHead(cborLabelKey(b, 6), 0, uint64(r.t))
		}
		if r.vb != nil {
			b = append(cborLabelKey(b, 4), 0xf4)
		} else {
			b = cborFloat(cborLabelKey(b, 2), r.v)
		}
		if r.s != 0 {
			b = cborFloat(cborLabelKey(b, 5), r.s)
		}
	}
	return b
}

func BenchmarkDecodeSenMLCBOR10(b *testing.B) {
	in := senmlPack10CBOR()
	want, err := Decode(FormatSenMLJSON, []byte(senmlPack10), benchContext)
	if err != nil {
		b.Fatal(err)
	}
	got, err := Decode(FormatSenMLCBOR, in, benchContext)
	if err != nil || !sameReadings(got, want) {
		b.Fatalf("the CBOR pack differs from the JSON one: %v", err)
	}
	benchDecode(b, FormatAuto, in, 10)
}

// BenchmarkDecodeSenMLCBOR10Resolved is the pack in resolved form: a full
// name, unit and absolute time in every record.
func BenchmarkDecodeSenMLCBOR10Resolved(b *testing.B) {
	rs, err := Decode(FormatSenMLJSON, []byte(senmlPack10), benchContext)
	if err != nil {
		b.Fatal(err)
	}
	benchDecode(b, FormatAuto, encodeCBORPack(rs), 10)
}

func sameReadings(a, b []buffer.Reading) bool {
	x, _ := json.Marshal(toGolden(a))
	y, _ := json.Marshal(toGolden(b))
	return bytes.Equal(x, y)
}

func BenchmarkDecodeValue(b *testing.B) {
	benchDecode(b, FormatAuto, []byte("21.5\n"), 1)
}
