package testenv

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// Proxy is a TCP proxy on 127.0.0.1 between clients and one upstream address, for
// faults on a live link: Cut drops every connection with a reset and refuses new
// ones until Heal; SetLatency and SetBandwidth slow every connection, open or new.
//
// A FIN from either side is passed on as a half-close, and a reset from either side
// resets the other. All methods are safe for concurrent use.
//
// It is written here rather than taken from Shopify's toxiproxy: the newest release
// the module proxy serves is v2.5.0 (2022); it closes connections on disable with a
// FIN (no reset), has a window in which a connection accepted during disable
// survives it, and removing a latency toxic can hang with the toxic collection's
// lock held (toxiproxy issue #558, its fix still open), which SetLatency(0) would do.
type Proxy struct {
	t        testing.TB
	upstream string
	addr     string // host:port, the same after every Heal

	latency   atomic.Int64 // one-way delay added in each direction, in nanoseconds
	bandwidth atomic.Int64 // bytes per second in each direction of each connection; 0: no cap

	mu     sync.Mutex         // guards the fields below
	ln     net.Listener       // nil while cut or closed
	gen    int                // incremented by Cut: a connection accepted before it must not survive it
	links  map[*link]struct{} // open connections
	closed bool

	wg sync.WaitGroup // accept loops and connections
}

// link is one proxied connection.
type link struct {
	client, server *net.TCPConn
	abortOnce      sync.Once
	aborted        chan struct{} // closed by abort
}

// abort resets both sides: SO_LINGER 0 makes Close send a RST and drop unsent data.
func (l *link) abort() {
	l.abortOnce.Do(func() {
		close(l.aborted)
		for _, c := range []*net.TCPConn{l.client, l.server} {
			_ = c.SetLinger(0)
			_ = c.Close()
		}
	})
}

// StartProxy starts a proxy to upstream (host:port) on a free port on 127.0.0.1. It
// dials upstream for each connection it accepts, and resets the client if that fails.
// It is closed in t.Cleanup.
func StartProxy(t testing.TB, upstream string) *Proxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("testenv: start proxy: %v", err)
	}
	p := &Proxy{
		t:        t,
		upstream: upstream,
		addr:     ln.Addr().String(),
		ln:       ln,
		links:    make(map[*link]struct{}),
	}
	p.wg.Add(1)
	go p.acceptLoop(ln, 0)
	t.Cleanup(p.close)
	return p
}

// Addr returns the proxy's host:port on 127.0.0.1; clients connect here.
func (p *Proxy) Addr() string { return p.addr }

// Cut resets every open connection (both the client's and the upstream's side get a
// RST) and refuses new connections (connection refused) until Heal.
func (p *Proxy) Cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.gen++
	if p.ln != nil {
		_ = p.ln.Close()
		p.ln = nil
	}
	for l := range p.links {
		l.abort()
	}
}

// Heal accepts connections again after Cut, on the same address. If another process
// took the port meanwhile (unlikely: the kernel hands out ports in turn), the test
// is marked failed.
func (p *Proxy) Heal() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed || p.ln != nil {
		return
	}
	var ln net.Listener
	var err error
	for deadline := time.Now().Add(time.Second); ; {
		ln, err = net.Listen("tcp", p.addr)
		if err == nil || !errors.Is(err, syscall.EADDRINUSE) || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err != nil {
		p.t.Errorf("testenv: proxy Heal: listen again on %s: %v", p.addr, err)
		return
	}
	p.ln = ln
	p.wg.Add(1)
	go p.acceptLoop(ln, p.gen)
}

// SetLatency delays every byte by d in each direction (a round trip grows by 2d),
// on open connections too; 0 removes the delay. Bytes keep their order.
func (p *Proxy) SetLatency(d time.Duration) { p.latency.Store(int64(max(d, 0))) }

// SetBandwidth caps each direction of each connection at bytesPerSecond, on open
// connections too; 0 removes the cap. Bytes go out in slices of 20 ms worth.
func (p *Proxy) SetBandwidth(bytesPerSecond int) { p.bandwidth.Store(int64(max(bytesPerSecond, 0))) }

// close stops accepting, resets every connection and waits for all goroutines.
func (p *Proxy) close() {
	p.mu.Lock()
	p.closed = true
	p.gen++
	if p.ln != nil {
		_ = p.ln.Close()
		p.ln = nil
	}
	for l := range p.links {
		l.abort()
	}
	p.mu.Unlock()
	p.wg.Wait()
}

