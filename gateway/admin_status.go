package gateway

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Status is the JSON of /api/status: everything a technician or the status
// command needs to judge the gateway at a glance. It never holds a secret.
type Status struct {
	Gateway        GatewayStatus   `json:"gateway"`
	Ingress        []IngressStatus `json:"ingress"`
	Buffer         BufferStatus    `json:"buffer"`
	Uplink         UplinkStatus    `json:"uplink"`
	Clock          ClockStatus     `json:"clock"`
	Sensors        []SensorStatus  `json:"sensors"`
	SensorsHidden  int64           `json:"sensors_untracked,omitempty"` // messages of sensors over the tracker's cap
	BacklogHistory []BacklogSample `json:"backlog_history,omitempty"`
	// Health is the worst of Checks: ok | degraded | failing. Reasons are
	// the texts of the checks that are not ok.
	Health  string   `json:"health"`
	Reasons []string `json:"reasons,omitempty"`
	Checks  []Check  `json:"checks"`
}

// Health values.
const (
	HealthOK       = "ok"
	HealthDegraded = "degraded"
	HealthFailing  = "failing"
)

// Level is a check's colour: ok (green), warn (amber), fail (red).
type Level string

// Check levels.
const (
	LevelOK   Level = "ok"
	LevelWarn Level = "warn"
	LevelFail Level = "fail"
)

// Check is one part's state in plain words, for the page and `sluice status`.
type Check struct {
	Part  string `json:"part"`
	Level Level  `json:"level"`
	Text  string `json:"text"`
}

// BacklogSample is one point of the backlog sparkline.
type BacklogSample struct {
	At       time.Time `json:"at"`
	Readings int64     `json:"readings"`
}

// GatewayStatus identifies the gateway.
type GatewayStatus struct {
	ID            string  `json:"id"`
	Site          string  `json:"site"`
	Profile       string  `json:"profile"`
	Version       string  `json:"version"`
	UptimeSeconds float64 `json:"uptime_seconds"`
}

// IngressStatus is one way in.
type IngressStatus struct {
	Name      string `json:"name"`
	State     string `json:"state"`
	Up        bool   `json:"up"` // taking readings in
	LastError string `json:"last_error,omitempty"`
}

// BufferStatus is the local backlog.
type BufferStatus struct {
	Readings         int64            `json:"readings"`
	Bytes            int64            `json:"bytes"`
	MaxBytes         int64            `json:"max_bytes"`
	FileBytes        int64            `json:"file_bytes"`
	OldestAgeSeconds float64          `json:"oldest_age_seconds"`
	Dropped          map[string]int64 `json:"dropped"`
	DeadLetters      int64            `json:"dead_letters"`
	Full             bool             `json:"full"`
	OnFull           string           `json:"on_full"`
	Recovered        *RecoveryStatus  `json:"recovered,omitempty"`
}

// RecoveryStatus reports a damaged buffer file that was moved aside.
type RecoveryStatus struct {
	At           time.Time `json:"at"`
	MovedTo      string    `json:"moved_to"`
	Reason       string    `json:"reason"`
	LostReadings int64     `json:"lost_readings"` // -1 when the file was too damaged to count
}

// UplinkStatus is the central side as the gateway sees it.
type UplinkStatus struct {
	State           string    `json:"state"` // connecting | up | retrying
	LastSuccess     time.Time `json:"last_success,omitzero"`
	LastUpload      time.Time `json:"last_upload,omitzero"`
	LastHeartbeat   time.Time `json:"last_heartbeat,omitzero"`
	LastError       string    `json:"last_error,omitempty"`
	LagSeconds      float64   `json:"lag_seconds"`
	LagAlertSeconds float64   `json:"lag_alert_seconds"`
	SchemaVersion   int       `json:"schema_version"`
	Uploaded        int64     `json:"uploaded"`
}

// ClockStatus is the clock trust.
type ClockStatus struct {
	Synced        bool    `json:"synced"`
	Source        string  `json:"source"`
	Mode          string  `json:"mode"`
	OffsetSeconds float64 `json:"server_offset_seconds"`
}

