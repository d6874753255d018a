package senml

import (
	"bytes"
	"encoding/base64"
	"math"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/sluice-gw/sluice/buffer"
)

// SenML fields, by index; the CBOR labels are in cborLabel.
const (
	iBN = iota
	iBT
	iBU
	iBV
	iBS
	iBVer
	iN
	iU
	iV
	iVS
	iVB
	iVD
	iS
	iT
	iUT
	numFields
)

// labels are the JSON labels of the fields, RFC 8428 Table 1.
var labels = [numFields]string{"bn", "bt", "bu", "bv", "bs", "bver", "n", "u", "v", "vs", "vb", "vd", "s", "t", "ut"}

// What a field holds, RFC 8428 Table 1.
type fieldType uint8

const (
	tText fieldType = iota
	tNumber
	tBool
	tData
	tVersion // an unsigned integer
)

var fieldTypes = [numFields]fieldType{
	iBN: tText, iBT: tNumber, iBU: tText, iBV: tNumber, iBS: tNumber, iBVer: tVersion,
	iN: tText, iU: tText, iV: tNumber, iVS: tText, iVB: tBool, iVD: tData,
	iS: tNumber, iT: tNumber, iUT: tNumber,
}

func bit(i int) uint32 { return 1 << i }

const (
	valueFields   = 1<<iV | 1<<iVS | 1<<iVB | 1<<iVD
	regularFields = 1<<iN | 1<<iU | valueFields | 1<<iS | 1<<iT | 1<<iUT
)

// Names and units are identifiers, so they are bounded: a base name is
// repeated in every reading of its pack, and the bound keeps a small payload
// from growing into a large allocation.
const (
	maxName = 256
	maxUnit = 64
)

// supportedVersion is the SenML version this package implements (RFC 8428 §4.4).
const supportedVersion = 10

// record is one SenML record as read, before base fields are applied. Its
// byte slices point into the payload or into scratch space. A field's text
// or num is meaningful only when its bit is in has: reset leaves them be.
type record struct {
	has  uint32 // bit(i) for each field present
	text [numFields][]byte
	num  [numFields]float64
	vb   bool
	ver  uint64
	// rawVD says text[iVD] holds the bytes (CBOR), not base64url (JSON).
	rawVD bool
	// mandatory is the first unknown field whose label ends in '_'.
	mandatory []byte
	// bad is the first bad value seen while reading; reported after the
	// checks that say the record cannot be understood at all.
	bad *Error
}

// reset readies r for the next record.
func (r *record) reset() {
	r.has, r.rawVD, r.mandatory, r.bad = 0, false, nil, nil
}

// get is field i's number, or 0 when it is missing (§4.5.3, §4.5.4).
func (r *record) get(i int) float64 {
	if r.has&bit(i) == 0 {
		return 0
	}
	return r.num[i]
}

func (r *record) badValue(n int, format string, args ...any) {
	if r.bad == nil {
		r.bad = reject(ReasonBadValue, "record %d: "+format, append([]any{n}, args...)...)
	}
}

// decoder holds the state of one Decode call.
type decoder struct {
	c                         *Context
	nowUs, oldestUs, latestUs int64

	out []buffer.Reading
	// arena holds the names, units and texts of all readings, and the base
	// name and unit in force. The readings point into it: what a Builder
	// wrote stays where it is when it grows, so it is one allocation for
	// the whole message, usually.
	arena strings.Builder
	data  []byte // the values of vd fields

	scratch []byte // unknown CBOR labels; append-only, so slices of it stay valid
	keys    keySet // unknown text labels of the current record
	intKeys keySet // unknown integer labels of the current record (CBOR)

	// Base fields in force (RFC 8428 §4.1), in the arena.
	bn, bu       string
	bnSet, buSet bool
	bt, bv, bs   float64
	btSet, bsSet bool
	version      uint64
	// defBN is the topic's sensor + ":", made on first use.
	defBN     string
	defBNMade bool
	// firstErr is the first rejection found in a record; the records after
	// it are still read, so that a pack that does not parse is malformed
	// whatever came before.
	firstErr *Error
}

func (d *decoder) init(c *Context) {
	d.c = c
	d.nowUs = c.Now.UnixMicro()
	d.oldestUs = c.Oldest.UnixMicro()
	d.latestUs = maxUs
	if c.ClockSynced && c.MaxFuture >= 0 {
		d.latestUs = min(d.nowUs+c.MaxFuture.Microseconds(), maxUs)
	}
	d.version = supportedVersion
}

