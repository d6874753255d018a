package buffer

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"strings"
	"time"
)

// recordVersion is the first byte of every stored record. A reader refuses a
// version it does not know rather than guessing at its layout.
const recordVersion = 1

// Flag bits of a version 1 record.
const (
	flagKindMask       = 0x7
	flagBool           = 1 << 3
	flagSum            = 1 << 4
	flagSeq            = 1 << 5
	flagClockSynced    = 1 << 6
	flagGatewayTime    = 1 << 7
	flagBoot           = 1 << 8
	flagExplicitNames  = 1 << 9
	flagKnown          = 1<<10 - 1
	maxEncodedTimeUsec = math.MaxInt64 / 2
)

// errRecord is wrapped by every decoding failure.
var errRecord = errors.New("bad record")

// AppendRecord appends the version 1 encoding of r to dst. Times are kept to
// the microsecond; anything finer is dropped.
//
// Layout: version, uvarint flags, varint time (µs since the epoch), varint
// received-minus-time (µs), name, sensor and metric as a prefix length and a
// suffix offset into name (or as strings when they are not part of it), unit,
// the value, then sum, sensor sequence and boot/monotonic time when flagged.
// Strings are a uvarint length and the bytes.
func AppendRecord(dst []byte, r *Reading) []byte {
	flags := uint64(r.Kind) & flagKindMask
	if r.Kind == KindBool && r.Bool {
		flags |= flagBool
	}
	if r.HasSum {
		flags |= flagSum
	}
	if r.HasSensorSeq {
		flags |= flagSeq
	}
	if r.ClockSynced {
		flags |= flagClockSynced
	}
	if r.GatewayTime {
		flags |= flagGatewayTime
	}
	if !r.Boot.IsZero() {
		flags |= flagBoot
	}
	sensorLen, metricOff, inName := namePlaces(r)
	if !inName {
		flags |= flagExplicitNames
	}
	ts := r.Time.UnixMicro()
	dst = append(dst, recordVersion)
	dst = binary.AppendUvarint(dst, flags)
	dst = binary.AppendVarint(dst, ts)
	dst = binary.AppendVarint(dst, r.Received.UnixMicro()-ts)
	dst = appendString(dst, r.Name)
	if inName {
		dst = binary.AppendUvarint(dst, uint64(sensorLen))
		dst = binary.AppendUvarint(dst, uint64(metricOff))
	} else {
		dst = appendString(dst, r.Sensor)
		dst = appendString(dst, r.Metric)
	}
	dst = appendString(dst, r.Unit)
	switch r.Kind {
	case KindNumber:
		dst = binary.LittleEndian.AppendUint64(dst, math.Float64bits(r.Number))
	case KindString:
		dst = appendString(dst, r.Text)
	case KindData:
		dst = binary.AppendUvarint(dst, uint64(len(r.Data)))
		dst = append(dst, r.Data...)
	}
	if r.HasSum {
		dst = binary.LittleEndian.AppendUint64(dst, math.Float64bits(r.Sum))
	}
	if r.HasSensorSeq {
		dst = binary.AppendVarint(dst, r.SensorSeq)
	}
	if !r.Boot.IsZero() {
		dst = append(dst, r.Boot[:]...)
		dst = binary.AppendVarint(dst, r.Mono.Microseconds())
	}
	return dst
}

// namePlaces finds sensor as a prefix of name and metric as its suffix, the
// usual case, so that neither is stored twice.
func namePlaces(r *Reading) (sensorLen, metricOff int, ok bool) {
	if !strings.HasPrefix(r.Name, r.Sensor) || !strings.HasSuffix(r.Name, r.Metric) {
		return 0, 0, false
	}
	return len(r.Sensor), len(r.Name) - len(r.Metric), true
}

func appendString(dst []byte, s string) []byte {
	dst = binary.AppendUvarint(dst, uint64(len(s)))
	return append(dst, s...)
}

// DecodeRecord decodes one record made by AppendRecord. The result shares no
// memory with b, so b may be a bbolt value that is only valid in its transaction.
func DecodeRecord(b []byte) (Reading, error) { return decodeRecord(b, nil) }

