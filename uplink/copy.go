package uplink

import (
	"context"
	"encoding/binary"
	"io"
	"math"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/sluice-gw/sluice/buffer"
)

// ReadingColumns are sluice.readings' columns in COPY order.
var ReadingColumns = []string{
	"gateway_id", "site", "name", "sensor", "metric", "unit", "ts",
	"value", "value_text", "value_bool", "value_data", "value_sum",
	"sensor_seq", "received_at", "clock_synced",
}

// copyReadings copies recs into table (sluice.readings, or the batch's temp
// table of the same shape) in PostgreSQL's binary COPY format, written here
// rather than by pgx's CopyFrom: that one boxes every value in an interface
// and looks up an encode plan for it, which was a sixth of the gateway's CPU
// while uploading. The columns and their types are fixed by the schema, so
// the encoding is too. It returns the rows copied.
func copyReadings(ctx context.Context, conn *pgconn.PgConn, table, gatewayID, site string, recs []buffer.Record) (int64, error) {
	sql := "COPY " + table + " (" + strings.Join(ReadingColumns, ", ") + ") FROM STDIN (FORMAT binary)"
	tag, err := conn.CopyFrom(ctx, &copyStream{gatewayID: gatewayID, site: site, recs: recs}, sql)
	if err != nil {
		return 0, err
	}
	return tag.RowsAffected(), nil
}

// copyStream is the COPY data of a batch, encoded a row at a time as the
// connection reads it, so a batch never exists twice in memory.
type copyStream struct {
	gatewayID, site string
	recs            []buffer.Record
	next            int    // the next record to encode
	started, done   bool   // header written; trailer written
	pending         []byte // encoded, not yet read
	scratch         []byte
}

// Binary COPY framing (PostgreSQL manual, "COPY", Binary Format).
var copyHeader = []byte("PGCOPY\n\xff\r\n\x00\x00\x00\x00\x00\x00\x00\x00\x00")

const copyTrailer = 0xffff // a field count of -1

func (s *copyStream) Read(p []byte) (int, error) {
	n := 0
	for n < len(p) {
		if len(s.pending) == 0 {
			if s.done {
				break
			}
			s.pending = s.encodeNext(s.scratch[:0])
			s.scratch = s.pending[:0]
		}
		c := copy(p[n:], s.pending)
		n += c
		s.pending = s.pending[c:]
	}
	if n == 0 && s.done {
		return 0, io.EOF
	}
	return n, nil
}

// encodeNext appends the header, the next row or the trailer to b.
func (s *copyStream) encodeNext(b []byte) []byte {
	switch {
	case !s.started:
		s.started = true
		return append(b, copyHeader...)
	case s.next < len(s.recs):
		r := &s.recs[s.next].Reading
		s.next++
		return appendCopyRow(b, s.gatewayID, s.site, r)
	default:
		s.done = true
		return binary.BigEndian.AppendUint16(b, copyTrailer)
	}
}

// appendCopyRow appends r as one binary COPY tuple in ReadingColumns order.
// A field of length -1 is NULL: of the four value columns, only the one of
// the reading's kind is set.
func appendCopyRow(b []byte, gatewayID, site string, r *buffer.Reading) []byte {
	b = binary.BigEndian.AppendUint16(b, uint16(len(ReadingColumns)))
	b = appendCopyBytes(b, true, gatewayID)
	b = appendCopyBytes(b, true, site)
	b = appendCopyBytes(b, true, r.Name)
	b = appendCopyBytes(b, true, r.Sensor)
	b = appendCopyBytes(b, true, r.Metric)
	b = appendCopyBytes(b, true, r.Unit)
	b = appendCopyTime(b, r.Time)
	b = appendCopyUint64(b, r.Kind == buffer.KindNumber, math.Float64bits(r.Number))
	b = appendCopyBytes(b, r.Kind == buffer.KindString, r.Text)
	b = appendCopyBool(b, r.Kind == buffer.KindBool, r.Bool)
	b = appendCopyBytes(b, r.Kind == buffer.KindData, r.Data)
	b = appendCopyUint64(b, r.HasSum, math.Float64bits(r.Sum))
	b = appendCopyUint64(b, r.HasSensorSeq, uint64(r.SensorSeq))
	b = appendCopyTime(b, r.Received)
	return appendCopyBool(b, true, r.ClockSynced)
}

const copyNullLength = math.MaxUint32 // -1 as an int32

// appendCopyBytes appends text or bytea (the binary form of both is the bytes).
func appendCopyBytes[T string | []byte](b []byte, ok bool, v T) []byte {
	if !ok {
		return binary.BigEndian.AppendUint32(b, copyNullLength)
	}
	b = binary.BigEndian.AppendUint32(b, uint32(len(v)))
	return append(b, v...)
}

// appendCopyUint64 appends a float8 (as its bits) or an int8.
func appendCopyUint64(b []byte, ok bool, v uint64) []byte {
	if !ok {
		return binary.BigEndian.AppendUint32(b, copyNullLength)
	}
	b = binary.BigEndian.AppendUint32(b, 8)
	return binary.BigEndian.AppendUint64(b, v)
}

func appendCopyBool(b []byte, ok, v bool) []byte {
	if !ok {
		return binary.BigEndian.AppendUint32(b, copyNullLength)
	}
	b = binary.BigEndian.AppendUint32(b, 1)
	if v {
		return append(b, 1)
	}
	return append(b, 0)
}

// postgresEpoch is where timestamptz's binary form counts microseconds from.
var postgresEpoch = time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC).UnixMicro()

func appendCopyTime(b []byte, t time.Time) []byte {
	b = binary.BigEndian.AppendUint32(b, 8)
	return binary.BigEndian.AppendUint64(b, uint64(t.UnixMicro()-postgresEpoch))
}
