package senml

import (
	"math"
	"strconv"
)

// cborReader reads CBOR (RFC 8949) from a byte slice. Every length it is
// told is checked against the bytes left before anything is sized by it, and
// since SenML values are never nested it does not recurse.
type cborReader struct {
	b []byte
	i int
}

func (r *cborReader) malformed(at int, what string) *Error {
	if at >= len(r.b) {
		return reject(ReasonMalformed, "CBOR: %s, but the payload ends", what)
	}
	return reject(ReasonMalformed, "CBOR: %s at byte %d", what, at)
}

// head reads the initial byte of an item and its argument. For an
// indefinite length (or a break), ai is 31 and arg 0.
func (r *cborReader) head() (major, ai byte, arg uint64, err *Error) {
	if r.i >= len(r.b) {
		return 0, 0, 0, r.malformed(r.i, "expected another item")
	}
	at := r.i
	c := r.b[r.i]
	r.i++
	major, ai = c>>5, c&0x1f
	switch {
	case ai < 24:
		arg = uint64(ai)
	case ai <= 27:
		n := 1 << (ai - 24)
		if len(r.b)-r.i < n {
			return 0, 0, 0, r.malformed(len(r.b), "expected the rest of an item header")
		}
		for _, x := range r.b[r.i : r.i+n] {
			arg = arg<<8 | uint64(x)
		}
		r.i += n
		if major == 7 && ai == 24 && arg < 32 {
			return 0, 0, 0, r.malformed(at, "badly encoded simple value")
		}
	case ai == 31:
		if major < 2 || major == 6 {
			return 0, 0, 0, r.malformed(at, "indefinite length on a type that has none")
		}
	default:
		return 0, 0, 0, r.malformed(at, "reserved additional information")
	}
	return major, ai, arg, nil
}

// bytesOf returns the next n bytes.
func (r *cborReader) bytesOf(n uint64) ([]byte, *Error) {
	if n > uint64(len(r.b)-r.i) {
		return nil, r.malformed(r.i, "string of "+strconv.FormatUint(n, 10)+" bytes runs past the end")
	}
	v := r.b[r.i : r.i+int(n)]
	r.i += int(n)
	return v, nil
}

// senmlCBOR decodes a SenML CBOR pack (RFC 8428 §6).
func (d *decoder) senmlCBOR(b []byte) *Error {
	r := cborReader{b: b}
	major, ai, n, err := r.head()
	if err != nil {
		return err
	}
	if major != 4 {
		return r.malformed(0, "expected a SenML pack, an array of records,")
	}
	// §6 wants a definite length for SenML (indefinite is for SensML
	// streams); both are read, since the records say the same either way.
	indef := ai == 31
	switch {
	case indef:
		d.reserve(len(b)/8, len(b))
	case n == 0:
		return reject(ReasonMalformed, "empty pack: SenML needs at least one record")
	case n > uint64(len(b)-r.i):
		return r.malformed(0, "array of "+strconv.FormatUint(n, 10)+" records is longer than the payload")
	default:
		d.reserve(int(n), len(b))
	}
	var rec record
	for k := 1; ; k++ {
		if indef {
			if r.i < len(b) && b[r.i] == 0xff {
				r.i++
				if k == 1 {
					return reject(ReasonMalformed, "empty pack: SenML needs at least one record")
				}
				break
			}
		} else if uint64(k) > n {
			break
		}
		rec.reset()
		if err := d.cborRecord(&r, &rec, k); err != nil {
			return err
		}
		d.take(&rec, k)
	}
	if r.i < len(b) {
		return r.malformed(r.i, "data after the pack")
	}
	return d.packDone()
}

