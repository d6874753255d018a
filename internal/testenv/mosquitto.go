package testenv

import (
	"context"
	_ "embed"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// gatewayMosquittoConf holds the broker settings a gateway ships with.
//
//go:embed testdata/mosquitto.conf
var gatewayMosquittoConf string

// Mosquitto is a private MQTT broker for one test.
//
// It runs the gateway's shipped settings (persistence on, autosave every 60 s,
// 1,000,000 queued messages per client, 1,000 in flight) with one anonymous
// listener on 127.0.0.1, persistence in a temp directory, and logs to Log.
// Stop, Kill and Start are for the test goroutine; URL, Addr and Log are safe anywhere.
type Mosquitto struct {
	dir     string // persistence (mosquitto.db), config, log
	port    int    // fixed once the first start has succeeded
	logPath string
	proc    *process
}

// MosquittoOptions configure StartMosquitto.
type MosquittoOptions struct {
	// Port is the listener's TCP port on 127.0.0.1 (default: a free one).
	Port int
	// MaxInflight and MaxQueued are max_inflight_messages and max_queued_messages:
	// 0 keeps the gateway's shipped settings (1000 and 1000000), -1 leaves them out
	// so Mosquitto's defaults apply (20 and 1000), a positive number sets them.
	MaxInflight, MaxQueued int
	// ExtraConf lines are appended to the configuration, after the listener, so a
	// per-listener option applies to it; a global option applies anyway.
	ExtraConf []string
}

// StartMosquitto starts a private broker and waits until it answers an MQTT CONNECT.
// It is killed and its files removed in t.Cleanup; its log is printed if the test
// failed. A missing mosquitto skips the test (see Require).
func StartMosquitto(t testing.TB, opts MosquittoOptions) *Mosquitto {
	t.Helper()
	bin, ok := findBinary("mosquitto")
	if !ok {
		missing(t, "mosquitto", "mosquitto")
	}
	dir := t.TempDir()
	m := &Mosquitto{
		dir:     dir,
		port:    opts.Port,
		logPath: filepath.Join(dir, "mosquitto.log"),
	}
	m.proc = &process{
		name:     "mosquitto",
		path:     bin,
		args:     []string{"-c", filepath.Join(dir, "mosquitto.conf")},
		deathSig: syscall.SIGKILL,
		logPath:  m.logPath,
	}
	// Killed, not stopped: nothing needs the store a clean exit would write, and
	// writing a large queue takes a while.
	t.Cleanup(m.proc.kill)
	logOnFailure(t, "mosquitto", m.logPath)
	if err := m.launch(opts, opts.Port != 0); err != nil {
		t.Fatalf("testenv: start mosquitto: %v\n--- mosquitto log (%s) ---\n%s", err, m.logPath, logTail(m.logPath, 16<<10))
	}
	return m
}

// launch writes the configuration for m.port and starts the broker. With a port
// left to us, a port that another process took meanwhile is replaced, up to three times.
func (m *Mosquitto) launch(opts MosquittoOptions, fixedPort bool) error {
	for attempt := 1; ; attempt++ {
		if m.port == 0 {
			port, err := freePort()
			if err != nil {
				return err
			}
			m.port = port
		}
		conf := mosquittoConf(m.dir, m.port, opts)
		if err := os.WriteFile(filepath.Join(m.dir, "mosquitto.conf"), []byte(conf), 0o644); err != nil {
			return err
		}
		since := logSize(m.logPath)
		if err := m.proc.start(); err != nil {
			return err
		}
		err := m.proc.waitReady(func(ctx context.Context) error { return mqttProbe(ctx, m.Addr()) })
		if err == nil {
			return nil
		}
		m.proc.kill()
		if fixedPort || attempt == 3 || !addrInUse(m.logPath, since) {
			return err
		}
		m.port = 0
	}
}

// mosquittoConf renders the broker's configuration.
func mosquittoConf(dir string, port int, opts MosquittoOptions) string {
	var b strings.Builder
	b.WriteString("# Written by internal/testenv from testdata/mosquitto.conf.\n")
	for _, line := range strings.Split(gatewayMosquittoConf, "\n") {
		fields := strings.Fields(line)
		if len(fields) > 0 {
			switch fields[0] {
			case "max_inflight_messages":
				line = setOrDrop(line, fields[0], opts.MaxInflight)
			case "max_queued_messages":
				line = setOrDrop(line, fields[0], opts.MaxQueued)
			}
		}
		if line != "" {
			b.WriteString(line + "\n")
		}
	}
	lines := []string{
		"persistence_location " + dir + "/",
		// Everything but the per-message debug lines, to stderr, which goes to the log.
		"log_dest stderr",
		"log_type error",
		"log_type warning",
		"log_type notice",
		"log_type information",
		"log_type subscribe",
		"log_type unsubscribe",
		"log_timestamp_format %Y-%m-%dT%H:%M:%S",
		"connection_messages true",
	}
	if os.Geteuid() == 0 {
		// Stay root instead of becoming the mosquitto user, who could not write the
		// store into a temp directory of root's.
		lines = append(lines, "user root")
	}
	lines = append(lines,
		"listener "+strconv.Itoa(port)+" 127.0.0.1",
		"allow_anonymous true",
	)
	lines = append(lines, opts.ExtraConf...)
	b.WriteString(strings.Join(lines, "\n") + "\n")
	return b.String()
}

// setOrDrop applies a MosquittoOptions number to a setting line: 0 keeps the line,
// a negative number drops it (Mosquitto's default applies), a positive one sets it.
func setOrDrop(line, key string, v int) string {
	switch {
	case v == 0:
		return line
	case v < 0:
		return ""
	default:
		return key + " " + strconv.Itoa(v)
	}
}

// mqttProbe sends an MQTT 3.1.1 CONNECT (clean session) and expects CONNACK 0.
func mqttProbe(ctx context.Context, addr string) error {
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	const id = "sluice-testenv-probe"
	pkt := []byte{
		0x10, byte(12 + len(id)), // CONNECT, remaining length
		0, 4, 'M', 'Q', 'T', 'T', 4, // protocol name, level 4 (3.1.1)
		0x02,  // flags: clean session
		0, 10, // keep alive 10 s
		0, byte(len(id)),
	}
	pkt = append(pkt, id...)
	if _, err := c.Write(pkt); err != nil {
		return err
	}
	ack := make([]byte, 4)
	if _, err := io.ReadFull(c, ack); err != nil {
		return fmt.Errorf("read CONNACK: %w", err)
	}
	if ack[0] != 0x20 || ack[1] != 2 {
		return fmt.Errorf("expected CONNACK, got % x", ack)
	}
	if ack[3] != 0 {
		return fmt.Errorf("CONNACK return code %d", ack[3])
	}
	_, _ = c.Write([]byte{0xE0, 0}) // DISCONNECT
	return nil
}

// URL returns the broker's address as "mqtt://127.0.0.1:port".
func (m *Mosquitto) URL() string { return "mqtt://" + m.Addr() }

// Addr returns the broker's host:port on 127.0.0.1.
func (m *Mosquitto) Addr() string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(m.port)) }

