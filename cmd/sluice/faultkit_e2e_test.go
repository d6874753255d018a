package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/message/pool"
	"github.com/plgd-dev/go-coap/v3/udp/coder"

	"github.com/sluice-gw/sluice/internal/testenv"
)

// The fault and attack tests count readings by per-sensor sequence numbers:
// every reading's value is its sensor's sequence number, so Postgres shows
// exactly which acknowledged reading is missing and which is stored twice.

// ledger is one scenario's count: what each sensor sent, and what its source
// acknowledged (the broker's PUBACK over MQTT, 2.04 over CoAP). Safe for
// concurrent use.
type ledger struct {
	mu      sync.Mutex
	sensors map[string]*sensorCount
}

type sensorCount struct {
	sent, acked map[int64]bool
}

func newLedger() *ledger { return &ledger{sensors: map[string]*sensorCount{}} }

func (l *ledger) sensor(name string) *sensorCount {
	s := l.sensors[name]
	if s == nil {
		s = &sensorCount{sent: map[int64]bool{}, acked: map[int64]bool{}}
		l.sensors[name] = s
	}
	return s
}

// sent records values about to be sent; acked those their source took.
func (l *ledger) sent(sensor string, values ...int64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	s := l.sensor(sensor)
	for _, v := range values {
		s.sent[v] = true
	}
}

func (l *ledger) acked(sensor string, values ...int64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	s := l.sensor(sensor)
	for _, v := range values {
		s.sent[v] = true
		s.acked[v] = true
	}
}

// tally is a scenario's outcome, as docs/RELIABILITY.md reports it.
type tally struct {
	sent, acked, stored int // stored: rows of the ledger's sensors
	lost                int // acknowledged, not stored
	duplicated          int // rows beyond the first of one sensor's value
	stray               int // rows of values never sent
	missing             map[string][]int64
	doubled             map[string][]int64
}

func (ty tally) String() string {
	return fmt.Sprintf("sent %d, acknowledged %d, stored %d, lost %d, duplicated %d", ty.sent, ty.acked, ty.stored, ty.lost, ty.duplicated)
}

// count compares the ledger with sluice.readings.
func (l *ledger) count(t *testing.T, dsn string) tally {
	t.Helper()
	l.mu.Lock()
	defer l.mu.Unlock()
	ty := tally{missing: map[string][]int64{}, doubled: map[string][]int64{}}
	names := make([]string, 0, len(l.sensors))
	for name, s := range l.sensors {
		names = append(names, name)
		ty.sent += len(s.sent)
		ty.acked += len(s.acked)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatalf("count readings: %v", err)
	}
	defer conn.Close(context.Background())
	rows, err := conn.Query(ctx, `SELECT sensor, value::bigint, count(*) FROM sluice.readings
WHERE sensor = ANY($1) GROUP BY 1, 2`, names)
	if err != nil {
		t.Fatalf("count readings: %v", err)
	}
	stored := map[string]map[int64]int{}
	for rows.Next() {
		var sensor string
		var v, n int64
		if err := rows.Scan(&sensor, &v, &n); err != nil {
			t.Fatalf("count readings: %v", err)
		}
		if stored[sensor] == nil {
			stored[sensor] = map[int64]int{}
		}
		stored[sensor][v] = int(n)
		ty.stored += int(n)
	}
	if err := rows.Err(); err != nil {
		t.Fatalf("count readings: %v", err)
	}
	for name, s := range l.sensors {
		for v := range s.acked {
			if stored[name][v] == 0 {
				ty.lost++
				ty.missing[name] = append(ty.missing[name], v)
			}
		}
		for v, n := range stored[name] {
			if n > 1 {
				ty.duplicated += n - 1
				ty.doubled[name] = append(ty.doubled[name], v)
			}
			if !s.sent[v] {
				ty.stray += n
			}
		}
		slices.Sort(ty.missing[name])
		slices.Sort(ty.doubled[name])
	}
	return ty
}

