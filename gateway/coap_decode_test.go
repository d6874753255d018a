package gateway

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/message/pool"
	"github.com/plgd-dev/go-coap/v3/mux"

	"github.com/sluice-gw/sluice/buffer"
)

var updateCoAP = flag.Bool("update-coap", false, "rewrite gateway/testdata/coap/*/expected.json")

// The CoAP-facing decode path without sockets: the real router and decoder
// answer into a recorder. Cases live in testdata/coap/<case>/request, a
// request line ("POST /s/feeder-1"), option lines ("Content-Format: 110",
// "Uri-Query: m=v"), a blank line and the body ("Body-Hex: ..." instead for
// binary bodies), with the outcome in expected.json.

// recorder is the response side of one routed request.
type recorder struct{ m *pool.Message }

func (r *recorder) SetResponse(code codes.Code, cf message.MediaType, d io.ReadSeeker, opts ...message.Option) error {
	r.m.SetCode(code)
	r.m.ResetOptionsTo(opts)
	if d != nil {
		r.m.SetContentFormat(cf)
		r.m.SetBody(d)
	}
	return nil
}
func (r *recorder) Conn() mux.Conn             { return nil }
func (r *recorder) SetMessage(m *pool.Message) { r.m = m }
func (r *recorder) Message() *pool.Message     { return r.m }

// outcome is what a request came to, as expected.json holds it.
type outcome struct {
	Code     string           `json:"code"`
	Payload  string           `json:"payload,omitempty"`
	Size1    int              `json:"size1,omitempty"`
	Class    string           `json:"class,omitempty"`
	Readings []decodedReading `json:"readings,omitempty"`
}

type decodedReading struct {
	Name, Sensor, Metric, Unit string
	Value                      any
	GatewayTime                bool `json:",omitempty"`
}

// decodeOnly builds a CoAP ingress whose router decodes and answers but
// stores nothing.
func decodeOnly(in *Ingest) (*CoAP, *mux.Router, *outcome) {
	c := &CoAP{in: in, log: in.log}
	var out outcome
	router := c.newRouter(func(w mux.ResponseWriter, m *mux.Message, t coapTarget) {
		d, reply := c.decode(m.Message, t)
		if reply != nil {
			c.reply(w, reply)
			return
		}
		out.Class = string(t.class)
		for _, r := range d.readings {
			dr := decodedReading{Name: r.Name, Sensor: r.Sensor, Metric: r.Metric, Unit: r.Unit, GatewayTime: r.GatewayTime}
			switch r.Kind {
			case buffer.KindNumber:
				dr.Value = r.Number
			case buffer.KindString:
				dr.Value = r.Text
			case buffer.KindBool:
				dr.Value = r.Bool
			case buffer.KindData:
				dr.Value = r.Data
			}
			out.Readings = append(out.Readings, dr)
		}
		c.reply(w, &coapReply{code: codes.Changed})
	})
	return c, router, &out
}

// route sends one request through router and fills out from the recorder.
func route(router *mux.Router, out *outcome, req *pool.Message) {
	rec := &recorder{m: pool.NewMessage(context.Background())}
	router.ServeCOAP(rec, &mux.Message{Message: req, RouteParams: new(mux.RouteParams)})
	out.Code = rec.m.Code().String()
	if b, err := rec.m.ReadBody(); err == nil && len(b) > 0 {
		out.Payload = string(b)
	}
	if v, err := rec.m.GetOptionUint32(message.Size1); err == nil {
		out.Size1 = int(v)
	}
}

