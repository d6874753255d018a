package senml

import (
	"bytes"
	"math"
	"strconv"
	"unicode/utf16"
)

// scanner reads JSON (RFC 8259) from a byte slice, one token at a time,
// without reflection and mostly without allocating.
type scanner struct {
	b []byte
	i int
	// scratch holds unescaped strings; it is append-only, so slices of it
	// stay valid.
	scratch []byte
}

func (s *scanner) skipWS() {
	for s.i < len(s.b) {
		switch s.b[s.i] {
		case ' ', '\t', '\n', '\r':
			s.i++
		default:
			return
		}
	}
}

// peek returns the next byte, or 0 at the end (0 is never valid JSON there).
func (s *scanner) peek() byte {
	if s.i < len(s.b) {
		return s.b[s.i]
	}
	return 0
}

func (s *scanner) syntax(at int, what string) *Error {
	if at >= len(s.b) {
		return reject(ReasonMalformed, "JSON: %s, but the payload ends", what)
	}
	return reject(ReasonMalformed, "JSON: %s at byte %d", what, at)
}

// expect consumes c, or fails naming what was expected.
func (s *scanner) expect(c byte, what string) *Error {
	s.skipWS()
	if s.peek() != c {
		return s.syntax(s.i, "expected "+what)
	}
	s.i++
	s.skipWS()
	return nil
}

// str reads the string that starts at s.i. The result points into the input
// or, when it had escapes, into the scanner's scratch space.
func (s *scanner) str() ([]byte, *Error) {
	start := s.i + 1
	for i := start; i < len(s.b); i++ {
		switch c := s.b[i]; {
		case c == '"':
			s.i = i + 1
			return s.b[start:i], nil
		case c == '\\':
			return s.strEscaped(start)
		case c < 0x20:
			return nil, s.syntax(i, "control character in a string")
		}
	}
	return nil, s.syntax(len(s.b), "expected the end of a string")
}

func (s *scanner) strEscaped(start int) ([]byte, *Error) {
	off := len(s.scratch)
	for i := start; i < len(s.b); {
		c := s.b[i]
		switch {
		case c == '"':
			s.i = i + 1
			return s.scratch[off:len(s.scratch):len(s.scratch)], nil
		case c < 0x20:
			return nil, s.syntax(i, "control character in a string")
		case c != '\\':
			s.scratch = append(s.scratch, c)
			i++
			continue
		}
		if i+1 >= len(s.b) {
			break
		}
		switch e := s.b[i+1]; e {
		case '"', '\\', '/':
			s.scratch = append(s.scratch, e)
		case 'b':
			s.scratch = append(s.scratch, '\b')
		case 'f':
			s.scratch = append(s.scratch, '\f')
		case 'n':
			s.scratch = append(s.scratch, '\n')
		case 'r':
			s.scratch = append(s.scratch, '\r')
		case 't':
			s.scratch = append(s.scratch, '\t')
		case 'u':
			r, ok := hex4(s.b[i+2:])
			if !ok {
				return nil, s.syntax(i, `bad \u escape`)
			}
			i += 6
			// A high surrogate followed by a low one is one character. A
			// lone surrogate has no UTF-8 form: it is kept as its invalid
			// bytes, so that the text check refuses it rather than it
			// turning silently into U+FFFD.
			if 0xd800 <= r && r < 0xdc00 && i+1 < len(s.b) && s.b[i] == '\\' && s.b[i+1] == 'u' {
				if r2, ok := hex4(s.b[i+2:]); ok && 0xdc00 <= r2 && r2 < 0xe000 {
					r = utf16.DecodeRune(r, r2)
					i += 6
				}
			}
			s.scratch = appendRune3or4(s.scratch, r)
			continue
		default:
			return nil, s.syntax(i, "bad escape")
		}
		i += 2
	}
	return nil, s.syntax(len(s.b), "expected the end of a string")
}

func hex4(b []byte) (rune, bool) {
	if len(b) < 4 {
		return 0, false
	}
	var r rune
	for _, c := range b[:4] {
		switch {
		case '0' <= c && c <= '9':
			c -= '0'
		case 'a' <= c && c <= 'f':
			c -= 'a' - 10
		case 'A' <= c && c <= 'F':
			c -= 'A' - 10
		default:
			return 0, false
		}
		r = r<<4 | rune(c)
	}
	return r, true
}

// appendRune3or4 encodes r as UTF-8, but unlike utf8.AppendRune it writes
// surrogates as they are (invalid UTF-8) instead of U+FFFD.
func appendRune3or4(b []byte, r rune) []byte {
	switch {
	case r < 0x80:
		return append(b, byte(r))
	case r < 0x800:
		return append(b, 0xc0|byte(r>>6), 0x80|byte(r)&0x3f)
	case r < 0x10000:
		return append(b, 0xe0|byte(r>>12), 0x80|byte(r>>6)&0x3f, 0x80|byte(r)&0x3f)
	}
	return append(b, 0xf0|byte(r>>18), 0x80|byte(r>>12)&0x3f, 0x80|byte(r>>6)&0x3f, 0x80|byte(r)&0x3f)
}

