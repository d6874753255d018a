package main

import (
	"bufio"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/google/uuid"

	"github.com/sluice-gw/sluice/buffer"
	"github.com/sluice-gw/sluice/uplink"
)

type bufferCmd struct {
	Inspect bufferInspectCmd `cmd:"" help:"Summarise the buffer: streams, backlog, dead letters."`
	Export  bufferExportCmd  `cmd:"" help:"Write the unsent backlog and dead letters as resolved SenML JSON lines."`
	Import  bufferImportCmd  `cmd:"" help:"Upload an exported file to Postgres under the same exactly-once rules."`
	Requeue bufferRequeueCmd `cmd:"" help:"Put dead letters back into the queue once their cause is fixed."`
}

type dataDirFlag struct {
	DataDir string `help:"The gateway's data directory." required:"" type:"path" placeholder:"DIR" name:"data-dir"`
}

// open opens the buffer for a command; the daemon must be stopped.
func (d dataDirFlag) open() (*buffer.Buffer, error) {
	if _, err := os.Stat(d.DataDir + "/" + buffer.FileName); err != nil {
		return nil, fmt.Errorf("no buffer in %s: %w", d.DataDir, err)
	}
	b, err := buffer.Open(buffer.Options{Dir: d.DataDir})
	if errors.Is(err, buffer.ErrLocked) {
		return nil, fmt.Errorf("%w; `systemctl stop sluice` first", err)
	}
	return b, err
}

type bufferInspectCmd struct {
	dataDirFlag
}

func (c *bufferInspectCmd) Run() error {
	b, err := c.open()
	if err != nil {
		return err
	}
	defer b.Close()
	st := b.Stats()
	fmt.Printf("file        %s (%d bytes on disk, max %d)\n", b.Path(), st.FileBytes, st.MaxBytes)
	fmt.Printf("unsent      %d readings, %d bytes\n", st.Readings, st.Bytes)
	if !st.Oldest.IsZero() {
		fmt.Printf("oldest      %s (%s ago)\n", st.Oldest.Format(time.RFC3339), time.Since(st.Oldest).Round(time.Second))
	}
	for _, cs := range st.Classes {
		fmt.Printf("stream      %-9s %s  next seq %d  unsent %d\n", cs.Class, uuid.UUID(cs.Stream), cs.NextSeq, cs.Readings)
	}
	fmt.Printf("dropped     %d buffer_full, %d max_age\n", st.Dropped[buffer.DropFull], st.Dropped[buffer.DropAge])
	fmt.Printf("dead        %d letters\n", st.DeadLetters)
	if rec := b.Recovered(); rec != nil {
		fmt.Printf("recovered   %s: %s moved to %s, %d readings lost\n", rec.At.Format(time.RFC3339), rec.Reason, rec.MovedTo, rec.LostReadings)
	}
	return nil
}

type bufferExportCmd struct {
	dataDirFlag
	Out  string `help:"Output file (default: standard output)." placeholder:"FILE" short:"o"`
	Dead bool   `help:"Export only the dead letters." name:"dead-only"`
}

func (c *bufferExportCmd) Run() error {
	b, err := c.open()
	if err != nil {
		return err
	}
	defer b.Close()
	var w io.Writer = os.Stdout
	if c.Out != "" {
		f, err := os.OpenFile(c.Out, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
		if err != nil {
			return err
		}
		defer f.Close()
		w = f
	}
	bw := bufio.NewWriter(w)
	gw, site := b.Identity()
	n := 0
	write := func(l exportLine) error {
		l.Gateway, l.Site = gw, site
		line, err := json.Marshal(l)
		if err != nil {
			return err
		}
		n++
		_, err = bw.Write(append(line, '\n'))
		return err
	}
	if !c.Dead {
		if err := b.Unsent(func(cl buffer.Class, stream [16]byte, r buffer.Record) error {
			return write(toExportLine(cl, stream, r, ""))
		}); err != nil {
			return err
		}
	}
	if err := b.DeadLetters(func(d buffer.DeadLetter) error {
		return write(toExportLine(d.Class, d.Stream, d.Record, d.Err))
	}); err != nil {
		return err
	}
	if err := bw.Flush(); err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "exported %d readings\n", n)
	return nil
}

