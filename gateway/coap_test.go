package gateway

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/message/pool"
	"github.com/plgd-dev/go-coap/v3/net/blockwise"
	"github.com/plgd-dev/go-coap/v3/options"
	"github.com/plgd-dev/go-coap/v3/udp"
	udpClient "github.com/plgd-dev/go-coap/v3/udp/client"
	"github.com/plgd-dev/go-coap/v3/udp/coder"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/sluice-gw/sluice/buffer"
	"github.com/sluice-gw/sluice/internal/testenv"
)

// coapEnv is a CoAP ingress on free loopback ports over a real buffer.
type coapEnv struct {
	t      *testing.T
	buf    *buffer.Buffer
	in     *Ingest
	reg    *prometheus.Registry
	srv    *CoAP
	addr   string // plain UDP
	dtls   string // DTLS, when configured
	cancel context.CancelFunc
	done   chan error
	logs   testWriter
}

type coapSetup struct {
	opts   CoAPOptions // Listen/DTLSListen "auto" pick free ports
	ingest IngestOptions
	buffer buffer.Options
}

func startCoAP(t *testing.T, s coapSetup) *coapEnv {
	t.Helper()
	if s.buffer.Dir == "" {
		s.buffer.Dir = t.TempDir()
	}
	buf, err := buffer.Open(s.buffer)
	if err != nil {
		t.Fatal(err)
	}
	e := &coapEnv{t: t, buf: buf, reg: prometheus.NewPedanticRegistry(), logs: newTestWriter(t)}
	e.in = NewIngest(s.ingest, NewClock(ClockTrusted), nil, e.reg)
	if s.opts.Listen == "auto" {
		s.opts.Listen = fmt.Sprintf("127.0.0.1:%d", testenv.FreeUDPPort(t))
	}
	if s.opts.DTLSListen == "auto" {
		s.opts.DTLSListen = fmt.Sprintf("127.0.0.1:%d", testenv.FreeUDPPort(t))
	}
	e.addr, e.dtls = s.opts.Listen, s.opts.DTLSListen
	t.Cleanup(func() {
		if err := buf.Close(); err != nil {
			t.Errorf("close buffer: %v", err)
		}
	})
	e.start(s.opts)
	return e
}

