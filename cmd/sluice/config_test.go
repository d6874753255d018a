package main

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	firmwareprofiles "github.com/sluice-gw/sluice/firmware-profiles"
)

func writeConfig(t *testing.T, text string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "sluice.toml")
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

const minimalConfig = `
[gateway]
id = "gw-1"
data_dir = "/tmp/sluice-test"
[mqtt]
broker = "mqtt://127.0.0.1:1883"
[[mqtt.subscribe]]
topic = "sensors/+/+"
[uplink]
dsn = "postgres://u@127.0.0.1/db"
`

func TestConfigDefaults(t *testing.T) {
	cfg, err := LoadConfig(writeConfig(t, minimalConfig), "")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Gateway.Site != "default" || cfg.Gateway.Clock != "auto" || cfg.Admin.Listen != "127.0.0.1:9180" {
		t.Fatalf("defaults not applied: %+v %+v", cfg.Gateway, cfg.Admin)
	}
	mq, errs := cfg.mqttOptions(false)
	if len(errs) > 0 || mq.Subscriptions[0].QoS != 1 {
		t.Fatalf("subscription qos default: %+v %v", mq.Subscriptions, errs)
	}
	if cfg.Runtime.MemoryLimit.Bytes != 20<<20 || cfg.Runtime.GCPercent != 400 {
		t.Fatalf("runtime defaults: memory_limit %d, gc_percent %d; want 20MiB, 400", cfg.Runtime.MemoryLimit.Bytes, cfg.Runtime.GCPercent)
	}
}

func TestConfigUnknownKeyIsNamed(t *testing.T) {
	_, err := LoadConfig(writeConfig(t, minimalConfig+"\n[buffer]\nmax_byts = \"1MiB\"\n"), "")
	var ce *ConfigError
	if !errors.As(err, &ce) || !strings.Contains(err.Error(), "buffer.max_byts: unknown key") {
		t.Fatalf("misspelt key: %v", err)
	}
}

func TestConfigReportsEveryProblemAtOnce(t *testing.T) {
	text := `
profile = "dev"
[gateway]
clock = "sometimes"
[ingest]
max_payload = "lots"
max_future = 5
[mqtt]
broker = "http://x"
[[mqtt.subscribe]]
topic = "a/#/b"
format = "xml"
qos = 3
priority = "urgent"
[buffer]
on_full = "drop-newest"
max_bytes = "10B"
commit_interval = "forever"
[uplink]
batch_size = "many"
heartbeat = "0.1s"
[log]
level = "chatty"
[runtime]
memory_limit = "1MiB"
gc_percent = 5
[nonsense]
x = 1
`
	_, err := LoadConfig(writeConfig(t, text), "")
	var ce *ConfigError
	if !errors.As(err, &ce) {
		t.Fatalf("bad config accepted: %v", err)
	}
	for _, want := range []string{
		"ingest.max_payload:", "ingest.max_future:", "buffer.commit_interval:", "uplink.batch_size:",
		"nonsense: unknown key",
		"gateway.clock:", "mqtt.broker:", "mqtt.subscribe[0].topic:", "mqtt.subscribe[0].format:",
		"mqtt.subscribe[0].qos:", "mqtt.subscribe[0].priority:", "buffer.on_full:", "buffer.max_bytes:",
		"uplink.heartbeat:", "log.level:", "runtime.memory_limit:", "runtime.gc_percent:",
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("problems do not include %q:\n%v", want, err)
		}
	}
	if n := strings.Count(err.Error(), "buffer.commit_interval:"); n != 1 {
		t.Errorf("buffer.commit_interval reported %d times", n)
	}
}

func TestConfigLayersOverProfile(t *testing.T) {
	cfg, err := LoadConfig(writeConfig(t, `
profile = "dev"
[gateway]
id = "gw-layer"
[uplink]
heartbeat = "45s"
`), "")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Uplink.Heartbeat.Duration != 45*time.Second {
		t.Fatalf("file did not override the profile: heartbeat %s", cfg.Uplink.Heartbeat)
	}
	if cfg.Gateway.DataDir != "./sluice-data" || cfg.Buffer.MaxBytes.Bytes != 64<<20 {
		t.Fatalf("profile defaults lost: data_dir %q max_bytes %d", cfg.Gateway.DataDir, cfg.Buffer.MaxBytes.Bytes)
	}
	if cfg.Profile != "dev" || cfg.Gateway.ID != "gw-layer" {
		t.Fatalf("profile %q id %q", cfg.Profile, cfg.Gateway.ID)
	}
	// The --profile flag wins over the file's profile key.
	if _, err := LoadConfig(writeConfig(t, `profile = "dev"`), "no-such-board"); err == nil || !strings.Contains(err.Error(), `profile: "no-such-board" is not one of`) {
		t.Fatalf("unknown profile flag: %v", err)
	}
}