// waitLanded waits until every acknowledged reading is in Postgres.
func (l *ledger) waitLanded(t *testing.T, dsn string, d time.Duration) tally {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		ty := l.count(t, dsn)
		if ty.lost == 0 {
			return ty
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %s: %s; missing %s", d, ty, ranges(ty.missing))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// verify waits until every acknowledged reading landed and the gateway's
// buffer is empty (so no copy is still on its way), then requires that
// none is stored twice and nothing unsent appeared, and logs the line that
// docs/RELIABILITY.md reports.
func (l *ledger) verify(t *testing.T, g *gatewayProc, dsn, scenario string, d time.Duration) tally {
	t.Helper()
	l.waitLanded(t, dsn, d)
	g.waitBufferEmpty(d)
	ty := l.count(t, dsn)
	if ty.lost != 0 || ty.duplicated != 0 || ty.stray != 0 {
		t.Fatalf("%s: %s, stray %d; missing %s; doubled %s", scenario, ty, ty.stray, ranges(ty.missing), ranges(ty.doubled))
	}
	t.Logf("RELIABILITY %s: %s", scenario, ty)
	return ty
}

// queryStrings runs a query that returns one text column, nil on any error
// (the server may be the fault under test).
func queryStrings(dsn, sql string) []string {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return nil
	}
	defer conn.Close(context.Background())
	rows, err := conn.Query(ctx, sql)
	if err != nil {
		return nil
	}
	out, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil
	}
	return out
}

// ranges prints each sensor's values as runs, e.g. "s1: 3-7,9".
func ranges(m map[string][]int64) string {
	var parts []string
	for name, vs := range m {
		var runs []string
		for i := 0; i < len(vs); {
			j := i
			for j+1 < len(vs) && vs[j+1] == vs[j]+1 {
				j++
			}
			if i == j {
				runs = append(runs, strconv.FormatInt(vs[i], 10))
			} else {
				runs = append(runs, fmt.Sprintf("%d-%d", vs[i], vs[j]))
			}
			i = j + 1
		}
		parts = append(parts, name+": "+strings.Join(runs, ","))
	}
	slices.Sort(parts)
	if len(parts) == 0 {
		return "none"
	}
	return strings.Join(parts, "; ")
}

