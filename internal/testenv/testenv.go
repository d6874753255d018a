// Package testenv starts real Mosquitto, PostgreSQL and PgBouncer processes and an
// in-process TCP fault proxy on loopback, for integration tests.
// It stays out of production code, and mocks nothing.
//
// Every server is a child process of the test binary, started on a free 127.0.0.1
// port, awaited until it really serves (an MQTT CONNACK, a Postgres login, a query
// through PgBouncer) within StartTimeout, and stopped in t.Cleanup; the shared
// Postgres of SharedPostgres is stopped by Main. Postgres and PgBouncer keep their
// files in directories "sluice-testenv-*" (under /dev/shm when it is there, see
// DirEnv), Mosquitto in t.TempDir(). On a failed test the tail of each server's log
// is printed. Children get a parent-death signal, so a test binary that is killed
// or times out leaves no server running (only its directories).
//
// A missing binary skips the test with a loud reason, or fails it when
// SLUICE_REQUIRE_SERVICES=1 (see Require), which the README's test command sets.
// A package that calls SharedPostgres needs
//
//	func TestMain(m *testing.M) { testenv.Main(m) }
//
// # Running the sluice binary against these servers
//
// Write a config file into t.TempDir() with Mosquitto.URL, a DSN (from NewDatabase,
// StartPgBouncer, or with the host:port replaced by a Proxy's Addr) and ports from
// FreePort/FreeUDPPort, and start the binary after the servers, so that t.Cleanup,
// which runs last-in first-out, stops it before them. Give it
// SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL} and in its cleanup kill it
// and Wait, as this package does with its servers. A Proxy lives inside the test
// binary: it works for a child process, but only while the test runs.
//
// # Sharp edges
//
//   - The DSN user is a superuser (PostgresUser). To test a restricted role, create
//     it with Query and put it in the DSN yourself.
//   - The shared server runs synchronous_commit=off; a private one (StartPostgres)
//     keeps it on, so committed transactions survive its Kill. fsync is off on both:
//     only a crash of the machine, which no test makes, would lose data.
//   - PgBouncer 1.18 in transaction mode does not keep named prepared statements:
//     pgx must use QueryExecModeExec (or SimpleProtocol). The DSN does not set it, so a
//     test through PgBouncer catches code that forgets to.
//   - Mosquitto writes its store only on a clean Stop, on Save and every 60 s: a Kill
//     loses sessions and queued messages since the last of those, as on a gateway.
//     It runs as root here ("user root"); the packaged broker runs as mosquitto.
//   - Kill of Postgres SIGKILLs the postmaster and every backend at once (they sit
//     in sessions of their own, out of reach of a process-group kill), as an OOM
//     kill of the whole server would; the next Start runs crash recovery.
//   - Ports are free when picked, not reserved: the Start functions retry on a port
//     taken meanwhile; a port you pass in Options is used as it is.
package testenv

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// StartTimeout bounds how long a server may take to become ready, and how long a
// graceful stop may take before the process is killed.
const StartTimeout = 15 * time.Second

// RequireEnv is the environment variable that turns a missing service binary from a
// skip into a failure; the README's test command (./test.sh) sets it to 1.
const RequireEnv = "SLUICE_REQUIRE_SERVICES"

// mainRan records that the test binary runs under Main or Run, which stop shared servers.
var mainRan atomic.Bool

// Main runs the tests of a package, then stops the shared servers (the Postgres of
// SharedPostgres) and removes their files, and exits with the tests' status.
// Call it from TestMain:
//
//	func TestMain(m *testing.M) { testenv.Main(m) }
//
// Main never returns, so deferred calls in TestMain do not run: a TestMain with
// cleanup of its own uses Run.
func Main(m *testing.M) {
	os.Exit(Run(m))
}

// Run is Main without the exit: it runs the tests, stops the shared servers and
// returns the exit status, for a TestMain that cleans up after it:
//
//	code := testenv.Run(m)
//	os.RemoveAll(dir)
//	os.Exit(code)
func Run(m *testing.M) int {
	mainRan.Store(true)
	code := m.Run()
	if err := stopShared(); err != nil {
		fmt.Fprintf(os.Stderr, "testenv: stopping shared servers: %v\n", err)
		if code == 0 {
			code = 1
		}
	}
	return code
}