// TestConfigDSNFormReplacesProfiles: a board profile names dsn_file; a file
// that gives an inline dsn replaces it instead of clashing, and both in the
// same file are still an error.
func TestConfigDSNFormReplacesProfiles(t *testing.T) {
	cfg, err := LoadConfig(writeConfig(t, `
profile = "arm64"
[gateway]
id = "gw-inline"
[uplink]
dsn = "postgres://u@127.0.0.1/db"
`), "")
	if err != nil {
		t.Fatalf("inline dsn over the arm64 profile: %v", err)
	}
	if cfg.Uplink.DSN != "postgres://u@127.0.0.1/db" || cfg.Uplink.DSNFile != "" {
		t.Fatalf("dsn %q dsn_file %q", cfg.Uplink.DSN, cfg.Uplink.DSNFile)
	}
	_, err = LoadConfig(writeConfig(t, `
profile = "arm64"
[uplink]
dsn = "postgres://u@127.0.0.1/db"
dsn_file = "dsn"
`), "")
	if err == nil || !strings.Contains(err.Error(), "uplink.dsn: set dsn or dsn_file, not both") {
		t.Fatalf("both in one file: %v", err)
	}
}

func TestEveryProfileLoadsAlone(t *testing.T) {
	for _, name := range firmwareprofiles.Names() {
		t.Run(name, func(t *testing.T) {
			if _, err := LoadConfig("", name); err != nil {
				t.Fatalf("profile %s does not load alone: %v", name, err)
			}
		})
	}
}

func TestBadConfigExitsTwoWithOneLinePerProblem(t *testing.T) {
	path := writeConfig(t, minimalConfig+"\n[buffer]\non_full = \"never\"\n[log]\nformat = \"xml\"\n")
	stderr := captureStderr(t, func() {
		if code := run([]string{"run", "--config", path}); code != exitUsage {
			t.Errorf("exit status %d, want %d", code, exitUsage)
		}
	})
	lines := strings.Split(strings.TrimSpace(stderr), "\n")
	if len(lines) != 2 || !strings.HasPrefix(lines[0], "buffer.on_full:") || !strings.HasPrefix(lines[1], "log.format:") {
		t.Fatalf("stderr:\n%s", stderr)
	}
}

func TestSecretFileReadableByOthersIsRefused(t *testing.T) {
	dir := t.TempDir()
	secret := filepath.Join(dir, "dsn")
	if err := os.WriteFile(secret, []byte("postgres://u:pw@h/db\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := readSecret(secret); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Fatalf("world-readable secret: %v", err)
	}
	if err := os.Chmod(secret, 0o600); err != nil {
		t.Fatal(err)
	}
	if s, err := readSecret(secret); err != nil || !strings.HasPrefix(s, "postgres://") {
		t.Fatalf("readSecret = %q, %v", s, err)
	}
	// A relative name is found in systemd's credentials directory.
	t.Setenv("CREDENTIALS_DIRECTORY", dir)
	if s, err := readSecret("dsn"); err != nil || !strings.HasPrefix(s, "postgres://") {
		t.Fatalf("credential lookup = %q, %v", s, err)
	}
}

func TestRedactDSN(t *testing.T) {
	for in, want := range map[string]string{
		"postgres://u:secret@h:5432/db?sslmode=require": "postgres://u:REDACTED@h:5432/db?sslmode=require",
		"host=h user=u password=secret dbname=db":       "host=h user=u password=REDACTED dbname=db",
		"postgres://u@h/db":                             "postgres://u@h/db",
	} {
		if got := redactDSN(in); got != want || strings.Contains(got, "secret") {
			t.Errorf("redactDSN(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestSizeParsing(t *testing.T) {
	for in, want := range map[string]int64{"64KiB": 64 << 10, "1MiB": 1 << 20, "2 GiB": 2 << 30, "512": 512, "100B": 100} {
		var z Size
		if err := z.parse(in); err != nil || z.Bytes != want {
			t.Errorf("%q: %d, %v; want %d", in, z.Bytes, err, want)
		}
	}
	for _, bad := range []string{"", "lots", "-1KiB", "1XB"} {
		var z Size
		if err := z.parse(bad); err == nil {
			t.Errorf("%q parsed as %d", bad, z.Bytes)
		}
	}
}

func captureStderr(t *testing.T, fn func()) string {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	old := os.Stderr
	os.Stderr = w
	done := make(chan string)
	go func() {
		var b strings.Builder
		buf := make([]byte, 4096)
		for {
			n, err := r.Read(buf)
			b.Write(buf[:n])
			if err != nil {
				break
			}
		}
		done <- b.String()
	}()
	fn()
	os.Stderr = old
	w.Close()
	return <-done
}

func TestDSNClientKeyReadableByOthersIsRefused(t *testing.T) {
	key := filepath.Join(t.TempDir(), "client.key")
	if err := os.WriteFile(key, []byte("key"), 0o640); err != nil {
		t.Fatal(err)
	}
	for _, dsn := range []string{
		"postgres://u@h/db?sslmode=verify-full&sslkey=" + key,
		"host=h user=u sslmode=verify-full sslkey=" + key,
	} {
		c := Config{Uplink: UplinkSection{DSN: dsn}}
		if _, err := c.resolveDSN(); err == nil || !strings.Contains(err.Error(), "uplink.dsn: sslkey:") {
			t.Errorf("%s: %v", dsn, err)
		}
	}
	if err := os.Chmod(key, 0o600); err != nil {
		t.Fatal(err)
	}
	c := Config{Uplink: UplinkSection{DSN: "postgres://u@h/db?sslkey=" + key}}
	if _, err := c.resolveDSN(); err != nil {
		t.Fatalf("a 0600 key was refused: %v", err)
	}
}