// waitBufferEmpty waits until the gateway's buffer holds no reading.
func (g *gatewayProc) waitBufferEmpty(d time.Duration) {
	g.t.Helper()
	deadline := time.Now().Add(d)
	for {
		st := g.adminStatus()
		if st.Buffer.Readings == 0 {
			return
		}
		if time.Now().After(deadline) {
			g.t.Fatalf("buffer still holds %d readings after %s (uplink %s: %s)", st.Buffer.Readings, d, st.Uplink.State, st.Uplink.LastError)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// waitIngress waits until /api/status shows the named ingress up (MQTT:
// connected and every subscription granted). /readyz alone says only that
// some ingress is up.
func (g *gatewayProc) waitIngress(name string, d time.Duration) {
	g.t.Helper()
	deadline := time.Now().Add(d)
	for {
		var last string
		if g.get("/healthz") != "" {
			for _, in := range g.adminStatus().Ingress {
				if in.Name == name {
					if in.Up {
						return
					}
					last = in.State + " " + in.LastError
				}
			}
		}
		if time.Now().After(deadline) {
			g.t.Fatalf("ingress %s not up after %s (%s)", name, d, last)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// sensor is what the test sensors of both transports share: the ledger
// that books their readings, the name those carry, and their time.
type sensor struct {
	l      *ledger
	name   string
	metric string
	timed  bool  // the reading carries its own time; otherwise the gateway stamps it
	base   int64 // the time of value 0, in Unix milliseconds
}

// streamValues sends first, first+1, ... with pause before each until stop
// is closed or a send fails, and returns the next value to send.
func (s *sensor) streamValues(t *testing.T, stop <-chan struct{}, pause time.Duration, first int64, send func(int64) error) int64 {
	for v := first; ; v++ {
		select {
		case <-stop:
			return v
		case <-time.After(pause):
		}
		if err := send(v); err != nil {
			t.Errorf("sensor %s value %d: %v", s.name, v, err)
			return v + 1
		}
	}
}

// mqttSensor publishes one sensor's readings at QoS 1: flat JSON with its
// time, or an untimed plain number.
type mqttSensor struct {
	sensor
	p *publisher
}

func (s *mqttSensor) send(v int64) error {
	payload := strconv.FormatInt(v, 10)
	if s.timed {
		payload = fmt.Sprintf(`{"value": %d, "ts": %d}`, v, s.base+v)
	}
	s.l.sent(s.name, v)
	if err := s.p.publish("sensors/"+s.name+"/"+s.metric, []byte(payload)); err != nil {
		return err
	}
	s.l.acked(s.name, v)
	return nil
}

// stream sends 0, 1, 2, ... until stop is closed.
func (s *mqttSensor) stream(t *testing.T, stop <-chan struct{}, pause time.Duration) int64 {
	return s.streamValues(t, stop, pause, 0, s.send)
}

// coapPeer is a CoAP client on one UDP socket, as a sensor is: it sends a
// confirmable request and retransmits it with the same message id until an
// answer comes (RFC 7252 §4.2), also across a gateway restart, since the
// port stays the same.
type coapPeer struct {
	conn    *net.UDPConn
	to      *net.UDPAddr
	mid     uint16
	buf     []byte
	timeout time.Duration // before a retransmission (0: 200 ms plus up to 100 ms of jitter)
}

func newCoAPPeer(t *testing.T, addr string) *coapPeer {
	t.Helper()
	conn, to := testenv.UDPPeer(t, addr)
	return &coapPeer{conn: conn, to: to, mid: uint16(rand.IntN(1 << 16)), buf: make([]byte, 64<<10)}
}

// coapRequest is one POST: path, content-format (-1: none) and body.
type coapRequest struct {
	path string
	cf   int
	body []byte
}

// encode builds a confirmable POST with the given message id.
func (r coapRequest) encode(mid uint16) ([]byte, error) {
	m := pool.NewMessage(context.Background())
	m.SetType(message.Confirmable)
	m.SetMessageID(int32(mid))
	m.SetToken(message.Token{byte(mid >> 8), byte(mid), 0x5e})
	m.SetCode(codes.POST)
	if err := m.SetPath(r.path); err != nil {
		return nil, err
	}
	if r.cf >= 0 {
		m.SetContentFormat(message.MediaType(r.cf))
	}
	if len(r.body) > 0 {
		m.SetBody(bytes.NewReader(r.body))
	}
	return m.MarshalWithEncoder(coder.DefaultCoder)
}

// errNoAnswer: the request went unanswered until the context ended.
var errNoAnswer = errors.New("no answer")

// post sends r as one exchange, retransmitting the same bytes after each
// timeout until the answer to its message id comes or ctx ends.
func (c *coapPeer) post(ctx context.Context, r coapRequest) (codes.Code, error) {
	c.mid++
	mid := c.mid
	b, err := r.encode(mid)
	if err != nil {
		return 0, err
	}
	for ctx.Err() == nil {
		if _, err := c.conn.WriteToUDP(b, c.to); err != nil {
			return 0, err
		}
		timeout := c.timeout
		if timeout == 0 {
			timeout = 200*time.Millisecond + rand.N(100*time.Millisecond)
		}
		wait := time.Now().Add(timeout)
		for {
			_ = c.conn.SetReadDeadline(wait)
			n, _, err := c.conn.ReadFromUDP(c.buf)
			if err != nil {
				break // timed out: retransmit
			}
			var m message.Message
			m.Options = make(message.Options, 0, 8)
			if _, err := coder.DefaultCoder.Decode(c.buf[:n], &m); err != nil || m.MessageID != int32(mid) {
				continue // a stray or late answer to an earlier exchange
			}
			return m.Code, nil
		}
	}
	return 0, errNoAnswer
}

// coapSensor posts one sensor's readings: SenML JSON with its time, or an
// untimed plain number. A reading counts as acknowledged only on 2.04.
type coapSensor struct {
	sensor
	c *coapPeer
}

func (s *coapSensor) request(v int64) coapRequest {
	if s.timed {
		return coapRequest{path: "/s/" + s.name, cf: int(message.AppSenmlJSON), body: fmt.Appendf(nil,
			`[{"bn":"%s:","n":"%s","v":%d,"t":%d.%03d}]`, s.name, s.metric, v, (s.base+v)/1000, (s.base+v)%1000)}
	}
	return coapRequest{path: "/s/" + s.name + "/" + s.metric, cf: int(message.TextPlain), body: strconv.AppendInt(nil, v, 10)}
}

// send posts value v until the gateway stores it. A 5.03 (the gateway is
// stopping) is tried again as a new exchange, as a sensor would after Max-Age.
func (s *coapSensor) send(ctx context.Context, v int64) error {
	s.l.sent(s.name, v)
	for {
		code, err := s.c.post(ctx, s.request(v))
		if err != nil {
			return err
		}
		switch code {
		case codes.Changed:
			s.l.acked(s.name, v)
			return nil
		case codes.ServiceUnavailable:
			select {
			case <-ctx.Done():
				return errNoAnswer
			case <-time.After(100 * time.Millisecond):
			}
		default:
			return fmt.Errorf("answered %v", code)
		}
	}
}

// stream posts 0, 1, 2, ... until stop is closed. The exchange in progress
// then still gets up to a minute to be answered.
func (s *coapSensor) stream(t *testing.T, stop <-chan struct{}, pause time.Duration) int64 {
	return s.streamValues(t, stop, pause, 0, func(v int64) error {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		return s.send(ctx, v)
	})
}

// metricValue reads one series from Prometheus text, e.g.
// metricValue(text, `sluice_messages_rejected_total{ingress="mqtt",reason="malformed"}`);
// a series that is not there reads 0.
func metricValue(text, series string) float64 {
	for _, line := range strings.Split(text, "\n") {
		if v, ok := strings.CutPrefix(line, series+" "); ok {
			f, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			if err == nil {
				return f
			}
		}
	}
	return 0
}

// memoryKiB is the gateway's peak resident set (VmHWM) and anonymous
// resident memory (RssAnon) in KiB, read by procMemory.
func (g *gatewayProc) memoryKiB() (vmHWM, rssAnon int64) {
	g.t.Helper()
	hwm, anon := procMemory(g.t, g.cmd.Process.Pid)
	kib := func(s string) int64 {
		n, err := strconv.ParseInt(strings.TrimSuffix(s, " kB"), 10, 64)
		if err != nil {
			g.t.Fatalf("memory figure %q: %v", s, err)
		}
		return n
	}
	return kib(hwm), kib(anon)
}

// withKeys adds lines to a section of a test config, right under its header.
func withKeys(t *testing.T, cfg, section string, lines ...string) string {
	t.Helper()
	header := "[" + section + "]\n"
	if !strings.Contains(cfg, header) {
		t.Fatalf("config has no %s section", header)
	}
	return strings.Replace(cfg, header, header+strings.Join(lines, "\n")+"\n", 1)
}

// coapOnly is the [coap] section for a plain UDP listener. The key is
// written without spaces round '=': the harness takes a `listen = ` line
// for the admin address.
func coapOnly(addr string) string { return fmt.Sprintf("\n[coap]\nlisten=%q\n", addr) }