// cborRecord reads one record map. It returns an error only for what makes
// the pack unreadable; other problems go to rec.bad.
func (d *decoder) cborRecord(r *cborReader, rec *record, n int) *Error {
	at := r.i
	major, ai, pairs, err := r.head()
	if err != nil {
		return err
	}
	if major != 5 {
		return reject(ReasonMalformed, "record %d: not a map (byte %d)", n, at)
	}
	indef := ai == 31
	if !indef && pairs > uint64(len(r.b)-r.i)/2 {
		return r.malformed(at, "map of "+strconv.FormatUint(pairs, 10)+" fields is longer than the payload")
	}
	d.keys.reset()
	d.intKeys.reset()
	for k := uint64(0); indef || k < pairs; k++ {
		if indef && r.i < len(r.b) && r.b[r.i] == 0xff {
			r.i++
			break
		}
		at := r.i
		kmaj, kai, karg, err := r.head()
		if err != nil {
			return err
		}
		i := -1
		var key []byte // a text label
		switch kmaj {
		case 0, 1:
			i = cborLabel(kmaj, karg)
			if i < 0 {
				// Keep the label as 9 bytes in scratch, for the duplicate check.
				off := len(d.scratch)
				d.scratch = append(d.scratch, kmaj, byte(karg>>56), byte(karg>>48), byte(karg>>40),
					byte(karg>>32), byte(karg>>24), byte(karg>>16), byte(karg>>8), byte(karg))
				if d.intKeys.add(d.scratch[off:len(d.scratch):len(d.scratch)]) {
					return reject(ReasonMalformed, "record %d: field %s appears twice", n, intLabel(kmaj, karg))
				}
			}
		case 3:
			if kai == 31 {
				return r.malformed(at, "indefinite-length field label")
			}
			if key, err = r.bytesOf(karg); err != nil {
				return err
			}
			// §6 gives the known fields integer labels; their JSON labels
			// are taken too, as naive encoders write them.
			if i = jsonLabel(key); i < 0 {
				if d.keys.add(key) {
					return reject(ReasonMalformed, "record %d: field %s appears twice", n, quote(key))
				}
				if len(key) > 0 && key[len(key)-1] == '_' && rec.mandatory == nil {
					rec.mandatory = key
				}
			}
		default:
			return r.malformed(at, "field label that is not an integer or text")
		}
		if i < 0 {
			// Unknown fields are ignored (§4.4), but must be well formed.
			vmaj, vai, varg, err := r.head()
			if err != nil {
				return err
			}
			if _, problem, err := r.skip(vmaj, vai, varg, n); err != nil {
				return err
			} else if problem != "" {
				label := intLabel(kmaj, karg)
				if kmaj == 3 {
					label = quote(key)
				}
				return reject(ReasonMalformed, "record %d: field %s: %s", n, label, problem)
			}
			continue
		}
		if rec.has&bit(i) != 0 {
			return reject(ReasonMalformed, "record %d: field %q appears twice", n, labels[i])
		}
		rec.has |= bit(i)
		if err := r.field(rec, i, n); err != nil {
			return err
		}
	}
	return nil
}

// cborLabel maps the integer labels of RFC 8428 Table 4 to fields.
func cborLabel(major byte, arg uint64) int {
	if major == 0 {
		if arg <= 8 {
			return [...]int{iN, iU, iV, iVS, iVB, iS, iT, iUT, iVD}[arg]
		}
		return -1
	}
	// Negative: the label is -1-arg.
	if arg <= 5 {
		return [...]int{iBVer, iBN, iBT, iBU, iBV, iBS}[arg]
	}
	return -1
}

func intLabel(major byte, arg uint64) string {
	if major == 0 {
		return strconv.FormatUint(arg, 10)
	}
	if arg < math.MaxInt64 {
		return strconv.FormatInt(-1-int64(arg), 10)
	}
	return "-1-" + strconv.FormatUint(arg, 10)
}

// field reads the value of known field i into rec.
func (r *cborReader) field(rec *record, i, n int) *Error {
	at := r.i
	major, ai, arg, err := r.head()
	if err != nil {
		return err
	}
	want := fieldTypes[i]
	switch {
	case (want == tText && major == 3) || (want == tData && major == 2):
		if ai == 31 {
			// §6: text and data are definite-length strings.
			return r.malformed(at, "indefinite-length string")
		}
		rec.text[i], err = r.bytesOf(arg)
		rec.rawVD = rec.rawVD || want == tData
		return err
	case want == tVersion && major == 0:
		rec.ver, rec.num[i] = arg, float64(arg)
		return nil
	case want == tBool && major == 7 && (ai == 20 || ai == 21):
		rec.vb = ai == 21
		return nil
	case want == tNumber:
		f, kind, err := r.number(major, ai, arg, n)
		switch {
		case err != nil:
			return err
		case kind == numBignum:
			rec.badValue(n, "field %q: a decimal fraction with a bignum mantissa is not supported", labels[i])
			return nil
		case kind == numOK:
			rec.num[i] = f
			if !finite(f) {
				rec.badValue(n, "field %q: not a finite number", labels[i])
			}
			return nil
		}
	}
	got, problem, err := r.skip(major, ai, arg, n)
	if err != nil {
		return err
	}
	if problem != "" {
		return reject(ReasonMalformed, "record %d: field %q: %s", n, labels[i], problem)
	}
	rec.badValue(n, "field %q: not %s (got %s)", labels[i], cborTypeName(want), got)
	return nil
}

// What number found.
const (
	numNot    = iota // another type; nothing more was read
	numOK            // a number
	numBignum        // a decimal fraction with a bignum mantissa, read but not supported
)

