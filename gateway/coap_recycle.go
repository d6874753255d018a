package gateway

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/message/pool"
	"github.com/plgd-dev/go-coap/v3/options/config"
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

// coapMaxTransmitSpan is MAX_TRANSMIT_SPAN (RFC 7252 §4.8.2): the longest a
// client goes on retransmitting a confirmable request.
const coapMaxTransmitSpan = 45 * time.Second

// peerRecycling makes the UDP server give each peer's conn a recycling
// monitor around its idle monitor (go-coap's: closes after 16 s quiet), and
// tells the monitor when a message has been processed and answered.
type peerRecycling struct {
	recycled *atomic.Int64 // conns closed for recycling
}

func (o peerRecycling) UDPServerApply(cfg *udpServer.Config) {
	idle := cfg.CreateInactivityMonitor
	cfg.CreateInactivityMonitor = func() udpClient.InactivityMonitor {
		return &peerMonitor{InactivityMonitor: idle(), recycled: o.recycled, pending: map[int32]time.Time{}}
	}
	process := cfg.ProcessReceivedMessage
	cfg.ProcessReceivedMessage = func(req *pool.Message, cc *udpClient.Conn, handler config.HandlerFunc[*udpClient.Conn]) {
		mid := req.MessageID()
		if process != nil {
			process(req, cc, handler)
		} else {
			cc.ProcessReceivedMessageWithHandler(req, handler) // go-coap's default
		}
		if m := peerMonitorOf(cc); m != nil {
			m.processed(mid)
		}
	}
}

// peerMonitor counts a peer's messages and closes its conn once it has taken
// coapPeerRecycle of them, but only when nothing of the peer's lives in the
// conn: no request taken in and not yet answered (a queued one would be
// dropped with the conn; a NON one is never sent again), and no block-wise
// upload for MAX_TRANSMIT_SPAN after its last block (its blocks, and the
// answer to a retransmitted last block, live in the conn). go-coap sends
// the confirmable answer to a refused NON once and keeps no state for it.
type peerMonitor struct {
	udpClient.InactivityMonitor
	recycled *atomic.Int64

	mu        sync.Mutex
	messages  int
	pending   map[int32]time.Time // requests taken in and not yet answered, by message id
	holdUntil time.Time           // a block-wise upload's blocks may still come until then
}

// CheckInactivity is called by go-coap's read loop just before it hands on
// the peer's next datagram, with now 10 ms ahead, and by its periodic sweep
// from another goroutine. Only the read loop recycles: the datagram in hand
// then goes to the fresh conn, and no other can be queued on the old one
// between the check and the close.
func (m *peerMonitor) CheckInactivity(now time.Time, cc *udpClient.Conn) {
	if now.After(time.Now()) && m.recyclable(now) {
		_ = cc.Close() // ends the conn's context; go-coap drops it from its table
		m.recycled.Add(1)
		return
	}
	m.InactivityMonitor.CheckInactivity(now, cc)
}

func (m *peerMonitor) recyclable(now time.Time) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.messages < coapPeerRecycle || now.Before(m.holdUntil) {
		return false
	}
	for mid, since := range m.pending {
		// A request whose client has given up (or one go-coap dropped as a
		// duplicate after its first copy was answered) holds no longer.
		if now.Sub(since) < coapMaxTransmitSpan {
			return false
		}
		delete(m.pending, mid)
	}
	return true
}

// seen is called for each message from the peer before go-coap queues it:
// it counts the message, notes a request taken in (not a ping, an ACK or a
// retransmission of one still pending) and holds the conn for a block-wise
// upload.
func (m *peerMonitor) seen(req *pool.Message) {
	now := time.Now()
	m.mu.Lock()
	defer m.mu.Unlock()
	m.messages++
	if (req.Type() == message.Confirmable || req.Type() == message.NonConfirmable) && req.Code() != codes.Empty {
		if _, ok := m.pending[req.MessageID()]; !ok {
			m.pending[req.MessageID()] = now
		}
	}
	if req.HasOption(message.Block1) {
		m.holdUntil = now.Add(coapMaxTransmitSpan)
	}
}

// processed is called once go-coap has handled a message and written its answer.
func (m *peerMonitor) processed(mid int32) {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.pending, mid)
}

// peerMonitorOf is the conn's recycling monitor; nil for DTLS conns, which
// are never recycled (a new conn would need a new handshake).
func peerMonitorOf(cc *udpClient.Conn) *peerMonitor {
	m, _ := cc.InactivityMonitor().(*peerMonitor)
	return m
}