// decodeRecord is DecodeRecord with the strings made by str (nil: each its
// own copy).
func decodeRecord(b []byte, str func([]byte) string) (Reading, error) {
	d := decoder{b: b, str: str}
	var r Reading
	if v := d.byte(); v != recordVersion {
		if d.err != nil {
			return r, d.err
		}
		return r, fmt.Errorf("%w: unknown record version %d", errRecord, v)
	}
	flags := d.uvarint()
	if flags&^flagKnown != 0 {
		return r, fmt.Errorf("%w: unknown flags %#x", errRecord, flags)
	}
	r.Kind = Kind(flags & flagKindMask)
	if r.Kind >= kindLimit {
		return r, fmt.Errorf("%w: unknown value kind %d", errRecord, r.Kind)
	}
	if flags&flagBool != 0 && r.Kind != KindBool {
		return r, fmt.Errorf("%w: bool flag on a %s value", errRecord, r.Kind)
	}
	ts := d.varint()
	recv := d.varint()
	if ts > maxEncodedTimeUsec || ts < -maxEncodedTimeUsec || recv > maxEncodedTimeUsec || recv < -maxEncodedTimeUsec {
		return r, fmt.Errorf("%w: time out of range", errRecord)
	}
	r.Time = time.UnixMicro(ts).UTC()
	r.Received = time.UnixMicro(ts + recv).UTC()
	r.Name = d.string()
	if flags&flagExplicitNames != 0 {
		r.Sensor = d.string()
		r.Metric = d.string()
	} else {
		sensorLen, metricOff := d.uvarint(), d.uvarint()
		if d.err == nil && (sensorLen > uint64(len(r.Name)) || metricOff > uint64(len(r.Name))) {
			return r, fmt.Errorf("%w: sensor or metric outside the name", errRecord)
		}
		if d.err == nil {
			r.Sensor = r.Name[:sensorLen]
			r.Metric = r.Name[metricOff:]
		}
	}
	r.Unit = d.string()
	switch r.Kind {
	case KindNumber:
		r.Number = math.Float64frombits(d.uint64())
	case KindString:
		r.Text = d.string()
	case KindBool:
		r.Bool = flags&flagBool != 0
	case KindData:
		if s := d.string(); s != "" {
			r.Data = []byte(s)
		}
	}
	if flags&flagSum != 0 {
		r.HasSum = true
		r.Sum = math.Float64frombits(d.uint64())
	}
	if flags&flagSeq != 0 {
		r.HasSensorSeq = true
		r.SensorSeq = d.varint()
	}
	r.ClockSynced = flags&flagClockSynced != 0
	r.GatewayTime = flags&flagGatewayTime != 0
	if flags&flagBoot != 0 {
		copy(r.Boot[:], d.bytes(len(r.Boot)))
		mono := d.varint()
		if mono > math.MaxInt64/1000 || mono < math.MinInt64/1000 {
			return r, fmt.Errorf("%w: monotonic time out of range", errRecord)
		}
		r.Mono = time.Duration(mono) * time.Microsecond
		if d.err == nil && r.Boot.IsZero() {
			return r, fmt.Errorf("%w: zero boot id", errRecord)
		}
	}
	if d.err != nil {
		return r, d.err
	}
	if len(d.b) != 0 {
		return r, fmt.Errorf("%w: %d trailing bytes", errRecord, len(d.b))
	}
	if err := r.Valid(); err != nil {
		return r, fmt.Errorf("%w: %w", errRecord, err)
	}
	return r, nil
}

// decoder reads fields in order and remembers the first error, so the caller
// checks once at the end.
type decoder struct {
	b   []byte
	err error
	str func([]byte) string // makes a string of bytes in b; nil: a copy each
}

func (d *decoder) fail(what string) {
	if d.err == nil {
		d.err = fmt.Errorf("%w: truncated %s", errRecord, what)
	}
	d.b = nil
}

func (d *decoder) byte() byte {
	if len(d.b) < 1 {
		d.fail("byte")
		return 0
	}
	v := d.b[0]
	d.b = d.b[1:]
	return v
}

func (d *decoder) uvarint() uint64 {
	v, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.fail("uvarint")
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) varint() int64 {
	v, n := binary.Varint(d.b)
	if n <= 0 {
		d.fail("varint")
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) uint64() uint64 {
	if len(d.b) < 8 {
		d.fail("float")
		return 0
	}
	v := binary.LittleEndian.Uint64(d.b)
	d.b = d.b[8:]
	return v
}

func (d *decoder) bytes(n int) []byte {
	if n < 0 || len(d.b) < n {
		d.fail("bytes")
		return nil
	}
	v := d.b[:n]
	d.b = d.b[n:]
	return v
}

func (d *decoder) string() string {
	n := d.uvarint()
	if n > uint64(len(d.b)) {
		d.fail("string")
		return ""
	}
	b := d.bytes(int(n))
	if d.str != nil {
		return d.str(b)
	}
	return string(b)
}
