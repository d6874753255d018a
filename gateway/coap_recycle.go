package gateway

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/pool"
	"github.com/plgd-dev/go-coap/v3/mux"
	"github.com/plgd-dev/go-coap/v3/net/blockwise"
	"github.com/plgd-dev/go-coap/v3/net/responsewriter"
	udpClient "github.com/plgd-dev/go-coap/v3/udp/client"
	udpServer "github.com/plgd-dev/go-coap/v3/udp/server"
)

// coapPeerRecycle is how many messages a plain-UDP peer's conn takes before
// it is closed, to be made afresh by go-coap at the peer's next datagram.
//
// go-coap keeps every answer a peer got for EXCHANGE_LIFETIME (247 s) and
// walks that whole cache, on the one goroutine that reads the socket, before
// it hands on each datagram from the peer (its upstream issue 586). A busy
// peer's walk grew to a fifth of the gateway's CPU and pushed CoAP's p99
// over 20 ms. A fresh conn starts with an empty cache; a retransmission of a
// request answered before the recycle is then recognised by its stored
// idempotency key (peer address + message id + payload hash), answered 2.04
// again and counted as redelivered, never stored twice.
const coapPeerRecycle = 64

// peerRecycling makes the UDP server give each peer's conn a recycling
// monitor around go-coap's own idle monitor (closes after 16 s quiet).
type peerRecycling struct{}

func (peerRecycling) UDPServerApply(cfg *udpServer.Config) {
	idle := udpServer.DefaultConfig.CreateInactivityMonitor
	cfg.CreateInactivityMonitor = func() udpClient.InactivityMonitor {
		return &peerMonitor{InactivityMonitor: idle()}
	}
}

// peerMonitor counts a peer's messages and closes its conn once it has taken
// coapPeerRecycle of them, but never while a handler of the peer has not yet
// answered (its answer would be lost, costing the sensor a retransmission)
// or a block-wise upload may be open (its blocks live in the conn). Nothing
// else of a server's lives there: go-coap sends the confirmable answer to a
// refused NON once and keeps no state for it.
//
// go-coap calls CheckInactivity from its read loop just before it hands on
// the peer's next datagram, and from its periodic sweep.
type peerMonitor struct {
	udpClient.InactivityMonitor
	messages   atomic.Uint32
	busy       atomic.Int32 // handlers started and not yet answered
	blockUntil atomic.Int64 // unix ns: a Block1 upload may be open until then
}

func (m *peerMonitor) CheckInactivity(now time.Time, cc *udpClient.Conn) {
	if m.recyclable(now) {
		_ = cc.Close() // ends the conn's context; go-coap drops it from its table
		return
	}
	m.InactivityMonitor.CheckInactivity(now, cc)
}

func (m *peerMonitor) recyclable(now time.Time) bool {
	return m.messages.Load() >= coapPeerRecycle && m.busy.Load() == 0 && now.UnixNano() > m.blockUntil.Load()
}

// seen counts a message from the peer and notes a Block1 upload that has
// more blocks to come.
func (m *peerMonitor) seen(req *pool.Message) {
	m.messages.Add(1)
	v, err := req.GetOptionUint32(message.Block1)
	if err != nil {
		return
	}
	if _, _, more, err := blockwise.DecodeBlockOption(v); err == nil && more {
		m.blockUntil.Store(time.Now().Add(coapBlockTimeout).UnixNano())
	}
}

// peerMonitorOf is the conn's recycling monitor; nil for DTLS conns, which
// are never recycled (a new conn would need a new handshake).
func peerMonitorOf(conn any) *peerMonitor {
	cc, ok := conn.(*udpClient.Conn)
	if !ok {
		return nil
	}
	m, _ := cc.InactivityMonitor().(*peerMonitor)
	return m
}

// holdPeer is router middleware: while a handler has not answered, its
// peer's conn is not recycled.
func holdPeer(next mux.Handler) mux.Handler {
	return mux.HandlerFunc(func(w mux.ResponseWriter, r *mux.Message) {
		m := peerMonitorOf(w.Conn())
		if m == nil {
			next.ServeCOAP(w, r)
			return
		}
		m.busy.Add(1)
		release := sync.OnceFunc(func() { m.busy.Add(-1) })
		next.ServeCOAP(w, r)
		// go-coap writes the answer after the handler returns and runs the
		// callbacks only if it wrote one (a NON accepted gets none).
		if !w.Message().IsModified() || !responsewriter.AfterWrite(r.Context(), release) {
			release()
		}
	})
}
