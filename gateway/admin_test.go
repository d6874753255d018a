package gateway

import (
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/sluice-gw/sluice/buffer"
)

func testAdmin(t *testing.T, opts AdminOptions, st Status, ready error) *Admin {
	t.Helper()
	if opts.Listen == "" {
		opts.Listen = "127.0.0.1:0"
	}
	a, err := NewAdmin(opts, prometheus.NewRegistry(), func() Status { return st }, func() error { return ready }, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = a.ln.Close() })
	return a
}

func get(t *testing.T, h http.Handler, path string, header ...string) *httptest.ResponseRecorder {
	t.Helper()
	req := httptest.NewRequest(http.MethodGet, path, nil)
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	return rec
}

func TestAdminToken(t *testing.T) {
	const token = "s3cret-token"
	h := testAdmin(t, AdminOptions{Token: token}, Status{Health: HealthOK}, nil).Handler()
	basic := func(pw string) string {
		req := httptest.NewRequest(http.MethodGet, "/", nil)
		req.SetBasicAuth("tech", pw)
		return req.Header.Get("Authorization")
	}
	cases := []struct {
		path, auth string
		want       int
	}{
		{"/healthz", "", 200},
		{"/readyz", "", 401},
		{"/api/status", "", 401},
		{"/metrics", "", 401},
		{"/", "", 401},
		{"/api/status", "Bearer " + token, 200},
		{"/api/status", "bearer " + token, 200},
		{"/api/status", "Bearer " + token + "x", 401},
		{"/api/status", "Bearer ", 401},
		{"/metrics", "Bearer " + token, 200},
		{"/readyz", "Bearer " + token, 200},
		{"/", basic(token), 200},
		{"/", basic("wrong"), 401},
		{"/api/status", "Basic !!notbase64", 401},
	}
	for _, c := range cases {
		rec := get(t, h, c.path, "Authorization", c.auth)
		if rec.Code != c.want {
			t.Errorf("GET %s with %q: %d, want %d", c.path, c.auth, rec.Code, c.want)
		}
		if rec.Code == 401 && len(rec.Header().Values("WWW-Authenticate")) == 0 {
			t.Errorf("GET %s: 401 without WWW-Authenticate", c.path)
		}
		if strings.Contains(rec.Body.String(), token) {
			t.Errorf("GET %s: the body shows the token", c.path)
		}
	}
}

func TestAdminRefusesOpenListenWithoutToken(t *testing.T) {
	_, err := NewAdmin(AdminOptions{Listen: "0.0.0.0:0"}, prometheus.NewRegistry(), nil, nil, nil)
	if err == nil || !strings.Contains(err.Error(), "token") {
		t.Fatalf("NewAdmin on 0.0.0.0 without a token: %v, want a token error", err)
	}
}

func TestIsLoopback(t *testing.T) {
	for listen, want := range map[string]bool{
		"127.0.0.1:9180": true, "[::1]:9180": true, "localhost:9180": true, "127.0.0.2:1": true,
		"0.0.0.0:9180": false, ":9180": false, "[::]:9180": false, "192.168.1.10:9180": false, "gateway:9180": false, "nonsense": false,
	} {
		if got := IsLoopback(listen); got != want {
			t.Errorf("IsLoopback(%q) = %v, want %v", listen, got, want)
		}
	}
}

