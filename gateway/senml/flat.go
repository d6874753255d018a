package senml

import (
	"math"
	"strconv"
	"strings"
	"time"

	"github.com/sluice-gw/sluice/buffer"
)

// Keys of the flat JSON object.
const (
	kSensor = 1 << iota
	kMetric
	kValue
	kUnit
	kTS
	kSeq
)

// flat is the flat JSON object as read.
type flat struct {
	have                       int // k* bits of the keys present
	sensor, metric, unit, text []byte
	r                          buffer.Reading
	tsUs                       int64
	bad                        *Error // the first bad value, reported once the object parsed
}

func (f *flat) badValue(format string, args ...any) {
	if f.bad == nil {
		f.bad = reject(ReasonBadValue, format, args...)
	}
}

// wrongType reads a value of the wrong type for key, noting a bad value; an
// object or array is malformed.
func (f *flat) wrongType(s *scanner, key, want string) *Error {
	got, nested, err := s.scalar()
	switch {
	case err != nil:
		return err
	case nested:
		return reject(ReasonMalformed, "field %q: nested object or array", key)
	}
	f.badValue("field %q: not %s (got %s)", key, want, got)
	return nil
}

func (f *flat) readText(s *scanner, key string) ([]byte, *Error) {
	if s.peek() != '"' {
		return nil, f.wrongType(s, key, jString)
	}
	return s.str()
}

// readValue reads a number, string or boolean.
func (f *flat) readValue(s *scanner) (err *Error) {
	switch c := s.peek(); {
	case c == '"':
		f.r.Kind = buffer.KindString
		f.text, err = s.str()
	case c == '-' || '0' <= c && c <= '9':
		var ok bool
		f.r.Kind = buffer.KindNumber
		if f.r.Number, _, ok, err = s.number(); err == nil && !ok {
			f.badValue("field \"value\": number out of range")
		}
	case c == 't' || c == 'f':
		var l byte
		f.r.Kind = buffer.KindBool
		l, err = s.literal()
		f.r.Bool = l == 't'
	default:
		return f.wrongType(s, "value", "a number, string or boolean")
	}
	return err
}

// readTS reads milliseconds since the epoch or an RFC 3339 string.
func (f *flat) readTS(s *scanner) *Error {
	switch c := s.peek(); {
	case c == '-' || '0' <= c && c <= '9':
		ms, tok, ok, err := s.number()
		if err != nil {
			return err
		}
		if !ok {
			f.badValue("field \"ts\": number out of range")
		}
		if f.tsUs, ok = msToMicros(ms, tok); !ok {
			f.tsUs = math.MinInt64 // out of range: bad_time
		}
	case c == '"':
		v, err := s.str()
		if err != nil {
			return err
		}
		t, perr := time.Parse(time.RFC3339Nano, string(v))
		if perr != nil {
			f.badValue("field \"ts\": %s is not an RFC 3339 time", quote(v))
		}
		f.tsUs = t.Round(time.Microsecond).UnixMicro()
	default:
		return f.wrongType(s, "ts", "milliseconds or an RFC 3339 string")
	}
	return nil
}

// readSeq reads the sensor's sequence number, an integer in 0..2^63-1.
func (f *flat) readSeq(s *scanner) *Error {
	if c := s.peek(); c != '-' && (c < '0' || c > '9') {
		return f.wrongType(s, "seq", jNumber)
	}
	_, tok, _, err := s.number()
	if err != nil {
		return err
	}
	seq, perr := strconv.ParseInt(string(tok), 10, 64)
	if perr != nil || seq < 0 {
		f.badValue("field \"seq\": %s is not an integer in 0..2^63-1", quote(tok))
	}
	f.r.SensorSeq, f.r.HasSensorSeq = seq, true
	return nil
}