// parseCase reads a request file into a go-coap message.
func parseCase(data []byte) (*pool.Message, error) {
	head, body, _ := bytes.Cut(data, []byte("\n\n"))
	lines := strings.Split(string(head), "\n")
	method, path, ok := strings.Cut(lines[0], " ")
	if !ok {
		return nil, fmt.Errorf("request line %q", lines[0])
	}
	m := pool.NewMessage(context.Background())
	code, err := codes.ToCode(method)
	if err != nil {
		return nil, err
	}
	m.SetCode(code)
	m.SetType(message.Confirmable)
	m.SetMessageID(1)
	if err := m.SetPath(path); err != nil {
		return nil, err
	}
	body = bytes.TrimSuffix(body, []byte("\n"))
	for _, l := range lines[1:] {
		k, v, _ := strings.Cut(l, ": ")
		switch k {
		case "Content-Format":
			n, err := strconv.Atoi(v)
			if err != nil {
				return nil, err
			}
			m.AddOptionUint32(message.ContentFormat, uint32(n))
		case "Uri-Query":
			m.AddQuery(v)
		case "Body-Hex":
			if body, err = hex.DecodeString(v); err != nil {
				return nil, err
			}
		default:
			return nil, fmt.Errorf("unknown line %q", l)
		}
	}
	if len(body) > 0 {
		m.SetBody(bytes.NewReader(body))
	}
	return m, nil
}

func TestCoAPDecodeGolden(t *testing.T) {
	dirs, err := filepath.Glob("testdata/coap/*")
	if err != nil || len(dirs) == 0 {
		t.Fatalf("no cases: %v", err)
	}
	for _, dir := range dirs {
		t.Run(filepath.Base(dir), func(t *testing.T) {
			data, err := os.ReadFile(filepath.Join(dir, "request"))
			if err != nil {
				t.Fatal(err)
			}
			req, err := parseCase(data)
			if err != nil {
				t.Fatalf("request file: %v", err)
			}
			in := NewIngest(IngestOptions{MaxPayload: 256}, NewClock(ClockTrusted), nil, nil)
			_, router, out := decodeOnly(in)
			route(router, out, req)
			var b bytes.Buffer
			enc := json.NewEncoder(&b)
			enc.SetEscapeHTML(false)
			enc.SetIndent("", "  ")
			if err := enc.Encode(out); err != nil {
				t.Fatal(err)
			}
			got := b.Bytes()
			file := filepath.Join(dir, "expected.json")
			if *updateCoAP {
				if err := os.WriteFile(file, got, 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			want, err := os.ReadFile(file)
			if err != nil {
				t.Fatalf("%v (run with -update-coap to write it)", err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("got:\n%s\nwant:\n%s", got, want)
			}
		})
	}
}

// FuzzCoAPDecode: any path, content-format, query and body is answered with
// a code of the contract, and what is accepted decodes to valid readings.
func FuzzCoAPDecode(f *testing.F) {
	dirs, _ := filepath.Glob("testdata/coap/*/request")
	for _, file := range dirs {
		data, err := os.ReadFile(file)
		if err != nil {
			f.Fatal(err)
		}
		req, err := parseCase(data)
		if err != nil {
			f.Fatal(err)
		}
		path, _ := req.Path()
		cf := -1
		if v, err := req.ContentFormat(); err == nil {
			cf = int(v)
		}
		queries, _ := req.Queries()
		body, _ := req.ReadBody()
		f.Add(path, cf, strings.Join(queries, "&"), body)
	}
	allowed := map[codes.Code]bool{
		codes.Changed: true, codes.Content: true, codes.BadRequest: true, codes.BadOption: true, codes.NotFound: true,
		codes.MethodNotAllowed: true, codes.RequestEntityTooLarge: true, codes.UnsupportedMediaType: true,
	}
	in := NewIngest(IngestOptions{MaxPayload: 4096}, NewClock(ClockTrusted), nil, nil)
	f.Fuzz(func(t *testing.T, path string, cf int, query string, body []byte) {
		req := pool.NewMessage(context.Background())
		req.SetCode(codes.POST)
		if req.SetPath(path) != nil {
			return
		}
		if cf >= 0 {
			req.AddOptionUint32(message.ContentFormat, uint32(cf))
		}
		if query != "" {
			for _, q := range strings.Split(query, "&") {
				req.AddQuery(q)
			}
		}
		req.SetBody(bytes.NewReader(body))
		_, router, out := decodeOnly(in)
		route(router, out, req)
		code, err := codes.ToCode(out.Code)
		if err != nil || !allowed[code] {
			t.Fatalf("answered %s", out.Code)
		}
		if code != codes.Changed && out.Payload == "" {
			t.Fatalf("%s without a diagnostic", out.Code)
		}
		if code == codes.Changed && len(out.Readings) == 0 {
			t.Fatal("2.04 for no readings")
		}
	})
}