// pow10 holds the powers of ten that a float64 represents exactly.
var pow10 = [...]float64{1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10,
	1e11, 1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22}

// number reads the number that starts at s.i (RFC 8259 §6). It returns the
// value and the token; inRange is false when the value is beyond float64.
func (s *scanner) number() (f float64, tok []byte, inRange bool, err *Error) {
	b, i := s.b, s.i
	start := i
	neg := i < len(b) && b[i] == '-'
	if neg {
		i++
	}
	// Collect up to 19 significant digits in mant, with exp the power of
	// ten to scale them by; more digits than that go to strconv.
	var mant uint64
	digits, exp := 0, 0
	exact := true
	digit := func(c byte) {
		if digits == 19 {
			exact = false
			return
		}
		if mant != 0 || c != '0' {
			digits++
		}
		mant = mant*10 + uint64(c-'0')
	}
	switch {
	case i < len(b) && b[i] == '0':
		i++
	case i < len(b) && '1' <= b[i] && b[i] <= '9':
		for ; i < len(b) && '0' <= b[i] && b[i] <= '9'; i++ {
			digit(b[i])
		}
	default:
		return 0, nil, false, s.syntax(i, "bad number")
	}
	if i < len(b) && b[i] == '.' {
		i++
		if i >= len(b) || b[i] < '0' || b[i] > '9' {
			return 0, nil, false, s.syntax(i, "bad number")
		}
		for ; i < len(b) && '0' <= b[i] && b[i] <= '9'; i++ {
			digit(b[i])
			exp--
		}
	}
	if i < len(b) && (b[i] == 'e' || b[i] == 'E') {
		i++
		eneg := false
		if i < len(b) && (b[i] == '+' || b[i] == '-') {
			eneg = b[i] == '-'
			i++
		}
		if i >= len(b) || b[i] < '0' || b[i] > '9' {
			return 0, nil, false, s.syntax(i, "bad number")
		}
		e := 0
		for ; i < len(b) && '0' <= b[i] && b[i] <= '9'; i++ {
			if e < 10000 {
				e = e*10 + int(b[i]-'0')
			}
		}
		if eneg {
			e = -e
		}
		exp += e
	}
	s.i = i
	tok = b[start:i]
	// Exact when the digits fit in 53 bits and the power of ten is exact
	// (Clinger's fast path); otherwise let strconv round correctly.
	if exact && mant < 1<<53 && exp >= -22 && exp <= 22 {
		f = float64(mant)
		if exp >= 0 {
			f *= pow10[exp]
		} else {
			f /= pow10[-exp]
		}
		if neg {
			f = -f
		}
		return f, tok, true, nil
	}
	f, perr := strconv.ParseFloat(string(tok), 64)
	return f, tok, perr == nil && !math.IsInf(f, 0), nil
}

// valueStart reports whether c can start a JSON value, to tell JSON of
// another shape from what is not JSON at all.
func valueStart(c byte) bool {
	switch c {
	case '{', '[', '"', '-', 't', 'f', 'n':
		return true
	}
	return '0' <= c && c <= '9'
}

// literal reads true, false or null.
func (s *scanner) literal() (byte, *Error) {
	if s.i >= len(s.b) {
		return 0, s.syntax(s.i, "expected a value")
	}
	for _, lit := range [...]string{"true", "false", "null"} {
		if len(s.b)-s.i >= len(lit) && string(s.b[s.i:s.i+len(lit)]) == lit {
			s.i += len(lit)
			return lit[0], nil
		}
	}
	return 0, s.syntax(s.i, "unexpected character")
}

// JSON value types, for diagnostics.
const (
	jString = "a string"
	jNumber = "a number"
	jBool   = "a boolean"
	jNull   = "null"
)

// scalar reads any value but an object or array and says what it was.
// nested is true, and nothing is read, for an object or array.
func (s *scanner) scalar() (typ string, nested bool, err *Error) {
	switch c := s.peek(); {
	case c == '"':
		_, err = s.str()
		return jString, false, err
	case c == '-' || '0' <= c && c <= '9':
		_, _, _, err = s.number()
		return jNumber, false, err
	case c == '{' || c == '[':
		return "", true, nil
	}
	l, err := s.literal()
	if l == 'n' {
		return jNull, false, err
	}
	return jBool, false, err
}

