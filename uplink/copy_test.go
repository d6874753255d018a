package uplink

import (
	"context"
	"fmt"
	"math"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/sluice-gw/sluice/buffer"
	"github.com/sluice-gw/sluice/internal/testenv"
)

// copyCases are readings that between them set every column and leave each
// nullable one NULL, with text that is not ASCII.
func copyCases() []buffer.Reading {
	at := time.Date(2026, 12, 3, 10, 0, 0, 123456000, time.UTC)
	base := func(metric string, i int) buffer.Reading {
		return buffer.Reading{Name: "pump-7:" + metric, Sensor: "pump-7", Metric: metric,
			Time: at.Add(time.Duration(i) * time.Second), Received: at.Add(time.Minute), ClockSynced: i%2 == 0}
	}
	num := base("flow", 0)
	num.Unit, num.Kind, num.Number = "m3/h", buffer.KindNumber, -12.375
	num.HasSum, num.Sum = true, 1e12
	num.HasSensorSeq, num.SensorSeq = true, math.MaxInt64
	text := base("état", 1)
	text.Kind, text.Text = buffer.KindString, "vanne fermée ✓"
	yes := base("open", 2)
	yes.Kind, yes.Bool = buffer.KindBool, true
	no := base("closed", 3)
	no.Kind, no.Bool = buffer.KindBool, false
	data := base("blob", 4)
	data.Kind, data.Data = buffer.KindData, []byte{0, 1, 0xfe, 0xff}
	sumOnly := base("energy", 5)
	sumOnly.Unit, sumOnly.HasSum, sumOnly.Sum = "Wh", true, 42.5
	old := base("old", 6)
	old.Time, old.Kind, old.Number = time.Date(1999, 12, 31, 23, 59, 59, 999999000, time.UTC), buffer.KindNumber, 1
	return []buffer.Reading{num, text, yes, no, data, sumOnly, old}
}

// TestCopyRoundTripsEveryField: the binary COPY encoding, read back by
// pgx's own decoders, gives every field as it was, through the direct COPY
// and through the temp table and ON CONFLICT way.
func TestCopyRoundTripsEveryField(t *testing.T) {
	dsn := testenv.SharedPostgres(t).NewDatabase(t)
	b := openBuffer(t)
	u := newUplink(t, dsn, b, nil)
	want := copyCases()
	if _, err := b.Append(context.Background(), buffer.Message{Class: buffer.ClassTelemetry, Readings: want}); err != nil {
		t.Fatal(err)
	}
	runUntil(t, u, 30*time.Second, func() bool { return b.Stats().Readings == 0 })
	check(t, dsn, want, "direct COPY")

	// The same readings again, with one new one: the direct COPY meets the
	// natural key and the batch goes the temp table way.
	extra := want[0]
	extra.Metric, extra.Name = "flow2", "pump-7:flow2"
	again := append(copyCases(), extra)
	if _, err := b.Append(context.Background(), buffer.Message{Class: buffer.ClassTelemetry, Readings: again}); err != nil {
		t.Fatal(err)
	}
	runUntil(t, u, 30*time.Second, func() bool { return b.Stats().Readings == 0 })
	if left := u.conflictWay.Load(); left != conflictBatches {
		t.Fatalf("the batch with duplicates did not take the ON CONFLICT way (%d batches left)", left)
	}
	check(t, dsn, append(want, extra), "temp table and ON CONFLICT")
}

func check(t *testing.T, dsn string, want []buffer.Reading, path string) {
	t.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	for _, w := range want {
		var (
			gw, site, sensor, metric, unit string
			ts, received                   time.Time
			value, sum                     *float64
			text                           *string
			boolean                        *bool
			data                           []byte
			seq                            *int64
			synced                         bool
		)
		err := conn.QueryRow(ctx, `SELECT gateway_id, site, sensor, metric, unit, ts, value, value_text, value_bool,
			value_data, value_sum, sensor_seq, received_at, clock_synced FROM sluice.readings WHERE name = $1`, w.Name).
			Scan(&gw, &site, &sensor, &metric, &unit, &ts, &value, &text, &boolean, &data, &sum, &seq, &received, &synced)
		if err != nil {
			t.Fatalf("%s: reading %s: %v", path, w.Name, err)
		}
		got := fmt.Sprintf("%s %s %s %s %q %s %v %v %v %x %v %v %s %v", gw, site, sensor, metric, unit, ts.UTC().Format(time.RFC3339Nano),
			deref(value), deref(text), deref(boolean), data, deref(sum), deref(seq), received.UTC().Format(time.RFC3339Nano), synced)
		exp := fmt.Sprintf("gw-test site-a %s %s %q %s %v %v %v %x %v %v %s %v", w.Sensor, w.Metric, w.Unit, w.Time.Format(time.RFC3339Nano),
			orNil(w.Kind == buffer.KindNumber, w.Number), orNil(w.Kind == buffer.KindString, w.Text), orNil(w.Kind == buffer.KindBool, w.Bool),
			w.Data, orNil(w.HasSum, w.Sum), orNil(w.HasSensorSeq, w.SensorSeq), w.Received.Format(time.RFC3339Nano), w.ClockSynced)
		if got != exp {
			t.Errorf("%s: %s\n got %s\nwant %s", path, w.Name, got, exp)
		}
	}
	if n := count(t, dsn, "SELECT count(*) FROM sluice.readings"); n != int64(len(want)) {
		t.Fatalf("%s: %d rows, want %d", path, n, len(want))
	}
}

func deref[T any](p *T) any {
	if p == nil {
		return nil
	}
	return *p
}

func orNil[T any](ok bool, v T) any {
	if !ok {
		return nil
	}
	return v
}