// Require reports whether every service must be there: SLUICE_REQUIRE_SERVICES=1,
// as the README's test command sets. A missing binary then fails the test instead
// of skipping it.
func Require() bool {
	v := os.Getenv(RequireEnv)
	return v != "" && v != "0" && !strings.EqualFold(v, "false")
}

// missing skips (or, under Require, fails) a test that needs something the
// machine does not have. what names the binary; pkg the Debian package that has it.
func missing(t testing.TB, what, pkg string) {
	t.Helper()
	if Require() {
		t.Fatalf("%s not installed, and %s=1 demands every service: apt-get install %s", what, RequireEnv, pkg)
	}
	t.Skipf("SKIP: %s not installed; run the README's test command (./test.sh) to run this test", what)
}

// sbinDirs are searched after PATH: Debian puts mosquitto and pgbouncer in /usr/sbin,
// which is not on every user's PATH.
var sbinDirs = []string{"/usr/local/sbin", "/usr/sbin", "/sbin"}

// findBinary returns the path of an executable on PATH or in the sbin directories.
func findBinary(name string) (string, bool) {
	if p, err := exec.LookPath(name); err == nil {
		return p, true
	}
	for _, dir := range sbinDirs {
		p := filepath.Join(dir, name)
		if isExecutable(p) {
			return p, true
		}
	}
	return "", false
}

func isExecutable(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0
}

// postgresBinDir returns the directory holding initdb and postgres: the one on PATH
// if there is one, else the newest /usr/lib/postgresql/VERSION/bin.
func postgresBinDir() (string, bool) {
	if p, err := exec.LookPath("initdb"); err == nil {
		dir := filepath.Dir(p)
		if isExecutable(filepath.Join(dir, "postgres")) {
			return dir, true
		}
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	dirs = slices.DeleteFunc(dirs, func(d string) bool {
		return !isExecutable(filepath.Join(d, "initdb")) || !isExecutable(filepath.Join(d, "postgres"))
	})
	if len(dirs) == 0 {
		return "", false
	}
	// Newest first: compare "9.6" < "15" < "16" by their numeric parts.
	version := func(dir string) []int {
		var v []int
		for _, part := range strings.Split(filepath.Base(filepath.Dir(dir)), ".") {
			n, _ := strconv.Atoi(part)
			v = append(v, n)
		}
		return v
	}
	slices.SortFunc(dirs, func(a, b string) int { return slices.Compare(version(b), version(a)) })
	return dirs[0], true
}

// serverUser is the account that runs PostgreSQL and PgBouncer, which refuse to run
// as root: the "postgres" user when the tests run as root, else the current user.
type serverUser struct {
	cred *syscall.Credential // nil: run as ourselves
	uid  int
	gid  int
}

// postgresUser returns the account for PostgreSQL and PgBouncer, skipping (or failing)
// the test when it runs as root and there is no postgres user.
func postgresUser(t testing.TB) serverUser {
	t.Helper()
	if os.Geteuid() != 0 {
		return serverUser{uid: os.Geteuid(), gid: os.Getegid()}
	}
	u, err := user.Lookup("postgres")
	if err != nil {
		missing(t, `the "postgres" user (PostgreSQL and PgBouncer refuse to run as root)`, "postgresql")
	}
	uid, err1 := strconv.Atoi(u.Uid)
	gid, err2 := strconv.Atoi(u.Gid)
	if err1 != nil || err2 != nil {
		t.Fatalf("testenv: user postgres has a non-numeric uid %q or gid %q", u.Uid, u.Gid)
	}
	return serverUser{cred: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}, uid: uid, gid: gid}
}

// DirEnv names the environment variable that sets where server directories go.
const DirEnv = "SLUICE_TESTENV_DIR"

// tempRoot returns the parent for server directories: $SLUICE_TESTENV_DIR if set,
// else /dev/shm, a tmpfs (initdb and copying a data directory take a tenth of the
// time they take on this VM's disk), else os.TempDir(). A directory that a server
// running as another user could not traverse (e.g. a TMPDIR of mode 0700) is passed
// over for /tmp.
func tempRoot() string {
	if dir := os.Getenv(DirEnv); dir != "" {
		return dir
	}
	for _, dir := range []string{"/dev/shm", os.TempDir()} {
		if traversable(dir) && unix.Access(dir, unix.W_OK) == nil {
			return dir
		}
	}
	return "/tmp"
}