// flatJSON decodes the flat object {"sensor","metric","value","unit","ts","seq"}.
// Unknown keys are malformed, so that a misspelt key shows at once.
func (d *decoder) flatJSON(b []byte) *Error {
	s := scanner{b: b}
	s.skipWS()
	if s.peek() != '{' {
		if valueStart(s.peek()) {
			return reject(ReasonMalformed, "not a flat JSON object")
		}
		return s.syntax(s.i, "expected an object")
	}
	s.i++
	s.skipWS()
	var f flat
	for s.peek() != '}' {
		if s.peek() != '"' {
			return s.syntax(s.i, "expected a field name")
		}
		key, err := s.str()
		if err != nil {
			return err
		}
		if err := s.expect(':', ":"); err != nil {
			return err
		}
		var k int
		switch string(key) {
		case "sensor":
			k = kSensor
		case "metric":
			k = kMetric
		case "value":
			k = kValue
		case "unit":
			k = kUnit
		case "ts":
			k = kTS
		case "seq":
			k = kSeq
		default:
			return reject(ReasonMalformed, "unknown field %s (want sensor, metric, value, unit, ts or seq)", quote(key))
		}
		if f.have&k != 0 {
			return reject(ReasonMalformed, "field %q appears twice", key)
		}
		f.have |= k
		switch k {
		case kSensor:
			f.sensor, err = f.readText(&s, "sensor")
		case kMetric:
			f.metric, err = f.readText(&s, "metric")
		case kUnit:
			f.unit, err = f.readText(&s, "unit")
		case kValue:
			err = f.readValue(&s)
		case kTS:
			err = f.readTS(&s)
		case kSeq:
			err = f.readSeq(&s)
		}
		if err != nil {
			return err
		}
		s.skipWS()
		if s.peek() == ',' {
			s.i++
			s.skipWS()
			if s.peek() == '}' {
				return s.syntax(s.i, "expected a field name")
			}
		} else if s.peek() != '}' {
			return s.syntax(s.i, "expected , or }")
		}
	}
	s.i++
	s.skipWS()
	if s.i < len(b) {
		return s.syntax(s.i, "data after the object")
	}

	if f.bad != nil {
		return f.bad
	}
	// The topic's sensor and metric fill in what the payload leaves out.
	if len(f.sensor) == 0 && d.c.Sensor == "" {
		return reject(ReasonMalformed, "no sensor (neither in the payload nor from the topic or path)")
	}
	if len(f.metric) == 0 && d.c.Metric == "" {
		return reject(ReasonMalformed, "no metric (neither in the payload nor from the topic or path)")
	}
	if err := checkFlatName(f.sensor, f.metric, d.c); err != nil {
		return err
	}
	if f.have&kValue == 0 {
		return reject(ReasonBadValue, "no value")
	}
	if msg := textProblem(f.unit); msg != "" {
		return reject(ReasonBadValue, "field \"unit\": %s", msg)
	}
	if len(f.unit) > maxUnit {
		return reject(ReasonBadValue, "unit %s is longer than %d bytes", quote(f.unit), maxUnit)
	}
	if msg := textProblem(f.text); msg != "" {
		return reject(ReasonBadValue, "field \"value\": %s", msg)
	}
	if f.have&kTS != 0 {
		if err := d.checkSensorTime(f.tsUs); err != nil {
			return err
		}
		f.r.Time = time.UnixMicro(f.tsUs).UTC()
	} else {
		f.r.GatewayTime = true
	}
	d.addFlat(&f.r, f.sensor, f.metric, f.unit, f.text)
	return nil
}

// addFlat appends the one reading of a flat object or plain number, named
// sensor + ":" + metric; an empty sensor or metric is the topic's.
func (d *decoder) addFlat(r *buffer.Reading, sensor, metric, unit, text []byte) {
	d.reserve(1, len(sensor)+len(metric)+len(unit)+len(text)+len(d.c.Sensor)+len(d.c.Metric)+1)
	off := d.arena.Len()
	if len(sensor) > 0 {
		d.arena.Write(sensor)
	} else {
		d.arena.WriteString(d.c.Sensor)
	}
	sep := d.arena.Len() - off
	d.arena.WriteByte(':')
	if len(metric) > 0 {
		d.arena.Write(metric)
	} else {
		d.arena.WriteString(d.c.Metric)
	}
	r.Name = d.arena.String()[off:]
	r.Sensor, r.Metric = r.Name[:sep], r.Name[sep+1:]
	r.Unit = d.str(unit)
	if r.Kind == buffer.KindString {
		r.Text = d.str(text)
	}
	d.out = append(d.out, *r)
}