func (p *Proxy) acceptLoop(ln net.Listener, gen int) {
	defer p.wg.Done()
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			time.Sleep(10 * time.Millisecond) // e.g. out of file descriptors
			continue
		}
		p.wg.Add(1)
		go p.serve(c.(*net.TCPConn), gen)
	}
}

// serve proxies one connection until both directions are done or it is aborted.
func (p *Proxy) serve(client *net.TCPConn, gen int) {
	defer p.wg.Done()
	sc, err := net.DialTimeout("tcp", p.upstream, 5*time.Second)
	if err != nil {
		_ = client.SetLinger(0)
		_ = client.Close()
		return
	}
	l := &link{client: client, server: sc.(*net.TCPConn), aborted: make(chan struct{})}
	p.mu.Lock()
	if p.closed || p.gen != gen {
		p.mu.Unlock()
		l.abort()
		return
	}
	p.links[l] = struct{}{}
	p.mu.Unlock()

	upOK := make(chan bool, 1)
	go func() { upOK <- p.pipe(l, l.client, l.server) }()
	downOK := p.pipe(l, l.server, l.client)
	if <-upOK && downOK {
		_ = l.client.Close()
		_ = l.server.Close()
	} else {
		l.abort()
	}
	p.mu.Lock()
	delete(p.links, l)
	p.mu.Unlock()
}

// chunk is what one Read returned, and when.
type chunk struct {
	data []byte
	at   time.Time
}

// pipe copies src to dst with the proxy's latency and bandwidth. On EOF from src it
// half-closes dst and reports true; on any error it aborts the link and reports false.
func (p *Proxy) pipe(l *link, src, dst *net.TCPConn) bool {
	// A reader goroutine timestamps chunks as they arrive, so latency is measured from
	// arrival and not from when the previous chunk left. The queue is bounded: when it
	// is full, the reader stops reading and TCP pushes back on the sender.
	queue := make(chan chunk, 64)
	var readErr error // set before queue is closed
	go func() {
		defer close(queue)
		buf := make([]byte, 32<<10)
		for {
			n, err := src.Read(buf)
			if n > 0 {
				select {
				case queue <- chunk{data: append([]byte(nil), buf[:n]...), at: time.Now()}:
				case <-l.aborted:
					readErr = net.ErrClosed
					return
				}
			}
			if err != nil {
				readErr = err
				return
			}
		}
	}()
	var next time.Time // when the bandwidth cap lets the next slice go
	ok := true
	for c := range queue {
		if ok && !p.deliver(l, dst, c, &next) {
			ok = false
			l.abort() // unblocks the reader; the loop drains what it had queued
		}
	}
	if ok && errors.Is(readErr, io.EOF) {
		if err := dst.CloseWrite(); err == nil {
			return true
		}
	}
	l.abort()
	return false
}

// deliver writes one chunk to dst once its latency has passed, in slices paced by the
// bandwidth cap. It reports false if the link was aborted or the write failed.
func (p *Proxy) deliver(l *link, dst *net.TCPConn, c chunk, next *time.Time) bool {
	if d := time.Duration(p.latency.Load()); d > 0 {
		if !sleepUntil(c.at.Add(d), l.aborted) {
			return false
		}
	}
	data := c.data
	for len(data) > 0 {
		n := len(data)
		if bw := p.bandwidth.Load(); bw > 0 {
			n = min(n, int(max(bw/50, 1)))
			if now := time.Now(); next.Before(now) {
				*next = now // an idle link saves up no credit
			}
			if !sleepUntil(*next, l.aborted) {
				return false
			}
			*next = next.Add(time.Duration(int64(n) * int64(time.Second) / bw))
		}
		if _, err := dst.Write(data[:n]); err != nil {
			return false
		}
		data = data[n:]
	}
	return true
}

// sleepUntil waits until t; it reports false if stop was closed first.
func sleepUntil(t time.Time, stop <-chan struct{}) bool {
	d := time.Until(t)
	if d <= 0 {
		select {
		case <-stop:
			return false
		default:
			return true
		}
	}
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-timer.C:
		return true
	case <-stop:
		return false
	}
}