// reserve sizes the output for about n readings, and the arena for about
// size bytes; a hostile count cannot make it allocate much.
func (d *decoder) reserve(n, size int) {
	n = max(1, min(n, 256))
	if cap(d.c.Into) >= n {
		d.out = d.c.Into[:0]
	} else {
		d.out = make([]buffer.Reading, 0, n)
	}
	d.arena.Grow(min(size, 64<<10))
}

// str copies b into the arena.
func (d *decoder) str(b []byte) string {
	off := d.arena.Len()
	d.arena.Write(b)
	return d.arena.String()[off:]
}

// packDone is the end of a pack: its first rejection, if any.
func (d *decoder) packDone() *Error {
	if d.firstErr == nil && len(d.out) == 0 {
		return reject(ReasonBadValue, "no record has a value (v, vs, vb or vd) or a sum")
	}
	return d.firstErr
}

// take resolves rec unless an earlier record was rejected.
func (d *decoder) take(rec *record, n int) {
	if d.firstErr == nil {
		d.firstErr = d.resolve(rec, n)
	}
}

// resolve applies the base fields in force to rec (RFC 8428 §4.6) and
// appends its reading.
func (d *decoder) resolve(rec *record, n int) *Error {
	// First what makes the record impossible to understand (RFC 8428 §4.4).
	if rec.mandatory != nil {
		return reject(ReasonUnsupportedFormat, "record %d: field %s must be understood but is not supported", n, quote(rec.mandatory))
	}
	if rec.has&bit(iBVer) != 0 {
		if rec.ver > supportedVersion {
			return reject(ReasonUnsupportedFormat, "record %d: SenML version %d is above %d, the newest this gateway understands", n, rec.ver, supportedVersion)
		}
		// All records of a pack have one version (§4.4); the first record
		// sets it, explicitly or by the default.
		if n == 1 {
			d.version = rec.ver
		} else if rec.ver != d.version {
			return reject(ReasonMalformed, "record %d: SenML version %d differs from version %d of the pack", n, rec.ver, d.version)
		}
	}
	if rec.bad != nil {
		return rec.bad
	}

	// Base fields apply to this record and the ones after it (§4).
	if rec.has&bit(iBN) != 0 {
		if err := checkNameChars(rec.text[iBN], n, `field "bn"`); err != nil {
			return err
		}
		d.bn, d.bnSet = d.str(rec.text[iBN]), true
	}
	if rec.has&bit(iBU) != 0 {
		if err := checkText(rec.text[iBU], n, "bu"); err != nil {
			return err
		}
		if len(rec.text[iBU]) > maxUnit {
			return reject(ReasonBadValue, "record %d: unit %s is longer than %d bytes", n, quote(rec.text[iBU]), maxUnit)
		}
		d.bu, d.buSet = d.str(rec.text[iBU]), true
	}
	if rec.has&bit(iBT) != 0 {
		d.bt, d.btSet = rec.num[iBT], true
	}
	if rec.has&bit(iBV) != 0 {
		d.bv = rec.num[iBV]
	}
	if rec.has&bit(iBS) != 0 {
		d.bs, d.bsSet = rec.num[iBS], true
	}
	// A record of base fields only sets them for the records after it, as
	// in RFC 8428 §5.1.7; it is no measurement, so it makes no reading.
	if rec.has&regularFields == 0 {
		return nil
	}

	// The reading is made in place: a Reading is large, and copying it
	// into the heap is not free.
	var prev *buffer.Reading
	if k := len(d.out); k > 0 {
		prev = &d.out[k-1]
	}
	d.out = append(d.out, buffer.Reading{})
	r := &d.out[len(d.out)-1]
	if err := d.resolveName(r, prev, rec, n); err != nil {
		return err
	}
	switch {
	case rec.has&bit(iU) != 0:
		u := rec.text[iU]
		if err := checkText(u, n, "u"); err != nil {
			return err
		}
		if len(u) > maxUnit {
			return reject(ReasonBadValue, "record %d: unit %s is longer than %d bytes", n, quote(u), maxUnit)
		}
		switch {
		case d.buSet && d.bu == string(u):
			r.Unit = d.bu
		case prev != nil && prev.Unit == string(u):
			r.Unit = prev.Unit
		default:
			r.Unit = d.str(u)
		}
	case d.buSet:
		r.Unit = d.bu
	}

	// Exactly one value, unless there is a sum (§4.2).
	hasSum := rec.has&bit(iS) != 0 || d.bsSet
	switch values := rec.has & valueFields; {
	case values == 0 && !hasSum:
		return reject(ReasonBadValue, "record %d: no value (v, vs, vb or vd) and no sum", n)
	case values&(values-1) != 0:
		return reject(ReasonBadValue, "record %d: more than one value (%s)", n, fieldList(values))
	}
	switch {
	case rec.has&bit(iV) != 0:
		// The base value is added to a numeric value only (§4.5.4).
		r.Kind, r.Number = buffer.KindNumber, d.bv+rec.num[iV]
		if !finite(r.Number) {
			return reject(ReasonBadValue, "record %d: value bv+v is out of range", n)
		}
	case rec.has&bit(iVS) != 0:
		if err := checkText(rec.text[iVS], n, "vs"); err != nil {
			return err
		}
		r.Kind, r.Text = buffer.KindString, d.str(rec.text[iVS])
	case rec.has&bit(iVB) != 0:
		r.Kind, r.Bool = buffer.KindBool, rec.vb
	case rec.has&bit(iVD) != 0:
		r.Kind = buffer.KindData
		var ok bool
		if r.Data, ok = d.putData(rec.text[iVD], rec.rawVD); !ok {
			return reject(ReasonBadValue, "record %d: field \"vd\": not base64url (RFC 8428 §4.3)", n)
		}
	}
	if hasSum {
		// A base sum alone is the sum (§4.5.4).
		r.Sum, r.HasSum = d.bs+rec.get(iS), true
		if !finite(r.Sum) {
			return reject(ReasonBadValue, "record %d: sum bs+s is out of range", n)
		}
	}

	// Time: base time + time, a missing one counting as zero (§4.5.3).
	if rec.has&bit(iT) != 0 || d.btSet {
		if err := d.senmlTime(r, d.bt+rec.get(iT), n); err != nil {
			return err
		}
	} else {
		r.GatewayTime = true
	}
	return nil
}

