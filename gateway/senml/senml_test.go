package senml

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/sluice-gw/sluice/buffer"
)

var update = flag.Bool("update", false, "rewrite expected.json / expected.err of testdata")

// goldenContext is context.json of a testdata case; every field is optional.
type goldenContext struct {
	Format      string `json:"format"` // a ParseFormat name (default "auto")
	Sensor      string `json:"sensor"`
	Metric      string `json:"metric"`
	Now         string `json:"now"`        // RFC 3339 (default 2024-05-01T12:00:00.123456Z)
	Oldest      string `json:"oldest"`     // RFC 3339 (default 2000-01-01T00:00:00Z)
	MaxFuture   string `json:"max_future"` // Go duration (default 10m)
	ClockSynced *bool  `json:"clock_synced"`
}

// goldenReading is a reading as expected.json shows it.
type goldenReading struct {
	Name        string   `json:"name"`
	Sensor      string   `json:"sensor"`
	Metric      string   `json:"metric"`
	Unit        string   `json:"unit,omitempty"`
	Time        string   `json:"time,omitempty"`
	GatewayTime bool     `json:"gateway_time,omitempty"`
	Kind        string   `json:"kind"`
	Number      *float64 `json:"number,omitempty"`
	Text        *string  `json:"text,omitempty"`
	Bool        *bool    `json:"bool,omitempty"`
	DataHex     *string  `json:"data_hex,omitempty"`
	Sum         *float64 `json:"sum,omitempty"`
	SensorSeq   *int64   `json:"sensor_seq,omitempty"`
}

func toGolden(rs []buffer.Reading) []goldenReading {
	out := make([]goldenReading, 0, len(rs))
	for _, r := range rs {
		g := goldenReading{Name: r.Name, Sensor: r.Sensor, Metric: r.Metric, Unit: r.Unit,
			GatewayTime: r.GatewayTime, Kind: r.Kind.String()}
		if !r.Time.IsZero() {
			g.Time = r.Time.Format(time.RFC3339Nano)
		}
		switch r.Kind {
		case buffer.KindNumber:
			g.Number = &r.Number
		case buffer.KindString:
			g.Text = &r.Text
		case buffer.KindBool:
			g.Bool = &r.Bool
		case buffer.KindData:
			h := hex.EncodeToString(r.Data)
			g.DataHex = &h
		}
		if r.HasSum {
			g.Sum = &r.Sum
		}
		if r.HasSensorSeq {
			g.SensorSeq = &r.SensorSeq
		}
		out = append(out, g)
	}
	return out
}

