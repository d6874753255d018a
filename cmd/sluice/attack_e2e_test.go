package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/message/pool"
	"github.com/plgd-dev/go-coap/v3/udp/coder"

	"github.com/sluice-gw/sluice/gateway"
	"github.com/sluice-gw/sluice/internal/testenv"
)

// hostileFormat is how a corpus file is sent, by the end of its name: the
// MQTT topic (whose subscription names the format) and the CoAP path and
// content-format.
type hostileFormat struct {
	suffix   string
	topic    string
	coapPath string
	cf       int
}

var hostileFormats = []hostileFormat{
	{".senml.json", "h/senml/hostile", "/s/hostile", int(message.AppSenmlJSON)},
	{".senml.cbor", "h/cbor/hostile", "/s/hostile", int(message.AppSenmlCbor)},
	{".json", "h/json/hostile", "/s/hostile", int(message.AppJSON)},
	{".txt", "h/value/hostile/level", "/s/hostile/level", int(message.TextPlain)},
}

// hostileSubscriptions subscribe one topic per format, so that a payload is
// decoded as what it claims to be, as its CoAP content-format makes it.
const hostileSubscriptions = `
[[mqtt.subscribe]]
topic = "h/senml/+"
pattern = "h/senml/{sensor}"
format = "senml"

[[mqtt.subscribe]]
topic = "h/cbor/+"
pattern = "h/cbor/{sensor}"
format = "senml+cbor"

[[mqtt.subscribe]]
topic = "h/json/+"
pattern = "h/json/{sensor}"
format = "json"

[[mqtt.subscribe]]
topic = "h/value/+/+"
pattern = "h/value/{sensor}/{metric}"
format = "value"
`

// hostileCase is one file of testdata/hostile: <reason>--<what>.<format>.
type hostileCase struct {
	name    string
	reason  gateway.Reason
	format  hostileFormat
	payload []byte
}