// traversable reports whether every user may traverse dir and its parents.
func traversable(dir string) bool {
	for d := dir; ; d = filepath.Dir(d) {
		fi, err := os.Stat(d)
		if err != nil || !fi.IsDir() || fi.Mode().Perm()&0o001 == 0 {
			return false
		}
		if d == filepath.Dir(d) {
			return true
		}
	}
}

// makeServerDir creates a private directory under tempRoot owned by u, so a server
// running as u can create files in it.
func makeServerDir(kind string, u serverUser) (string, error) {
	dir, err := os.MkdirTemp(tempRoot(), "sluice-testenv-"+kind+"-")
	if err != nil {
		return "", err
	}
	if err := os.Chown(dir, u.uid, u.gid); err != nil {
		os.RemoveAll(dir)
		return "", fmt.Errorf("chown %s: %w", dir, err)
	}
	return dir, nil
}

// writeFileAs writes a file owned by u.
func writeFileAs(path string, data []byte, perm os.FileMode, u serverUser) error {
	if err := os.WriteFile(path, data, perm); err != nil {
		return err
	}
	return os.Chown(path, u.uid, u.gid)
}

// FreePort returns a TCP port on 127.0.0.1 that was free a moment ago. Another process
// may take it before you bind it; the Start functions here retry with a new port when
// that happens.
func FreePort(t testing.TB) int {
	t.Helper()
	port, err := freePort()
	if err != nil {
		t.Fatalf("testenv: free TCP port: %v", err)
	}
	return port
}

func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// FreeUDPPort returns a UDP port on 127.0.0.1 that was free a moment ago.
func FreeUDPPort(t testing.TB) int {
	t.Helper()
	c, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("testenv: free UDP port: %v", err)
	}
	defer c.Close()
	return c.LocalAddr().(*net.UDPAddr).Port
}

// UDPPeer opens a client UDP socket on loopback, closed when the test ends,
// and resolves the server address addr it will send to: a sensor whose
// datagrams (message ids, retransmissions, garbage) the test controls.
func UDPPeer(t testing.TB, addr string) (*net.UDPConn, *net.UDPAddr) {
	t.Helper()
	to, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		t.Fatalf("testenv: resolve %s: %v", addr, err)
	}
	conn, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatalf("testenv: UDP socket: %v", err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn, to
}

// shared holds what lives as long as the test binary; Main stops and removes it.
// Lock order: mu before templateMu.
var shared struct {
	mu    sync.Mutex // guards pg and pgErr
	pg    *Postgres  // the SharedPostgres server, once started
	pgErr error      // why starting it failed; every later caller fails the same way

	templateMu sync.Mutex // guards template
	template   string     // a directory holding an initdb'd data directory to copy, or ""
}

// stopShared stops the shared Postgres and removes the shared files. A server that
// did not stop cleanly keeps its files, for a look at its log.
func stopShared() error {
	shared.mu.Lock()
	defer shared.mu.Unlock()
	var err error
	if shared.pg != nil {
		if err = shared.pg.stop(); err != nil {
			err = fmt.Errorf("shared postgres: %w (log %s)", err, shared.pg.logPath)
		} else {
			os.RemoveAll(shared.pg.base)
		}
		shared.pg = nil
	}
	shared.templateMu.Lock()
	defer shared.templateMu.Unlock()
	if shared.template != "" {
		os.RemoveAll(shared.template)
		shared.template = ""
	}
	return err
}

// logTail returns the last max bytes of a log file, for failure messages.
func logTail(path string, max int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	if len(b) > max {
		b = b[len(b)-max:]
		if i := strings.IndexByte(string(b), '\n'); i >= 0 {
			b = b[i+1:]
		}
		return "[...]\n" + string(b)
	}
	return string(b)
}

// logOnFailure prints the tail of a server's log when the test has failed.
func logOnFailure(t testing.TB, name, path string) {
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("--- %s log (%s), last lines ---\n%s", name, path, logTail(path, 8<<10))
		}
	})
}