// Port returns the broker's TCP port.
func (m *Mosquitto) Port() int { return m.port }

// Dir returns the broker's directory: mosquitto.db (the persistence file, written
// on a clean exit and every autosave_interval), mosquitto.conf and mosquitto.log.
func (m *Mosquitto) Dir() string { return m.dir }

// Log returns the broker's log so far (every run of it), for failure messages.
func (m *Mosquitto) Log() string {
	b, err := os.ReadFile(m.logPath)
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	return string(b)
}

// Stop sends SIGTERM and waits until the broker has exited; a clean exit writes its
// persistence file, so sessions and queued messages survive into the next Start.
// A stopped broker is left alone.
func (m *Mosquitto) Stop(t testing.TB) {
	t.Helper()
	if err := m.proc.stop(syscall.SIGTERM, StartTimeout); err != nil {
		t.Fatalf("testenv: stop mosquitto: %v", err)
	}
}

// Save makes the broker write its persistence file now, as it does every
// autosave_interval (SIGUSR1), and waits until the file is written. What a Kill
// after it loses is only what came after it.
func (m *Mosquitto) Save(t testing.TB) {
	t.Helper()
	r := m.proc.current()
	if r == nil || r.exited() {
		t.Fatal("testenv: Save on a stopped mosquitto")
	}
	db := filepath.Join(m.dir, "mosquitto.db")
	before := inode(db) // the store is written to a new file and renamed over the old
	if err := r.cmd.Process.Signal(syscall.SIGUSR1); err != nil {
		t.Fatalf("testenv: mosquitto Save: %v", err)
	}
	for deadline := time.Now().Add(StartTimeout); inode(db) == before; {
		if time.Now().After(deadline) {
			t.Fatalf("testenv: mosquitto did not write %s within %v\n%s", db, StartTimeout, logTail(m.logPath, 4<<10))
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// inode returns a file's inode number, or 0 if there is no such file.
func inode(path string) uint64 {
	fi, err := os.Stat(path)
	if err != nil {
		return 0
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Ino
	}
	return 0
}

// Kill SIGKILLs the broker and waits until it is gone. What it had not yet written
// to its persistence file (since the last autosave) is lost, as in a crash.
func (m *Mosquitto) Kill(t testing.TB) {
	t.Helper()
	m.proc.kill()
}

// Start starts a stopped or killed broker again, on the same port and persistence
// directory, and waits until it answers an MQTT CONNECT.
func (m *Mosquitto) Start(t testing.TB) {
	t.Helper()
	if m.proc.running() {
		t.Fatal("testenv: mosquitto is already running")
	}
	// The configuration file of the first start, for the same port, is still there.
	if err := m.restart(); err != nil {
		t.Fatalf("testenv: restart mosquitto: %v\n--- mosquitto log (%s) ---\n%s", err, m.logPath, logTail(m.logPath, 16<<10))
	}
}

// restart starts the broker with the configuration file as it is.
func (m *Mosquitto) restart() error {
	if err := m.proc.start(); err != nil {
		return err
	}
	err := m.proc.waitReady(func(ctx context.Context) error { return mqttProbe(ctx, m.Addr()) })
	if err != nil {
		m.proc.kill()
	}
	return err
}
