package sim

import (
	"encoding/json"
	"fmt"
	"strings"
)

// Format is how a reading goes on the wire.
type Format string

// Payload formats, as DESIGN.md's contract spells them.
const (
	// FlatJSON is {"sensor","metric","value","unit","ts","seq"}, ts in
	// milliseconds since the epoch, seq the sensor's sequence number.
	FlatJSON Format = "json"
	// SenML is an RFC 8428 SenML JSON pack of one record, with the sensor as
	// base name and an absolute time in seconds.
	SenML Format = "senml"
)

// ParseFormat accepts "json" or "senml".
func ParseFormat(s string) (Format, error) {
	switch f := Format(s); f {
	case FlatJSON, SenML:
		return f, nil
	}
	return "", fmt.Errorf("format %q is not one of json, senml", s)
}

type flatReading struct {
	Sensor string  `json:"sensor"`
	Metric string  `json:"metric"`
	Value  float64 `json:"value"`
	Unit   string  `json:"unit"`
	TS     int64   `json:"ts"`
	Seq    int64   `json:"seq"`
}

type senmlRecord struct {
	BaseName string  `json:"bn"`
	Name     string  `json:"n"`
	Unit     string  `json:"u"`
	Value    float64 `json:"v"`
	Time     float64 `json:"t"`
}

// Encode returns the payload of one value of a report.
func (f Format) Encode(r Report, v Value) []byte {
	var b []byte
	var err error
	switch f {
	case SenML:
		b, err = json.Marshal([]senmlRecord{{
			BaseName: r.Sensor + ":", Name: v.Metric, Unit: v.Unit, Value: v.Value,
			Time: float64(r.Time.UnixMilli()) / 1000,
		}})
	default:
		b, err = json.Marshal(flatReading{
			Sensor: r.Sensor, Metric: v.Metric, Value: v.Value, Unit: v.Unit, TS: r.Time.UnixMilli(), Seq: r.Seq,
		})
	}
	if err != nil {
		// Only NaN or infinities fail, and the models never produce them.
		panic("sim: encode reading: " + err.Error())
	}
	return b
}

// ContentFormat is the CoAP content-format number of f: 50 (application/json)
// or 110 (application/senml+json).
func (f Format) ContentFormat() uint16 {
	if f == SenML {
		return 110
	}
	return 50
}

// Topic fills a topic template's {sensor} and {metric}, e.g.
// "sensors/{sensor}/{metric}" -> "sensors/feeder-1/voltage".
func Topic(template, sensor, metric string) string {
	return strings.NewReplacer("{sensor}", sensor, "{metric}", metric).Replace(template)
}