func TestAdminReadyAndPage(t *testing.T) {
	h := testAdmin(t, AdminOptions{}, Status{Health: HealthOK}, errors.New("no ingress is up: mqtt disconnected")).Handler()
	rec := get(t, h, "/readyz")
	if rec.Code != 503 || !strings.Contains(rec.Body.String(), "mqtt disconnected") {
		t.Fatalf("/readyz = %d %q, want 503 with the reason", rec.Code, rec.Body.String())
	}
	page := get(t, h, "/")
	if page.Code != 200 || !strings.Contains(page.Header().Get("Content-Type"), "text/html") {
		t.Fatalf("/ = %d %s", page.Code, page.Header().Get("Content-Type"))
	}
	csp := page.Header().Get("Content-Security-Policy")
	if !strings.Contains(csp, "script-src 'sha256-") || !strings.Contains(csp, "style-src 'sha256-") || !strings.Contains(csp, "default-src 'none'") {
		t.Fatalf("CSP %q does not pin the inline script and style", csp)
	}
	for _, external := range []string{"http://", "https://", "//cdn"} {
		if strings.Contains(strings.ReplaceAll(page.Body.String(), "http://www.w3.org/2000/svg", ""), external) {
			t.Fatalf("the page refers to %s: it must work offline", external)
		}
	}
	if rec := get(t, h, "/nope"); rec.Code != 404 {
		t.Fatalf("/nope = %d, want 404", rec.Code)
	}
}

func TestBacklogHistory(t *testing.T) {
	h := newBacklogHistory(3)
	at := time.Unix(1000, 0)
	sample := func(i int) BacklogSample {
		return BacklogSample{At: at.Add(time.Duration(i) * time.Second), Readings: int64(i)}
	}
	if got := h.samples(sample(99)); len(got) != 1 || got[0].Readings != 99 {
		t.Fatalf("empty history gives %v, want only now", got)
	}
	for i := range 5 {
		h.add(sample(i))
	}
	got := h.samples(sample(99))
	var vals []int64
	for _, s := range got {
		vals = append(vals, s.Readings)
	}
	if want := []int64{2, 3, 4, 99}; !equalInts(vals, want) {
		t.Fatalf("history = %v, want %v (bounded, oldest first, then now)", vals, want)
	}
}

func equalInts(a, b []int64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestAdminStatusJSON(t *testing.T) {
	a := testAdmin(t, AdminOptions{Backlog: func() int64 { return 7 }}, Status{Health: HealthOK, Buffer: BufferStatus{Readings: 7}}, nil)
	a.history.add(BacklogSample{At: time.Now().Add(-time.Minute), Readings: 3})
	rec := get(t, a.Handler(), "/api/status")
	var st Status
	if err := json.Unmarshal(rec.Body.Bytes(), &st); err != nil {
		t.Fatal(err)
	}
	if len(st.BacklogHistory) != 2 || st.BacklogHistory[0].Readings != 3 || st.BacklogHistory[1].Readings != 7 {
		t.Fatalf("backlog_history = %+v, want the sample and now", st.BacklogHistory)
	}
	if rec.Header().Get("Cache-Control") != "no-store" {
		t.Fatalf("status is cacheable")
	}
}

func TestAssess(t *testing.T) {
	healthy := func() Status {
		return Status{
			Ingress: []IngressStatus{{Name: "mqtt", State: StateConnected, Up: true}},
			Buffer:  BufferStatus{Readings: 10, Bytes: 1000, MaxBytes: 1 << 20, OnFull: "drop-oldest"},
			Uplink:  UplinkStatus{State: "up", LagSeconds: 1, LagAlertSeconds: 60},
			Clock:   ClockStatus{Synced: true, Source: "configured trusted"},
			Sensors: []SensorStatus{{Sensor: "a"}, {Sensor: "b"}},
		}
	}
	cases := []struct {
		name   string
		change func(*Status)
		health string
		part   string
		level  Level
		text   string
	}{
		{"healthy", func(*Status) {}, HealthOK, "uplink", LevelOK, "reachable"},
		{"broker down", func(s *Status) {
			s.Ingress[0] = IngressStatus{Name: "mqtt", State: StateDisconnected, LastError: "connection refused"}
		}, HealthFailing, "mqtt", LevelFail, "connection refused"},
		{"subscribing", func(s *Status) { s.Ingress[0] = IngressStatus{Name: "mqtt", State: StateSubscribing} }, HealthDegraded, "mqtt", LevelWarn, "subscribing"},
		{"no ingress", func(s *Status) { s.Ingress = nil }, HealthFailing, "ingress", LevelFail, "no ingress"},
		{"postgres down", func(s *Status) { s.Uplink.State, s.Uplink.LastError = "retrying", "dial tcp: refused" }, HealthDegraded, "uplink", LevelWarn, "unreachable"},
		{"lagging", func(s *Status) { s.Uplink.LagSeconds = 600 }, HealthDegraded, "uplink", LevelWarn, "10m00s old"},
		{"buffer full, reject", func(s *Status) { s.Buffer.Full, s.Buffer.OnFull = true, "reject" }, HealthFailing, "buffer", LevelFail, "held back"},
		{"buffer full, drop", func(s *Status) { s.Buffer.Full = true }, HealthFailing, "buffer", LevelFail, "dropped"},
		{"buffer nearly full", func(s *Status) { s.Buffer.Bytes = 900 << 10 }, HealthDegraded, "buffer", LevelWarn, "87% full"},
		{"dead letters", func(s *Status) { s.Buffer.DeadLetters = 3 }, HealthDegraded, "buffer", LevelWarn, "3 readings refused"},
		{"clock", func(s *Status) { s.Clock = ClockStatus{Source: "not synchronised"} }, HealthDegraded, "clock", LevelWarn, "not synchronised"},
		{"stale sensor", func(s *Status) { s.Sensors[1].Stale = true }, HealthDegraded, "sensors", LevelWarn, "1 of 2 sensors silent too long: b"},
		{"recovered", func(s *Status) { s.Buffer.Recovered = &RecoveryStatus{LostReadings: 4} }, HealthDegraded, "buffer", LevelWarn, "4 readings lost"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			st := healthy()
			c.change(&st)
			st.Assess(time.Now())
			if st.Health != c.health {
				t.Errorf("health = %s, want %s (checks %+v)", st.Health, c.health, st.Checks)
			}
			found := false
			for _, ch := range st.Checks {
				if ch.Part == c.part && ch.Level == c.level && strings.Contains(ch.Text, c.text) {
					found = true
				}
			}
			if !found {
				t.Errorf("no %s check at %s saying %q in %+v", c.part, c.level, c.text, st.Checks)
			}
			if (st.Health == HealthOK) != (len(st.Reasons) == 0) {
				t.Errorf("health %s with reasons %q", st.Health, st.Reasons)
			}
		})
	}
}

