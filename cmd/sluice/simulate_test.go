package main

import (
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sluice-gw/sluice/internal/testenv"
)

func TestSimulateFlagsReportEveryProblem(t *testing.T) {
	good := simulateCmd{Sensors: 3, Rate: 1, Duration: 30 * time.Second, Faults: 12, Dropout: 0.01, QoS: 1, Timeout: 10 * time.Second}
	now := time.Date(2026, 6, 1, 12, 0, 0, 0, time.UTC)
	if o, err := good.options(now); err != nil || o.Interval != time.Second || !o.Start.Equal(now) {
		t.Fatalf("good flags: %+v, %v", o, err)
	}
	at := good
	at.Start, at.Rate = "2026-01-02T03:04:05Z", 250
	if o, err := at.options(now); err != nil || o.Interval != 4*time.Millisecond || o.Start.Year() != 2026 || o.Start.Month() != 1 {
		t.Fatalf("--start and --rate: %+v, %v", o, err)
	}
	bad := simulateCmd{Sensors: 0, Rate: 2000, Duration: 0, QoS: 3, Timeout: 0, Start: "yesterday", Dropout: 1, Faults: -1}
	_, err := bad.options(now)
	for _, want := range []string{"--rate:", "--duration:", "--qos:", "--timeout:", "--start:"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("problems lack %q: %v", want, err)
		}
	}
	// With the flags in order, the model's own checks speak.
	bad = good
	bad.Sensors, bad.Dropout = 0, 1
	if _, err := bad.options(now); err == nil || !strings.Contains(err.Error(), "sensors:") || !strings.Contains(err.Error(), "dropout:") {
		t.Errorf("sensors 0, dropout 1: %v", err)
	}
}

// TestSimulateOverCoAPAndMQTT sends flat JSON and SenML, over CoAP to the
// gateway's own listener and over MQTT through the broker, and finds each
// acknowledged reading in Postgres once.
func TestSimulateOverCoAPAndMQTT(t *testing.T) {
	broker := testenv.StartMosquitto(t, testenv.MosquittoOptions{})
	dsn := testenv.SharedPostgres(t).NewDatabase(t)
	coap := fmt.Sprintf("127.0.0.1:%d", testenv.FreeUDPPort(t))
	port := testenv.FreePort(t)
	// startGateway would take the CoAP listen line for the admin address.
	config := writeConfig(t, gatewayConfig(t, t.TempDir(), broker.URL(), dsn, port, fmt.Sprintf("[coap]\nlisten = %q\n", coap)))
	g := startGatewayArgs(t, fmt.Sprintf("127.0.0.1:%d", port), nil, sluiceBin, "run", "--config", config)
	g.waitHTTP("/readyz", 20*time.Second)

	var total int64
	base := time.Now().Add(-time.Hour).Truncate(time.Second)
	for i, tc := range []struct{ transport, format string }{
		{"coap", "json"}, {"coap", "senml"}, {"mqtt", "senml"},
	} {
		// A start of its own, so no two runs send a reading of the same identity.
		start := base.Add(time.Duration(i) * time.Minute).UTC().Format(time.RFC3339)
		acked := runSimulate(t, nil, sluiceBin, "simulate", "--transport", tc.transport, "--format", tc.format,
			"--coap", coap, "--broker", broker.URL(), "--sensors", "8", "--rate", "10", "--duration", "2s",
			"--seed", strconv.Itoa(i+1), "--start", start)
		total += acked
		waitRows(t, dsn, total, 30*time.Second, "SELECT count(*) FROM sluice.readings")
	}
	if n := queryInt(t, dsn, "SELECT count(*) FROM sluice.readings"); n != total {
		t.Fatalf("%d rows, %d messages acknowledged", n, total)
	}
	if n := queryInt(t, dsn, "SELECT count(DISTINCT sensor) FROM sluice.readings"); n != 8 {
		t.Fatalf("%d sensors, want 8", n)
	}
	// Only flat JSON carries the sensor's sequence number.
	if n := queryInt(t, dsn, "SELECT count(*) FROM sluice.readings WHERE sensor_seq IS NOT NULL AND ts < $1", base.Add(time.Minute)); n == 0 {
		t.Fatal("flat JSON over CoAP stored no sensor_seq")
	}
	if n := queryInt(t, dsn, "SELECT count(*) FROM sluice.readings WHERE sensor_seq IS NOT NULL AND ts >= $1", base.Add(time.Minute)); n != 0 {
		t.Fatalf("%d SenML readings with a sensor_seq", n)
	}
}

func TestSimulateFailsWhenNothingIsAcknowledged(t *testing.T) {
	nobody := fmt.Sprintf("mqtt://127.0.0.1:%d", testenv.FreePort(t))
	out, code := runSluice(t, nil, "simulate", "--broker", nobody, "--sensors", "2", "--rate", "5", "--duration", "1s", "--timeout", "2s", "--dropout", "0")
	if code != exitFailure || !strings.Contains(out, "15 of 15 messages were not acknowledged") || !strings.Contains(out, "connection refused") {
		t.Fatalf("exit %d:\n%s", code, out)
	}
	if !strings.Contains(out, "feeder-1") || !strings.Contains(out, "transformer-1") {
		t.Fatalf("no per-sensor summary:\n%s", out)
	}
}