func mustTime(t *testing.T, s string) time.Time {
	t.Helper()
	v, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// loadContext reads dir/context.json, filling in the defaults.
func loadContext(t *testing.T, dir string) (Format, *Context) {
	t.Helper()
	g := goldenContext{Format: "auto", Now: "2024-05-01T12:00:00.123456Z", Oldest: "2000-01-01T00:00:00Z", MaxFuture: "10m"}
	if b, err := os.ReadFile(filepath.Join(dir, "context.json")); err == nil {
		dec := json.NewDecoder(bytes.NewReader(b))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&g); err != nil {
			t.Fatalf("context.json: %v", err)
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	f, err := ParseFormat(g.Format)
	if err != nil {
		t.Fatal(err)
	}
	maxFuture, err := time.ParseDuration(g.MaxFuture)
	if err != nil {
		t.Fatal(err)
	}
	c := &Context{Sensor: g.Sensor, Metric: g.Metric, Now: mustTime(t, g.Now), Oldest: mustTime(t, g.Oldest),
		MaxFuture: maxFuture, ClockSynced: g.ClockSynced == nil || *g.ClockSynced}
	return f, c
}

// loadInput reads the input of a case: input.json or input.txt as they are,
// input.cbor as hex (whitespace and # comments to the end of a line ignored).
func loadInput(dir string) ([]byte, error) {
	for _, name := range []string{"input.json", "input.txt"} {
		if b, err := os.ReadFile(filepath.Join(dir, name)); err == nil {
			return b, nil
		}
	}
	b, err := os.ReadFile(filepath.Join(dir, "input.cbor"))
	if err != nil {
		return nil, err
	}
	return parseHex(string(b))
}

func parseHex(s string) ([]byte, error) {
	var clean strings.Builder
	for line := range strings.Lines(s) {
		line, _, _ = strings.Cut(line, "#")
		clean.WriteString(strings.Join(strings.Fields(line), ""))
	}
	return hex.DecodeString(clean.String())
}

func caseDirs(t testing.TB) []string {
	dirs, err := filepath.Glob(filepath.Join("testdata", "*", ""))
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, d := range dirs {
		if st, err := os.Stat(d); err == nil && st.IsDir() && filepath.Base(d) != "fuzz" {
			out = append(out, d)
		}
	}
	if len(out) == 0 {
		t.Fatal("no testdata cases")
	}
	return out
}

// TestGolden decodes each testdata/<case> and compares with its
// expected.json (the readings) or expected.err (reason, then message).
func TestGolden(t *testing.T) {
	for _, dir := range caseDirs(t) {
		t.Run(filepath.Base(dir), func(t *testing.T) {
			f, c := loadContext(t, dir)
			in, err := loadInput(dir)
			if err != nil {
				t.Fatal(err)
			}
			rs, derr := Decode(f, in, c)
			var got []byte
			var gotFile, otherFile string
			if derr != nil {
				var e *Error
				if !errors.As(derr, &e) {
					t.Fatalf("error %v is not an *Error", derr)
				}
				got = []byte(string(e.Reason) + "\n" + e.Msg + "\n")
				gotFile, otherFile = "expected.err", "expected.json"
			} else {
				checkReadings(t, rs, c)
				got, err = json.MarshalIndent(toGolden(rs), "", "  ")
				if err != nil {
					t.Fatal(err)
				}
				got = append(got, '\n')
				gotFile, otherFile = "expected.json", "expected.err"
			}
			if *update {
				if err := os.WriteFile(filepath.Join(dir, gotFile), got, 0o644); err != nil {
					t.Fatal(err)
				}
				os.Remove(filepath.Join(dir, otherFile))
				return
			}
			want, err := os.ReadFile(filepath.Join(dir, gotFile))
			if err != nil {
				t.Fatalf("got %s:\n%s\n(run go test -update to accept)", gotFile, got)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("%s differs\n got: %s\nwant: %s", gotFile, got, want)
			}
		})
	}
}

// checkReadings checks what every accepted reading must satisfy.
func checkReadings(t testing.TB, rs []buffer.Reading, c *Context) {
	t.Helper()
	if len(rs) == 0 {
		t.Fatal("accepted with no readings")
	}
	for i := range rs {
		r := rs[i] // a copy: stamping must not change the caller's
		if r.Time.IsZero() {
			if !r.GatewayTime {
				t.Errorf("reading %d: no time but not GatewayTime", i)
			}
			r.Time = c.Now
		}
		if err := r.Valid(); err != nil {
			t.Errorf("reading %d: %v", i, err)
		}
		if r.Time.Location() != time.UTC || r.Time.Nanosecond()%1000 != 0 {
			t.Errorf("reading %d: time %v is not UTC microseconds", i, r.Time)
		}
		for _, s := range []string{r.Name, r.Unit, r.Text} {
			if !utf8.ValidString(s) || strings.IndexByte(s, 0) >= 0 {
				t.Errorf("reading %d: text %q is not valid UTF-8 without NUL", i, s)
			}
		}
		if !strings.HasPrefix(r.Name, r.Sensor) || !strings.HasSuffix(r.Name, r.Metric) {
			t.Errorf("reading %d: sensor %q / metric %q are not prefix / suffix of %q", i, r.Sensor, r.Metric, r.Name)
		}
		if len(r.Sensor)+len(r.Metric) > len(r.Name) {
			t.Errorf("reading %d: sensor %q and metric %q overlap in %q", i, r.Sensor, r.Metric, r.Name)
		}
		if !r.GatewayTime && (r.Time.Before(c.Oldest) || c.ClockSynced && r.Time.After(c.Now.Add(c.MaxFuture))) {
			t.Errorf("reading %d: sensor time %v outside the window", i, r.Time)
		}
		if !r.Received.IsZero() || r.ClockSynced || !r.Boot.IsZero() || r.Mono != 0 {
			t.Errorf("reading %d: decoder set a field of the caller", i)
		}
	}
}

// checkError checks what every rejection must satisfy.
func checkError(t testing.TB, err error) {
	t.Helper()
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("error %T %v is not an *Error", err, err)
	}
	switch e.Reason {
	case ReasonMalformed, ReasonBadValue, ReasonBadTime, ReasonUnsupportedFormat:
	default:
		t.Fatalf("unknown reason %q", e.Reason)
	}
	if e.Msg == "" || len(e.Msg) > 300 || !utf8.ValidString(e.Msg) || strings.ContainsAny(e.Msg, "\x00\n") {
		t.Fatalf("message %q is not a short line of text", e.Msg)
	}
}

func TestParseFormat(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want Format
		err  bool
	}{
		{"auto", FormatAuto, false},
		{"senml", FormatSenMLJSON, false},
		{"senml+json", FormatSenMLJSON, false},
		{"senml+cbor", FormatSenMLCBOR, false},
		{"cbor", FormatSenMLCBOR, false},
		{"json", FormatJSON, false},
		{"value", FormatValue, false},
		{"", 0, true},
		{"JSON", 0, true},
		{"xml", 0, true},
	} {
		t.Run(tc.in, func(t *testing.T) {
			got, err := ParseFormat(tc.in)
			if tc.err {
				if err == nil || !strings.Contains(err.Error(), "\""+tc.in+"\"") {
					t.Fatalf("ParseFormat(%q) = %v, %v; want an error naming it", tc.in, got, err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("ParseFormat(%q) = %v, %v; want %v", tc.in, got, err, tc.want)
			}
		})
	}
	for f := FormatAuto; f <= FormatValue; f++ {
		if back, err := ParseFormat(f.String()); err != nil || back != f {
			t.Errorf("ParseFormat(%v.String()) = %v, %v", int(f), back, err)
		}
	}
	if s := Format(42).String(); s != "format(42)" {
		t.Errorf("Format(42).String() = %q", s)
	}
}

func TestDetect(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   string
		want Format
		ok   bool
	}{
		{"empty", "", 0, false},
		{"whitespace", " \t\r\n", 0, false},
		{"senml json", `[{"v":1}]`, FormatSenMLJSON, true},
		{"senml json after whitespace", "\r\n\t [", FormatSenMLJSON, true},
		{"flat json", `{"value":1}`, FormatJSON, true},
		{"flat json after whitespace", "  {", FormatJSON, true},
		{"cbor array 0", "\x80", FormatSenMLCBOR, true},
		{"cbor array 1", "\x81\xa1", FormatSenMLCBOR, true},
		{"cbor array 4-byte length", "\x9a\x00\x00\x00\x01", FormatSenMLCBOR, true},
		{"cbor indefinite array", "\x9f", FormatSenMLCBOR, true},
		{"cbor map is not a pack", "\xa1", FormatValue, true},
		{"number", "21.5", FormatValue, true},
		{"number after whitespace", "  -3", FormatValue, true},
		{"text", "hello", FormatValue, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := detect([]byte(tc.in))
			if got != tc.want || ok != tc.ok {
				t.Fatalf("detect(%q) = %v, %v; want %v, %v", tc.in, got, ok, tc.want, tc.ok)
			}
		})
	}
}

