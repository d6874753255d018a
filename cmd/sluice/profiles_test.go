package main

import (
	"net"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	firmwareprofiles "github.com/sluice-gw/sluice/firmware-profiles"
)

// boardProfiles are the profiles a gateway ships with, and their limits.
var boardProfiles = []struct {
	name, target string
	ramBytes     int64 // the smallest board of the class
}{
	{"amd64", "linux/amd64", 4 << 30},
	{"arm64", "linux/arm64", 1 << 30},
	{"armv7", "linux/arm/v7", 256 << 20},
	{"armv6", "linux/arm/v6", 512 << 20},
}

func TestBoardProfiles(t *testing.T) {
	names := firmwareprofiles.Names()
	for _, b := range boardProfiles {
		t.Run(b.name, func(t *testing.T) {
			cfg, err := LoadConfig("", b.name)
			if err != nil {
				t.Fatal(err)
			}
			if got := cfg.Build.target(); got != b.target {
				t.Errorf("target %s, want %s", got, b.target)
			}
			if cfg.Gateway.DataDir != "/var/lib/sluice" {
				t.Errorf("data_dir %s, want systemd's StateDirectory /var/lib/sluice", cfg.Gateway.DataDir)
			}
			if host, _, err := net.SplitHostPort(cfg.Admin.Listen); err != nil || !net.ParseIP(host).IsLoopback() {
				t.Errorf("admin listens on %q, want loopback", cfg.Admin.Listen)
			}
			if cfg.Uplink.DSN != "" || cfg.Uplink.DSNFile != "dsn" {
				t.Errorf("uplink dsn %q dsn_file %q, want only the credential \"dsn\"", cfg.Uplink.DSN, cfg.Uplink.DSNFile)
			}
			if cfg.CoAP.Listen != "" || cfg.CoAP.DTLSListen != "" {
				t.Errorf("CoAP on (%q, %q): a profile has no sensor keys", cfg.CoAP.Listen, cfg.CoAP.DTLSListen)
			}
			if m := cfg.Runtime.MemoryLimit.Bytes; m <= 0 || m > b.ramBytes/2 {
				t.Errorf("memory_limit %d, want set and at most half the smallest board's %d", m, b.ramBytes)
			}
			if ci := cfg.Buffer.CommitInterval.Duration; ci < 10*time.Millisecond || ci > 200*time.Millisecond {
				t.Errorf("commit_interval %s, want 10ms..200ms (flash wear against CoAP latency)", ci)
			}
			// bbolt maps the whole file: a 32-bit process has 3 GiB of address space.
			if strings.HasPrefix(b.target, "linux/arm/") && cfg.Buffer.MaxBytes.Bytes > 1<<30 {
				t.Errorf("max_bytes %d on a 32-bit board", cfg.Buffer.MaxBytes.Bytes)
			}
			if len(cfg.MQTT.Subscribe) != 2 || cfg.MQTT.Subscribe[1].Priority != "alarm" {
				t.Errorf("subscriptions %+v, want sensors/+/+ and alarms/+/+ (alarm)", cfg.MQTT.Subscribe)
			}
		})
	}
	if len(names) != len(boardProfiles)+1 {
		t.Errorf("profiles %v: a new one needs a row here", names)
	}
}

// numberLine is a key whose value is a number, a size or a duration.
var numberLine = regexp.MustCompile(`^[a-z_]+ = "?[0-9][0-9.]*\s*(B|KiB|MiB|GiB|ms|s|m|h)?"?$`)

// TestEveryProfileNumberSaysWhy: each tuned number has a ## comment
// right above it ([build] holds targets, not tuning).
func TestEveryProfileNumberSaysWhy(t *testing.T) {
	for _, name := range firmwareprofiles.Names() {
		text, _ := firmwareprofiles.Read(name)
		lines := strings.Split(string(text), "\n")
		section := ""
		for i, line := range lines {
			if strings.HasPrefix(line, "[") {
				section = line
			}
			if section == "[build]" || !numberLine.MatchString(line) {
				continue
			}
			if i == 0 || !strings.HasPrefix(lines[i-1], "## ") {
				t.Errorf("%s.toml line %d: %q has no ## comment on why", name, i+1, line)
			}
		}
	}
}

