package gateway

import (
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/net/blockwise"
	"github.com/plgd-dev/go-coap/v3/options"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// TestCoAPPeerRecycled: a busy peer's conn is made afresh after
// coapPeerRecycle messages, so go-coap's cache of its answers stays short. A
// retransmission of a request answered before that is then answered from the
// stored idempotency key: 2.04 again, counted as redelivered, stored once
// (go-coap's own cache would have answered it without counting).
func TestCoAPPeerRecycled(t *testing.T) {
	e := startCoAP(t, coapSetup{opts: CoAPOptions{Listen: "auto"}})
	p := newRawPeer(t, e.addr)
	exchange := func(req []byte, mid int32) {
		t.Helper()
		m, ok := p.exchange(req)
		if !ok || m.Code != codes.Changed || m.Type != message.Acknowledgement || m.MessageID != mid {
			t.Fatalf("message id %d: got %v (ok %v), want a 2.04 ACK", mid, m, ok)
		}
	}
	// Untimed readings: only the key can keep a retransmitted one single.
	post := func(mid int) []byte {
		return encodeRequest(t, message.Confirmable, int32(mid), request{codes.POST, "/s/pump-1/flow", 0, nil, strconv.Itoa(mid)})
	}
	first := post(1)
	exchange(first, 1)
	for mid := 2; mid <= coapPeerRecycle+1; mid++ {
		exchange(post(mid), int32(mid))
	}
	redelivered := func() float64 { return testutil.ToFloat64(e.in.metrics.redeliveries.WithLabelValues(IngressCoAP)) }
	if n := redelivered(); n != 0 {
		t.Fatalf("%v redeliveries before any retransmission", n)
	}

	exchange(first, 1)
	if n := e.stored(); n != coapPeerRecycle+1 {
		t.Fatalf("%d readings stored, want %d: a retransmission after the recycle was stored again", n, coapPeerRecycle+1)
	}
	if n := redelivered(); n != 1 {
		t.Fatalf("redeliveries_total{ingress=coap} = %v, want 1: the retransmission was not answered by a fresh conn", n)
	}
}

// TestCoAPRecycleSparesBlockwise: a block-wise upload that crosses the
// recycling threshold completes, since its blocks live in the peer's conn
// and a conn with an upload open is not recycled.
func TestCoAPRecycleSparesBlockwise(t *testing.T) {
	e := startCoAP(t, coapSetup{opts: CoAPOptions{Listen: "auto"}, ingest: IngestOptions{MaxPayload: 4096}})
	cc := e.dial(options.WithBlockwise(true, blockwise.SZX64, 5*time.Second))
	const before = coapPeerRecycle - 10
	for i := range before {
		if got := do(t, cc, request{codes.POST, "/s/logger-1/x", 0, nil, strconv.Itoa(i)}); got.code != codes.Changed {
			t.Fatalf("post %d: %v (%s)", i, got.code, got.body)
		}
	}
	recs := make([]string, 150)
	for i := range recs {
		recs[i] = fmt.Sprintf(`{"n":"r%03d","v":%d}`, i, i)
	}
	body := "[" + strings.Join(recs, ",") + "]" // about 2.7 KB: 43 blocks of 64 bytes, across the threshold
	if got := do(t, cc, request{codes.POST, "/s/logger-1", 110, nil, body}); got.code != codes.Changed {
		t.Fatalf("block-wise upload across the recycling threshold: %v (%s)", got.code, got.body)
	}
	if n := e.stored(); n != before+150 {
		t.Fatalf("%d readings stored, want %d", n, before+150)
	}
}
