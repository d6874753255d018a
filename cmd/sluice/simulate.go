package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"slices"
	"strings"
	"sync"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/sluice-gw/sluice/internal/sim"
)

type simulateCmd struct {
	Sensors   int           `help:"How many sensors; kinds are dealt in turn: feeder, transformer, fibre, pipe, pressure, reservoir, pump." default:"3"`
	Rate      float64       `help:"Reports a second per sensor (each report is one message per metric)." default:"1"`
	Duration  time.Duration `help:"How long to send." default:"30s"`
	Seed      uint64        `help:"Seed of the noise, faults and dropouts: the same seed sends the same readings." default:"1"`
	Start     string        `help:"Simulated time of the first report, RFC 3339 (default now). A fixed start repeats the same readings, which Postgres keeps once." placeholder:"TIME"`
	Faults    float64       `help:"Faults (voltage sags, bursts, stuck gauges...) a sensor starts per hour." default:"12"`
	Dropout   float64       `help:"Share of reports lost on the way (their sequence numbers show the gap)." default:"0.01"`
	Format    string        `help:"Payload: json (flat, with seq) or senml." enum:"json,senml" default:"json"`
	Transport string        `help:"mqtt (to the broker) or coap (POST /s/{sensor} to the gateway)." enum:"mqtt,coap" default:"mqtt"`
	Broker    string        `help:"MQTT broker URL (mqtt:// or mqtts://)." default:"mqtt://127.0.0.1:1883" placeholder:"URL"`
	Topic     string        `help:"MQTT topic template." default:"sensors/{sensor}/{metric}"`
	QoS       int           `help:"MQTT QoS: 0, 1 or 2." name:"qos" default:"1"`
	CoAP      string        `help:"CoAP address of the gateway (host:port, UDP)." name:"coap" default:"127.0.0.1:5683" placeholder:"ADDR"`
	Timeout   time.Duration `help:"How long one message may wait for its acknowledgement." default:"10s"`
}

// sender delivers one payload and reports whether the other side
// acknowledged it. Each sensor has its own, used from one goroutine.
type sender interface {
	send(ctx context.Context, r sim.Report, v sim.Value, payload []byte) (acked bool, err error)
	close()
}

// sensorTally is what one sensor did; its goroutine owns it until Wait.
type sensorTally struct {
	name, kind          string
	reports, lost       int64
	sent, acked, failed int64
	faults              []string // distinct faults, in order of appearance
	lastErr             error
}