// resolveName sets r's name, base name + name (§4.5.1), and its sensor and
// metric. The topic's sensor stands in for a base name until the payload
// gives one, its metric for a missing name. prev is the reading before r.
func (d *decoder) resolveName(r, prev *buffer.Reading, rec *record, n int) *Error {
	bn := d.bn
	if !d.bnSet {
		if !d.defBNMade && d.c.Sensor != "" {
			if err := checkNameChars(d.c.Sensor, n, "sensor from the topic or path"); err != nil {
				return err
			}
			off := d.arena.Len()
			d.arena.WriteString(d.c.Sensor)
			d.arena.WriteByte(':')
			d.defBN = d.arena.String()[off:]
		}
		bn, d.defBNMade = d.defBN, true
	}
	var part []byte
	if rec.has&bit(iN) != 0 {
		part = rec.text[iN]
	}
	fromTopic := len(part) == 0
	size := len(bn) + len(part)
	if fromTopic {
		size = len(bn) + len(d.c.Metric)
	}
	full := func() []byte { // for diagnostics
		if fromTopic {
			return []byte(bn + d.c.Metric)
		}
		return []byte(bn + string(part))
	}
	// Packs often repeat a name: they share one copy, checked once.
	if prev != nil && len(prev.Name) == size && size > 0 && prev.Name[:len(bn)] == bn &&
		(fromTopic && prev.Name[len(bn):] == d.c.Metric || !fromTopic && prev.Name[len(bn):] == string(part)) {
		r.Name = prev.Name
	} else {
		switch {
		case size == 0:
			return reject(ReasonMalformed, "record %d: no name (no n or bn, and no sensor from the topic or path)", n)
		case size > maxName:
			return reject(ReasonMalformed, "record %d: name %s is longer than %d bytes", n, quote(full()), maxName)
		case fromTopic:
			if err := checkNameChars(d.c.Metric, n, "metric from the topic or path"); err != nil {
				return err
			}
		default:
			if err := checkNameChars(part, n, `field "n"`); err != nil {
				return err
			}
		}
		var first byte
		if len(bn) > 0 {
			first = bn[0]
		} else if fromTopic {
			first = d.c.Metric[0]
		} else {
			first = part[0]
		}
		if !isAlnum(first) {
			return reject(ReasonMalformed, "record %d: name %s does not start with a letter or digit", n, quote(full()))
		}
		off := d.arena.Len()
		d.arena.WriteString(bn)
		if fromTopic {
			d.arena.WriteString(d.c.Metric)
		} else {
			d.arena.Write(part)
		}
		r.Name = d.arena.String()[off:]
	}

	// Sensor is the base name without its trailing separator and Metric
	// the rest after it; with no base name, the name is split at its last
	// ':' or '/'.
	switch {
	case len(bn) > 0 && isSep(bn[len(bn)-1]):
		r.Sensor, r.Metric = r.Name[:len(bn)-1], r.Name[len(bn):]
	case len(bn) > 0:
		r.Sensor, r.Metric = r.Name[:len(bn)], r.Name[len(bn):]
		if len(r.Metric) > 0 && isSep(r.Metric[0]) {
			r.Metric = r.Metric[1:]
		}
	default:
		r.Sensor, r.Metric = r.Name, ""
		if i := strings.LastIndexAny(r.Name, ":/"); i >= 0 {
			r.Sensor, r.Metric = r.Name[:i], r.Name[i+1:]
		}
	}
	return nil
}