// exportLine is a resolved SenML record (RFC 8428 §4.6) with Sluice's own
// fields beside it; "t" keeps microseconds exactly as a 6-decimal number.
type exportLine struct {
	Name        string      `json:"n"`
	Unit        string      `json:"u,omitempty"`
	Time        json.Number `json:"t"`
	Value       *float64    `json:"v,omitempty"`
	String      *string     `json:"vs,omitempty"`
	Bool        *bool       `json:"vb,omitempty"`
	Data        string      `json:"vd,omitempty"`
	Sum         *float64    `json:"s,omitempty"`
	Stream      string      `json:"stream"`
	Seq         uint64      `json:"seq"`
	Class       string      `json:"class"`
	Gateway     string      `json:"gateway_id"`
	Site        string      `json:"site"`
	Sensor      string      `json:"sensor"`
	Metric      string      `json:"metric"`
	SensorSeq   *int64      `json:"sensor_seq,omitempty"`
	Received    json.Number `json:"received"`
	ClockSynced bool        `json:"clock_synced"`
	DeadError   string      `json:"dead_letter_error,omitempty"`
}

func microsText(t time.Time) json.Number {
	us := t.UnixMicro()
	sign := ""
	if us < 0 {
		sign, us = "-", -us
	}
	return json.Number(fmt.Sprintf("%s%d.%06d", sign, us/1e6, us%1e6))
}

func parseMicros(n json.Number) (time.Time, error) {
	s := string(n)
	neg := strings.HasPrefix(s, "-")
	s = strings.TrimPrefix(s, "-")
	whole, frac, _ := strings.Cut(s, ".")
	if len(frac) > 6 {
		return time.Time{}, fmt.Errorf("time %s has more than 6 decimals", n)
	}
	frac += strings.Repeat("0", 6-len(frac))
	sec, err1 := strconv.ParseInt(whole, 10, 64)
	us, err2 := strconv.ParseInt(frac, 10, 64)
	if err1 != nil || err2 != nil || sec > math.MaxInt64/1_000_000-1 {
		return time.Time{}, fmt.Errorf("time %s is not seconds since the epoch", n)
	}
	v := sec*1e6 + us
	if neg {
		v = -v
	}
	return time.UnixMicro(v).UTC(), nil
}

func toExportLine(cl buffer.Class, stream [16]byte, r buffer.Record, deadErr string) exportLine {
	l := exportLine{
		Name: r.Name, Unit: r.Unit, Time: microsText(r.Time), Stream: uuid.UUID(stream).String(), Seq: r.Seq,
		Class: string(cl), Sensor: r.Sensor, Metric: r.Metric, Received: microsText(r.Received),
		ClockSynced: r.ClockSynced, DeadError: deadErr,
	}
	switch r.Kind {
	case buffer.KindNumber:
		l.Value = &r.Number
	case buffer.KindString:
		l.String = &r.Text
	case buffer.KindBool:
		l.Bool = &r.Bool
	case buffer.KindData:
		l.Data = base64.RawURLEncoding.EncodeToString(r.Data)
	}
	if r.HasSum {
		l.Sum = &r.Sum
	}
	if r.HasSensorSeq {
		l.SensorSeq = &r.SensorSeq
	}
	return l
}

