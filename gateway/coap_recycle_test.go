package gateway

import (
	"strconv"
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
	first := untimedPost(t, message.Confirmable, 1)
	exchangeChanged(t, p, first, 1)
	mid := 2
	for ; mid <= coapPeerRecycle; mid++ {
		exchangeChanged(t, p, untimedPost(t, message.Confirmable, mid), mid)
	}
	if n := e.srv.recycled.Load(); n != 0 {
		t.Fatalf("%d conns recycled before the threshold", n)
	}
	mid = postUntilRecycled(t, e, p, mid)
	redelivered := func() float64 { return testutil.ToFloat64(e.in.metrics.redeliveries.WithLabelValues(IngressCoAP)) }
	if n := redelivered(); n != 0 {
		t.Fatalf("%v redeliveries before any retransmission", n)
	}

	exchangeChanged(t, p, first, 1)
	if n := e.stored(); n != int64(mid-1) {
		t.Fatalf("%d readings stored, want %d: a retransmission after the recycle was stored again", n, mid-1)
	}
	if n := redelivered(); n != 1 {
		t.Fatalf("redeliveries_total{ingress=coap} = %v, want 1: the retransmission was not answered by a fresh conn", n)
	}
}

// TestCoAPRecycleKeepsQueuedRequests: a burst of NON requests across the
// threshold is stored whole. A conn is not recycled while a request of its
// peer waits in go-coap's queue, which would drop it (and a NON request is
// never sent again).
func TestCoAPRecycleKeepsQueuedRequests(t *testing.T) {
	e := startCoAP(t, coapSetup{opts: CoAPOptions{Listen: "auto"}})
	p := newRawPeer(t, e.addr)
	const before, burst = coapPeerRecycle - 4, 30
	for mid := 1; mid <= before; mid++ {
		exchangeChanged(t, p, untimedPost(t, message.Confirmable, mid), mid)
	}
	for mid := 1000; mid < 1000+burst; mid++ {
		p.send(untimedPost(t, message.NonConfirmable, mid))
	}
	waitFor(t, "the burst of NON readings stored", func() bool { return e.stored() == before+burst })
	mid := postUntilRecycled(t, e, p, 2000)
	if n := e.stored(); n != int64(before+burst+mid-2000) {
		t.Fatalf("%d readings stored, want %d", n, before+burst+mid-2000)
	}
}

// untimedPost is a request with one reading of its own value and no time:
// only its key can keep a retransmission of it single.
func untimedPost(t *testing.T, typ message.Type, mid int) []byte {
	return encodeRequest(t, typ, int32(mid), request{codes.POST, "/s/pump-1/flow", 0, nil, strconv.Itoa(mid)})
}

// exchangeChanged sends a confirmable request until its answer comes, which
// must be a 2.04 ACK.
func exchangeChanged(t *testing.T, p *rawPeer, req []byte, mid int) {
	t.Helper()
	m, ok := p.exchange(req)
	if !ok || m.Code != codes.Changed || m.Type != message.Acknowledgement || m.MessageID != int32(mid) {
		t.Fatalf("message id %d: got %v (ok %v), want a 2.04 ACK", mid, m, ok)
	}
}

// postUntilRecycled posts untimed readings from message id mid on until the
// peer's conn has been recycled, and returns the next unused id. The conn is
// recycled at the peer's next datagram once its last answer has been
// written; on a loaded machine that may be a datagram or two later.
func postUntilRecycled(t *testing.T, e *coapEnv, p *rawPeer, mid int) int {
	t.Helper()
	for limit := mid + 20; e.srv.recycled.Load() == 0; mid++ {
		if mid > limit {
			t.Fatal("the peer's conn was not recycled")
		}
		exchangeChanged(t, p, untimedPost(t, message.Confirmable, mid), mid)
	}
	return mid
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
	body := pack(150) // about 2.7 KB: 43 blocks of 64 bytes, across the threshold
	if got := do(t, cc, request{codes.POST, "/s/logger-1", 110, nil, body}); got.code != codes.Changed {
		t.Fatalf("block-wise upload across the recycling threshold: %v (%s)", got.code, got.body)
	}
	if n := e.stored(); n != before+150 {
		t.Fatalf("%d readings stored, want %d", n, before+150)
	}
}