// senmlTime sets r's time from a resolved SenML time t in seconds.
func (d *decoder) senmlTime(r *buffer.Reading, t float64, n int) *Error {
	switch {
	case t == 0:
		// "Roughly now", the same as no time at all (§4.5.3): the caller
		// stamps it from a clock that never repeats a microsecond.
		r.GatewayTime = true
		return nil
	case t < 1<<28:
		// Relative to now (§4.5.3): it depends on the gateway clock as an
		// untimed reading does, so it is not checked against oldest/max_future.
		us, ok := relMicros(d.nowUs, t)
		if !ok {
			return reject(ReasonBadTime, "record %d: relative time %g s is out of range", n, t)
		}
		r.Time, r.GatewayTime = time.UnixMicro(us).UTC(), true
		return nil
	}
	us, ok := absMicros(t)
	if !ok {
		return reject(ReasonBadTime, "record %d: time %g is beyond the year 9999", n, t)
	}
	if err := d.checkSensorTime(us); err != nil {
		err.Msg = "record " + strconv.Itoa(n) + ": " + err.Msg
		return err
	}
	r.Time = time.UnixMicro(us).UTC()
	return nil
}

// checkSensorTime checks a time the sensor sent against oldest and max_future.
func (d *decoder) checkSensorTime(us int64) *Error {
	if us < minUs || us > maxUs {
		return reject(ReasonBadTime, "time is outside the years 1 to 9999")
	}
	if us < d.oldestUs {
		return reject(ReasonBadTime, "time %s is before the oldest accepted, %s",
			fmtMicros(us), fmtMicros(d.oldestUs))
	}
	if us > d.latestUs {
		return reject(ReasonBadTime, "time %s is more than max_future (%s) ahead of the gateway clock (%s)",
			fmtMicros(us), d.c.MaxFuture, fmtMicros(d.nowUs))
	}
	return nil
}

// Times must lie in the years 1 to 9999 (Postgres and RFC 3339 keep
// those), and not on the zero time.Time, which means "no time".
var (
	minUs = time.Date(1, 1, 1, 0, 0, 0, 1000, time.UTC).UnixMicro()
	maxUs = time.Date(9999, 12, 31, 23, 59, 59, 999999000, time.UTC).UnixMicro()
)

// absMicros converts seconds since the epoch to microseconds, rounding to the
// nearest: a float holds 1.276020076001e9 as ...076.0009999, which truncation
// would turn into .000999.
func absMicros(sec float64) (int64, bool) {
	if !(sec >= float64(minUs)/1e6 && sec <= float64(maxUs)/1e6) { // also NaN
		return 0, false
	}
	whole := math.Floor(sec)
	us := int64(whole)*1e6 + int64(math.Round((sec-whole)*1e6))
	return us, us >= minUs && us <= maxUs
}