func fromExportLine(l exportLine) (uplink.ImportRecord, error) {
	var ir uplink.ImportRecord
	id, err := uuid.Parse(l.Stream)
	if err != nil {
		return ir, fmt.Errorf("stream %q: %w", l.Stream, err)
	}
	ir.Stream, ir.GatewayID, ir.Site, ir.Dead = id, l.Gateway, l.Site, l.DeadError != ""
	r := buffer.Reading{Name: l.Name, Sensor: l.Sensor, Metric: l.Metric, Unit: l.Unit, ClockSynced: l.ClockSynced}
	if r.Time, err = parseMicros(l.Time); err != nil {
		return ir, err
	}
	if r.Received, err = parseMicros(l.Received); err != nil {
		return ir, err
	}
	switch {
	case l.Value != nil:
		r.Kind, r.Number = buffer.KindNumber, *l.Value
	case l.String != nil:
		r.Kind, r.Text = buffer.KindString, *l.String
	case l.Bool != nil:
		r.Kind, r.Bool = buffer.KindBool, *l.Bool
	case l.Data != "":
		r.Kind = buffer.KindData
		if r.Data, err = base64.RawURLEncoding.DecodeString(strings.TrimRight(l.Data, "=")); err != nil {
			return ir, fmt.Errorf("vd: %w", err)
		}
	}
	if l.Sum != nil {
		r.HasSum, r.Sum = true, *l.Sum
	}
	if l.SensorSeq != nil {
		r.HasSensorSeq, r.SensorSeq = true, *l.SensorSeq
	}
	if err := r.Valid(); err != nil {
		return ir, err
	}
	ir.Record = buffer.Record{Seq: l.Seq, Reading: r}
	return ir, nil
}

type bufferImportCmd struct {
	File    string `arg:"" help:"A file written by buffer export." type:"existingfile"`
	DSN     string `help:"Postgres connection string." placeholder:"DSN"`
	DSNFile string `help:"File holding the DSN." placeholder:"FILE" name:"dsn-file"`
	Config  string `help:"Take the DSN from this gateway config instead." type:"path" placeholder:"FILE"`
}

func (c *bufferImportCmd) Run() error {
	dsn := ""
	var err error
	if c.Config != "" {
		cfg, cerr := LoadConfig(c.Config, "")
		if cerr != nil {
			return cerr
		}
		if dsn, err = cfg.resolveDSN(); err != nil {
			return err
		}
	} else if dsn, err = dsnFrom(c.DSN, c.DSNFile); err != nil {
		return err
	}
	f, err := os.Open(c.File)
	if err != nil {
		return err
	}
	defer f.Close()
	var recs []uplink.ImportRecord
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 0, 64<<10), 16<<20)
	for line := 1; sc.Scan(); line++ {
		if strings.TrimSpace(sc.Text()) == "" {
			continue
		}
		var l exportLine
		dec := json.NewDecoder(strings.NewReader(sc.Text()))
		dec.UseNumber()
		if err := dec.Decode(&l); err != nil {
			return fmt.Errorf("%s line %d: %w", c.File, line, err)
		}
		ir, err := fromExportLine(l)
		if err != nil {
			return fmt.Errorf("%s line %d: %w", c.File, line, err)
		}
		recs = append(recs, ir)
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("read %s: %w", c.File, err)
	}
	sort.SliceStable(recs, func(i, j int) bool { return recs[i].Record.Seq < recs[j].Record.Seq })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	res, err := uplink.Import(ctx, dsn, recs)
	if err != nil {
		return err
	}
	fmt.Printf("imported %d readings: %d inserted, %d already there\n", len(recs), res.Inserted, res.Skipped)
	return nil
}

type bufferRequeueCmd struct {
	dataDirFlag
	Sensor string `help:"Only dead letters of this sensor."`
}

func (c *bufferRequeueCmd) Run() error {
	b, err := c.open()
	if err != nil {
		return err
	}
	defer b.Close()
	n, err := b.Requeue(func(d buffer.DeadLetter) bool { return c.Sensor == "" || d.Record.Sensor == c.Sensor })
	if err != nil {
		return err
	}
	fmt.Printf("requeued %d dead letters\n", n)
	return nil
}