func TestFileLayersOverBoardProfile(t *testing.T) {
	path := writeConfig(t, `
profile = "armv6"
[gateway]
id = "gw-zero"
[buffer]
max_bytes = "32MiB"
`)
	cfg, err := LoadConfig(path, "")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Profile != "armv6" || cfg.Buffer.MaxBytes.Bytes != 32<<20 {
		t.Fatalf("profile %q max_bytes %d: the file's value must win", cfg.Profile, cfg.Buffer.MaxBytes.Bytes)
	}
	if cfg.Buffer.CommitInterval.Duration != 200*time.Millisecond || cfg.Runtime.MemoryLimit.Bytes != 128<<20 || cfg.Uplink.BatchSize != 1000 {
		t.Fatalf("armv6 values lost under the file: commit %s memory %d batch %d",
			cfg.Buffer.CommitInterval, cfg.Runtime.MemoryLimit.Bytes, cfg.Uplink.BatchSize)
	}
	if len(cfg.MQTT.Subscribe) != 2 {
		t.Fatalf("a file without [[mqtt.subscribe]] keeps the profile's: %+v", cfg.MQTT.Subscribe)
	}

	// --profile replaces the file's profile key; the file still layers over it.
	cfg, err = LoadConfig(path, "arm64")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Profile != "arm64" || cfg.Buffer.CommitInterval.Duration != 50*time.Millisecond || cfg.Buffer.MaxBytes.Bytes != 32<<20 {
		t.Fatalf("--profile arm64: profile %q commit %s max_bytes %d", cfg.Profile, cfg.Buffer.CommitInterval, cfg.Buffer.MaxBytes.Bytes)
	}

	// An array of tables in the file replaces the profile's whole.
	cfg, err = LoadConfig(writeConfig(t, `
profile = "arm64"
[[mqtt.subscribe]]
topic = "plant/#"
`), "")
	if err != nil {
		t.Fatal(err)
	}
	if len(cfg.MQTT.Subscribe) != 1 || cfg.MQTT.Subscribe[0].Topic != "plant/#" {
		t.Fatalf("subscriptions %+v, want only plant/#", cfg.MQTT.Subscribe)
	}

	// A bad value over a profile is named with its key.
	_, err = LoadConfig(writeConfig(t, "profile = \"armv7\"\n[buffer]\ncommit_interval = \"2s\"\n"), "")
	if err == nil || !strings.Contains(err.Error(), "buffer.commit_interval:") {
		t.Fatalf("commit_interval 2s over armv7: %v", err)
	}
}

// TestPackageConffileLoads: the /etc/sluice/sluice.toml every package ships
// loads for every board profile, as the gateway will read it.
func TestPackageConffileLoads(t *testing.T) {
	tmpl, err := os.ReadFile("../../packaging/sluice.toml")
	if err != nil {
		t.Fatal(err)
	}
	for _, b := range boardProfiles {
		text := strings.ReplaceAll(string(tmpl), "@PROFILE@", b.name)
		cfg, err := LoadConfig(writeConfig(t, text), "")
		if err != nil {
			t.Fatalf("%s: %v", b.name, err)
		}
		if cfg.Profile != b.name || cfg.Uplink.DSNFile != "dsn" {
			t.Fatalf("%s: profile %q dsn_file %q", b.name, cfg.Profile, cfg.Uplink.DSNFile)
		}
	}
}

func TestProfileListShowsTargets(t *testing.T) {
	out, code := runSluice(t, nil, "profile", "list")
	if code != exitOK {
		t.Fatalf("exit %d:\n%s", code, out)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != len(firmwareprofiles.Names())+1 || !strings.HasPrefix(lines[0], "PROFILE") {
		t.Fatalf("profile list:\n%s", out)
	}
	for _, b := range boardProfiles {
		if !regexp.MustCompile(`(?m)^` + b.name + `\s+` + regexp.QuoteMeta(b.target) + `\s`).MatchString(out) {
			t.Errorf("no line %s %s in:\n%s", b.name, b.target, out)
		}
	}
}