func TestFormatAge(t *testing.T) {
	for s, want := range map[float64]string{0: "0s", 42.4: "42s", 190: "3m10s", 3600*5 + 120: "5h02m", 86400*3 + 3600*4: "3d04h", -5: "0s"} {
		if got := FormatAge(s); got != want {
			t.Errorf("FormatAge(%v) = %q, want %q", s, got, want)
		}
	}
}

// TestMetricsLint registers every collector the gateway package makes on a
// pedantic registry and lints the names, types and help texts.
func TestMetricsLint(t *testing.T) {
	reg := prometheus.NewPedanticRegistry()
	in := NewIngest(IngestOptions{}, NewClock(ClockTrusted), nil, reg)
	reg.MustRegister(in.Tracker())
	reg.MustRegister(NewBufferCollector(func() buffer.Stats { return buffer.Stats{} }))
	NewCommitHistogram(reg).Observe(0.001)
	in.Tracker().Observe([]buffer.Reading{seqReading("s", 1)})
	in.Tracker().Observe([]buffer.Reading{seqReading("s", 4)})
	problems, err := testutil.GatherAndLint(reg)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("metric %s: %s", p.Metric, p.Text)
	}
	want := `
# HELP sluice_sensor_gaps_total Reports sensors missed, from their sequence numbers or their reporting interval.
# TYPE sluice_sensor_gaps_total counter
sluice_sensor_gaps_total 2
# HELP sluice_sensors_stale Sensors silent for longer than their stale threshold.
# TYPE sluice_sensors_stale gauge
sluice_sensors_stale 0
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "sluice_sensor_gaps_total", "sluice_sensors_stale"); err != nil {
		t.Fatal(err)
	}
}
