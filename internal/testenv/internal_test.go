package testenv

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// recorder stands in for a test to see whether a helper skips or fails it.
type recorder struct {
	testing.TB
	skipped, failed string
}

func (r *recorder) Helper() {}
func (r *recorder) Skipf(format string, args ...any) {
	r.skipped = fmt.Sprintf(format, args...)
	runtime.Goexit()
}
func (r *recorder) Fatalf(format string, args ...any) {
	r.failed = fmt.Sprintf(format, args...)
	runtime.Goexit()
}

// onGoroutine runs f on its own goroutine, which Skipf and Fatalf end.
func onGoroutine(f func()) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	<-done
}

func TestMissingSkipsOrFails(t *testing.T) {
	t.Setenv(RequireEnv, "")
	r := &recorder{TB: t}
	onGoroutine(func() { missing(r, "mosquitto", "mosquitto") })
	want := "SKIP: mosquitto not installed; run the README's test command (./test.sh) to run this test"
	if r.skipped != want || r.failed != "" {
		t.Errorf("without %s: skipped %q, failed %q; want skipped %q", RequireEnv, r.skipped, r.failed, want)
	}

	t.Setenv(RequireEnv, "1")
	if !Require() {
		t.Fatal("Require() false with SLUICE_REQUIRE_SERVICES=1")
	}
	r = &recorder{TB: t}
	onGoroutine(func() { missing(r, "mosquitto", "mosquitto") })
	if r.skipped != "" || !strings.Contains(r.failed, "mosquitto not installed") || !strings.Contains(r.failed, "apt-get install mosquitto") {
		t.Errorf("with %s=1: skipped %q, failed %q", RequireEnv, r.skipped, r.failed)
	}
}

func TestDatabaseName(t *testing.T) {
	for _, name := range []string{"TestX", "TestUplink/batch_of_5000/über-lång", strings.Repeat("TestLong/", 20)} {
		got := databaseName(name, 12345)
		if len(got) > 63 || strings.Trim(got, "abcdefghijklmnopqrstuvwxyz0123456789_") != "" {
			t.Errorf("databaseName(%q) = %q: not a plain identifier of at most 63 bytes", name, got)
		}
	}
	if databaseName("TestA", 1) == databaseName("TestA", 2) {
		t.Error("the sequence number does not tell databases apart")
	}
}

// TestCleanupStopsEverything checks that a test's servers are gone, processes and
// files, once the test is over, even when it failed.
func TestCleanupStopsEverything(t *testing.T) {
	var pids, shmids []int
	var dirs []string
	t.Run("servers", func(t *testing.T) {
		pg := StartPostgres(t, PostgresOptions{})
		m := StartMosquitto(t, MosquittoOptions{})
		StartPgBouncer(t, pg, pg.AdminDSN())
		postmaster := pg.proc.current().cmd.Process.Pid
		pids = append(pids, postmaster, m.proc.current().cmd.Process.Pid)
		pids = append(pids, descendants(postmaster)...) // its backends
		dirs = append(dirs, pg.base, m.dir)
		shmids = append(shmids, shmID(t, pg))
		pg.Kill(t) // a killed server, too, leaves nothing behind

		pg2 := StartPostgres(t, PostgresOptions{}) // and one left running
		pids = append(pids, pg2.proc.current().cmd.Process.Pid)
		dirs = append(dirs, pg2.base)
		shmids = append(shmids, shmID(t, pg2))
	})
	if len(pids) < 5 {
		t.Fatalf("pids %v: expected the postmaster's children among them", pids)
	}
	for _, id := range shmids {
		var ds unix.SysvShmDesc
		if _, err := unix.SysvShmCtl(id, unix.IPC_STAT, &ds); err == nil {
			t.Errorf("shared memory segment %d still there after its test", id)
		}
	}
	for _, pid := range pids {
		if procAlive(pid) {
			t.Errorf("process %d still running after its test", pid)
		}
	}
	for _, dir := range dirs {
		if _, err := os.Stat(dir); !os.IsNotExist(err) {
			t.Errorf("directory %s still there after its test (%v)", dir, err)
		}
	}
}

// shmID returns the System V shared memory segment of a running server.
func shmID(t *testing.T, pg *Postgres) int {
	t.Helper()
	b, err := os.ReadFile(pg.dataDir + "/postmaster.pid")
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(string(b), "\n")
	if len(lines) < 7 {
		t.Fatalf("postmaster.pid: %q", b)
	}
	f := strings.Fields(lines[6])
	id, err := strconv.Atoi(f[len(f)-1])
	if err != nil {
		t.Fatalf("postmaster.pid line 7: %q", lines[6])
	}
	return id
}

// helperEnv makes the test binary, run again by TestServersDieWithTestBinary, start
// servers, print their pids and directories, and wait to be killed.
const helperEnv = "SLUICE_TESTENV_HELPER"

func TestHelperStartAndWait(t *testing.T) {
	if os.Getenv(helperEnv) != "1" {
		t.Skip("run by TestServersDieWithTestBinary")
	}
	pg := StartPostgres(t, PostgresOptions{})
	m := StartMosquitto(t, MosquittoOptions{})
	shared.templateMu.Lock()
	template := shared.template
	shared.templateMu.Unlock()
	fmt.Printf("pid %d\npid %d\ndir %s\ndir %s\ndir %s\nready\n",
		pg.proc.current().cmd.Process.Pid, m.proc.current().cmd.Process.Pid, pg.base, m.dir, template)
	time.Sleep(time.Minute)
}

// TestServersDieWithTestBinary SIGKILLs a test binary that runs servers: they must
// not outlive it (their parent-death signal).
func TestServersDieWithTestBinary(t *testing.T) {
	if os.Getenv(helperEnv) == "1" {
		t.Skip("in the helper")
	}
	if _, ok := findBinary("mosquitto"); !ok {
		missing(t, "mosquitto", "mosquitto")
	}
	if _, ok := postgresBinDir(); !ok {
		missing(t, "PostgreSQL (initdb, postgres)", "postgresql")
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperStartAndWait$", "-test.v")
	cmd.Env = append(os.Environ(), helperEnv+"=1")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()

	var pids []int
	var dirs []string
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		line := sc.Text()
		if v, ok := strings.CutPrefix(line, "pid "); ok {
			pid, _ := strconv.Atoi(v)
			pids = append(pids, pid)
		}
		if v, ok := strings.CutPrefix(line, "dir "); ok && v != "" {
			dirs = append(dirs, v)
		}
		if line == "ready" {
			break
		}
	}
	// The killed binary cannot remove its files: we do.
	defer func() {
		for _, d := range dirs {
			os.RemoveAll(d)
		}
	}()
	if len(pids) != 2 {
		t.Fatalf("helper reported pids %v", pids)
	}
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = cmd.Wait()
	deadline := time.Now().Add(10 * time.Second)
	for _, pid := range pids {
		for procAlive(pid) && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		if procAlive(pid) {
			_ = syscall.Kill(-pid, syscall.SIGKILL)
			t.Errorf("server %d outlived the killed test binary", pid)
		}
	}
}
