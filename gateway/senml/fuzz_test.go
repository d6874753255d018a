package senml

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sluice-gw/sluice/buffer"
)

// fuzzContext has topic defaults and a synchronised clock, so every check
// is in play.
func fuzzContext() *Context {
	return &Context{
		Sensor: "pump7", Metric: "pressure",
		Now:       time.Date(2024, 5, 1, 12, 0, 0, 123456000, time.UTC),
		Oldest:    time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC),
		MaxFuture: 10 * time.Minute, ClockSynced: true,
	}
}

// seed adds the inputs of the testdata cases named like one of names.
func seed(f *testing.F, names ...string) {
	dirs, _ := filepath.Glob(filepath.Join("testdata", "*"))
	for _, dir := range dirs {
		for _, name := range names {
			if _, err := os.Stat(filepath.Join(dir, name)); err != nil {
				continue
			}
			in, err := loadInput(dir)
			if err != nil {
				f.Fatalf("%s: %v", dir, err)
			}
			f.Add(in)
		}
	}
}

// bareContext has no topic defaults and a clock that is not synchronised.
func bareContext() *Context {
	c := fuzzContext()
	c.Sensor, c.Metric, c.ClockSynced = "", "", false
	return c
}

// decodeChecked decodes with c (fuzzContext when nil) and checks the
// invariants of the result; it returns the readings, or nil and the
// rejection.
func decodeChecked(t *testing.T, f Format, in []byte, c *Context) ([]buffer.Reading, *Error) {
	if c == nil {
		c = fuzzContext()
	}
	rs, err := Decode(f, in, c)
	if err != nil {
		checkError(t, err)
		if rs != nil {
			t.Fatal("readings with an error")
		}
		var e *Error
		errors.As(err, &e)
		return nil, e
	}
	checkReadings(t, rs, c)
	return rs, nil
}

func reasonOf(e *Error) Reason {
	if e == nil {
		return ""
	}
	return e.Reason
}

func msgOf(e *Error) string {
	if e == nil {
		return ""
	}
	return e.Msg
}

// checkValidJSON cross-checks the JSON scanner with encoding/json: what is
// not JSON must be malformed, and what is must not be a JSON syntax error.
func checkValidJSON(t *testing.T, in []byte, rs []buffer.Reading, reason Reason, msg string) {
	if json.Valid(in) {
		if strings.HasPrefix(msg, "JSON:") {
			t.Fatalf("valid JSON %q rejected: %s", in, msg)
		}
		return
	}
	if rs != nil {
		t.Fatalf("accepted invalid JSON %q", in)
	}
	if reason != ReasonMalformed {
		t.Fatalf("invalid JSON %q rejected as %s, not malformed", in, reason)
	}
}

func FuzzDecodeSenMLJSON(f *testing.F) {
	seed(f, "input.json")
	f.Fuzz(func(t *testing.T, in []byte) {
		rs, e := decodeChecked(t, FormatSenMLJSON, in, nil)
		checkValidJSON(t, in, rs, reasonOf(e), msgOf(e))
		if rs != nil {
			checkRoundTrip(t, FormatSenMLJSON, rs, encodeJSONPack(rs))
		}
	})
}

func FuzzDecodeSenMLCBOR(f *testing.F) {
	seed(f, "input.cbor")
	f.Fuzz(func(t *testing.T, in []byte) {
		rs, _ := decodeChecked(t, FormatSenMLCBOR, in, nil)
		if rs != nil {
			checkRoundTrip(t, FormatSenMLCBOR, rs, encodeCBORPack(rs))
		}
	})
}

func FuzzDecodeFlatJSON(f *testing.F) {
	seed(f, "input.json")
	f.Fuzz(func(t *testing.T, in []byte) {
		rs, e := decodeChecked(t, FormatJSON, in, nil)
		checkValidJSON(t, in, rs, reasonOf(e), msgOf(e))
		if rs != nil {
			if len(rs) != 1 {
				t.Fatalf("%d readings from a flat object", len(rs))
			}
			checkRoundTrip(t, FormatJSON, rs, encodeFlat(&rs[0]))
		}
	})
}

func FuzzDecodeAuto(f *testing.F) {
	seed(f, "input.json", "input.cbor", "input.txt")
	f.Fuzz(func(t *testing.T, in []byte) {
		for _, c := range []*Context{fuzzContext(), bareContext()} {
			rs, e := decodeChecked(t, FormatAuto, in, c)
			format, ok := detect(in)
			if !ok {
				if reasonOf(e) != ReasonMalformed {
					t.Fatalf("undetectable input rejected as %q", reasonOf(e))
				}
				continue
			}
			again, e2 := decodeChecked(t, format, in, c)
			if reasonOf(e) != reasonOf(e2) || len(rs) != len(again) {
				t.Fatalf("auto and %v differ: %q/%d vs %q/%d", format, reasonOf(e), len(rs), reasonOf(e2), len(again))
			}
		}
	})
}

// checkRoundTrip decodes the resolved encoding of rs and compares what
// identifies a reading, and its values.
func checkRoundTrip(t *testing.T, f Format, rs []buffer.Reading, enc []byte) {
	back, err := Decode(f, enc, fuzzContext())
	if err != nil {
		t.Fatalf("re-encoded %q: %v", enc, err)
	}
	if len(back) != len(rs) {
		t.Fatalf("re-encoded %q: %d readings, want %d", enc, len(back), len(rs))
	}
	for i := range rs {
		a, b := rs[i], back[i]
		if a.GatewayTime {
			a.Time = time.Time{} // re-encoded untimed
		}
		if a.Name != b.Name || a.Unit != b.Unit || !a.Time.Equal(b.Time) || a.Kind != b.Kind ||
			!sameFloat(a.Number, b.Number) || a.Text != b.Text || a.Bool != b.Bool || !bytes.Equal(a.Data, b.Data) ||
			a.HasSum != b.HasSum || !sameFloat(a.Sum, b.Sum) || a.HasSensorSeq != b.HasSensorSeq || a.SensorSeq != b.SensorSeq {
			t.Fatalf("reading %d changed in a round trip through %q:\n was %+v\n now %+v", i, enc, a, b)
		}
	}
}

