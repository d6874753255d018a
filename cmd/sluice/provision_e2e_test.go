package main

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sluice-gw/sluice/internal/testenv"
)

// TestProvisionDoctorRunSimulate is the technician's path with real
// processes: provision a bundle for an arm64 board, check it with doctor,
// run the gateway on it, simulate three sensors, and find every reading the
// broker acknowledged in Postgres once, also when the same readings are sent
// again.
func TestProvisionDoctorRunSimulate(t *testing.T) {
	broker := testenv.StartMosquitto(t, testenv.MosquittoOptions{})
	dsn := testenv.SharedPostgres(t).NewDatabase(t)
	work := t.TempDir()
	dsnFile := filepath.Join(work, "central-dsn")
	if err := os.WriteFile(dsnFile, []byte(dsn+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	bundle := filepath.Join(work, "bundle")
	provision := []string{"provision", "--profile", "arm64", "--gateway-id", "gw-field-1", "--site", "pump-station-7",
		"--broker", broker.URL(), "--dsn-file", dsnFile, "--out", bundle}
	out, code := runSluice(t, nil, provision...)
	if code != exitOK || !strings.Contains(out, "config valid") || !strings.Contains(out, "sluice doctor --config") {
		t.Fatalf("provision exit %d:\n%s", code, out)
	}
	for path, mode := range map[string]os.FileMode{
		"etc/sluice/sluice.toml": 0o644, "etc/sluice/credentials": 0o700 | os.ModeDir, "etc/sluice/credentials/dsn": 0o600,
		"etc/systemd/system/sluice.service": 0o644, "etc/sysusers.d/sluice.conf": 0o644, "etc/tmpfiles.d/sluice.conf": 0o644,
	} {
		fi, err := os.Stat(filepath.Join(bundle, path))
		if err != nil || fi.Mode() != mode {
			t.Errorf("bundle %s: %v, mode %v, want %v", path, err, fi.Mode(), mode)
		}
	}
	configPath := filepath.Join(bundle, "etc/sluice/sluice.toml")
	config, err := os.ReadFile(configPath)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(config, []byte(dsn)) || bytes.Contains(config, []byte("postgres://")) {
		t.Fatalf("the config holds the DSN:\n%s", config)
	}
	if cred, _ := os.ReadFile(filepath.Join(bundle, "etc/sluice/credentials/dsn")); strings.TrimSpace(string(cred)) != dsn {
		t.Fatalf("the credential holds %q", cred)
	}
	// A second provision never overwrites a bundle (it holds a credential).
	if out, code := runSluice(t, nil, provision...); code != exitUsage || !strings.Contains(out, "already exists") {
		t.Fatalf("provision over a bundle: exit %d:\n%s", code, out)
	}

	// What a technician adapts on this machine: the data directory and a free
	// admin port instead of the board's /var/lib/sluice and 9180.
	admin := fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
	local := withKeys(t, string(config), "gateway", fmt.Sprintf("data_dir = %q", filepath.Join(work, "data")))
	local += fmt.Sprintf("\n[admin]\nlisten = %q\n", admin)
	if err := os.WriteFile(configPath, []byte(local), 0o644); err != nil {
		t.Fatal(err)
	}
	// As under systemd: the unit's LoadCredential=dsn puts the DSN here.
	env := []string{"CREDENTIALS_DIRECTORY=" + filepath.Join(bundle, "etc/sluice/credentials")}

	out, code = runSluice(t, env, "doctor", "--config", configPath)
	// Postgres may warn here (no TLS on loopback, schema not applied yet).
	for _, want := range []string{`ok\s+config\s+valid \(gateway gw-field-1`, `(ok|warn)\s+postgres\s+127\.0\.0\.1`, `ok\s+broker\s+`} {
		if !regexp.MustCompile(`(?m)^` + want).MatchString(out) {
			t.Errorf("doctor output lacks %s", want)
		}
	}
	if strings.Contains(out, "FAIL") || code != exitOK {
		t.Errorf("doctor failed (exit %d) on the provisioned gateway", code)
	}
	if t.Failed() {
		t.Fatalf("doctor:\n%s", out)
	}

	g := startGatewayArgs(t, admin, env, sluiceBin, "run", "--config", configPath)
	g.waitHTTP("/readyz", 30*time.Second)

	start := time.Now().Add(-time.Minute).Truncate(time.Second).UTC().Format(time.RFC3339)
	simulate := []string{"simulate", "--broker", broker.URL(), "--sensors", "3", "--rate", "10", "--duration", "3s",
		"--seed", "5", "--start", start}
	acked := runSimulate(t, nil, append([]string{sluiceBin}, simulate...)...)
	waitRows(t, dsn, acked, 30*time.Second, "SELECT count(*) FROM sluice.readings")
	for sql, want := range map[string]int64{
		"SELECT count(DISTINCT sensor) FROM sluice.readings":                                               3,
		"SELECT count(*) FROM sluice.readings WHERE gateway_id = 'gw-field-1' AND site = 'pump-station-7'": acked,
		"SELECT count(*) FROM sluice.readings WHERE sensor_seq IS NOT NULL":                                acked,
		"SELECT count(DISTINCT (metric, unit)) FROM sluice.readings WHERE sensor = 'feeder-1'":             2, // voltage V, frequency Hz
		"SELECT count(*) FROM sluice.gateways WHERE gateway_id = 'gw-field-1' AND profile = 'arm64'":       1,
	} {
		if n := queryInt(t, dsn, sql); n != want {
			t.Errorf("%s = %d, want %d", sql, n, want)
		}
	}

	// The same seed and start send the same readings again: the gateway
	// buffers and uploads them, and Postgres keeps each once.
	if again := runSimulate(t, nil, append([]string{sluiceBin}, simulate...)...); again != acked {
		t.Fatalf("the same seed sent %d messages, first %d", again, acked)
	}
	waitRows(t, dsn, 2*acked, 30*time.Second, "SELECT coalesce(sum(acked_seq), 0) FROM sluice.streams")
	if n := queryInt(t, dsn, "SELECT count(*) FROM sluice.readings"); n != acked {
		t.Fatalf("%d rows after sending the same %d readings twice", n, acked)
	}
	// status: broker and uplink fine. Once the simulation stops, its sensors
	// go stale within a few of their 100 ms intervals, which status reports.
	out, code = runSluice(t, nil, "status", "--config", configPath)
	for _, want := range []string{"gw-field-1", "pump-station-7"} {
		if !strings.Contains(out, want) {
			t.Errorf("status lacks %q", want)
		}
	}
	for _, want := range []string{`ok\s+mqtt\s`, `ok\s+uplink\s`, `ok\s+buffer\s`} {
		if !regexp.MustCompile(`(?m)^\s*` + want).MatchString(out) {
			t.Errorf("status lacks %s", want)
		}
	}
	if bad := regexp.MustCompile(`(?m)^\s*(warn|FAIL|fail)\s+(\w+)`).FindAllStringSubmatch(out, -1); code != exitOK &&
		(len(bad) != 1 || bad[0][2] != "sensors") {
		t.Errorf("status exit %d for more than stale sensors", code)
	}
	if t.Failed() {
		t.Fatalf("status:\n%s", out)
	}
}

// runSluice runs the native binary with extra environment and returns its
// combined output and exit status.
func runSluice(t *testing.T, env []string, args ...string) (string, int) {
	t.Helper()
	return runCommand(t, env, append([]string{sluiceBin}, args...)...)
}

// runCommand runs argv, bounded to two minutes.
func runCommand(t *testing.T, env []string, argv ...string) (string, int) {
	t.Helper()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), env...)
	var out syncBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case <-done:
	case <-time.After(2 * time.Minute):
		_ = cmd.Process.Kill()
		<-done
		t.Fatalf("%s did not finish within 2 minutes:\n%s", strings.Join(argv, " "), out.String())
	}
	return out.String(), cmd.ProcessState.ExitCode()
}

