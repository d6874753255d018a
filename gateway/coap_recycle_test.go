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
	first := untimedPost(t, message.Confirmable, 1)
	exchangeChanged(t, p, first, 1)
	mid := 2
	for ; mid <= coapPeerRecycle; mid++ {
		exchangeChanged(t, p, untimedPost(t, message.Confirmable, mid), mid)
	}
	if n := e.srv.recycled.Load(); n != 0 {
		t.Fatalf("%d conns recycled before the threshold", n)
	}
	// The conn is recycled at the peer's next datagram once its last answer
	// has been written; on a loaded machine that may be a datagram or two later.
	for ; e.srv.recycled.Load() == 0; mid++ {
		if mid > coapPeerRecycle+20 {
			t.Fatal("the peer's conn was not recycled")
		}
		exchangeChanged(t, p, untimedPost(t, message.Confirmable, mid), mid)
	}
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
	// Then the conn is recycled at the next datagram.
	mid := 2000
	for ; e.srv.recycled.Load() == 0; mid++ {
		if mid > 2020 {
			t.Fatal("the peer's conn was not recycled after the burst")
		}
		exchangeChanged(t, p, untimedPost(t, message.Confirmable, mid), mid)
	}
	if n := e.stored(); n != int64(before+burst+mid-2000) {
		t.Fatalf("%d readings stored, want %d", n, before+burst+mid-2000)
	}
}

// untimedPost is a request with one reading of its own value and no time:
// only its key can keep a retransmission of it single.
func untimedPost(t *testing.T, typ message.Type, mid int) []byte {
	return encodeRequest(t, typ, int32(mid), request{codes.POST, "/s/pump-1/flow", 0, nil, strconv.Itoa(mid)})
}

// exchangeChanged sends a confirmable request, again every 2 s as a client
// would, until its 2.04 ACK comes; late copies of earlier answers are skipped.
func exchangeChanged(t *testing.T, p *rawPeer, req []byte, mid int) {
	t.Helper()
	for range 5 {
		p.send(req)
		deadline := time.Now().Add(2 * time.Second)
		for {
			m, ok := p.recv(time.Until(deadline))
			if !ok {
				break
			}
			if m.Type == message.Acknowledgement && m.MessageID == int32(mid) {
				if m.Code != codes.Changed {
					t.Fatalf("message id %d answered %v (%s), want 2.04", mid, m.Code, m.Payload)
				}
				return
			}
		}
	}
	t.Fatalf("message id %d: no 2.04 ACK after 5 tries", mid)
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
