package bench

import (
	"fmt"
	"strconv"
	"time"
)

// Shape is the payload of a load message.
type Shape int

// Payload shapes.
const (
	// Flat is one reading a message: the flat JSON object on
	// sensors/{sensor}/{metric}.
	Flat Shape = iota
	// SenML10 is a SenML JSON pack of 10 records on packs/{sensor}.
	SenML10
)

func (s Shape) String() string {
	switch s {
	case Flat:
		return "flat JSON"
	case SenML10:
		return "SenML pack of 10"
	}
	return fmt.Sprintf("shape(%d)", int(s))
}

// Topic filters and patterns a subscriber of the load needs, as the gateway
// config and the bare subscriber use them.
const (
	FlatFilter   = "sensors/+/+"
	FlatPattern  = "sensors/{sensor}/{metric}"
	SenMLFilter  = "packs/+"
	SenMLPattern = "packs/{sensor}"
)

// Workload makes the messages of a run. Message i's readings carry a time of
// their own, Start + i ms, so every reading of a run has its own natural key
// (site, name, unit, ts) and lands as one row: a count of rows is a count of
// readings delivered.
type Workload struct {
	Shape   Shape
	Sensors int       // distinct sensors the messages rotate through (default 100)
	Start   time.Time // the time of message 0
}

// ReadingsPer is the number of readings in one message.
func (w Workload) ReadingsPer() int {
	if w.Shape == SenML10 {
		return len(meterRecords)
	}
	return 1
}

func (w Workload) sensors() int {
	if w.Sensors <= 0 {
		return 100
	}
	return w.Sensors
}

// Topic is message i's topic.
func (w Workload) Topic(i int) string {
	if w.Shape == SenML10 {
		return "packs/meter-" + strconv.Itoa(i%w.sensors())
	}
	return "sensors/feeder-" + strconv.Itoa(i%w.sensors()) + "/voltage"
}

// meterRecords are the ten records of a grid meter's pack, after the first
// (which carries the base name and time): name, unit, value field.
var meterRecords = [...]struct{ n, u, field string }{
	{"voltage_l1", "V", "v"}, {"voltage_l2", "V", "v"}, {"voltage_l3", "V", "v"},
	{"current_l1", "A", "v"}, {"current_l2", "A", "v"}, {"current_l3", "A", "v"},
	{"power", "W", "v"}, {"frequency", "Hz", "v"}, {"power_factor", "/", "v"},
	{"energy", "J", "s"},
}

// AppendPayload appends message i's payload to dst.
func (w Workload) AppendPayload(dst []byte, i int) []byte {
	ms := w.Start.UnixMilli() + int64(i)
	v := 230 + float64(i%1000)/100
	if w.Shape == SenML10 {
		dst = append(dst, `[{"bn":"meter-`...)
		dst = strconv.AppendInt(dst, int64(i%w.sensors()), 10)
		dst = append(dst, `:","bt":`...)
		dst = strconv.AppendInt(dst, ms/1000, 10)
		dst = append(dst, '.')
		dst = append(dst, byte('0'+ms%1000/100), byte('0'+ms%100/10), byte('0'+ms%10))
		for k, r := range meterRecords {
			if k > 0 {
				dst = append(dst, ",{"...)
			} else {
				dst = append(dst, ',')
			}
			dst = append(dst, `"n":"`...)
			dst = append(dst, r.n...)
			dst = append(dst, `","u":"`...)
			dst = append(dst, r.u...)
			dst = append(dst, `","`...)
			dst = append(dst, r.field...)
			dst = append(dst, `":`...)
			dst = strconv.AppendFloat(dst, v+float64(k), 'f', 2, 64)
			dst = append(dst, '}')
		}
		return append(dst, ']')
	}
	dst = append(dst, `{"sensor":"feeder-`...)
	dst = strconv.AppendInt(dst, int64(i%w.sensors()), 10)
	dst = append(dst, `","metric":"voltage","value":`...)
	dst = strconv.AppendFloat(dst, v, 'f', 2, 64)
	dst = append(dst, `,"unit":"V","ts":`...)
	dst = strconv.AppendInt(dst, ms, 10)
	dst = append(dst, `,"seq":`...)
	dst = strconv.AppendInt(dst, int64(i), 10)
	return append(dst, '}')
}