// start runs a new server on the same buffer and ports.
func (e *coapEnv) start(opts CoAPOptions) {
	e.t.Helper()
	srv, err := NewCoAP(opts, e.in, e.buf, slog.New(slog.NewTextHandler(e.logs, &slog.HandlerOptions{Level: slog.LevelDebug})))
	if err != nil {
		e.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	e.srv, e.cancel, e.done = srv, cancel, make(chan error, 1)
	go func() { e.done <- srv.Run(ctx) }()
	e.t.Cleanup(e.stop)
	deadline := time.Now().Add(5 * time.Second)
	for {
		if st, lastErr := srv.State(); st == StateListening {
			return
		} else if st == StateStopped {
			e.t.Fatalf("coap did not start: %s", lastErr)
		}
		if time.Now().After(deadline) {
			e.t.Fatal("coap not listening within 5 s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// stop cancels Run and checks that it returns nil.
func (e *coapEnv) stop() {
	if e.cancel == nil {
		return
	}
	e.cancel()
	e.cancel = nil
	select {
	case err := <-e.done:
		if err != nil {
			e.t.Errorf("Run returned %v, want nil", err)
		}
	case <-time.After(10 * time.Second):
		e.t.Error("Run did not return within 10 s of its context ending")
	}
}

func (e *coapEnv) stored() int64 { return e.buf.Stats().Readings }

func (e *coapEnv) rejected(reason Reason) float64 {
	return testutil.ToFloat64(e.in.metrics.rejected.WithLabelValues(IngressCoAP, string(reason)))
}

func (e *coapEnv) dial(opts ...udp.Option) *udpClient.Conn {
	e.t.Helper()
	cc, err := udp.Dial(e.addr, opts...)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { _ = cc.Close() })
	return cc
}

// request is one CoAP request of a test.
type request struct {
	method  codes.Code
	path    string
	cf      int // -1: no Content-Format
	queries []string
	body    string
}

// fill sets m's code, options and body from req.
func (req request) fill(t testing.TB, m *pool.Message) {
	t.Helper()
	m.SetCode(req.method)
	if err := m.SetPath(req.path); err != nil {
		t.Fatal(err)
	}
	if req.cf >= 0 {
		m.SetContentFormat(message.MediaType(req.cf))
	}
	for _, q := range req.queries {
		m.AddQuery(q)
	}
	if req.body != "" {
		m.SetBody(bytes.NewReader([]byte(req.body)))
	}
}

// response is what came back, read out of go-coap's pooled message.
type response struct {
	code   codes.Code
	body   string
	size1  int64 // -1 when absent
	maxAge int64 // -1 when absent
}

func readResponse(m *pool.Message) response {
	r := response{code: m.Code(), size1: -1, maxAge: -1}
	if b, err := m.ReadBody(); err == nil {
		r.body = string(b)
	}
	if v, err := m.GetOptionUint32(message.Size1); err == nil {
		r.size1 = int64(v)
	}
	if v, err := m.GetOptionUint32(message.MaxAge); err == nil {
		r.maxAge = int64(v)
	}
	return r
}

type doer interface {
	AcquireMessage(ctx context.Context) *pool.Message
	ReleaseMessage(*pool.Message)
	Do(*pool.Message) (*pool.Message, error)
}

// do sends req as a confirmable request and returns the response.
func do(t *testing.T, cc doer, req request) response {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	m := cc.AcquireMessage(ctx)
	defer cc.ReleaseMessage(m)
	m.SetType(message.Confirmable)
	token, err := message.GetToken()
	if err != nil {
		t.Fatal(err)
	}
	m.SetToken(token)
	req.fill(t, m)
	resp, err := cc.Do(m)
	if err != nil {
		t.Fatalf("%s %s: %v", req.method, req.path, err)
	}
	defer cc.ReleaseMessage(resp)
	return readResponse(resp)
}

const senmlPack = `[{"bn":"feeder-1:","n":"voltage","u":"V","v":230.4},{"n":"current","u":"A","v":12.5}]`

func TestCoAPResponseCodes(t *testing.T) {
	e := startCoAP(t, coapSetup{opts: CoAPOptions{Listen: "auto"}, ingest: IngestOptions{MaxPayload: 512}})
	cc := e.dial()
	cbor := []byte{0x81, 0xa2, 0x00, 0x63, 'h', 'u', 'm', 0x02, 0x18, 0x2a} // [{0:"hum", 2:42}]
	cases := []struct {
		name   string
		req    request
		code   codes.Code
		reason Reason // counted, "" for none
		stored int64  // readings this request adds
		body   string // substring of the diagnostic
	}{
		{"senml json", request{codes.POST, "/s/feeder-1", 110, nil, senmlPack}, codes.Changed, "", 2, ""},
		{"senml cbor", request{codes.PUT, "/s/pump-3", 112, nil, string(cbor)}, codes.Changed, "", 1, ""},
		{"flat json", request{codes.POST, "/s/x", 50, nil, `{"sensor":"tank-2","metric":"level","value":3.5}`}, codes.Changed, "", 1, ""},
		{"plain with path metric", request{codes.POST, "/s/meter-9/energy", 0, nil, "17.25"}, codes.Changed, "", 1, ""},
		{"plain with query metric", request{codes.POST, "/a/valve-2", 0, []string{"m=pressure"}, "8"}, codes.Changed, "", 1, ""},
		{"no content-format is told apart", request{codes.POST, "/s/feeder-2", -1, nil, senmlPack}, codes.Changed, "", 2, ""},
		{"malformed", request{codes.POST, "/s/feeder-1", 110, nil, `[{"v":`}, codes.BadRequest, ReasonMalformed, 0, "payload ends"},
		{"plain without metric", request{codes.POST, "/s/meter-9", 0, nil, "17"}, codes.BadRequest, ReasonMalformed, 0, "metric"},
		{"bad value", request{codes.POST, "/s/feeder-1", 110, nil, `[{"n":"v","v":1,"vs":"x"}]`}, codes.BadRequest, ReasonBadValue, 0, "value"},
		{"bad time", request{codes.POST, "/s/feeder-1", 110, nil, `[{"n":"v","v":1,"t":1e12}]`}, codes.BadRequest, ReasonBadTime, 0, "time"},
		{"unsupported content-format", request{codes.POST, "/s/feeder-1", 60, nil, "x"}, codes.UnsupportedMediaType, ReasonUnsupported, 0, "60"},
		{"unsupported bver", request{codes.POST, "/s/feeder-1", 110, nil, `[{"bver":99,"n":"v","v":1}]`}, codes.UnsupportedMediaType, ReasonUnsupported, 0, "version 99"},
		{"unknown query", request{codes.POST, "/s/feeder-1", 0, []string{"x=1"}, "1"}, codes.BadOption, ReasonMalformed, 0, "query"},
		{"metric twice", request{codes.POST, "/s/feeder-1/v", 0, []string{"m=w"}, "1"}, codes.BadOption, ReasonMalformed, 0, "twice"},
		{"too large", request{codes.POST, "/s/feeder-1", 0, []string{"m=v"}, strings.Repeat(" ", 600) + "1"}, codes.RequestEntityTooLarge, ReasonTooLarge, 0, "max_payload"},
		{"unknown path", request{codes.POST, "/readings/feeder-1", 0, nil, "1"}, codes.NotFound, ReasonMalformed, 0, "/s/{sensor}"},
		{"too deep a path", request{codes.POST, "/s/a/b/c", 0, nil, "1"}, codes.NotFound, ReasonMalformed, 0, "no resource"},
		{"wrong method", request{codes.GET, "/s/feeder-1", -1, nil, ""}, codes.MethodNotAllowed, "", 0, "POST"},
		{"delete", request{codes.DELETE, "/a/feeder-1", -1, nil, ""}, codes.MethodNotAllowed, "", 0, "POST"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			before, rejBefore := e.stored(), 0.0
			if c.reason != "" {
				rejBefore = e.rejected(c.reason)
			}
			got := do(t, cc, c.req)
			if got.code != c.code {
				t.Fatalf("code %v (%q), want %v", got.code, got.body, c.code)
			}
			if c.body != "" && !strings.Contains(got.body, c.body) {
				t.Errorf("diagnostic %q does not mention %q", got.body, c.body)
			}
			if n := e.stored() - before; n != c.stored {
				t.Errorf("%d readings stored, want %d", n, c.stored)
			}
			if c.reason != "" && e.rejected(c.reason)-rejBefore != 1 {
				t.Errorf("rejection %s counted %v times, want once", c.reason, e.rejected(c.reason)-rejBefore)
			}
			if c.code == codes.RequestEntityTooLarge && got.size1 != 512 {
				t.Errorf("4.13 with Size1 %d, want 512 (max_payload)", got.size1)
			}
		})
	}
	if problems, err := testutil.GatherAndLint(e.reg); err != nil || len(problems) > 0 {
		t.Errorf("metrics lint: %v %v", problems, err)
	}
}

func TestCoAPStoresWhatItAcknowledged(t *testing.T) {
	e := startCoAP(t, coapSetup{opts: CoAPOptions{Listen: "auto"}})
	cc := e.dial()
	if got := do(t, cc, request{codes.POST, "/a/valve-2/pressure", 0, nil, "8.5"}); got.code != codes.Changed {
		t.Fatalf("code %v (%s)", got.code, got.body)
	}
	b, err := e.buf.Peek(10)
	if err != nil {
		t.Fatal(err)
	}
	if b.Class != buffer.ClassAlarm || len(b.Records) != 1 {
		t.Fatalf("%d %s readings, want 1 alarm", len(b.Records), b.Class)
	}
	r := b.Records[0].Reading
	if r.Name != "valve-2:pressure" || r.Sensor != "valve-2" || r.Metric != "pressure" || r.Number != 8.5 || !r.GatewayTime {
		t.Errorf("stored %+v", r)
	}
	if n := testutil.ToFloat64(e.in.metrics.received.WithLabelValues(IngressCoAP)); n != 1 {
		t.Errorf("readings_received_total{ingress=coap} = %v, want 1", n)
	}
}

func TestCoAPDiscovery(t *testing.T) {
	e := startCoAP(t, coapSetup{opts: CoAPOptions{Listen: "auto"}})
	cc := e.dial()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := cc.Get(ctx, "/.well-known/core")
	if err != nil {
		t.Fatal(err)
	}
	got := readResponse(resp)
	cf, _ := resp.ContentFormat()
	if got.code != codes.Content || cf != message.AppLinkFormat {
		t.Fatalf("code %v format %v", got.code, cf)
	}
	for _, want := range []string{`</s>;rt="sluice.telemetry"`, `</a>;rt="sluice.alarm"`, `ct="110 112 50 0"`} {
		if !strings.Contains(got.body, want) {
			t.Errorf("link format %q lacks %q", got.body, want)
		}
	}
	if got := do(t, cc, request{codes.POST, "/.well-known/core", 0, nil, "1"}); got.code != codes.MethodNotAllowed {
		t.Errorf("POST to discovery: %v, want 4.05", got.code)
	}
}

// pack is a SenML pack of n records, each with a name and a value: 18 or 19
// bytes a record.
func pack(n int) string {
	recs := make([]string, n)
	for i := range recs {
		recs[i] = fmt.Sprintf(`{"n":"r%03d","v":%d}`, i, i)
	}
	return "[" + strings.Join(recs, ",") + "]"
}

func TestCoAPBlockwise(t *testing.T) {
	e := startCoAP(t, coapSetup{opts: CoAPOptions{Listen: "auto"}, ingest: IngestOptions{MaxPayload: 4096}})
	cc := e.dial(options.WithBlockwise(true, blockwise.SZX64, 5*time.Second))
	small := pack(150) // about 2.7 KB: 43 blocks of 64 bytes
	if len(small) <= 2048 || len(small) > 4096 {
		t.Fatalf("test body of %d bytes", len(small))
	}
	if got := do(t, cc, request{codes.POST, "/s/logger-1", 110, nil, small}); got.code != codes.Changed {
		t.Fatalf("block-wise upload under max_payload: %v (%s)", got.code, got.body)
	}
	if n := e.stored(); n != 150 {
		t.Fatalf("%d readings stored, want 150", n)
	}
	// The same body again is a new upload, not taken for a retransmission.
	if got := do(t, cc, request{codes.POST, "/s/logger-1", 110, nil, small}); got.code != codes.Changed {
		t.Fatalf("second block-wise upload: %v (%s)", got.code, got.body)
	}
	if n := e.stored(); n != 300 {
		t.Fatalf("%d readings stored after the same upload twice, want 300", n)
	}

	big := pack(400) // about 7 KB
	got := do(t, cc, request{codes.POST, "/s/logger-1", 110, nil, big})
	if got.code != codes.RequestEntityTooLarge || got.size1 != 4096 {
		t.Fatalf("block-wise upload over max_payload: %v Size1 %d (%s), want 4.13 with Size1 4096", got.code, got.size1, got.body)
	}
	if n := e.stored(); n != 300 {
		t.Fatalf("%d readings stored after the refused upload, want 300", n)
	}
	if e.rejected(ReasonTooLarge) != 1 {
		t.Errorf("too_large counted %v times, want 1", e.rejected(ReasonTooLarge))
	}
	// The peer is still served.
	if got := do(t, cc, request{codes.POST, "/s/logger-1/x", 0, nil, "1"}); got.code != codes.Changed {
		t.Fatalf("after the refused upload: %v", got.code)
	}
}

// rawPeer is a sensor speaking CoAP over its own UDP socket, to control
// message ids and types exactly.
type rawPeer struct {
	t    *testing.T
	conn *net.UDPConn
	to   *net.UDPAddr
}

func newRawPeer(t *testing.T, addr string) *rawPeer {
	t.Helper()
	conn, to := testenv.UDPPeer(t, addr)
	return &rawPeer{t: t, conn: conn, to: to}
}

func encodeRequest(t testing.TB, typ message.Type, mid int32, req request) []byte {
	t.Helper()
	m := pool.NewMessage(context.Background())
	m.SetType(typ)
	m.SetMessageID(mid)
	m.SetToken(message.Token{byte(mid >> 8), byte(mid)})
	req.fill(t, m)
	b, err := m.MarshalWithEncoder(coder.DefaultCoder)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func (p *rawPeer) send(b []byte) {
	p.t.Helper()
	if _, err := p.conn.WriteToUDP(b, p.to); err != nil {
		p.t.Fatal(err)
	}
}

// recv waits up to d for one message; ok is false when none came.
func (p *rawPeer) recv(d time.Duration) (m message.Message, ok bool) {
	p.t.Helper()
	buf := make([]byte, 2048)
	_ = p.conn.SetReadDeadline(time.Now().Add(d))
	n, _, err := p.conn.ReadFromUDP(buf)
	if err != nil {
		return m, false
	}
	m.Options = make(message.Options, 0, 16)
	if _, err := coder.DefaultCoder.Decode(buf[:n], &m); err != nil {
		p.t.Fatalf("undecodable response: %v", err)
	}
	return m, true
}

// exchange sends a confirmable request and waits for its answer,
// retransmitting as a CoAP client does (RFC 7252 §4.2, with a shorter timeout).
// An immediate second copy can be dropped by go-coap as a duplicate of a request
// still in flight, so a test retransmits the way a client would. A late copy
// of an earlier exchange's ACK is skipped, as a client skips it.
func (p *rawPeer) exchange(req []byte) (message.Message, bool) {
	p.t.Helper()
	mid := int32(binary.BigEndian.Uint16(req[2:4])) // after version, type, token length and code
	for range 5 {
		p.send(req)
		deadline := time.Now().Add(time.Second)
		for {
			m, ok := p.recv(time.Until(deadline))
			if !ok {
				break
			}
			if m.Type == message.Acknowledgement && m.MessageID != mid {
				continue
			}
			return m, true
		}
	}
	return message.Message{}, false
}

func TestCoAPNonConfirmable(t *testing.T) {
	e := startCoAP(t, coapSetup{opts: CoAPOptions{Listen: "auto"}})
	p := newRawPeer(t, e.addr)

	p.send(encodeRequest(t, message.NonConfirmable, 100, request{codes.POST, "/s/feeder-1", 110, nil, senmlPack}))
	if m, ok := p.recv(300 * time.Millisecond); ok {
		t.Fatalf("an accepted NON request was answered: %v", m)
	}
	waitFor(t, "the NON readings stored", func() bool { return e.stored() == 2 })

	p.send(encodeRequest(t, message.NonConfirmable, 101, request{codes.POST, "/s/feeder-1", 110, nil, `[{"v":`}))
	m, ok := p.recv(2 * time.Second)
	if !ok {
		t.Fatal("a refused NON request was not answered")
	}
	// go-coap sends it as a CON message, once, which RFC 7252 §5.2.3 allows.
	if m.Code != codes.BadRequest || m.Type == message.Acknowledgement || !strings.Contains(string(m.Payload), "payload ends") {
		t.Fatalf("refused NON answered %v type %v %q, want 4.00 with a diagnostic, not an ACK", m.Code, m.Type, m.Payload)
	}
	if e.stored() != 2 || e.rejected(ReasonMalformed) != 1 {
		t.Fatalf("%d stored, %v malformed", e.stored(), e.rejected(ReasonMalformed))
	}
}

// TestCoAPRetransmission: a confirmable request sent again with the same
// message id is answered 2.04 and stored once, while go-coap still has the
// exchange (answered from its cache) and after a restart of the server
// (answered because the key stored with the readings matches).
func TestCoAPRetransmission(t *testing.T) {
	e := startCoAP(t, coapSetup{opts: CoAPOptions{Listen: "auto"}})
	p := newRawPeer(t, e.addr)
	req := encodeRequest(t, message.Confirmable, 7, request{codes.POST, "/s/pump-1/flow", 0, nil, "3.25"}) // untimed: only the key keeps it single
	ack := func(what string) {
		t.Helper()
		m, ok := p.exchange(req)
		if !ok || m.Code != codes.Changed || m.Type != message.Acknowledgement || m.MessageID != 7 {
			t.Fatalf("%s: got %v (ok %v), want a 2.04 ACK for message id 7", what, m, ok)
		}
	}
	ack("first")
	ack("retransmission")
	if n := e.stored(); n != 1 {
		t.Fatalf("%d readings after a retransmission, want 1", n)
	}

	e.stop()
	e.start(CoAPOptions{Listen: e.addr})
	ack("retransmission after a restart")
	if n := e.stored(); n != 1 {
		t.Fatalf("%d readings after a retransmission to a restarted server, want 1", n)
	}
	if n := testutil.ToFloat64(e.in.metrics.redeliveries.WithLabelValues(IngressCoAP)); n != 1 {
		t.Errorf("redeliveries_total{ingress=coap} = %v, want 1", n)
	}

	// The same bytes under a new message id are a new message.
	if m, ok := p.exchange(encodeRequest(t, message.Confirmable, 8, request{codes.POST, "/s/pump-1/flow", 0, nil, "3.25"})); !ok || m.Code != codes.Changed {
		t.Fatalf("new message id: %v", m)
	}
	if n := e.stored(); n != 2 {
		t.Fatalf("%d readings, want 2", n)
	}
}

func TestCoAPBufferFull(t *testing.T) {
	e := startCoAP(t, coapSetup{
		opts:   CoAPOptions{Listen: "auto"},
		buffer: buffer.Options{MaxBytes: 1 << 20, OnFull: buffer.Reject},
	})
	// Fill the buffer directly, in ever smaller messages until not even a
	// short reading fits.
	now := time.Now().UTC().Truncate(time.Microsecond)
	for i, size := 0, 64<<10; size > 0; i++ {
		r := buffer.Reading{Name: fmt.Sprintf("fill:%d", i), Kind: buffer.KindString, Text: strings.Repeat("x", size), Time: now, Received: now}
		if _, err := e.buf.Append(context.Background(), buffer.Message{Class: buffer.ClassTelemetry, Readings: []buffer.Reading{r}}); err != nil {
			size /= 2
		}
	}
	before := e.stored()
	got := do(t, e.dial(), request{codes.POST, "/s/feeder-1", 110, nil, senmlPack})
	if got.code != codes.ServiceUnavailable || got.maxAge != coapFullRetry {
		t.Fatalf("full buffer: %v Max-Age %d (%s), want 5.03 with Max-Age %d", got.code, got.maxAge, got.body, coapFullRetry)
	}
	if e.stored() != before || e.rejected(ReasonBufferFull) != 1 {
		t.Fatalf("stored %d (was %d), buffer_full counted %v", e.stored(), before, e.rejected(ReasonBufferFull))
	}
}

// TestCoAPStopAnswersInFlight: a stop lets a request already taken in become
// durable and be answered, answers a request that comes meanwhile 5.03, and
// only then returns.
func TestCoAPStopAnswersInFlight(t *testing.T) {
	// A long commit interval holds the second request in flight.
	e := startCoAP(t, coapSetup{opts: CoAPOptions{Listen: "auto"}, buffer: buffer.Options{CommitInterval: time.Second}})
	p := newRawPeer(t, e.addr)
	if m, ok := p.exchange(encodeRequest(t, message.Confirmable, 1, request{codes.POST, "/s/a/v", 0, nil, "1"})); !ok || m.Code != codes.Changed {
		t.Fatalf("first request: %v", m)
	}
	inflight := func(n int) func() bool {
		return func() bool {
			e.srv.mu.Lock()
			defer e.srv.mu.Unlock()
			return e.srv.inflight == n
		}
	}
	waitFor(t, "the first request done", inflight(0))
	p.send(encodeRequest(t, message.Confirmable, 2, request{codes.POST, "/s/a/v", 0, nil, "2"}))
	waitFor(t, "the second request in flight", inflight(1))
	e.cancel()
	waitFor(t, "the stop to begin", func() bool {
		e.srv.mu.Lock()
		defer e.srv.mu.Unlock()
		return e.srv.stopping
	})
	late := newRawPeer(t, e.addr)
	late.send(encodeRequest(t, message.Confirmable, 3, request{codes.POST, "/s/b/v", 0, nil, "3"}))
	if m, ok := late.recv(5 * time.Second); !ok || m.Code != codes.ServiceUnavailable {
		t.Errorf("request during the stop: %v (ok %v), want 5.03", m, ok)
	}
	if m, ok := p.recv(5 * time.Second); !ok || m.Code != codes.Changed || m.MessageID != 2 {
		t.Fatalf("request in flight at the stop: %v (ok %v), want its 2.04", m, ok)
	}
	select {
	case err := <-e.done:
		if err != nil {
			t.Fatalf("Run: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return")
	}
	e.cancel = nil
	if n := e.stored(); n != 2 {
		t.Fatalf("%d readings stored, want 2", n)
	}
}

// TestCoAPSurvivesGarbage floods the port with random bytes, truncated
// headers and bad options, and then expects good requests to be served.
func TestCoAPSurvivesGarbage(t *testing.T) {
	e := startCoAP(t, coapSetup{opts: CoAPOptions{Listen: "auto"}})
	good := encodeRequest(t, message.Confirmable, 1, request{codes.POST, "/s/feeder-1", 110, nil, senmlPack})
	var junk [][]byte
	seed := uint64(1)
	rnd := func() byte { seed = seed*6364136223846793005 + 1442695040888963407; return byte(seed >> 56) }
	for n := range 200 {
		b := make([]byte, n%64)
		for i := range b {
			b[i] = rnd()
		}
		junk = append(junk, b)
	}
	for cut := range len(good) {
		junk = append(junk, good[:cut]) // truncated headers, options, payload marker
	}
	badOpt := bytes.Clone(good)
	badOpt[4+2] = 0xff // an option delta of 15 where a header byte belongs
	junk = append(junk, badOpt,
		[]byte{0x40, 0x02, 0x00, 0x01, 0xd1, 0xff, 0x00}, // option number 13+255 (critical, unknown)
		[]byte{0x80, 0x02, 0x00, 0x01},                   // version 2
		[]byte{0x4f, 0x02, 0x00, 0x01},                   // token length 15
	)
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Go(func() {
			p := newRawPeer(t, e.addr)
			for i := w; i < len(junk); i += 4 {
				for range 5 {
					p.send(junk[i])
				}
			}
		})
	}
	wg.Wait()
	// The flood overruns the socket's receive buffer, so the kernel drops
	// datagrams for a while, good ones too: a good client retransmits.
	for i := range 10 {
		p := newRawPeer(t, e.addr)
		m, ok := p.exchange(encodeRequest(t, message.Confirmable, int32(1000+i), request{codes.POST, "/s/good", 0, []string{"m=v"}, strconv.Itoa(i)}))
		if !ok || m.Code != codes.Changed {
			t.Fatalf("good request %d after the flood: %v (ok %v)", i, m, ok)
		}
	}
	if n := e.stored(); n != 10 {
		t.Fatalf("%d readings stored, want the 10 good ones", n)
	}
}

// testWriter sends log lines to the test's log until the test is over
// (a library goroutine may still log while it winds down).
type testWriter struct {
	t  *testing.T
	mu *sync.Mutex // held while logging; the cleanup takes it to set over
	ov *bool
}

func newTestWriter(t *testing.T) testWriter {
	w := testWriter{t: t, mu: new(sync.Mutex), ov: new(bool)}
	t.Cleanup(func() {
		w.mu.Lock()
		*w.ov = true
		w.mu.Unlock()
	})
	return w
}

func (w testWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !*w.ov {
		w.t.Log(strings.TrimSpace(string(p)))
	}
	return len(p), nil
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
