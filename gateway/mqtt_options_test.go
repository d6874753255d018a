package gateway

import (
	"strings"
	"testing"
)

func TestMatchesFilter(t *testing.T) {
	cases := []struct {
		filter, topic string
		want          bool
	}{
		{"sensors/+/+", "sensors/a/b", true},
		{"sensors/+/+", "sensors/a", false},
		{"sensors/+/+", "sensors/a/b/c", false},
		{"sensors/#", "sensors", true},
		{"sensors/#", "sensors/a/b/c", true},
		{"#", "anything/at/all", true},
		{"sensors/a", "sensors/a", true},
		{"sensors/a", "sensors/b", false},
		{"+/temp", "x/temp", true},
		{"+/temp", "x/hum", false},
		{"a/+/c", "a//c", true},
	}
	for _, c := range cases {
		if got := matchesFilter(c.filter, c.topic); got != c.want {
			t.Errorf("matchesFilter(%q, %q) = %v, want %v", c.filter, c.topic, got, c.want)
		}
	}
}

func TestPatternCaptures(t *testing.T) {
	cases := []struct {
		pattern, topic, sensor, metric string
	}{
		{"sensors/{sensor}/{metric}", "sensors/feeder-1/voltage", "feeder-1", "voltage"},
		{"sensors/{sensor}/{metric}", "other/feeder-1/voltage", "", ""},
		{"sensors/{sensor}/{metric}", "sensors/feeder-1", "", ""},
		{"site/+/{sensor}", "site/north/pump-3", "pump-3", ""},
		{"{metric}/of/{sensor}", "temp/of/boiler", "boiler", "temp"},
		{"", "sensors/a/b", "", ""},
	}
	for _, c := range cases {
		o := MQTTOptions{Subscriptions: []Subscription{{Topic: "#", Pattern: c.pattern}}}
		o.setDefaults("gw")
		sensor, metric := o.Subscriptions[0].match(c.topic)
		if sensor != c.sensor || metric != c.metric {
			t.Errorf("pattern %q on %q: (%q, %q), want (%q, %q)", c.pattern, c.topic, sensor, metric, c.sensor, c.metric)
		}
	}
}

func TestMQTTOptionsValidate(t *testing.T) {
	o := MQTTOptions{
		Broker:         "http://broker",
		ReceiveMaximum: 70000,
		CertFile:       "c.pem",
		Subscriptions: []Subscription{
			{Topic: "a/#/b", QoS: 3, Priority: "urgent"},
			{Topic: "x/+", Pattern: "x/{sensor}/{metric}"},
			{Topic: "y/+", Pattern: "y/{sensr}"},
		},
	}
	err := o.Validate()
	if err == nil {
		t.Fatal("bad options validated")
	}
	for _, key := range []string{"broker:", "receive_maximum:", "cert_file:", "subscribe[0].topic:", "subscribe[0].qos:",
		"subscribe[0].priority:", "subscribe[1].pattern:", "subscribe[2].pattern:"} {
		if !strings.Contains(err.Error(), key) {
			t.Errorf("validation does not name %s:\n%v", key, err)
		}
	}
	good := MQTTOptions{Broker: "mqtt://127.0.0.1:1883", Subscriptions: []Subscription{{Topic: "sensors/+/+", Pattern: "sensors/{sensor}/{metric}", QoS: 1}}}
	if err := good.Validate(); err != nil {
		t.Fatalf("good options: %v", err)
	}
	if err := (MQTTOptions{Broker: "mqtt://u:p@h:1883", Subscriptions: good.Subscriptions}).Validate(); err == nil || !strings.Contains(err.Error(), "password_file") {
		t.Fatalf("credentials in the URL: %v", err)
	}
}
