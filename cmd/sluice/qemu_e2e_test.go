package main

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sluice-gw/sluice/internal/testenv"
)

// TestARMBuildsUnderQEMU cross-builds the gateway for arm64 and 32-bit ARMv7
// and runs each under qemu-user: version, profile list, then the ARM gateway
// ingests what the ARM simulator publishes to a real Mosquitto and uploads it
// to a real Postgres. It logs the emulated process's peak memory, for
// bench/README.md.
func TestARMBuildsUnderQEMU(t *testing.T) {
	for _, tc := range []struct {
		name, goarch, goarm string
		qemu                []string
	}{
		{"arm64", "arm64", "", []string{"qemu-aarch64-static"}},
		{"armv7", "arm", "7", []string{"qemu-arm-static", "-cpu", "cortex-a7"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			qemu := needBinary(t, tc.qemu[0], "qemu-user-static")
			bin := crossBuild(t, tc.goarch, tc.goarm)
			argv := append(append([]string{qemu}, tc.qemu[1:]...), bin)

			out, code := runCommand(t, nil, append(argv, "version")...)
			if code != exitOK || !strings.HasPrefix(out, "sluice qemu-e2e\n") {
				t.Fatalf("version under qemu: exit %d:\n%s", code, out)
			}
			out, code = runCommand(t, nil, append(argv, "profile", "list")...)
			if code != exitOK || !strings.Contains(out, "linux/arm/v7") || !strings.Contains(out, "Raspberry Pi") {
				t.Fatalf("profile list under qemu: exit %d:\n%s", code, out)
			}

			broker := testenv.StartMosquitto(t, testenv.MosquittoOptions{})
			dsn := testenv.SharedPostgres(t).NewDatabase(t)
			port := testenv.FreePort(t)
			config := filepath.Join(t.TempDir(), "sluice.toml")
			text := gatewayConfig(t, t.TempDir(), broker.URL(), dsn, port, "")
			if err := os.WriteFile(config, []byte(text), 0o600); err != nil {
				t.Fatal(err)
			}
			g := startGatewayArgs(t, fmt.Sprintf("127.0.0.1:%d", port), nil, append(argv, "run", "--config", config)...)
			g.waitHTTP("/readyz", 60*time.Second)

			acked := runSimulate(t, nil, append(argv, "simulate", "--broker", broker.URL(), "--sensors", "4",
				"--rate", "20", "--duration", "3s", "--seed", "3")...)
			waitRows(t, dsn, acked, 60*time.Second, "SELECT count(*) FROM sluice.readings")
			time.Sleep(300 * time.Millisecond) // anything extra would show now
			if n := queryInt(t, dsn, "SELECT count(*) FROM sluice.readings"); n != acked {
				t.Fatalf("%d rows, the broker acknowledged %d messages", n, acked)
			}
			hwm, anon := procMemory(t, g.cmd.Process.Pid)
			t.Logf("%s under %s: %d readings ingested and uploaded; qemu process VmHWM %s, RssAnon %s",
				tc.name, tc.qemu[0], acked, hwm, anon)
		})
	}
}

// needBinary finds a tool the test runs (pkg is its Debian package); without
// it the test fails under SLUICE_REQUIRE_SERVICES=1 (./test.sh) and skips
// loudly otherwise, as testenv does for its servers.
func needBinary(t *testing.T, name, pkg string) string {
	t.Helper()
	path, err := exec.LookPath(name)
	if err == nil {
		return path
	}
	if testenv.Require() {
		t.Fatalf("%s not installed, and %s=1 demands it: apt-get install %s", name, testenv.RequireEnv, pkg)
	}
	t.Skipf("SKIP: %s not installed; run the README's test command (./test.sh) to run this test", name)
	return ""
}

// crossBuild builds the gateway for linux/GOARCH as make dist does
// (static, trimmed, stripped), bounded to five minutes.
func crossBuild(t *testing.T, goarch, goarm string) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "sluice-"+goarch+goarm)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags", "-s -w -buildid= -X main.version=qemu-e2e", "-o", bin, ".")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+goarch, "GOARM="+goarm)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build for %s%s: %v\n%s", goarch, goarm, err, out)
	}
	return bin
}

// procMemory reads a process's peak resident set and its anonymous
// resident memory from /proc.
func procMemory(t *testing.T, pid int) (vmHWM, rssAnon string) {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		key, val, _ := strings.Cut(sc.Text(), ":")
		switch key {
		case "VmHWM":
			vmHWM = strings.TrimSpace(val)
		case "RssAnon":
			rssAnon = strings.TrimSpace(val)
		}
	}
	if vmHWM == "" || rssAnon == "" {
		t.Fatalf("/proc/%d/status has no VmHWM or RssAnon", pid)
	}
	return vmHWM, rssAnon
}
