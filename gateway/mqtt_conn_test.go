package gateway

import (
	"bytes"
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

// tcpPair returns both ends of a loopback TCP connection.
func tcpPair(t *testing.T) (client, server net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			close(accepted)
			return
		}
		accepted <- c
	}()
	client, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	server = <-accepted
	if server == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { client.Close(); server.Close() })
	return client, server
}

// TestBatchConnKeepsOrder: many small writes from several goroutines, each
// goroutine's own in order, all arrive whole; Close sends what is pending.
func TestBatchConnKeepsOrder(t *testing.T) {
	client, server := tcpPair(t)
	c := newBatchConn(client)
	const writers, each = 4, 5000
	var wg sync.WaitGroup
	for w := range writers {
		wg.Go(func() {
			for i := range each {
				// One 3-byte "packet": writer, then i as two bytes.
				if _, err := c.Write([]byte{byte(w), byte(i >> 8), byte(i)}); err != nil {
					t.Errorf("write: %v", err)
					return
				}
			}
		})
	}
	got := make(chan []byte, 1)
	go func() {
		b, _ := io.ReadAll(server)
		got <- b
	}()
	wg.Wait()
	if err := c.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	b := <-got
	if len(b) != writers*each*3 {
		t.Fatalf("read %d bytes, want %d", len(b), writers*each*3)
	}
	next := make([]int, writers)
	for off := 0; off < len(b); off += 3 {
		w, i := int(b[off]), int(b[off+1])<<8|int(b[off+2])
		if w >= writers || i != next[w] {
			t.Fatalf("at byte %d: writer %d packet %d, want packet %d", off, w, i, next[w])
		}
		next[w]++
	}
}

// TestBatchConnCoalesces: writes made while the socket is busy leave
// together, in fewer socket writes than Writes.
func TestBatchConnCoalesces(t *testing.T) {
	client, server := tcpPair(t)
	counting := &countingConn{Conn: client}
	c := newBatchConn(counting)
	for i := range 1000 {
		if _, err := c.Write([]byte{byte(i)}); err != nil {
			t.Fatal(err)
		}
	}
	buf := make([]byte, 1000)
	if _, err := io.ReadFull(server, buf); err != nil {
		t.Fatal(err)
	}
	for i, v := range buf {
		if v != byte(i) {
			t.Fatalf("byte %d is %d", i, v)
		}
	}
	if n := counting.writes(); n >= 1000 {
		t.Errorf("%d socket writes for 1000 Writes: nothing was coalesced", n)
	}
	c.Close()
}

type countingConn struct {
	net.Conn
	mu sync.Mutex
	n  int
}

func (c *countingConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	c.n++
	c.mu.Unlock()
	return c.Conn.Write(p)
}

func (c *countingConn) writes() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n
}

// TestBatchConnReportsWriteErrors: once the socket refuses a write, later
// Writes return the error instead of queueing into nothing.
func TestBatchConnReportsWriteErrors(t *testing.T) {
	client, server := tcpPair(t)
	c := newBatchConn(client)
	server.Close()
	deadline := time.Now().Add(5 * time.Second)
	var err error
	for err == nil && time.Now().Before(deadline) {
		_, err = c.Write(bytes.Repeat([]byte{1}, 1024))
		time.Sleep(time.Millisecond)
	}
	if err == nil {
		t.Fatal("writes to a closed peer kept succeeding")
	}
	if _, again := c.Write([]byte{1}); !errors.Is(again, err) {
		t.Errorf("a later Write returned %v, want the first error %v", again, err)
	}
	c.Close()
	if _, err := c.Write([]byte{1}); err == nil {
		t.Error("Write after Close succeeded")
	}
}

// TestBatchConnCloseUnblocks: Close returns even when the peer stops reading
// and the socket takes nothing more.
func TestBatchConnCloseUnblocks(t *testing.T) {
	client, _ := tcpPair(t)
	c := newBatchConn(client)
	chunk := bytes.Repeat([]byte{1}, 32<<10)
	// Fill the socket buffers and the pending buffer in the background.
	go func() {
		for {
			if _, err := c.Write(chunk); err != nil {
				return
			}
		}
	}()
	time.Sleep(200 * time.Millisecond)
	done := make(chan struct{})
	go func() {
		c.Close()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(closeFlush + 5*time.Second):
		t.Fatal("Close did not return while the peer was not reading")
	}
}
