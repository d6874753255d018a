// Package senml decodes sensor payloads (RFC 8428 SenML JSON and CBOR, a flat JSON object, a plain number) into buffer readings.
// It is pure: bytes and the receive time in, readings or a rejection out; no I/O, logging or clock of its own.
package senml

import (
	"fmt"
	"strconv"
	"time"
	"unicode/utf8"

	"github.com/sluice-gw/sluice/buffer"
)

// Format is a payload format.
type Format int

// Payload formats. The CoAP content-format of each is in its comment.
const (
	FormatAuto      Format = iota // tell the formats below apart by their first byte
	FormatSenMLJSON               // RFC 8428 JSON array (CoAP content-format 110)
	FormatSenMLCBOR               // RFC 8428 CBOR array (content-format 112)
	FormatJSON                    // the flat JSON object (content-format 50)
	FormatValue                   // a plain number (content-format 0, text/plain)
)

// ParseFormat maps a config value ("auto", "senml", "senml+cbor" or "cbor",
// "json", "value") to a Format. An unknown name is an error naming it.
func ParseFormat(s string) (Format, error) {
	switch s {
	case "auto":
		return FormatAuto, nil
	case "senml", "senml+json":
		return FormatSenMLJSON, nil
	case "senml+cbor", "cbor":
		return FormatSenMLCBOR, nil
	case "json":
		return FormatJSON, nil
	case "value":
		return FormatValue, nil
	}
	return 0, fmt.Errorf("unknown payload format %q (want auto, senml, senml+cbor, json or value)", s)
}

// String returns the config name of f, which ParseFormat maps back to f.
func (f Format) String() string {
	switch f {
	case FormatAuto:
		return "auto"
	case FormatSenMLJSON:
		return "senml"
	case FormatSenMLCBOR:
		return "senml+cbor"
	case FormatJSON:
		return "json"
	case FormatValue:
		return "value"
	}
	return "format(" + strconv.Itoa(int(f)) + ")"
}

// Reason is why a message was rejected; the values are metric label values and fixed.
type Reason string

// Rejection reasons.
const (
	ReasonMalformed         Reason = "malformed"          // does not parse in the configured or detected format
	ReasonBadValue          Reason = "bad_value"          // NaN, infinities, out of range, wrong type, a record with no or two values, NUL/invalid UTF-8 text
	ReasonBadTime           Reason = "bad_time"           // a sensor time outside Oldest .. Now+MaxFuture
	ReasonUnsupportedFormat Reason = "unsupported_format" // SenML bver above 10, an unknown mandatory field (name ending in "_")
)

// Error is a rejection of a whole message. Msg names the problem and where
// (e.g. `record 3: field "v": not a number (got a string)`); it quotes at
// most about 40 bytes of the input, so it is safe to send back to a device.
type Error struct {
	Reason Reason
	Msg    string
}

func (e *Error) Error() string { return string(e.Reason) + ": " + e.Msg }

func reject(r Reason, format string, args ...any) *Error {
	return &Error{Reason: r, Msg: fmt.Sprintf(format, args...)}
}

// Context is what the receiving side knows about a message.
type Context struct {
	// Sensor and Metric are defaults from the MQTT topic pattern or the CoAP
	// path ("" = none); what the payload says wins.
	Sensor, Metric string
	// Now is the receive time, a microsecond no other message gets: relative
	// SenML times resolve against it.
	Now time.Time
	// Oldest: a sensor-sent time before this is bad_time.
	Oldest time.Time
	// MaxFuture: a sensor-sent time after Now+MaxFuture is bad_time, checked
	// only when ClockSynced (a gateway still at 1970 would reject everything).
	MaxFuture   time.Duration
	ClockSynced bool
	// Into, when it has room, holds the readings: a caller that decodes many
	// messages may lend the slice of one it is done with.
	Into []buffer.Reading
}

// Decode decodes one whole message in format f. It is accepted or rejected
// whole: one bad record rejects the pack, and the error is then an *Error.
//
// Readings without a time of their own have a zero Time and GatewayTime set;
// the caller stamps them. Received, ClockSynced, Boot and Mono are left to the
// caller too. The readings share no memory with payload.
func Decode(f Format, payload []byte, c *Context) ([]buffer.Reading, error) {
	if c == nil {
		c = &Context{}
	}
	if f == FormatAuto {
		var ok bool
		if f, ok = detect(payload); !ok {
			return nil, reject(ReasonMalformed, "empty payload")
		}
	}
	var d decoder
	d.init(c)
	var err *Error
	switch f {
	case FormatSenMLJSON:
		err = d.senmlJSON(payload)
	case FormatSenMLCBOR:
		err = d.senmlCBOR(payload)
	case FormatJSON:
		err = d.flatJSON(payload)
	case FormatValue:
		err = d.plainValue(payload)
	default:
		err = reject(ReasonUnsupportedFormat, "unknown payload format %d", int(f))
	}
	if err != nil {
		return nil, err
	}
	return d.out, nil
}

// detect picks the format from the first byte: a CBOR array header, else
// the first non-whitespace byte of JSON, else a plain number.
func detect(b []byte) (Format, bool) {
	if len(b) == 0 {
		return 0, false
	}
	if b[0] >= 0x80 && b[0] <= 0x9f { // CBOR major type 4: an array
		return FormatSenMLCBOR, true
	}
	for _, c := range b {
		switch c {
		case ' ', '\t', '\n', '\r':
			continue
		case '[':
			return FormatSenMLJSON, true
		case '{':
			return FormatJSON, true
		}
		return FormatValue, true
	}
	return 0, false
}

// maxQuote bounds how much input a diagnostic echoes.
const maxQuote = 40

// quote quotes at most maxQuote bytes of b for a diagnostic.
func quote(b []byte) string {
	if len(b) <= maxQuote {
		return strconv.Quote(string(b))
	}
	n := maxQuote
	for n > maxQuote-utf8.UTFMax && !utf8.RuneStart(b[n]) {
		n--
	}
	return strconv.Quote(string(b[:n])) + "..."
}