// senmlJSON decodes a SenML JSON pack (RFC 8428 §5).
func (d *decoder) senmlJSON(b []byte) *Error {
	s := scanner{b: b}
	s.skipWS()
	if s.peek() != '[' {
		if valueStart(s.peek()) {
			return reject(ReasonMalformed, "not a SenML pack: expected an array of records")
		}
		return s.syntax(s.i, "expected a SenML pack, an array of records,")
	}
	s.i++
	s.skipWS()
	if s.peek() == ']' {
		return reject(ReasonMalformed, "empty pack: SenML needs at least one record")
	}
	d.reserve(bytes.Count(b, []byte{'{'}), len(b))
	var rec record
	for n := 1; ; n++ {
		if s.peek() != '{' {
			if s.peek() == ']' {
				return s.syntax(s.i, "expected a record after ,")
			}
			if _, _, err := s.scalar(); err != nil {
				return err
			}
			return reject(ReasonMalformed, "record %d: not an object", n)
		}
		rec.reset()
		if err := d.jsonRecord(&s, &rec, n); err != nil {
			return err
		}
		d.take(&rec, n)
		s.skipWS()
		switch s.peek() {
		case ',':
			s.i++
			s.skipWS()
			continue
		case ']':
			s.i++
		default:
			return s.syntax(s.i, "expected , or ] after a record")
		}
		break
	}
	s.skipWS()
	if s.i < len(b) {
		return s.syntax(s.i, "data after the pack")
	}
	return d.packDone()
}

// jsonRecord reads the record object that starts at s.i. It returns an
// error only for what makes the pack unreadable; other problems go to rec.bad.
func (d *decoder) jsonRecord(s *scanner, rec *record, n int) *Error {
	s.i++ // '{'
	s.skipWS()
	if s.peek() == '}' {
		s.i++
		return nil
	}
	d.keys.reset()
	for {
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
		i := jsonLabel(key)
		if i < 0 {
			if d.keys.add(key) {
				return reject(ReasonMalformed, "record %d: field %s appears twice", n, quote(key))
			}
			if _, nested, err := s.scalar(); err != nil {
				return err
			} else if nested {
				return reject(ReasonMalformed, "record %d: field %s: nested object or array", n, quote(key))
			}
			// Unknown fields are ignored unless their label ends in '_' (§4.4).
			if len(key) > 0 && key[len(key)-1] == '_' && rec.mandatory == nil {
				rec.mandatory = key
			}
		} else {
			if rec.has&bit(i) != 0 {
				return reject(ReasonMalformed, "record %d: field %q appears twice", n, labels[i])
			}
			rec.has |= bit(i)
			if err := s.field(rec, i, n); err != nil {
				return err
			}
		}
		s.skipWS()
		switch s.peek() {
		case ',':
			s.i++
			s.skipWS()
		case '}':
			s.i++
			return nil
		default:
			return s.syntax(s.i, "expected , or } in a record")
		}
	}
}

func jsonLabel(key []byte) int {
	switch string(key) {
	case "bn":
		return iBN
	case "bt":
		return iBT
	case "bu":
		return iBU
	case "bv":
		return iBV
	case "bs":
		return iBS
	case "bver":
		return iBVer
	case "n":
		return iN
	case "u":
		return iU
	case "v":
		return iV
	case "vs":
		return iVS
	case "vb":
		return iVB
	case "vd":
		return iVD
	case "s":
		return iS
	case "t":
		return iT
	case "ut":
		return iUT
	}
	return -1
}

// field reads the value of known field i into rec.
func (s *scanner) field(rec *record, i, n int) *Error {
	want := fieldTypes[i]
	c := s.peek()
	switch {
	case c == '"' && (want == tText || want == tData):
		v, err := s.str()
		rec.text[i] = v
		return err
	case (c == '-' || '0' <= c && c <= '9') && (want == tNumber || want == tVersion):
		f, _, ok, err := s.number()
		switch {
		case err != nil:
			return err
		case !ok:
			rec.badValue(n, "field %q: number out of range", labels[i])
		case want == tVersion:
			if f < 0 || f != math.Trunc(f) || f >= 1<<53 {
				rec.badValue(n, "field \"bver\": not an unsigned integer")
			}
			rec.ver = uint64(f)
		}
		rec.num[i] = f
		return nil
	case (c == 't' || c == 'f') && want == tBool:
		l, err := s.literal()
		rec.vb = l == 't'
		return err
	}
	got, nested, err := s.scalar()
	if err != nil {
		return err
	}
	if nested {
		return reject(ReasonMalformed, "record %d: field %q: nested object or array", n, labels[i])
	}
	rec.badValue(n, "field %q: not %s (got %s)", labels[i], typeName(want), got)
	return nil
}

func typeName(t fieldType) string {
	switch t {
	case tNumber:
		return jNumber
	case tBool:
		return jBool
	case tVersion:
		return "an unsigned integer"
	case tData:
		return "base64url text"
	}
	return jString
}
