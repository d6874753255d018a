package gateway

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"

	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/message/pool"
	"github.com/plgd-dev/go-coap/v3/mux"

	"github.com/sluice-gw/sluice/buffer"
	"github.com/sluice-gw/sluice/gateway/senml"
)

// coapTarget is what an ingest path names: the priority class (/s telemetry,
// /a alarm) and the sensor and metric defaults for the payload.
type coapTarget struct {
	class          buffer.Class
	sensor, metric string
}

// coapLinks is the RFC 6690 description of the resources, for /.well-known/core.
const coapLinks = `</s>;rt="sluice.telemetry";ct="110 112 50 0";title="POST or PUT /s/{sensor}[/{metric}][?m=metric]",` +
	`</a>;rt="sluice.alarm";ct="110 112 50 0";title="POST or PUT /a/{sensor}[/{metric}][?m=metric]"`

// newRouter routes /s/{sensor}[/{metric}] and /a/... to ingest with the
// target the path names, /.well-known/core to discovery, and answers
// anything else 4.04 (counted as malformed when it carried a body to store).
func (c *CoAP) newRouter(ingest func(mux.ResponseWriter, *mux.Message, coapTarget)) *mux.Router {
	r := mux.NewRouter()
	r.SetErrorHandler(c.libError)
	for _, p := range []struct {
		prefix string
		class  buffer.Class
	}{{"/s/", buffer.ClassTelemetry}, {"/a/", buffer.ClassAlarm}} {
		for _, pattern := range []string{p.prefix + "{sensor}", p.prefix + "{sensor}/{metric}"} {
			r.HandleFunc(pattern, func(w mux.ResponseWriter, m *mux.Message) {
				ingest(w, m, coapTarget{class: p.class, sensor: m.RouteParams.Vars["sensor"], metric: m.RouteParams.Vars["metric"]})
			})
		}
	}
	r.HandleFunc("/.well-known/core", func(w mux.ResponseWriter, m *mux.Message) {
		if m.Code() != codes.GET {
			setText(w, codes.MethodNotAllowed, "only GET")
			return
		}
		setResponse(w, codes.Content, message.AppLinkFormat, coapLinks)
	})
	r.DefaultHandleFunc(func(w mux.ResponseWriter, m *mux.Message) {
		path, _ := m.Path()
		msg := fmt.Sprintf("no resource %q: POST to /s/{sensor} or /a/{sensor}", clip(path))
		if m.Code() == codes.POST || m.Code() == codes.PUT {
			c.in.Reject(IngressCoAP, &Rejection{ReasonMalformed, msg})
		}
		setText(w, codes.NotFound, msg)
	})
	return r
}

func setText(w mux.ResponseWriter, code codes.Code, msg string) {
	setResponse(w, code, message.TextPlain, msg)
}

func setResponse(w mux.ResponseWriter, code codes.Code, cf message.MediaType, body string) {
	// An error here is the request's No-Response option (RFC 7967) at work.
	_ = w.SetResponse(code, cf, bytes.NewReader([]byte(body)))
}

// clip shortens what a device sent before it goes back in a diagnostic.
func clip(s string) string {
	const max = 40
	if len(s) > max {
		return s[:max] + "..."
	}
	return s
}

// coapFormats are the content-formats of the contract and their decoders.
var coapFormats = map[message.MediaType]senml.Format{
	message.AppSenmlJSON: senml.FormatSenMLJSON,
	message.AppSenmlCbor: senml.FormatSenMLCBOR,
	message.AppJSON:      senml.FormatJSON,
	message.TextPlain:    senml.FormatValue,
}

// coapDecoded is a request turned into readings, with the hash of what
// identifies its content for the idempotency key.
type coapDecoded struct {
	readings []buffer.Reading
	hash     [sha256.Size]byte
}

