package testenv_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/sluice-gw/sluice/internal/testenv"
)

// echoServer echoes every connection until EOF, then closes it; errs receives the
// read error of each connection that ended other than by EOF.
func echoServer(t *testing.T) (addr string, errs <-chan error) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ch := make(chan error, 16)
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				if _, err := io.Copy(c, c); err != nil {
					select {
					case ch <- err:
					default:
					}
				}
			}()
		}
	}()
	return ln.Addr().String(), ch
}

func dial(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// roundTrip sends a few bytes and reads them back, returning how long that took.
func roundTrip(t *testing.T, c net.Conn) time.Duration {
	t.Helper()
	start := time.Now()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatalf("write: %v", err)
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("read %q: %v", buf, err)
	}
	return time.Since(start)
}

func TestProxyPassesBytes(t *testing.T) {
	up, _ := echoServer(t)
	p := testenv.StartProxy(t, up)
	c := dial(t, p.Addr())

	// 4 MiB each way at once: no byte lost, duplicated or reordered.
	data := make([]byte, 4<<20)
	_, _ = rand.Read(data)
	got := make(chan []byte, 1)
	go func() {
		b, _ := io.ReadAll(c)
		got <- b
	}()
	if _, err := c.Write(data); err != nil {
		t.Fatal(err)
	}
	// A half-close reaches the server, whose close reaches us after the echo.
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	select {
	case b := <-got:
		if !bytes.Equal(b, data) {
			t.Fatalf("echoed %d bytes differ from the %d sent", len(b), len(data))
		}
	case <-time.After(10 * time.Second):
		t.Fatal("echo did not end")
	}
}

func TestProxyCutAndHeal(t *testing.T) {
	up, upErrs := echoServer(t)
	p := testenv.StartProxy(t, up)
	c := dial(t, p.Addr())
	roundTrip(t, c)

	p.Cut()
	// The open connection is reset at both ends.
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	_, err := c.Read(make([]byte, 1))
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("read on a cut connection: %v, want connection reset", err)
	}
	select {
	case err := <-upErrs:
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Errorf("upstream saw %v, want connection reset", err)
		}
	case <-time.After(5 * time.Second):
		t.Error("upstream connection not reset")
	}
	// New connections are refused.
	if _, err := net.DialTimeout("tcp", p.Addr(), time.Second); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("dial while cut: %v, want connection refused", err)
	}
	p.Cut() // twice is fine

	p.Heal()
	roundTrip(t, dial(t, p.Addr()))
	p.Heal() // twice is fine
	roundTrip(t, dial(t, p.Addr()))
}

func TestProxyLatency(t *testing.T) {
	up, _ := echoServer(t)
	p := testenv.StartProxy(t, up)
	c := dial(t, p.Addr())
	if d := roundTrip(t, c); d > 50*time.Millisecond {
		t.Fatalf("round trip without latency took %v", d)
	}
	const latency = 60 * time.Millisecond
	p.SetLatency(latency) // applies to the open connection
	for range 3 {
		if d := roundTrip(t, c); d < 2*latency || d > 2*latency+500*time.Millisecond {
			t.Errorf("round trip with %v each way took %v, want about %v", latency, d, 2*latency)
		}
	}
	p.SetLatency(0)
	if d := roundTrip(t, c); d > 50*time.Millisecond {
		t.Errorf("round trip after removing latency took %v", d)
	}
}

func TestProxyBandwidth(t *testing.T) {
	up, _ := echoServer(t)
	p := testenv.StartProxy(t, up)
	c := dial(t, p.Addr())
	const rate = 200_000 // bytes per second, each direction
	p.SetBandwidth(rate)
	data := make([]byte, 60_000)
	start := time.Now()
	go func() { _, _ = c.Write(data) }()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(c, make([]byte, len(data))); err != nil {
		t.Fatal(err)
	}
	// 60 kB at 200 kB/s is 300 ms; the two directions overlap.
	if d := time.Since(start); d < 250*time.Millisecond || d > 3*time.Second {
		t.Errorf("60 kB echoed at %d B/s in %v, want about 300 ms", rate, d)
	}
	p.SetBandwidth(0)
	start = time.Now()
	go func() { _, _ = c.Write(data) }()
	if _, err := io.ReadFull(c, make([]byte, len(data))); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 100*time.Millisecond {
		t.Errorf("60 kB without a cap took %v", d)
	}
}

func TestProxyUpstreamDown(t *testing.T) {
	p := testenv.StartProxy(t, "127.0.0.1:"+strconv.Itoa(testenv.FreePort(t)))
	// The proxy accepts, fails to dial upstream and resets the client, which may see
	// the reset already in its connect.
	c, err := net.DialTimeout("tcp", p.Addr(), 5*time.Second)
	if err == nil {
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		_, err = c.Read(make([]byte, 1))
	}
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("connection through a proxy to nowhere: %v, want connection reset", err)
	}
}

// TestProxyPostgres cuts a real Postgres connection and heals the link.
func TestProxyPostgres(t *testing.T) {
	pg := testenv.SharedPostgres(t)
	dsn := pg.NewDatabase(t)
	p := testenv.StartProxy(t, pg.Addr())
	proxied := replaceHost(t, dsn, p.Addr())
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()

	conn, err := pgx.Connect(ctx, proxied)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(ctx, "SELECT 1"); err != nil {
		t.Fatal(err)
	}
	p.Cut()
	if _, err := conn.Exec(ctx, "SELECT 1"); err == nil {
		t.Fatal("query on a cut connection succeeded")
	}
	if _, err := pgx.Connect(ctx, proxied); err == nil {
		t.Fatal("connected through a cut link")
	}
	p.Heal()
	conn2, err := pgx.Connect(ctx, proxied)
	if err != nil {
		t.Fatal(err)
	}
	defer conn2.Close(context.Background())
	p.SetLatency(25 * time.Millisecond)
	start := time.Now()
	if _, err := conn2.Exec(ctx, "SELECT 1"); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d < 50*time.Millisecond {
		t.Errorf("query with 25 ms each way took %v", d)
	}
}

func replaceHost(t *testing.T, dsn, hostport string) string {
	t.Helper()
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		t.Fatal(err)
	}
	old := cfg.Host + ":" + strconv.Itoa(int(cfg.Port))
	out := bytes.Replace([]byte(dsn), []byte("@"+old+"/"), []byte("@"+hostport+"/"), 1)
	if bytes.Equal(out, []byte(dsn)) {
		t.Fatalf("no %s in %s", old, dsn)
	}
	return string(out)
}
