package gateway

import (
	"errors"
	"fmt"
	"net/url"
	"strings"
	"time"

	"github.com/sluice-gw/sluice/buffer"
	"github.com/sluice-gw/sluice/gateway/senml"
)

// MQTTOptions are the [mqtt] section. The zero value of a field means its default.
type MQTTOptions struct {
	// Broker is mqtt://host:port or mqtts://host:port; "" turns MQTT off.
	Broker string
	// ClientID identifies the gateway's persistent session (default "sluice-" + gateway id).
	ClientID string
	// Username and Password authenticate to the broker (password from password_file).
	Username, Password string
	// CAFile, CertFile, KeyFile configure TLS for mqtts:// (client certificate optional).
	CAFile, CertFile, KeyFile string
	// SessionExpiry keeps the session, and what is queued for it, across
	// restarts and outages (default 24h).
	SessionExpiry time.Duration
	// KeepAlive is the MQTT keep-alive (default 30s).
	KeepAlive time.Duration
	// ReceiveMaximum bounds unacknowledged messages in flight to the gateway,
	// and so the memory they take and the idempotency keys kept (default 256).
	ReceiveMaximum int
	// AckInterval is how often acknowledgements leave, in order (default 1ms).
	AckInterval time.Duration
	// Subscriptions are the [[mqtt.subscribe]] entries.
	Subscriptions []Subscription
}

// Subscription is one [[mqtt.subscribe]] entry.
type Subscription struct {
	Topic    string       // topic filter
	Pattern  string       // e.g. "sensors/{sensor}/{metric}"; "" for none
	Format   senml.Format // payload format
	QoS      byte         // 0, 1 or 2 (default 1)
	Priority buffer.Class // priority class (default telemetry)

	levels []string // Pattern split at '/'
}

// MQTT defaults, each with the reason for its number.
const (
	// DefaultSessionExpiry keeps the broker queueing through a day's outage of the gateway.
	DefaultSessionExpiry = 24 * time.Hour
	// DefaultKeepAlive notices a dead broker connection within a minute.
	DefaultKeepAlive = 30 * time.Second
	// DefaultReceiveMaximum is deep enough to keep group commits full (a few
	// milliseconds each) while bounding memory to 256 messages.
	DefaultReceiveMaximum = 256
	// DefaultAckInterval: paho sends manual acks on a timer (50 ms by
	// default, which with Mosquitto's 20 in flight caps ingest at 400/s).
	DefaultAckInterval = time.Millisecond
)

func (o *MQTTOptions) setDefaults(gatewayID string) {
	if o.ClientID == "" {
		o.ClientID = "sluice-" + gatewayID
	}
	if o.SessionExpiry == 0 {
		o.SessionExpiry = DefaultSessionExpiry
	}
	if o.KeepAlive == 0 {
		o.KeepAlive = DefaultKeepAlive
	}
	if o.ReceiveMaximum == 0 {
		o.ReceiveMaximum = DefaultReceiveMaximum
	}
	if o.AckInterval == 0 {
		o.AckInterval = DefaultAckInterval
	}
	for i := range o.Subscriptions {
		s := &o.Subscriptions[i]
		if s.Priority == "" {
			s.Priority = buffer.ClassTelemetry
		}
		if s.Pattern != "" {
			s.levels = strings.Split(s.Pattern, "/")
		}
	}
}