// decode checks one request to an ingest path and decodes its body. A
// refusal comes back as the reply to send, already counted when the request
// carried a body to store (POST or PUT).
func (c *CoAP) decode(r *pool.Message, t coapTarget) (*coapDecoded, *coapReply) {
	if r.Code() != codes.POST && r.Code() != codes.PUT {
		return nil, &coapReply{code: codes.MethodNotAllowed, msg: "POST or PUT readings here"}
	}
	reject := func(reason Reason, format string, args ...any) (*coapDecoded, *coapReply) {
		return nil, rejectionReply(c.in.Reject(IngressCoAP, &Rejection{reason, fmt.Sprintf(format, args...)}), c.in.opts.MaxPayload)
	}
	if size, ok := r.Context().Value(tooLargeKey{}).(int64); ok {
		return reject(ReasonTooLarge, "block-wise body of %d bytes is over max_payload (%d)", size, c.in.opts.MaxPayload)
	}
	opts := r.Options()
	format := senml.FormatAuto // no Content-Format: told apart by the first byte, as MQTT's "auto"
	cfs := 0
	for _, o := range opts {
		if o.ID != message.ContentFormat {
			continue
		}
		if cfs++; cfs > 1 {
			return badOption(c, "Content-Format given more than once")
		}
		v, err := opts.GetUint32(message.ContentFormat)
		f, known := coapFormats[message.MediaType(v)]
		if err != nil || !known {
			return reject(ReasonUnsupported, "content-format %s is not one of 110 (senml+json), 112 (senml+cbor), 50 (json), 0 (text/plain)", formatOption(o.Value))
		}
		format = f
	}
	metric := t.metric
	queries, err := r.Queries()
	if err != nil && !errors.Is(err, message.ErrOptionNotFound) {
		return badOption(c, "Uri-Query: %v", err)
	}
	for _, q := range queries {
		m, ok := strings.CutPrefix(q, "m=")
		switch {
		case !ok:
			return badOption(c, "unknown query %q: only m=<metric>", clip(q))
		case m == "":
			return badOption(c, "empty metric in ?m=")
		case metric != "":
			return badOption(c, "metric given twice (path or ?m=)")
		}
		metric = m
	}
	body, err := r.ReadBody()
	if err != nil {
		return reject(ReasonMalformed, "cannot read the body: %v", err)
	}
	rs, rej := c.in.Decode(IngressCoAP, format, body, t.sensor, metric)
	if rej != nil {
		return nil, rejectionReply(rej, c.in.opts.MaxPayload)
	}
	d := &coapDecoded{readings: rs}
	path, _ := r.Path()
	h := sha256.New()
	for _, part := range [][]byte{[]byte(path), {byte(format)}, []byte(metric), body} {
		h.Write(binary.BigEndian.AppendUint32(nil, uint32(len(part))))
		h.Write(part)
	}
	h.Sum(d.hash[:0])
	return d, nil
}

// badOption refuses an option the gateway cannot act on: 4.02, counted as malformed.
func badOption(c *CoAP, format string, args ...any) (*coapDecoded, *coapReply) {
	rej := c.in.Reject(IngressCoAP, &Rejection{ReasonMalformed, fmt.Sprintf(format, args...)})
	return nil, &coapReply{code: codes.BadOption, msg: rej.Msg}
}

// formatOption shows a Content-Format option value as the number it encodes.
func formatOption(v []byte) string {
	if len(v) > 4 {
		return fmt.Sprintf("of %d bytes", len(v))
	}
	var n uint32
	for _, b := range v {
		n = n<<8 | uint32(b)
	}
	return strconv.FormatUint(uint64(n), 10)
}

// coapKey is the idempotency key of a request: a 128-bit hash of the
// listener kind and peer address, the message id, and the hash of path,
// format, metric and body. Fixed and short, because a busy gateway keeps
// many of them (see coapKeysKept).
func coapKey(conn mux.Conn, secure bool, mid int32, hash [sha256.Size]byte) []byte {
	peer := "udp:"
	if secure {
		peer = "dtls:"
	}
	if a, ok := conn.RemoteAddr().(*net.UDPAddr); ok {
		peer += a.AddrPort().String()
	} else {
		peer += conn.RemoteAddr().String()
	}
	h := sha256.New()
	h.Write([]byte(peer))
	h.Write(binary.BigEndian.AppendUint16(nil, uint16(mid)))
	h.Write(hash[:])
	return h.Sum(nil)[:16]
}