func (s *simulateCmd) Run() error {
	opts, err := s.options(time.Now())
	if err != nil {
		return usageError{err}
	}
	format, _ := sim.ParseFormat(s.Format)
	sensors, err := sim.New(opts)
	if err != nil {
		return usageError{err}
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	fmt.Fprintf(os.Stderr, "simulating %d sensors at %g reports/s for %s to %s (seed %d, Ctrl-C stops early)\n",
		len(sensors), s.Rate, s.Duration, s.target(), s.Seed)
	tallies := s.simulate(ctx, sensors, format, opts)
	return s.summarise(os.Stdout, tallies)
}

// options checks the flags and turns them into the simulation's options.
func (s *simulateCmd) options(now time.Time) (sim.Options, error) {
	var errs []error
	if !(s.Rate > 0 && s.Rate <= 1000) {
		errs = append(errs, fmt.Errorf("--rate: %g, want more than 0 and at most 1000 (readings are timed to the millisecond)", s.Rate))
	}
	if s.Duration <= 0 {
		errs = append(errs, fmt.Errorf("--duration: %s, want more than 0", s.Duration))
	}
	if s.QoS < 0 || s.QoS > 2 {
		errs = append(errs, fmt.Errorf("--qos: %d is not 0, 1 or 2", s.QoS))
	}
	if s.Timeout <= 0 {
		errs = append(errs, fmt.Errorf("--timeout: %s, want more than 0", s.Timeout))
	}
	start := now
	if s.Start != "" {
		t, err := time.Parse(time.RFC3339Nano, s.Start)
		if err != nil {
			errs = append(errs, fmt.Errorf("--start: %q is not an RFC 3339 time like 2026-06-01T12:00:00Z", s.Start))
		}
		start = t
	}
	o := sim.Options{Seed: s.Seed, Sensors: s.Sensors, Start: start, FaultsPerHour: s.Faults, Dropout: s.Dropout}
	if s.Rate > 0 {
		o.Interval = time.Duration(float64(time.Second) / s.Rate)
	}
	if len(errs) == 0 {
		if err := o.Validate(); err != nil {
			errs = append(errs, err)
		}
	}
	return o, errors.Join(errs...)
}

func (s *simulateCmd) target() string {
	if s.Transport == "coap" {
		return "coap://" + s.CoAP
	}
	return s.Broker
}

func (s *simulateCmd) newSender(format sim.Format) sender {
	if s.Transport == "coap" {
		return &coapSender{addr: s.CoAP, format: format}
	}
	return &mqttSender{broker: s.Broker, topic: s.Topic, qos: byte(s.QoS)}
}

// simulate runs one goroutine per sensor, each sending its reports on
// schedule, and returns what they did once all are done or ctx is.
func (s *simulateCmd) simulate(ctx context.Context, sensors []*sim.Sensor, format sim.Format, o sim.Options) []*sensorTally {
	reports := int64(s.Duration / o.Interval)
	if reports < 1 {
		reports = 1
	}
	wallStart := time.Now()
	tallies := make([]*sensorTally, len(sensors))
	var wg sync.WaitGroup
	for i, sensor := range sensors {
		tally := &sensorTally{name: sensor.Name, kind: string(sensor.Kind)}
		tallies[i] = tally
		wg.Go(func() {
			snd := s.newSender(format)
			defer snd.close()
			timer := time.NewTimer(0)
			defer timer.Stop()
			for k := range reports {
				timer.Reset(time.Until(wallStart.Add(time.Duration(k) * o.Interval)))
				select {
				case <-ctx.Done():
					return
				case <-timer.C:
				}
				r := sensor.Next()
				tally.reports++
				if r.Fault != "" && !slices.Contains(tally.faults, r.Fault) {
					tally.faults = append(tally.faults, r.Fault)
				}
				if r.Lost {
					tally.lost++
					continue
				}
				for _, v := range r.Values {
					sctx, cancel := context.WithTimeout(ctx, s.Timeout)
					acked, err := snd.send(sctx, r, v, format.Encode(r, v))
					cancel()
					tally.sent++
					switch {
					case acked:
						tally.acked++
					case err != nil:
						tally.failed++
						tally.lastErr = err
					}
				}
			}
		})
	}
	wg.Wait()
	return tallies
}

// summarise prints what each sensor sent and what was acknowledged; it fails
// when a message that was sent was not acknowledged.
func (s *simulateCmd) summarise(out io.Writer, tallies []*sensorTally) error {
	w := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "SENSOR\tKIND\tREPORTS\tLOST\tSENT\tACKNOWLEDGED\tFAILED\tFAULTS")
	var total sensorTally
	var lastErr error
	for _, t := range tallies {
		faults := strings.Join(t.faults, ",")
		if faults == "" {
			faults = "-"
		}
		fmt.Fprintf(w, "%s\t%s\t%d\t%d\t%d\t%d\t%d\t%s\n", t.name, t.kind, t.reports, t.lost, t.sent, t.acked, t.failed, faults)
		total.reports += t.reports
		total.lost += t.lost
		total.sent += t.sent
		total.acked += t.acked
		total.failed += t.failed
		if t.lastErr != nil {
			lastErr = t.lastErr
		}
	}
	fmt.Fprintf(w, "total\t\t%d\t%d\t%d\t%d\t%d\t\n", total.reports, total.lost, total.sent, total.acked, total.failed)
	if err := w.Flush(); err != nil {
		return err
	}
	via := "the broker"
	if s.Transport == "coap" {
		via = "the gateway"
	}
	if total.failed > 0 {
		return fmt.Errorf("simulate: %d of %d messages were not acknowledged by %s; last error: %w", total.failed, total.sent, via, lastErr)
	}
	if s.Transport == "mqtt" && s.QoS == 0 {
		via += " (QoS 0: none asked for)"
	}
	fmt.Fprintf(out, "%d messages sent, %d acknowledged by %s; %d reports lost on the way on purpose (gaps in seq)\n",
		total.sent, total.acked, via, total.lost)
	return nil
}