// Validate returns every problem as "key: problem"; subscription keys are
// "subscribe[N].key".
func (o MQTTOptions) Validate() error {
	var errs []error
	add := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	if o.Broker != "" {
		u, err := url.Parse(o.Broker)
		switch {
		case err != nil:
			add("broker: %q is not a URL", o.Broker)
		case u.Scheme != "mqtt" && u.Scheme != "mqtts":
			add("broker: scheme %q is not mqtt:// or mqtts://", u.Scheme)
		case u.Host == "":
			add("broker: %q has no host", o.Broker)
		case u.User != nil:
			add("broker: put credentials in username and password_file, not in the URL")
		}
		if u != nil && u.Scheme == "mqtt" && (o.CAFile != "" || o.CertFile != "") {
			add("broker: ca_file/cert_file are set but the broker URL is mqtt://, not mqtts://")
		}
		if len(o.Subscriptions) == 0 {
			add("subscribe: at least one [[mqtt.subscribe]] is needed when a broker is set")
		}
	}
	if (o.CertFile == "") != (o.KeyFile == "") {
		add("cert_file: cert_file and key_file go together")
	}
	if o.SessionExpiry < 0 || o.SessionExpiry > time.Duration(1<<32-1)*time.Second {
		add("session_expiry: %s is outside 1s..136y", o.SessionExpiry)
	}
	if o.KeepAlive < 0 || o.KeepAlive > 65535*time.Second {
		add("keep_alive: %s is outside 1s..65535s", o.KeepAlive)
	}
	if o.ReceiveMaximum < 0 || o.ReceiveMaximum > 65535 {
		add("receive_maximum: %d is outside 1..65535", o.ReceiveMaximum)
	}
	for i, s := range o.Subscriptions {
		key := fmt.Sprintf("subscribe[%d]", i)
		if err := validFilter(s.Topic); err != nil {
			add("%s.topic: %v", key, err)
		}
		if s.Pattern != "" {
			if err := validPattern(s.Pattern, s.Topic); err != nil {
				add("%s.pattern: %v", key, err)
			}
		}
		if s.QoS > 2 {
			add("%s.qos: %d is not 0, 1 or 2", key, s.QoS)
		}
		if s.Priority != "" && !s.Priority.Valid() {
			add("%s.priority: %q is not one of %q", key, s.Priority, buffer.Classes)
		}
	}
	return errors.Join(errs...)
}

func validFilter(f string) error {
	if f == "" {
		return errors.New("must not be empty")
	}
	levels := strings.Split(f, "/")
	for i, l := range levels {
		switch {
		case l == "#" && i != len(levels)-1:
			return fmt.Errorf("%q: '#' must be the last level", f)
		case l != "#" && l != "+" && strings.ContainsAny(l, "#+"):
			return fmt.Errorf("%q: wildcards must fill a whole level", f)
		}
	}
	return nil
}

func validPattern(p, filter string) error {
	levels := strings.Split(p, "/")
	seen := map[string]bool{}
	for _, l := range levels {
		if strings.HasPrefix(l, "{") || strings.HasSuffix(l, "}") {
			if l != "{sensor}" && l != "{metric}" {
				return fmt.Errorf("%q: only {sensor} and {metric} may be captured, as whole levels", p)
			}
			if seen[l] {
				return fmt.Errorf("%q: %s appears twice", p, l)
			}
			seen[l] = true
		}
	}
	fl := strings.Split(filter, "/")
	if len(fl) > 0 && fl[len(fl)-1] != "#" && len(fl) != len(levels) {
		return fmt.Errorf("%q has %d levels but topic %q has %d", p, len(levels), filter, len(fl))
	}
	return nil
}

// match returns the pattern's captures from topic; empty when the topic does
// not fit the pattern (the payload must then name sensor and metric itself).
func (s *Subscription) match(topic string) (sensor, metric string) {
	if len(s.levels) == 0 {
		return "", ""
	}
	rest := topic
	for i, l := range s.levels {
		var level string
		if i == len(s.levels)-1 {
			level, rest = rest, ""
		} else {
			var ok bool
			level, rest, ok = strings.Cut(rest, "/")
			if !ok {
				return "", ""
			}
		}
		switch l {
		case "{sensor}":
			sensor = level
		case "{metric}":
			metric = level
		case "+", "#":
		default:
			if l != level {
				return "", ""
			}
		}
	}
	return sensor, metric
}

// matchesFilter reports whether topic matches an MQTT topic filter.
func matchesFilter(filter, topic string) bool {
	for {
		fl, frest, fmore := strings.Cut(filter, "/")
		if fl == "#" {
			return true
		}
		tl, trest, tmore := strings.Cut(topic, "/")
		if fl != "+" && fl != tl {
			return false
		}
		if !fmore || !tmore {
			return fmore == tmore || (fmore && frest == "#")
		}
		filter, topic = frest, trest
	}
}