// Assess judges the figures: it fills Checks with one plain-language line
// per part and sets Health to the worst of them. The status page and
// `sluice status` show these lines, so both say the same.
func (s *Status) Assess(now time.Time) {
	s.Checks = s.Checks[:0]
	add := func(part string, l Level, format string, args ...any) {
		s.Checks = append(s.Checks, Check{Part: part, Level: l, Text: fmt.Sprintf(format, args...)})
	}
	if len(s.Ingress) == 0 {
		add("ingress", LevelFail, "no ingress configured or started")
	}
	for _, in := range s.Ingress {
		switch {
		case in.Up:
			add(in.Name, LevelOK, "%s: %s", strings.ToUpper(in.Name), in.State)
		case in.State == StateStarting || in.State == StateSubscribing:
			add(in.Name, LevelWarn, "%s: %s", strings.ToUpper(in.Name), in.State)
		default:
			add(in.Name, LevelFail, "%s: %s%s: readings are not coming in this way", strings.ToUpper(in.Name), in.State, errSuffix(in.LastError))
		}
	}

	b := s.Buffer
	switch {
	case b.Full && b.OnFull == "reject":
		add("buffer", LevelFail, "buffer full: new readings are held back until the uplink makes room")
	case b.Full:
		add("buffer", LevelFail, "buffer full: the oldest readings are being dropped")
	case b.DeadLetters > 0:
		add("buffer", LevelWarn, "%d readings refused by the central database (dead letters): `sluice buffer export` them", b.DeadLetters)
	case b.MaxBytes > 0 && b.Bytes*10 > b.MaxBytes*8:
		add("buffer", LevelWarn, "buffer %d%% full (%d readings waiting)", b.Bytes*100/b.MaxBytes, b.Readings)
	default:
		add("buffer", LevelOK, "%d readings waiting%s", b.Readings, oldestSuffix(b.OldestAgeSeconds))
	}
	if b.Recovered != nil {
		lost := "an unknown number of"
		if b.Recovered.LostReadings >= 0 {
			lost = strconv.FormatInt(b.Recovered.LostReadings, 10)
		}
		add("buffer", LevelWarn, "buffer file was damaged and moved aside at %s (%s readings lost)", b.Recovered.At.Format(time.RFC3339), lost)
	}

	u := s.Uplink
	lagging := u.LagAlertSeconds > 0 && u.LagSeconds > u.LagAlertSeconds
	switch u.State {
	case "up":
		if lagging {
			add("uplink", LevelWarn, "uploading, but the oldest waiting reading is %s old (alert at %s)", FormatAge(u.LagSeconds), FormatAge(u.LagAlertSeconds))
		} else {
			add("uplink", LevelOK, "central database reachable%s", agoSuffix(", last upload", u.LastUpload, now))
		}
	case "connecting":
		add("uplink", LevelWarn, "connecting to the central database")
	default:
		add("uplink", LevelWarn, "central database unreachable, retrying; readings wait in the buffer%s", errSuffix(u.LastError))
	}

	if s.Clock.Synced {
		add("clock", LevelOK, "clock synchronised (%s)", s.Clock.Source)
	} else {
		add("clock", LevelWarn, "clock not synchronised (%s): readings are marked and restamped once it is", s.Clock.Source)
	}

	var stale []string
	for _, se := range s.Sensors {
		if se.Stale {
			stale = append(stale, se.Sensor)
		}
	}
	switch {
	case len(stale) > 0:
		shown := stale[:min(len(stale), 5)]
		more := ""
		if len(stale) > len(shown) {
			more = fmt.Sprintf(" and %d more", len(stale)-len(shown))
		}
		add("sensors", LevelWarn, "%d of %d sensors silent too long: %s%s", len(stale), len(s.Sensors), strings.Join(shown, ", "), more)
	case s.SensorsHidden > 0:
		add("sensors", LevelWarn, "too many sensors to track: %d messages from untracked sensors", s.SensorsHidden)
	case len(s.Sensors) == 0:
		add("sensors", LevelOK, "no sensor heard yet")
	default:
		add("sensors", LevelOK, "%d sensors reporting", len(s.Sensors))
	}

	s.Health, s.Reasons = HealthOK, nil
	for _, c := range s.Checks {
		switch c.Level {
		case LevelFail:
			s.Health = HealthFailing
		case LevelWarn:
			if s.Health == HealthOK {
				s.Health = HealthDegraded
			}
		}
		if c.Level != LevelOK {
			s.Reasons = append(s.Reasons, c.Text)
		}
	}
}

func errSuffix(err string) string {
	if err == "" {
		return ""
	}
	return " (" + err + ")"
}

func oldestSuffix(age float64) string {
	if age <= 0 {
		return ""
	}
	return ", oldest " + FormatAge(age) + " old"
}

func agoSuffix(what string, t, now time.Time) string {
	if t.IsZero() {
		return ""
	}
	return what + " " + FormatAge(now.Sub(t).Seconds()) + " ago"
}

// FormatAge prints seconds as a short duration: 42s, 3m10s, 5h02m, 3d04h.
func FormatAge(s float64) string {
	n := int64(max(s, 0) + 0.5)
	switch {
	case n < 60:
		return fmt.Sprintf("%ds", n)
	case n < 3600:
		return fmt.Sprintf("%dm%02ds", n/60, n%60)
	case n < 48*3600:
		return fmt.Sprintf("%dh%02dm", n/3600, n%3600/60)
	default:
		return fmt.Sprintf("%dd%02dh", n/86400, n%86400/3600)
	}
}
