package bench

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/sluice-gw/sluice/buffer"
	"github.com/sluice-gw/sluice/gateway/senml"
	"github.com/sluice-gw/sluice/uplink"
)

// Readings decodes messages n0 .. n0+n-1 of w as the gateway's MQTT ingress
// does (topic pattern defaults, format auto) and stamps them received at now
// with a synchronised clock.
func (w Workload) Readings(n0, n int, now time.Time) ([]buffer.Reading, error) {
	out := make([]buffer.Reading, 0, n*w.ReadingsPer())
	ctx := &senml.Context{Now: now, Oldest: time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC), MaxFuture: 10 * time.Minute, ClockSynced: true}
	var payload []byte
	for i := n0; i < n0+n; i++ {
		ctx.Sensor, ctx.Metric = w.topicDefaults(i)
		payload = w.AppendPayload(payload[:0], i)
		rs, err := senml.Decode(senml.FormatAuto, payload, ctx)
		if err != nil {
			return nil, fmt.Errorf("decode message %d (%s): %w", i, payload, err)
		}
		for k := range rs {
			rs[k].Received = now
			rs[k].ClockSynced = true
		}
		out = append(out, rs...)
	}
	return out, nil
}

// topicDefaults are what the gateway's topic pattern takes from message i's topic.
func (w Workload) topicDefaults(i int) (sensor, metric string) {
	if w.Shape == SenML10 {
		return fmt.Sprintf("meter-%d", i%w.sensors()), ""
	}
	return fmt.Sprintf("feeder-%d", i%w.sensors()), "voltage"
}

// FillBuffer appends messages 0 .. n-1 of w to the buffer that opts open, a
// thousand readings to a transaction, and closes it: the backlog a gateway
// holds after an outage. It returns the readings appended.
func FillBuffer(ctx context.Context, opts buffer.Options, w Workload, n int) (int, error) {
	b, err := buffer.Open(opts)
	if err != nil {
		return 0, err
	}
	per := max(1, 1000/w.ReadingsPer())
	total := 0
	for i := 0; i < n && err == nil; i += per {
		var rs []buffer.Reading
		rs, err = w.Readings(i, min(per, n-i), time.Now())
		if err == nil {
			_, err = b.Append(ctx, buffer.Message{Class: buffer.ClassTelemetry, Readings: rs})
			total += len(rs)
		}
	}
	if cerr := b.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return total, fmt.Errorf("fill buffer: %w", err)
	}
	return total, nil
}

// Migrate applies the central schema to the database at dsn, with today's
// partitions, as the gateway does at its first upload.
func Migrate(ctx context.Context, dsn string) error {
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return fmt.Errorf("connect for migration: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if _, _, err := uplink.Migrate(ctx, conn); err != nil {
		return err
	}
	if _, err := conn.Exec(ctx, "SELECT sluice.ensure_partitions(7)"); err != nil {
		return fmt.Errorf("create partitions: %w", err)
	}
	return nil
}

// CountRows counts sluice.readings.
func CountRows(ctx context.Context, dsn string) (int64, error) {
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return 0, fmt.Errorf("connect to count rows: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	var n int64
	if err := conn.QueryRow(ctx, "SELECT count(*) FROM sluice.readings").Scan(&n); err != nil {
		return 0, fmt.Errorf("count rows: %w", err)
	}
	return n, nil
}

// CopyCeiling is the raw Postgres ceiling of the drain: messages 0 .. n-1 of
// w copied straight into sluice.readings (already migrated) with pgx
// CopyFrom, batch rows to a COPY, each COPY its own transaction, on one
// connection. Only the COPYs are timed; the rows of a batch are made before it.
// It returns the rows copied and the time the COPYs took.
func CopyCeiling(ctx context.Context, dsn, gatewayID, site string, w Workload, n, batch int) (int64, time.Duration, error) {
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return 0, 0, fmt.Errorf("connect for copy: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	per := max(1, batch/w.ReadingsPer())
	var rows int64
	var took time.Duration
	for i := 0; i < n; i += per {
		rs, err := w.Readings(i, min(per, n-i), time.Now())
		if err != nil {
			return rows, took, err
		}
		src := make([][]any, len(rs))
		for k := range rs {
			src[k] = readingRow(gatewayID, site, &rs[k])
		}
		start := time.Now()
		c, err := conn.CopyFrom(ctx, pgx.Identifier{"sluice", "readings"}, uplink.ReadingColumns, pgx.CopyFromRows(src))
		took += time.Since(start)
		rows += c
		if err != nil {
			return rows, took, fmt.Errorf("copy rows: %w", err)
		}
	}
	return rows, took, nil
}

// readingRow is r's values in uplink.ReadingColumns order, as pgx's CopyFrom
// takes them.
func readingRow(gatewayID, site string, r *buffer.Reading) []any {
	var value, text, boolean, data, sum, seq any
	switch r.Kind {
	case buffer.KindNumber:
		value = r.Number
	case buffer.KindString:
		text = r.Text
	case buffer.KindBool:
		boolean = r.Bool
	case buffer.KindData:
		data = r.Data
	}
	if r.HasSum {
		sum = r.Sum
	}
	if r.HasSensorSeq {
		seq = r.SensorSeq
	}
	return []any{gatewayID, site, r.Name, r.Sensor, r.Metric, r.Unit, r.Time,
		value, text, boolean, data, sum, seq, r.Received, r.ClockSynced}
}