// relMicros is now plus sec seconds, in microseconds.
func relMicros(nowUs int64, sec float64) (int64, bool) {
	const span = float64(1e4 * 366 * 86400) // more than any representable distance
	if !(sec > -span && sec < span) {
		return 0, false
	}
	us := nowUs + int64(math.Round(sec*1e6))
	return us, us >= minUs && us <= maxUs
}

func fmtMicros(us int64) string { return time.UnixMicro(us).UTC().Format(time.RFC3339Nano) }

// putData stores a vd value: raw bytes from CBOR, base64url text from JSON.
func (d *decoder) putData(v []byte, raw bool) ([]byte, bool) {
	off := len(d.data)
	if raw {
		d.data = append(d.data, v...)
	} else {
		// RFC 8428 §4.3 says URL-safe alphabet without padding; padding is
		// accepted too. Line breaks are not base64 (RFC 4648 §3.3), though
		// Go's decoder would skip them.
		if bytes.ContainsAny(v, "\r\n") {
			return nil, false
		}
		enc := base64.RawURLEncoding
		if len(v) > 0 && v[len(v)-1] == '=' {
			enc = base64.URLEncoding
		}
		d.data = append(d.data, make([]byte, enc.DecodedLen(len(v)))...)
		m, err := enc.Decode(d.data[off:], v)
		if err != nil {
			d.data = d.data[:off]
			return nil, false
		}
		d.data = d.data[:off+m]
	}
	return d.data[off:len(d.data):len(d.data)], true
}

// nameChar marks the characters a SenML name may have (RFC 8428 §4.5.1).
var nameChar = func() (t [256]bool) {
	for c := 'A'; c <= 'Z'; c++ {
		t[c], t[c+'a'-'A'] = true, true
	}
	for c := '0'; c <= '9'; c++ {
		t[c] = true
	}
	for _, c := range "-:./_" {
		t[c] = true
	}
	return t
}()

func isAlnum(c byte) bool { return nameChar[c] && !isSep(c) }

// isSep reports a separator between sensor and metric in a base name.
func isSep(c byte) bool { return c == ':' || c == '/' || c == '.' || c == '-' || c == '_' }

// checkNameChars checks the characters of (part of) a name; what names it.
func checkNameChars[T string | []byte](b T, n int, what string) *Error {
	for i := 0; i < len(b); i++ {
		if !nameChar[b[i]] {
			return reject(ReasonMalformed, "record %d: %s: %s has a character outside A-Z a-z 0-9 - : . / _ (RFC 8428 §4.5.1)", n, what, quote([]byte(b)))
		}
	}
	return nil
}

// checkText refuses text that Postgres would refuse: NUL bytes, invalid UTF-8.
func checkText(b []byte, n int, field string) *Error {
	if msg := textProblem(b); msg != "" {
		return reject(ReasonBadValue, "record %d: field %q: %s", n, field, msg)
	}
	return nil
}

func textProblem(b []byte) string {
	for i, c := range b {
		if c == 0 {
			return "contains a NUL byte"
		}
		if c >= utf8.RuneSelf {
			if !utf8.Valid(b[i:]) {
				return "not valid UTF-8"
			}
			if bytes.IndexByte(b[i:], 0) >= 0 {
				return "contains a NUL byte"
			}
			return ""
		}
	}
	return ""
}

func finite(f float64) bool { return !math.IsNaN(f) && !math.IsInf(f, 0) }

func fieldList(bits uint32) string {
	var s []string
	for i := range numFields {
		if bits&bit(i) != 0 {
			s = append(s, labels[i])
		}
	}
	return strings.Join(s, ", ")
}

// keySet finds duplicate labels among the unknown fields of one record:
// a short list, a map once there are many.
type keySet struct {
	list [][]byte
	set  map[string]struct{}
}

func (k *keySet) reset() {
	k.list = k.list[:0]
	k.set = nil
}

// add records key and reports whether it was there already.
func (k *keySet) add(key []byte) bool {
	if k.set != nil {
		if _, dup := k.set[string(key)]; dup {
			return true
		}
		k.set[string(key)] = struct{}{}
		return false
	}
	for _, have := range k.list {
		if bytes.Equal(have, key) {
			return true
		}
	}
	k.list = append(k.list, key)
	if len(k.list) > 16 {
		k.set = make(map[string]struct{}, 2*len(k.list))
		for _, have := range k.list {
			k.set[string(have)] = struct{}{}
		}
	}
	return false
}