func sameFloat(a, b float64) bool { return math.Float64bits(a) == math.Float64bits(b) }

// encodeJSONPack writes readings as resolved SenML JSON. The first record
// clears the topic's base name with an empty bn.
func encodeJSONPack(rs []buffer.Reading) []byte {
	recs := make([]map[string]any, len(rs))
	for i := range rs {
		r := &rs[i]
		m := map[string]any{"n": r.Name}
		if i == 0 {
			m["bn"] = ""
		}
		if r.Unit != "" {
			m["u"] = r.Unit
		}
		if !r.GatewayTime {
			m["t"] = json.Number(strconv.FormatFloat(float64(r.Time.UnixMicro())/1e6, 'g', -1, 64))
		}
		switch r.Kind {
		case buffer.KindNumber:
			m["v"] = r.Number
		case buffer.KindString:
			m["vs"] = r.Text
		case buffer.KindBool:
			m["vb"] = r.Bool
		case buffer.KindData:
			m["vd"] = base64.RawURLEncoding.EncodeToString(r.Data)
		}
		if r.HasSum {
			m["s"] = r.Sum
		}
		recs[i] = m
	}
	b, err := json.Marshal(recs)
	if err != nil {
		panic(err)
	}
	return b
}

func encodeFlat(r *buffer.Reading) []byte {
	m := map[string]any{"sensor": r.Sensor, "metric": r.Metric}
	switch r.Kind {
	case buffer.KindNumber:
		m["value"] = r.Number
	case buffer.KindString:
		m["value"] = r.Text
	case buffer.KindBool:
		m["value"] = r.Bool
	}
	if r.Unit != "" {
		m["unit"] = r.Unit
	}
	if !r.GatewayTime {
		m["ts"] = r.Time.Format(time.RFC3339Nano)
	}
	if r.HasSensorSeq {
		m["seq"] = r.SensorSeq
	}
	b, err := json.Marshal(m)
	if err != nil {
		panic(err)
	}
	return b
}

// A minimal CBOR encoder for the tests.

func cborHead(b []byte, major byte, n uint64) []byte {
	m := major << 5
	switch {
	case n < 24:
		return append(b, m|byte(n))
	case n <= math.MaxUint8:
		return append(b, m|24, byte(n))
	case n <= math.MaxUint16:
		return append(b, m|25, byte(n>>8), byte(n))
	case n <= math.MaxUint32:
		return append(b, m|26, byte(n>>24), byte(n>>16), byte(n>>8), byte(n))
	}
	return append(b, m|27, byte(n>>56), byte(n>>48), byte(n>>40), byte(n>>32), byte(n>>24), byte(n>>16), byte(n>>8), byte(n))
}

func cborText(b []byte, s string) []byte { return append(cborHead(b, 3, uint64(len(s))), s...) }

func cborFloat(b []byte, f float64) []byte {
	u := math.Float64bits(f)
	return append(b, 0xfb, byte(u>>56), byte(u>>48), byte(u>>40), byte(u>>32), byte(u>>24), byte(u>>16), byte(u>>8), byte(u))
}

// cborLabelKey writes an RFC 8428 Table 4 label.
func cborLabelKey(b []byte, label int) []byte {
	if label < 0 {
		return cborHead(b, 1, uint64(-1-label))
	}
	return cborHead(b, 0, uint64(label))
}

// encodeCBORPack writes readings as resolved SenML CBOR, the first record
// clearing the topic's base name.
func encodeCBORPack(rs []buffer.Reading) []byte {
	b := cborHead(nil, 4, uint64(len(rs)))
	for i := range rs {
		r := &rs[i]
		n := 2 // n and the value or sum
		if i == 0 {
			n++
		}
		if r.Unit != "" {
			n++
		}
		if !r.GatewayTime {
			n++
		}
		if r.HasSum && r.Kind != buffer.KindNone {
			n++
		}
		b = cborHead(b, 5, uint64(n))
		if i == 0 {
			b = cborText(cborLabelKey(b, -2), "")
		}
		b = cborText(cborLabelKey(b, 0), r.Name)
		if r.Unit != "" {
			b = cborText(cborLabelKey(b, 1), r.Unit)
		}
		if !r.GatewayTime {
			b = cborFloat(cborLabelKey(b, 6), float64(r.Time.UnixMicro())/1e6)
		}
		switch r.Kind {
		case buffer.KindNumber:
			b = cborFloat(cborLabelKey(b, 2), r.Number)
		case buffer.KindString:
			b = cborText(cborLabelKey(b, 3), r.Text)
		case buffer.KindBool:
			b = cborLabelKey(b, 4)
			b = append(b, map[bool]byte{false: 0xf4, true: 0xf5}[r.Bool])
		case buffer.KindData:
			b = append(cborHead(cborLabelKey(b, 8), 2, uint64(len(r.Data))), r.Data...)
		}
		if r.HasSum {
			b = cborFloat(cborLabelKey(b, 5), r.Sum)
		}
	}
	return b
}