// checkFlatName checks sensor + ":" + metric as a SenML name (RFC 8428
// §4.5.1), since export writes it as one. An empty sensor or metric is the
// topic's.
func checkFlatName(sensor, metric []byte, c *Context) *Error {
	s, m := string(sensor), string(metric)
	if s == "" {
		s = c.Sensor
	}
	if m == "" {
		m = c.Metric
	}
	if len(s)+1+len(m) > maxName {
		return reject(ReasonMalformed, "name %s is longer than %d bytes", quote([]byte(s+":"+m)), maxName)
	}
	for _, part := range [2]string{s, m} {
		for i := 0; i < len(part); i++ {
			if !nameChar[part[i]] {
				return reject(ReasonMalformed, "name %s has a character outside A-Z a-z 0-9 - : . / _ (RFC 8428 §4.5.1)", quote([]byte(s+":"+m)))
			}
		}
	}
	if !isAlnum(s[0]) {
		return reject(ReasonMalformed, "sensor %s does not start with a letter or digit", quote([]byte(s)))
	}
	return nil
}

// msToMicros converts milliseconds since the epoch, exactly when the token
// is an integer.
func msToMicros(ms float64, tok []byte) (int64, bool) {
	if v, err := strconv.ParseInt(string(tok), 10, 64); err == nil {
		if v < minUs/1000 || v > maxUs/1000 {
			return 0, false
		}
		return v * 1000, true
	}
	return absMicros(ms / 1000)
}

// plainValue decodes a plain number; sensor and metric come from the topic.
func (d *decoder) plainValue(b []byte) *Error {
	t := trimSpace(b)
	if len(t) == 0 {
		return reject(ReasonMalformed, "empty payload")
	}
	if !decimal(t) {
		switch strings.ToLower(strings.TrimLeft(string(t[:min(len(t), 10)]), "+-")) {
		case "nan", "inf", "infinity":
			return reject(ReasonBadValue, "%s is not a finite number", quote(t))
		}
		return reject(ReasonMalformed, "%s is not a number", quote(t))
	}
	f, err := strconv.ParseFloat(string(t), 64)
	if err != nil || !finite(f) {
		return reject(ReasonBadValue, "%s is out of range", quote(t))
	}
	if d.c.Sensor == "" || d.c.Metric == "" {
		return reject(ReasonMalformed, "a plain number needs sensor and metric from the topic or path")
	}
	if err := checkFlatName(nil, nil, d.c); err != nil {
		return err
	}
	d.addFlat(&buffer.Reading{Kind: buffer.KindNumber, Number: f, GatewayTime: true}, nil, nil, nil, nil)
	return nil
}

func trimSpace(b []byte) []byte {
	isSpace := func(c byte) bool { return c == ' ' || c == '\t' || c == '\n' || c == '\r' }
	for len(b) > 0 && isSpace(b[0]) {
		b = b[1:]
	}
	for len(b) > 0 && isSpace(b[len(b)-1]) {
		b = b[:len(b)-1]
	}
	return b
}

// decimal reports whether b is a decimal number as strconv.ParseFloat reads
// one, without the forms it also takes: hex, underscores, Inf and NaN.
func decimal(b []byte) bool {
	i := 0
	if i < len(b) && (b[i] == '+' || b[i] == '-') {
		i++
	}
	digits := 0
	for ; i < len(b) && '0' <= b[i] && b[i] <= '9'; i++ {
		digits++
	}
	if i < len(b) && b[i] == '.' {
		i++
		for ; i < len(b) && '0' <= b[i] && b[i] <= '9'; i++ {
			digits++
		}
	}
	if digits == 0 {
		return false
	}
	if i < len(b) && (b[i] == 'e' || b[i] == 'E') {
		i++
		if i < len(b) && (b[i] == '+' || b[i] == '-') {
			i++
		}
		start := i
		for ; i < len(b) && '0' <= b[i] && b[i] <= '9'; i++ {
		}
		if i == start {
			return false
		}
	}
	return i == len(b)
}