// number reads a number whose head was read: an integer, a half, single or
// double float, or a decimal fraction (tag 4, §6).
func (r *cborReader) number(major, ai byte, arg uint64, n int) (f float64, kind int, err *Error) {
	switch {
	case major == 0:
		return float64(arg), numOK, nil
	case major == 1:
		return -1 - float64(arg), numOK, nil
	case major == 7 && ai == 25:
		return halfFloat(uint16(arg)), numOK, nil
	case major == 7 && ai == 26:
		return float64(math.Float32frombits(uint32(arg))), numOK, nil
	case major == 7 && ai == 27:
		return math.Float64frombits(arg), numOK, nil
	case major == 6 && arg == 4:
		f, ok, err := r.decimalFraction(n)
		if !ok {
			return 0, numBignum, err
		}
		return f, numOK, err
	}
	return 0, numNot, nil
}

// decimalFraction reads the [exponent, mantissa] of a tag 4 whose head was
// read. ok is false for a well-formed bignum mantissa, which is not supported.
func (r *cborReader) decimalFraction(n int) (f float64, ok bool, err *Error) {
	at := r.i
	bad := func() (float64, bool, *Error) {
		return 0, false, reject(ReasonMalformed, "record %d: decimal fraction at byte %d is not [exponent, mantissa]", n, at)
	}
	major, ai, arg, err := r.head()
	if err != nil {
		return 0, false, err
	}
	if major != 4 || ai == 31 || arg != 2 {
		return bad()
	}
	var num [64]byte
	b := num[:0]
	var exp []byte
	for k := range 2 {
		major, _, arg, err := r.head()
		if err != nil {
			return 0, false, err
		}
		switch {
		case major == 0:
			b = strconv.AppendUint(b, arg, 10)
		case major == 1: // -1-arg, which may not fit an int64
			b = append(b, '-')
			if arg == math.MaxUint64 {
				b = append(b, "18446744073709551616"...)
			} else {
				b = strconv.AppendUint(b, arg+1, 10)
			}
		case k == 1 && major == 6 && (arg == 2 || arg == 3):
			// A bignum: well formed, but not supported.
			major, ai, arg, err := r.head()
			if err == nil && (major != 2 || ai == 31) {
				return bad()
			}
			if err == nil {
				_, err = r.bytesOf(arg)
			}
			return 0, false, err
		default:
			return bad()
		}
		if k == 0 {
			exp = append([]byte("e"), b...)
			b = b[:0]
		}
	}
	b = append(b, exp...)
	f, perr := strconv.ParseFloat(string(b), 64)
	if perr != nil && !math.IsInf(f, 0) && f != 0 {
		return bad()
	}
	return f, true, nil
}

// halfFloat converts an IEEE 754 half-precision float.
func halfFloat(h uint16) float64 {
	exp, mant := int(h>>10&0x1f), float64(h&0x3ff)
	var v float64
	switch exp {
	case 0:
		v = math.Ldexp(mant, -24)
	case 0x1f:
		v = math.Inf(1)
		if mant != 0 {
			v = math.NaN()
		}
	default:
		v = math.Ldexp(mant+0x400, exp-25)
	}
	if h&0x8000 != 0 {
		v = -v
	}
	return v
}

// skip skips the rest of a scalar whose head was read and says what it was.
// An array, map or tag other than a decimal fraction is a problem where a
// SenML value belongs; the caller names the field.
func (r *cborReader) skip(major, ai byte, arg uint64, n int) (got, problem string, err *Error) {
	switch major {
	case 0:
		return "an integer", "", nil
	case 1:
		return "a negative integer", "", nil
	case 2, 3:
		if ai == 31 {
			return "", "indefinite-length string", nil
		}
		_, err := r.bytesOf(arg)
		if major == 2 {
			return "a byte string", "", err
		}
		return "a text string", "", err
	case 4, 5:
		return "", "nested array or map", nil
	case 6:
		if arg == 4 {
			_, _, err := r.decimalFraction(n)
			return "a decimal fraction", "", err
		}
		return "", "CBOR tag " + strconv.FormatUint(arg, 10) + " is not supported", nil
	}
	switch ai {
	case 20, 21:
		return "a boolean", "", nil
	case 22:
		return "null", "", nil
	case 23:
		return "undefined", "", nil
	case 25, 26, 27:
		return "a float", "", nil
	case 31:
		return "", "unexpected break", nil
	}
	return "a simple value", "", nil
}

func cborTypeName(t fieldType) string {
	switch t {
	case tNumber:
		return "a number"
	case tBool:
		return "a boolean"
	case tVersion:
		return "an unsigned integer"
	case tData:
		return "a byte string"
	}
	return "a text string"
}