// TestDecodeSharesNoMemory checks that readings stay intact when the caller
// reuses the payload buffer, as MQTT and CoAP libraries do.
func TestDecodeSharesNoMemory(t *testing.T) {
	c := &Context{Now: time.Date(2024, 5, 1, 12, 0, 0, 0, time.UTC)}
	for _, in := range []string{
		`[{"bn":"dev:","n":"a","u":"V","vs":"hello"},{"n":"b","vd":"aGkgCg"}]`,
		"\x82\xa3\x00\x61\x61\x01\x61\x56\x03\x65\x68\x65\x6c\x6c\x6f\xa2\x00\x61\x62\x08\x42\x01\x02",
		`{"sensor":"dev","metric":"a","value":"hello","unit":"V"}`,
	} {
		payload := []byte(in)
		rs, err := Decode(FormatAuto, payload, c)
		if err != nil {
			t.Fatalf("%q: %v", in, err)
		}
		before := toGolden(rs)
		for i := range payload {
			payload[i] = 'X'
		}
		if after := toGolden(rs); !slices.EqualFunc(before, after, func(a, b goldenReading) bool {
			x, _ := json.Marshal(a)
			y, _ := json.Marshal(b)
			return bytes.Equal(x, y)
		}) {
			t.Errorf("%q: readings changed with the payload", in)
		}
	}
}

