package main

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/sluice-gw/sluice/bench"
)

// The ceiling's bare subscriber runs in a process of its own (this binary
// with -ceiling-subscriber), so that its CPU per message can be read from
// /proc and set beside the gateway's: the CPU target means little without
// what paho alone spends on a message.

// ceilingChildFlag makes this binary the bare subscriber: it subscribes,
// prints "ready", then its received count every 20 ms until SIGTERM, when it
// ends its session and exits.
const ceilingChildFlag = "-ceiling-subscriber"

func runCeilingChild(addr, clientID string) {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	sub, err := bench.Subscribe(ctx, bench.SubscriberOptions{Addr: addr, ClientID: clientID,
		Filters: []string{bench.FlatFilter, bench.SenMLFilter}})
	if err != nil {
		fmt.Fprintln(os.Stderr, "ceiling subscriber:", err)
		os.Exit(1)
	}
	fmt.Println("ready")
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			fmt.Println(sub.Received())
			if err := sub.Close(); err != nil {
				fmt.Fprintln(os.Stderr, "ceiling subscriber close:", err)
			}
			return
		case <-t.C:
			fmt.Println(sub.Received())
		}
	}
}

// ceilingProc is a running bare subscriber.
type ceilingProc struct {
	cmd      *exec.Cmd
	received atomic.Int64
	done     chan struct{}
}

func startCeiling(addr, clientID string) (*ceilingProc, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(self, ceilingChildFlag, addr, clientID)
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start the ceiling subscriber: %w", err)
	}
	c := &ceilingProc{cmd: cmd, done: make(chan struct{})}
	ready := make(chan struct{})
	go func() {
		defer close(c.done)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			line := strings.TrimSpace(sc.Text())
			if line == "ready" {
				close(ready)
				continue
			}
			if n, err := strconv.ParseInt(line, 10, 64); err == nil {
				c.received.Store(n)
			}
		}
	}()
	select {
	case <-ready:
		return c, nil
	case <-c.done:
		_ = cmd.Wait()
		return nil, fmt.Errorf("the ceiling subscriber exited before subscribing")
	case <-time.After(30 * time.Second):
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		return nil, fmt.Errorf("the ceiling subscriber did not subscribe within 30 s")
	}
}

func (c *ceilingProc) Received() int64 { return c.received.Load() }

func (c *ceilingProc) pid() int { return c.cmd.Process.Pid }

// stop ends the subscriber's session and waits for it.
func (c *ceilingProc) stop() error {
	_ = c.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-c.done:
	case <-time.After(15 * time.Second):
		_ = c.cmd.Process.Kill()
	}
	return c.cmd.Wait()
}