func hostileCorpus(t *testing.T) []hostileCase {
	t.Helper()
	files, err := filepath.Glob(filepath.Join("testdata", "hostile", "*--*"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no hostile corpus: %v", err)
	}
	var cases []hostileCase
	for _, f := range files {
		base := filepath.Base(f)
		reason, _, _ := strings.Cut(base, "--")
		if !slices.Contains(gateway.Reasons, gateway.Reason(reason)) {
			t.Fatalf("%s: %q is not a rejection reason", base, reason)
		}
		i := slices.IndexFunc(hostileFormats, func(hf hostileFormat) bool { return strings.HasSuffix(base, hf.suffix) })
		if i < 0 {
			t.Fatalf("%s: no known format suffix", base)
		}
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		cases = append(cases, hostileCase{name: base, reason: gateway.Reason(reason), format: hostileFormats[i], payload: b})
	}
	return cases
}

// coapCodeOf is the answer DESIGN.md gives each rejection reason.
var coapCodeOf = map[gateway.Reason]codes.Code{
	gateway.ReasonMalformed:   codes.BadRequest,
	gateway.ReasonTooLarge:    codes.RequestEntityTooLarge,
	gateway.ReasonBadValue:    codes.BadRequest,
	gateway.ReasonBadTime:     codes.BadRequest,
	gateway.ReasonUnsupported: codes.UnsupportedMediaType,
	gateway.ReasonForbidden:   codes.Forbidden,
	gateway.ReasonBufferFull:  codes.ServiceUnavailable,
}

// TestAttackHostilePayloads sends every file of testdata/hostile (truncated,
// deeply nested, huge numbers, NaN and infinities, wrong types, invalid
// UTF-8, NUL bytes, oversize, CBOR lengths of 4G records or 1 TiB strings
// in a few bytes, times of 1970 and 2100, unknown versions) over MQTT and
// over CoAP, each followed by a good reading: nothing hostile is stored,
// each is counted once under the reason its name gives (CoAP answers the
// matching code), every good reading lands once, and the gateway keeps
// serving.
func TestAttackHostilePayloads(t *testing.T) {
	broker := testenv.StartMosquitto(t, testenv.MosquittoOptions{})
	dsn := testenv.SharedPostgres(t).NewDatabase(t)
	coapAddr := fmt.Sprintf("127.0.0.1:%d", testenv.FreeUDPPort(t))
	g := startGateway(t, gatewayConfig(t, t.TempDir(), broker.URL(), dsn, testenv.FreePort(t),
		coapOnly(coapAddr)+"\n[ingest]\nmax_payload = \"24KiB\"\n"+hostileSubscriptions))
	g.waitIngress("mqtt", 20*time.Second)

	cases := hostileCorpus(t)
	l := newLedger()
	p := newPublisher(t, broker.Addr(), "hostile-pub")
	c := newCoAPPeer(t, coapAddr)
	c.timeout = 2 * time.Second // one copy each: a retransmission is answered from go-coap's cache, but need not be
	goodMQTT := &mqttSensor{p: p, sensor: sensor{l: l, name: "good-m", metric: "level"}}
	goodCoAP := &coapSensor{c: c, sensor: sensor{l: l, name: "good-c", metric: "level"}}
	want := map[string]map[gateway.Reason]int{gateway.IngressMQTT: {}, gateway.IngressCoAP: {}}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	for i, hc := range cases {
		if err := p.publish(hc.format.topic, hc.payload); err != nil {
			t.Fatalf("%s over MQTT: %v", hc.name, err)
		}
		want[gateway.IngressMQTT][hc.reason]++
		if err := goodMQTT.send(int64(i)); err != nil {
			t.Fatal(err)
		}
		code, err := c.post(ctx, coapRequest{path: hc.format.coapPath, cf: hc.format.cf, body: hc.payload})
		if err != nil || code != coapCodeOf[hc.reason] {
			t.Errorf("%s over CoAP: answered %v (%v), want %v", hc.name, code, err, coapCodeOf[hc.reason])
		}
		want[gateway.IngressCoAP][hc.reason]++
		if err := goodCoAP.send(ctx, int64(i)); err != nil {
			t.Fatal(err)
		}
	}
	// CoAP only: a content-format outside the contract, and a path that is
	// no resource.
	for _, extra := range []struct {
		req    coapRequest
		reason gateway.Reason
		code   codes.Code
	}{
		{coapRequest{path: "/s/hostile", cf: int(message.AppCBOR), body: []byte{0x01}}, gateway.ReasonUnsupported, codes.UnsupportedMediaType},
		{coapRequest{path: "/admin/../s/x", cf: int(message.TextPlain), body: []byte("1")}, gateway.ReasonMalformed, codes.NotFound},
	} {
		code, err := c.post(ctx, extra.req)
		if err != nil || code != extra.code {
			t.Errorf("POST %s (content-format %d): answered %v (%v), want %v", extra.req.path, extra.req.cf, code, err, extra.code)
		}
		want[gateway.IngressCoAP][extra.reason]++
	}

	ty := l.verify(t, g, dsn, "hostile payloads", time.Minute)
	if n := queryInt(t, dsn, "SELECT count(*) FROM sluice.readings"); n != int64(ty.stored) {
		t.Fatalf("%d rows stored, only the %d good readings may be", n, ty.stored)
	}
	m := g.metrics()
	total := 0
	for _, ingress := range []string{gateway.IngressMQTT, gateway.IngressCoAP} {
		for _, reason := range gateway.Reasons {
			series := fmt.Sprintf(`sluice_messages_rejected_total{ingress=%q,reason=%q}`, ingress, reason)
			if got := int(metricValue(m, series)); got != want[ingress][reason] {
				t.Errorf("%s = %d, want %d", series, got, want[ingress][reason])
			}
			total += want[ingress][reason]
		}
	}
	if code, _ := httpStatus(t, "http://"+g.admin+"/readyz"); code != 200 {
		t.Fatalf("/readyz = %d after the hostile payloads", code)
	}
	t.Logf("RELIABILITY hostile payloads: %d files x 2 ingresses + 2 CoAP-only, %d rejections counted by reason, %d good readings interleaved: %s",
		len(cases), total, ty.acked, ty)
}

// TestAttackCoAPFlood floods the CoAP port while a good sensor posts and an
// MQTT sensor publishes: random datagrams, truncated and bad-option
// messages, requests with hostile bodies from thousands of source ports,
// and block-wise uploads begun and abandoned from many peers (memory the
// server holds until the transfer times out). Every good reading lands
// once, the gateway keeps serving, and its memory stays bounded: the
// growth of its anonymous resident memory (RssAnon) and its peak (VmHWM)
// are measured and recorded.
func TestAttackCoAPFlood(t *testing.T) {
	broker := testenv.StartMosquitto(t, testenv.MosquittoOptions{})
	dsn := testenv.SharedPostgres(t).NewDatabase(t)
	coapAddr := fmt.Sprintf("127.0.0.1:%d", testenv.FreeUDPPort(t))
	g := startGateway(t, gatewayConfig(t, t.TempDir(), broker.URL(), dsn, testenv.FreePort(t), coapOnly(coapAddr)))
	g.waitIngress("mqtt", 20*time.Second)
	l := newLedger()

	// Warm up, so that the baseline has every part's buffers in place.
	warm := &coapSensor{c: newCoAPPeer(t, coapAddr), sensor: sensor{l: l, name: "warm", metric: "level"}}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	for v := range int64(200) {
		if err := warm.send(ctx, v); err != nil {
			t.Fatal(err)
		}
	}
	l.waitLanded(t, dsn, 30*time.Second)
	hwm0, anon0 := g.memoryKiB()
	heap0 := metricValue(g.metrics(), "go_memstats_heap_inuse_bytes")

	stop := make(chan struct{})
	var good sync.WaitGroup
	gc := &coapSensor{c: newCoAPPeer(t, coapAddr), sensor: sensor{l: l, name: "flood-good-c", metric: "level"}}
	gm := &mqttSensor{p: newPublisher(t, broker.Addr(), "flood-good-m"), sensor: sensor{l: l, name: "flood-good-m", metric: "level"}}
	good.Go(func() { gc.stream(t, stop, 10*time.Millisecond) })
	good.Go(func() { gm.stream(t, stop, 10*time.Millisecond) })

	to, err := net.ResolveUDPAddr("udp", coapAddr)
	if err != nil {
		t.Fatal(err)
	}
	var sent atomic.Int64
	var flood sync.WaitGroup
	junk := floodDatagrams(t)
	// Random and broken datagrams from a few sockets.
	for w := range 4 {
		flood.Go(func() {
			conn := listenUDP(t)
			for i := w; i < 40_000; i += 4 {
				_, _ = conn.WriteToUDP(junk[i%len(junk)], to)
				sent.Add(1)
			}
		})
	}
	// Requests with hostile bodies, each from a port of its own: per-peer
	// state in the server for every one.
	flood.Go(func() {
		bodies := hostileCorpus(t)
		for i := range 5_000 {
			conn := listenUDP(t)
			hc := bodies[i%len(bodies)]
			b, err := coapRequest{path: hc.format.coapPath, cf: hc.format.cf, body: hc.payload}.encode(uint16(i))
			if err == nil {
				_, _ = conn.WriteToUDP(b, to)
				sent.Add(1)
			}
			conn.Close()
		}
	})
	// Block-wise uploads begun and abandoned: the first 1 KiB block of a
	// 60 KB body, from 2,000 peers.
	flood.Go(func() {
		for i := range 2_000 {
			conn := listenUDP(t)
			_, _ = conn.WriteToUDP(firstBlock(t, uint16(i)), to)
			sent.Add(1)
			conn.Close()
		}
	})
	flood.Wait()
	hwm1, anon1 := g.memoryKiB()
	heap1 := metricValue(g.metrics(), "go_memstats_heap_inuse_bytes")
	time.Sleep(time.Second)
	close(stop)
	good.Wait()
	if t.Failed() {
		return
	}
	ty := l.verify(t, g, dsn, "CoAP flood", time.Minute)
	if code, _ := httpStatus(t, "http://"+g.admin+"/readyz"); code != 200 {
		t.Fatalf("/readyz = %d after the flood", code)
	}
	hwm2, anon2 := g.memoryKiB()
	t.Logf("RELIABILITY CoAP flood: %d datagrams; VmHWM %d -> %d -> %d KiB, RssAnon %d -> %d -> %d KiB, Go heap in use %.1f -> %.1f MiB (before, right after, at the end; race detector %v); good readings: %s",
		sent.Load(), hwm0, hwm1, hwm2, anon0, anon1, anon2, heap0/(1<<20), heap1/(1<<20), raceEnabled, ty)
	// Bounds with room to spare over what was measured (without the race
	// detector RssAnon grew by about 30 MiB; with it, which multiplies
	// memory use, by about 125 MiB): a server that kept every abandoned
	// block-wise body or every peer for long would pass them.
	boundKiB := int64(64 << 10)
	if raceEnabled {
		boundKiB = 256 << 10
	}
	if growth := max(anon1, anon2) - anon0; growth > boundKiB {
		t.Fatalf("RssAnon grew by %d KiB under the flood, more than %d KiB", growth, boundKiB)
	}
	if growth := heap1 - heap0; growth > 48<<20 {
		t.Fatalf("the Go heap in use grew by %.1f MiB under the flood, more than 48 MiB", growth/(1<<20))
	}
}

// listenUDP opens a client socket on loopback, closed in cleanup.
func listenUDP(t *testing.T) *net.UDPConn {
	conn, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Error(err)
		return nil
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// floodDatagrams are random bytes, every truncation of a good request, and
// requests with broken headers and options.
func floodDatagrams(t *testing.T) [][]byte {
	t.Helper()
	good, err := coapRequest{path: "/s/flood", cf: int(message.AppSenmlJSON), body: []byte(`[{"n":"v","v":1}]`)}.encode(1)
	if err != nil {
		t.Fatal(err)
	}
	rnd := rand.New(rand.NewPCG(6, 6))
	var out [][]byte
	for n := range 300 {
		b := make([]byte, n%200)
		for i := range b {
			b[i] = byte(rnd.UintN(256))
		}
		out = append(out, b)
	}
	for cut := range len(good) {
		out = append(out, good[:cut])
	}
	badOpt := slices.Clone(good)
	badOpt[4+3] = 0xff // an option delta of 15 where an option belongs
	return append(out, badOpt,
		[]byte{0x40, 0x02, 0x00, 0x01, 0xd1, 0xff, 0x00}, // option 13+255: critical, unknown
		[]byte{0x80, 0x02, 0x00, 0x01},                   // version 2
		[]byte{0x4f, 0x02, 0x00, 0x01},                   // token length 15
		[]byte{0x40, 0x02, 0x00, 0x01, 0xee, 0xff, 0xff}, // option delta and length of 65,000
	)
}

// firstBlock is block 0 (1 KiB, more to come) of a 60 KB POST.
func firstBlock(t *testing.T, mid uint16) []byte {
	m := pool.NewMessage(context.Background())
	m.SetType(message.Confirmable)
	m.SetMessageID(int32(mid))
	m.SetToken(message.Token{byte(mid >> 8), byte(mid), 0xb1})
	m.SetCode(codes.POST)
	if err := m.SetPath("/s/blocks"); err != nil {
		t.Error(err)
		return nil
	}
	m.SetContentFormat(message.AppSenmlJSON)
	m.SetOptionUint32(message.Block1, 0<<4|1<<3|6) // num 0, more, size 1024
	m.SetOptionUint32(message.Size1, 60_000)
	m.SetBody(strings.NewReader(strings.Repeat("[", 1024)))
	b, err := m.MarshalWithEncoder(coder.DefaultCoder)
	if err != nil {
		t.Error(err)
	}
	return b
}