// TestHostileLengths checks that lengths a CBOR header claims are not
// allocated before the bytes are there.
func TestHostileLengths(t *testing.T) {
	c := &Context{Now: time.Now()}
	for _, in := range []string{
		"\x9b\x00\x00\x00\x01\x00\x00\x00\x00",         // array of 2^32 records
		"\x9a\xff\xff\xff\xff\xa1\x00",                 // array of 4 GiB - 1
		"\x81\xbb\x00\x00\x00\x01\x00\x00\x00\x00",     // map of 2^32 pairs
		"\x81\xa1\x00\x7a\xff\xff\xff\xff",             // text of 4 GiB
		"\x81\xa1\x08\x5b\xff\xff\xff\xff\xff\xff\xff", // bytes of 2^64-1
	} {
		allocs := testing.AllocsPerRun(10, func() {
			if _, err := Decode(FormatSenMLCBOR, []byte(in), c); err == nil {
				t.Fatalf("%x accepted", in)
			}
		})
		if allocs > 10 {
			t.Errorf("%x: %v allocations", in, allocs)
		}
	}
}

// TestManyUnknownFields checks that duplicate detection stays linear.
func TestManyUnknownFields(t *testing.T) {
	var b strings.Builder
	b.WriteString(`[{"n":"a","v":1`)
	for i := range 5000 {
		b.WriteString(`,"x`)
		b.WriteString(strings.Repeat("y", i%7))
		b.WriteString(strconv.Itoa(i))
		b.WriteString(`":1`)
	}
	b.WriteString(`,"x0":2}]`)
	start := time.Now()
	_, err := Decode(FormatSenMLJSON, []byte(b.String()), &Context{Now: time.Now()})
	var e *Error
	if !errors.As(err, &e) || e.Reason != ReasonMalformed || !strings.Contains(e.Msg, `"x0" appears twice`) {
		t.Fatalf("got %v", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("took %v", d)
	}
}

func TestNilContext(t *testing.T) {
	rs, err := Decode(FormatSenMLJSON, []byte(`[{"n":"a","v":1}]`), nil)
	if err != nil || len(rs) != 1 || !rs[0].GatewayTime {
		t.Fatalf("got %v, %v", rs, err)
	}
	if _, err := Decode(Format(99), []byte(`1`), nil); err == nil {
		t.Fatal("unknown format accepted")
	} else {
		checkError(t, err)
	}
}

func TestQuote(t *testing.T) {
	long := strings.Repeat("é", 30) // 60 bytes
	q := quote([]byte(long))
	if !strings.HasSuffix(q, "...") || len(q) > maxQuote+10 || !utf8.ValidString(q) {
		t.Errorf("quote(%q) = %q", long, q)
	}
	if q := quote([]byte("a\x00\xff")); q != `"a\x00\xff"` {
		t.Errorf("quote = %s", q)
	}
}
