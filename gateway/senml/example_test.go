package senml_test

import (
	"fmt"
	"time"

	"github.com/sluice-gw/sluice/gateway/senml"
)

func ExampleDecode() {
	// Base name and base time apply to the records after them; the last
	// record's time is relative to now, the receive time.
	payload := []byte(`[{"bn":"urn:dev:ow:10e2073a01080063:","bt":1.320067464e+09,"n":"temp","u":"Cel","v":23.1},
		{"n":"temp","u":"Cel","t":60,"v":23.4},
		{"bt":-5,"n":"door","vb":true}]`)
	rs, err := senml.Decode(senml.FormatAuto, payload, &senml.Context{
		Now:         time.Date(2011, 10, 31, 13, 30, 0, 0, time.UTC),
		Oldest:      time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC),
		MaxFuture:   10 * time.Minute,
		ClockSynced: true,
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	for _, r := range rs {
		fmt.Println(r.Name, r.Sensor, r.Metric, r.Unit, r.Kind, r.Time.Format(time.RFC3339), r.GatewayTime)
	}

	_, err = senml.Decode(senml.FormatAuto, []byte(`[{"n":"temp","v":"23.1"}]`), &senml.Context{})
	fmt.Println(err)
	// Output:
	// urn:dev:ow:10e2073a01080063:temp urn:dev:ow:10e2073a01080063 temp Cel number 2011-10-31T13:24:24Z false
	// urn:dev:ow:10e2073a01080063:temp urn:dev:ow:10e2073a01080063 temp Cel number 2011-10-31T13:25:24Z false
	// urn:dev:ow:10e2073a01080063:door urn:dev:ow:10e2073a01080063 door  bool 2011-10-31T13:29:55Z true
	// bad_value: record 1: field "v": not a number (got a string)
}