var simulateSummary = regexp.MustCompile(`(\d+) messages sent, (\d+) acknowledged`)

// runSimulate runs a simulate command line and returns how many messages
// the broker acknowledged; every message sent must have been.
func runSimulate(t *testing.T, env []string, argv ...string) int64 {
	t.Helper()
	out, code := runCommand(t, env, argv...)
	m := simulateSummary.FindStringSubmatch(out)
	if code != exitOK || m == nil || m[1] != m[2] {
		t.Fatalf("simulate exit %d:\n%s", code, out)
	}
	n, _ := strconv.ParseInt(m[2], 10, 64)
	if n == 0 {
		t.Fatalf("simulate sent nothing:\n%s", out)
	}
	return n
}

// startGatewayArgs starts a gateway from any command line (the native
// binary with its own environment, or an ARM binary under qemu) and waits
// for its admin endpoint, as startGateway does.
func startGatewayArgs(t *testing.T, admin string, env []string, argv ...string) *gatewayProc {
	t.Helper()
	g := &gatewayProc{t: t, admin: admin, out: &syncBuffer{}}
	g.cmd = exec.Command(argv[0], argv[1:]...)
	g.cmd.Env = append(os.Environ(), env...)
	g.cmd.Stdout, g.cmd.Stderr = g.out, g.out
	g.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := g.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	g.exited = make(chan struct{})
	go func(cmd *exec.Cmd, exited chan struct{}) {
		_ = cmd.Wait()
		close(exited)
	}(g.cmd, g.exited)
	t.Cleanup(func() {
		g.stop()
		if t.Failed() {
			t.Logf("gateway output:\n%s", g.out.String())
		}
	})
	g.waitHTTP("/healthz", 60*time.Second)
	return g
}
