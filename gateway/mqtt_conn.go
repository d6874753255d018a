package gateway

import (
	"bufio"
	"context"
	"crypto/tls"
	"net"
	"net/url"
	"sync"
	"time"

	"github.com/eclipse/paho.golang/packets"
)

// DialMQTT connects to a broker URL (mqtt:// or mqtts://) the way the MQTT
// ingress does: reads go through a buffer and writes are coalesced (see
// batchConn). Other MQTT clients that should behave like the ingress, such
// as the load harness's bare subscriber, dial with it too.
func DialMQTT(ctx context.Context, tc *tls.Config, u *url.URL) (net.Conn, error) {
	return dialBuffered(ctx, tc, u)
}

func dialBuffered(ctx context.Context, tc *tls.Config, u *url.URL) (net.Conn, error) {
	var conn net.Conn
	var err error
	if u.Scheme == "mqtts" {
		d := tls.Dialer{Config: tc}
		conn, err = d.DialContext(ctx, "tcp", u.Host)
	} else {
		var d net.Dialer
		conn, err = d.DialContext(ctx, "tcp", u.Host)
	}
	if err != nil {
		return nil, err
	}
	// paho writes a packet in several Writes; the packet lock keeps those of
	// concurrent packets (acks, pings, subscribes) from interleaving.
	return packets.NewThreadSafeConn(newBatchConn(conn)), nil
}

// batchConn is the connection paho talks over.
//
// paho reads a packet in several small reads (type, length, body) and writes
// one in several Writes (header, body, payload), acknowledgements one packet
// at a time: without help each of those is a syscall, and on loopback a trip
// through the broker's TCP receive path. Reads go through a buffer. Writes
// are copied into a pending buffer and return; one goroutine hands whatever
// has gathered to the socket, so a burst of acks leaves in one syscall,
// in order, and a lone packet leaves at once.
//
// A write error is kept and returned by every later Write; Close sends what
// is pending first (for at most closeFlush).
type batchConn struct {
	net.Conn
	r *bufio.Reader

	mu      sync.Mutex
	data    sync.Cond // signalled when pending grows or the conn closes; guarded by mu
	room    sync.Cond // broadcast when pending was handed to the socket; guarded by mu
	pending []byte    // written, not yet handed to the socket; guarded by mu
	spare   []byte    // the buffer last handed to the socket, for reuse; guarded by mu
	err     error     // the first socket write error; guarded by mu
	closed  bool      // guarded by mu
	done    chan struct{}
}

const (
	// maxPending bounds what Write takes ahead of the socket: a broker that
	// stops reading makes writers wait rather than the buffer grow.
	maxPending = 64 << 10
	// closeFlush bounds how long Close waits for pending writes (a DISCONNECT).
	closeFlush = time.Second
)

func newBatchConn(conn net.Conn) *batchConn {
	c := &batchConn{Conn: conn, r: bufio.NewReaderSize(conn, 32<<10), done: make(chan struct{})}
	c.data.L = &c.mu
	c.room.L = &c.mu
	go c.writeLoop()
	return c
}

func (c *batchConn) Read(p []byte) (int, error) { return c.r.Read(p) }

// Write queues p for the socket and returns; it waits only while maxPending
// bytes are already queued.
func (c *batchConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for c.err == nil && !c.closed && len(c.pending) > 0 && len(c.pending)+len(p) > maxPending {
		c.room.Wait()
	}
	if c.err != nil {
		return 0, c.err
	}
	if c.closed {
		return 0, net.ErrClosed
	}
	c.pending = append(c.pending, p...)
	c.data.Signal()
	return len(p), nil
}

// writeLoop hands pending bytes to the socket until the conn is closed and
// drained, or a write fails.
func (c *batchConn) writeLoop() {
	defer close(c.done)
	c.mu.Lock()
	defer c.mu.Unlock()
	for {
		for len(c.pending) == 0 && !c.closed {
			c.data.Wait()
		}
		if len(c.pending) == 0 {
			return // closed, everything sent
		}
		out := c.pending
		c.pending = c.spare[:0]
		c.mu.Unlock()
		_, err := c.Conn.Write(out)
		c.mu.Lock()
		c.spare = out[:0]
		c.room.Broadcast()
		if err != nil {
			c.err = err
			c.pending = nil
			return
		}
	}
}

// Close sends what is pending (for at most closeFlush) and closes the socket.
func (c *batchConn) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return net.ErrClosed
	}
	c.closed = true
	c.data.Signal()
	c.room.Broadcast()
	c.mu.Unlock()
	t := time.NewTimer(closeFlush)
	defer t.Stop()
	select {
	case <-c.done:
	case <-t.C: // the socket does not take it; closing unblocks the writer
	}
	err := c.Conn.Close()
	<-c.done
	return err
}
