package main

import (
	"bufio"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/sluice-gw/sluice/gateway"
)

// mosquittoSettings reads the global settings of a Mosquitto config and the
// files its include_dir lines name; later lines win, as in Mosquitto.
func mosquittoSettings(path string) (map[string]string, error) {
	settings := map[string]string{}
	var read func(string, int) error
	read = func(path string, depth int) error {
		f, err := os.Open(path)
		if err != nil {
			return err
		}
		defer f.Close()
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			key, value, _ := strings.Cut(strings.TrimSpace(sc.Text()), " ")
			if key == "" || strings.HasPrefix(key, "#") {
				continue
			}
			value = strings.TrimSpace(value)
			if key == "include_dir" && depth < 2 {
				files, _ := filepath.Glob(filepath.Join(value, "*.conf"))
				sort.Strings(files)
				for _, inc := range files {
					if err := read(inc, depth+1); err != nil {
						return err
					}
				}
				continue
			}
			settings[key] = value
		}
		return sc.Err()
	}
	return settings, read(path, 0)
}

// checkBrokerQueue warns when the local broker's settings put the gateway's
// session at risk (DESIGN.md, "The local broker"). Only a broker on this
// board has its config here.
func (d *doctorCmd) checkBrokerQueue(cl *checklist, cfg *Config) {
	u, err := url.Parse(cfg.MQTT.Broker)
	if err != nil || !isLocalHost(u.Hostname()) {
		return
	}
	set, err := mosquittoSettings(d.MosquittoConf)
	if err != nil {
		cl.add(gateway.LevelOK, "queue", "broker settings not checked: "+err.Error(), "")
		return
	}
	num := func(key string, def int64) int64 {
		if v, ok := set[key]; ok {
			if n, err := strconv.ParseInt(v, 10, 64); err == nil {
				return n
			}
		}
		return def
	}
	const fix = "install mosquitto/gateway.conf as /etc/mosquitto/conf.d/sluice.conf and restart mosquitto"
	var risks []string
	if set["persistence"] != "true" {
		risks = append(risks, "persistence is off: the gateway's session and its queue vanish when the broker restarts")
	}
	if q := num("max_queued_messages", 1000); q > 0 && q < 100_000 {
		risks = append(risks, fmt.Sprintf("max_queued_messages %d: beyond that the broker silently drops messages it has acknowledged to sensors, whenever the gateway is down or that far behind", q))
	}
	if exp, ok := set["persistent_client_expiration"]; ok {
		if d, err := mosquittoDuration(exp); err == nil && d < cfg.MQTT.SessionExpiry.Duration {
			risks = append(risks, fmt.Sprintf("persistent_client_expiration %s is shorter than the session expiry %s", exp, cfg.MQTT.SessionExpiry.Duration))
		}
	}
	if a := num("autosave_interval", 1800); set["persistence"] == "true" && a > 300 {
		risks = append(risks, fmt.Sprintf("autosave_interval %d s: a broker crash loses up to that much of what it queued", a))
	}
	if len(risks) > 0 {
		cl.add(gateway.LevelWarn, "queue", strings.Join(risks, "; "), fix)
		return
	}
	cl.add(gateway.LevelOK, "queue", fmt.Sprintf("broker keeps the session: persistence on, max_queued_messages %d, max_inflight_messages %d",
		num("max_queued_messages", 1000), num("max_inflight_messages", 20)), "")
}

// mosquittoDuration parses Mosquitto's 1h, 2d, 3w, 1m (months), 1y forms.
func mosquittoDuration(s string) (time.Duration, error) {
	if len(s) < 2 {
		return 0, fmt.Errorf("bad duration %q", s)
	}
	n, err := strconv.ParseInt(s[:len(s)-1], 10, 64)
	if err != nil {
		return 0, err
	}
	unit := map[byte]time.Duration{'h': time.Hour, 'd': 24 * time.Hour, 'w': 7 * 24 * time.Hour, 'm': 30 * 24 * time.Hour, 'y': 365 * 24 * time.Hour}[s[len(s)-1]]
	if unit == 0 {
		return 0, fmt.Errorf("bad duration unit in %q", s)
	}
	return time.Duration(n) * unit, nil
}
