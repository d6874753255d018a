package buffer

import (
	"encoding/hex"
	"flag"
	"math"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

var update = flag.Bool("update", false, "rewrite golden files")

func encodingCases() map[string]Reading {
	ts := time.Date(2026, 3, 1, 8, 30, 0, 123456000, time.UTC)
	base := Reading{Name: "urn:dev:ow:10e2073a01080063:temp", Sensor: "urn:dev:ow:10e2073a01080063", Metric: "temp",
		Unit: "Cel", Time: ts, Received: ts.Add(1500 * time.Microsecond), ClockSynced: true}
	with := func(f func(*Reading)) Reading { r := base; f(&r); return r }
	return map[string]Reading{
		"number": with(func(r *Reading) { r.Kind, r.Number = KindNumber, 23.1 }),
		"string": with(func(r *Reading) { r.Kind, r.Text, r.Unit = KindString, "open ✓", "" }),
		"bool":   with(func(r *Reading) { r.Kind, r.Bool = KindBool, true }),
		"data":   with(func(r *Reading) { r.Kind, r.Data = KindData, []byte{0, 1, 2, 0xff} }),
		"sum-only": with(func(r *Reading) {
			r.Kind, r.HasSum, r.Sum, r.Unit = KindNone, true, 1234.5, "kWh"
		}),
		"sum-and-seq": with(func(r *Reading) {
			r.Kind, r.Number, r.HasSum, r.Sum, r.HasSensorSeq, r.SensorSeq = KindNumber, -1, true, 9, true, 1<<40
		}),
		"unsynced-gateway-time": with(func(r *Reading) {
			r.Kind, r.Number, r.ClockSynced, r.GatewayTime = KindNumber, 1, false, true
			r.Time = time.Date(1970, 1, 1, 0, 0, 42, 0, time.UTC)
			r.Received = r.Time
			r.Boot = BootID{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16}
			r.Mono = 42*time.Second + 17*time.Microsecond
		}),
		"names-not-in-name": with(func(r *Reading) {
			r.Kind, r.Number, r.Sensor, r.Metric = KindNumber, 0, "other", "thing"
		}),
		"extreme-numbers": with(func(r *Reading) {
			r.Kind, r.Number, r.HasSum, r.Sum = KindNumber, math.MaxFloat64, true, -math.SmallestNonzeroFloat64
		}),
		"before-epoch": with(func(r *Reading) {
			r.Kind, r.Number = KindNumber, 3
			r.Time = time.Date(1901, 12, 13, 20, 45, 52, 1000, time.UTC)
		}),
	}
}

// TestRecordGolden pins the on-disk encoding: a change to these bytes is a
// format change and needs a new record version.
func TestRecordGolden(t *testing.T) {
	for name, r := range encodingCases() {
		t.Run(name, func(t *testing.T) {
			enc := AppendRecord(nil, &r)
			path := filepath.Join("testdata", "record-"+name+".hex")
			if *update {
				if err := os.WriteFile(path, []byte(hex.EncodeToString(enc)+"\n"), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("read golden file (run with -update to create): %v", err)
			}
			if got := hex.EncodeToString(enc); got != strings.TrimSpace(string(want)) {
				t.Fatalf("encoding changed:\n got %s\nwant %s", got, want)
			}
			dec, err := DecodeRecord(enc)
			if err != nil {
				t.Fatalf("decode: %v", err)
			}
			if !reflect.DeepEqual(dec, r) {
				t.Fatalf("round trip:\n got %+v\nwant %+v", dec, r)
			}
		})
	}
}

func TestDecodeRecordRejects(t *testing.T) {
	good := encodingCases()["sum-and-seq"]
	enc := AppendRecord(nil, &good)
	cases := map[string][]byte{
		"empty":          nil,
		"version 2":      append([]byte{2}, enc[1:]...),
		"truncated":      enc[:len(enc)-1],
		"trailing bytes": append(append([]byte{}, enc...), 0),
		"unknown flag":   {1, 0x80, 0x10},
		"bool flag on a number": func() []byte {
			e := append([]byte{}, enc...)
			e[1] |= flagBool
			return e
		}(),
	}
	for name, b := range cases {
		t.Run(name, func(t *testing.T) {
			if _, err := DecodeRecord(b); err == nil {
				t.Fatal("decoded without error")
			}
		})
	}
}

func FuzzDecodeRecord(f *testing.F) {
	for _, r := range encodingCases() {
		f.Add(AppendRecord(nil, &r))
	}
	f.Add([]byte{1, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := DecodeRecord(b)
		if err != nil {
			return
		}
		// Whatever decodes re-encodes to something that decodes the same.
		again, err := DecodeRecord(AppendRecord(nil, &r))
		if err != nil {
			t.Fatalf("re-encoded record does not decode: %v", err)
		}
		if !reflect.DeepEqual(normalized(again), normalized(r)) {
			t.Fatalf("round trip changed the record:\n%+v\n%+v", r, again)
		}
	})
}

// normalized makes NaN-free float comparison exact by comparing bits.
func normalized(r Reading) Reading {
	r.Number = math.Float64frombits(math.Float64bits(r.Number))
	return r
}
