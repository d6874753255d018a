package main

import (
	"bufio"
	"context"
	"fmt"
	"net"
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
	subscribed := make(chan struct{})
	close(subscribed)
	_ = printCounts(ctx, subscribed, nil, sub.Received)
	if err := sub.Close(); err != nil {
		fmt.Fprintln(os.Stderr, "ceiling subscriber close:", err)
	}
}

// printCounts is a subscriber child's output: "ready" once subscribed is
// closed, then received's count every 20 ms until ctx ends (nil, after a
// last count) or failed reports an error.
func printCounts(ctx context.Context, subscribed <-chan struct{}, failed <-chan error, received func() int64) error {
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-subscribed:
			fmt.Println("ready")
			subscribed = nil
		case err := <-failed:
			return err
		case <-ctx.Done():
			fmt.Println(received())
			return nil
		case <-t.C:
			fmt.Println(received())
		}
	}
}

// ceilingProc is a running bare subscriber.
type ceilingProc struct {
	cmd      *exec.Cmd
	received atomic.Int64
	done     chan struct{}
}

// childStarter starts this binary as the subscriber child that flag selects.
func childStarter(flag string) func(addr, clientID string) (*ceilingProc, error) {
	return func(addr, clientID string) (*ceilingProc, error) { return startChild(flag, addr, clientID) }
}

func startChild(flag, addr, clientID string) (*ceilingProc, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	c, err := startCounted(exec.Command(self, flag, addr, clientID), func(line string, c *ceilingProc) bool {
		if line == "ready" {
			return true
		}
		if n, err := strconv.ParseInt(line, 10, 64); err == nil {
			c.received.Store(n)
		}
		return false
	})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", flag, err)
	}
	return c, nil
}

// startCounted starts a subscriber process and feeds each line it prints to
// line, which keeps the count and reports the line that means "subscribed".
func startCounted(cmd *exec.Cmd, line func(string, *ceilingProc) (ready bool)) (*ceilingProc, error) {
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start: %w", err)
	}
	c := &ceilingProc{cmd: cmd, done: make(chan struct{})}
	ready := make(chan struct{})
	go func() {
		defer close(c.done)
		sc := bufio.NewScanner(out)
		subscribed := false
		for sc.Scan() {
			if line(strings.TrimSpace(sc.Text()), c) && !subscribed {
				subscribed = true
				close(ready)
			}
		}
	}()
	select {
	case <-ready:
		return c, nil
	case <-c.done:
		_ = cmd.Wait()
		return nil, fmt.Errorf("exited before subscribing")
	case <-time.After(30 * time.Second):
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		return nil, fmt.Errorf("did not subscribe within 30 s")
	}
}

// startMosquittoSub starts Mosquitto's own C client, mosquitto_sub, as a
// bare subscriber: the broker's QoS 1 pass-through to a client that is not
// paho. It speaks MQTT 3.1.1 so that the broker's max_inflight_messages is
// its window (libmosquitto asks for a Receive Maximum of 20 under MQTT 5),
// keeps a persistent session like the gateway, and prints each message's
// topic, which this process counts. Before it subscribes, a retained message
// on a topic of its own is published: its arrival means the subscriptions
// are in place.
func startMosquittoSub(addr, clientID string) (*ceilingProc, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, err
	}
	ready := "bench/ready/" + clientID
	retain := func(msg ...string) error {
		args := append([]string{"-h", host, "-p", port, "-q", "1", "-r", "-t", ready}, msg...)
		if out, err := exec.Command("mosquitto_pub", args...).CombinedOutput(); err != nil {
			return fmt.Errorf("mosquitto_pub %s: %w: %s", ready, err, out)
		}
		return nil
	}
	if err := retain("-m", "ready"); err != nil {
		return nil, err
	}
	cmd := exec.Command("mosquitto_sub", "-h", host, "-p", port, "-i", clientID, "-c", "-q", "1",
		"-V", "mqttv311", "-F", "%t", "-t", bench.FlatFilter, "-t", bench.SenMLFilter, "-t", ready)
	c, err := startCounted(cmd, func(line string, c *ceilingProc) bool {
		if line == ready {
			return true
		}
		c.received.Add(1)
		return false
	})
	if err != nil {
		return nil, fmt.Errorf("mosquitto_sub: %w", err)
	}
	if err := retain("-n"); err != nil { // clear the marker
		_ = c.stop()
		return nil, err
	}
	return c, nil
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
