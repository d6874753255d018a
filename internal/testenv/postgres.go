package testenv

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"golang.org/x/sys/unix"
)

// The superuser of every test server. Its password is in every DSN: these servers
// listen on loopback only and live for one test binary.
const (
	PostgresUser     = "sluice"
	PostgresPassword = "sluice"
)

// defaultMaxConnections is high enough for a package's parallel tests, each with a
// pool of a few connections, on the one shared server.
const defaultMaxConnections = 200

// Postgres is a PostgreSQL server started for tests: the shared one of a test binary
// (SharedPostgres) or a private one (StartPostgres).
//
// It listens on 127.0.0.1 on its own port and on a unix socket in a private
// directory, runs with fsync and full_page_writes off (a crash of the machine would
// lose data; a crash or SIGKILL of Postgres does not), with synchronous_commit off on
// the shared server and on on private ones (so Kill keeps every committed
// transaction), and has one superuser, PostgresUser, with password authentication
// over TCP.
//
// NewDatabase, Addr, AdminDSN, Query and QueryRows are safe for concurrent use;
// Stop, Kill and Start are for the test goroutine of the test that owns a private server.
type Postgres struct {
	binDir  string     // holds initdb and postgres
	user    serverUser // runs the server
	base    string     // the server's directory: data/, sock/, postgres.log
	dataDir string
	sockDir string
	logPath string
	port    int // fixed once the first start has succeeded
	shared  bool
	proc    *process
	dbSeq   atomic.Int64 // names NewDatabase's databases
}

// PostgresOptions configure a private server (StartPostgres).
type PostgresOptions struct {
	// MaxConnections is max_connections (default 200). When set, no connections are
	// reserved for superusers, so every role, the test superuser too, gets exactly
	// that many.
	MaxConnections int
	// Port is the TCP port on 127.0.0.1 (default: a free one).
	Port int
	// ExtraConf lines are appended to postgresql.conf, after the settings made
	// here, so they win; e.g. "ssl = on". Relative file names in them are relative
	// to the data directory; see Files.
	ExtraConf []string
	// Files are written into the data directory before the first start, owned by
	// the server's user with mode 0600 (as a server key must be), e.g.
	// {"server.crt": crt, "server.key": key} with ExtraConf "ssl = on".
	Files map[string][]byte
}

// SharedPostgres returns the one Postgres server of this test binary, starting it on
// first use. Tests share it, so each should use its own database (NewDatabase) and
// leave the server running: fault tests use StartPostgres. The package must run its
// tests through Main, which stops the server.
//
// A missing PostgreSQL skips the test (see Require). A server that failed to start
// fails this and every later caller with the same message.
func SharedPostgres(t testing.TB) *Postgres {
	t.Helper()
	if !mainRan.Load() {
		t.Fatal("testenv: SharedPostgres needs the package's tests to run under testenv.Main (or Run), which stops the server: " +
			"add func TestMain(m *testing.M) { testenv.Main(m) }")
	}
	binDir, ok := postgresBinDir()
	if !ok {
		missing(t, "PostgreSQL (initdb, postgres)", "postgresql")
	}
	u := postgresUser(t)

	shared.mu.Lock()
	defer shared.mu.Unlock()
	if shared.pg != nil {
		return shared.pg
	}
	if shared.pgErr != nil {
		t.Fatalf("testenv: the shared Postgres failed to start earlier: %v", shared.pgErr)
	}
	p, err := newPostgres(binDir, u, PostgresOptions{}, true)
	if err == nil {
		err = p.launch(false)
		if err != nil {
			err = fmt.Errorf("%w\n--- postgres log (%s) ---\n%s", err, p.logPath, logTail(p.logPath, 16<<10))
			p.kill()
			os.RemoveAll(p.base)
		}
	}
	if err != nil {
		shared.pgErr = err
		t.Fatalf("testenv: start shared Postgres: %v", err)
	}
	shared.pg = p
	return p
}

// StartPostgres starts a private Postgres server for one test, for faults that would
// disturb other tests: Stop, Kill, Start, a small max_connections, SSL. It is stopped
// and its files removed in t.Cleanup; its log is printed if the test failed.
// A missing PostgreSQL skips the test (see Require).
func StartPostgres(t testing.TB, opts PostgresOptions) *Postgres {
	t.Helper()
	binDir, ok := postgresBinDir()
	if !ok {
		missing(t, "PostgreSQL (initdb, postgres)", "postgresql")
	}
	u := postgresUser(t)
	p, err := newPostgres(binDir, u, opts, false)
	if err != nil {
		t.Fatalf("testenv: prepare Postgres: %v", err)
	}
	t.Cleanup(func() {
		if err := p.stop(); err != nil {
			t.Logf("testenv: stop Postgres: %v", err)
		}
		os.RemoveAll(p.base)
	})
	logOnFailure(t, "postgres", p.logPath)
	if err := p.launch(opts.Port != 0); err != nil {
		t.Fatalf("testenv: start Postgres: %v\n--- postgres log (%s) ---\n%s", err, p.logPath, logTail(p.logPath, 16<<10))
	}
	return p
}

// newPostgres prepares a data directory and configuration; it starts nothing.
func newPostgres(binDir string, u serverUser, opts PostgresOptions, isShared bool) (*Postgres, error) {
	base, err := makeServerDir("pg", u)
	if err != nil {
		return nil, err
	}
	p := &Postgres{
		binDir:  binDir,
		user:    u,
		base:    base,
		dataDir: filepath.Join(base, "data"),
		sockDir: filepath.Join(base, "sock"),
		logPath: filepath.Join(base, "postgres.log"),
		port:    opts.Port,
		shared:  isShared,
	}
	fail := func(err error) (*Postgres, error) {
		os.RemoveAll(base)
		return nil, err
	}
	if err := os.Mkdir(p.sockDir, 0o755); err != nil {
		return fail(err)
	}
	if err := os.Chown(p.sockDir, u.uid, u.gid); err != nil {
		return fail(err)
	}
	if err := p.makeDataDir(); err != nil {
		return fail(err)
	}
	// The shared server commits asynchronously: a commit returns before its WAL is
	// written. A private server is for fault tests, where Kill must not lose what was
	// committed, as it would not on a real server; with fsync off the wait is one write.
	syncCommit := "synchronous_commit = on"
	if isShared {
		syncCommit = "synchronous_commit = off"
	}
	maxConn := opts.MaxConnections
	if maxConn <= 0 {
		maxConn = defaultMaxConnections
	}
	conf := []string{
		"",
		"# testenv",
		"listen_addresses = '127.0.0.1'",
		"unix_socket_directories = '" + p.sockDir + "'",
		"max_connections = " + strconv.Itoa(maxConn),
		"shared_buffers = 16MB",
		// The data directory may be on a tmpfs: bound the WAL kept between checkpoints.
		"max_wal_size = 256MB",
		"min_wal_size = 32MB",
		// Without fsync a crash of the machine may lose data, a crash of Postgres
		// does not: its writes are in the kernel's page cache. Likewise for torn pages.
		"fsync = off",
		"full_page_writes = off",
		syncCommit,
		"wal_level = minimal",
		"max_wal_senders = 0",
		"jit = off",
		"timezone = 'UTC'",
		"log_timezone = 'UTC'",
		"lc_messages = 'C'",
		"log_line_prefix = '%m [%p] %q%u@%d '",
	}
	if opts.MaxConnections > 0 {
		// MaxConnections means that many for every role, superuser or not.
		conf = append(conf, "superuser_reserved_connections = 0")
	}
	conf = append(conf, opts.ExtraConf...)
	f, err := os.OpenFile(filepath.Join(p.dataDir, "postgresql.conf"), os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		return fail(err)
	}
	_, err = io.WriteString(f, strings.Join(conf, "\n")+"\n")
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fail(err)
	}
	for name, data := range opts.Files {
		if err := writeFileAs(filepath.Join(p.dataDir, name), data, 0o600, u); err != nil {
			return fail(err)
		}
	}
	p.proc = &process{
		name:     "postgres",
		path:     filepath.Join(binDir, "postgres"),
		cred:     u.cred,
		deathSig: syscall.SIGQUIT, // immediate shutdown: the postmaster takes its backends along
		logPath:  p.logPath,
	}
	return p, nil
}

// makeDataDir fills p.dataDir: a copy of the test binary's initdb'd template under
// Main (initdb takes most of a second, a copy a tenth of that), else a fresh initdb.
func (p *Postgres) makeDataDir() error {
	if !mainRan.Load() {
		return initdb(p.binDir, p.user, p.dataDir, p.base)
	}
	shared.templateMu.Lock()
	if shared.template == "" {
		dir, err := makeServerDir("pgtemplate", p.user)
		if err == nil {
			err = initdb(p.binDir, p.user, filepath.Join(dir, "data"), dir)
			if err != nil {
				os.RemoveAll(dir)
			}
		}
		if err != nil {
			shared.templateMu.Unlock()
			return err
		}
		shared.template = dir
	}
	template := filepath.Join(shared.template, "data")
	shared.templateMu.Unlock()
	return copyTree(template, p.dataDir)
}

// initdb creates a data directory with the test superuser.
func initdb(binDir string, u serverUser, dataDir, scratch string) error {
	pwfile := filepath.Join(scratch, "pwfile")
	if err := writeFileAs(pwfile, []byte(PostgresPassword+"\n"), 0o600, u); err != nil {
		return err
	}
	defer os.Remove(pwfile)
	cmd := exec.Command(filepath.Join(binDir, "initdb"),
		"-D", dataDir,
		"-U", PostgresUser,
		"--pwfile", pwfile,
		"--auth-local=trust",
		"--auth-host=scram-sha-256",
		"--encoding=UTF8",
		"--locale=C",
		"--no-sync",
	)
	cmd.Env = serverEnv()
	cmd.Dir = scratch
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: u.cred, Pdeathsig: syscall.SIGKILL}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := startCmd(cmd)
	if err == nil {
		err = cmd.Wait()
	}
	if err != nil {
		return fmt.Errorf("initdb: %w\n%s", err, out.Bytes())
	}
	return nil
}

// copyTree copies a directory tree of regular files, keeping modes and owners.
func copyTree(src, dst string) error {
	return filepath.WalkDir(src, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, path)
		target := filepath.Join(dst, rel)
		fi, err := d.Info()
		if err != nil {
			return err
		}
		st, _ := fi.Sys().(*syscall.Stat_t)
		switch {
		case d.IsDir():
			if err := os.Mkdir(target, fi.Mode().Perm()); err != nil {
				return err
			}
		case fi.Mode().IsRegular():
			if err := copyFile(path, target, fi.Mode().Perm()); err != nil {
				return err
			}
		default:
			return fmt.Errorf("copy %s: not a regular file or directory", path)
		}
		if st != nil {
			return os.Lchown(target, int(st.Uid), int(st.Gid))
		}
		return nil
	})
}

func copyFile(src, dst string, perm os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_WRONLY, perm)
	if err != nil {
		return err
	}
	_, err = io.Copy(out, in)
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	return err
}

// launch starts the postmaster and waits until it answers a query. With a port left
// to us (fixedPort false), a port that another process took meanwhile is replaced
// by a new free one, up to three times.
func (p *Postgres) launch(fixedPort bool) error {
	for attempt := 1; ; attempt++ {
		if p.port == 0 {
			port, err := freePort()
			if err != nil {
				return err
			}
			p.port = port
		}
		since := logSize(p.logPath)
		p.proc.args = []string{"-D", p.dataDir, "-p", strconv.Itoa(p.port)}
		if err := p.proc.start(); err != nil {
			return err
		}
		err := p.proc.waitReady(p.probe)
		if err == nil {
			return nil
		}
		p.kill()
		if fixedPort || attempt == 3 || !addrInUse(p.logPath, since) {
			return err
		}
		p.port = 0
	}
}

// probe connects as the superuser: it succeeds once the server accepts connections.
func (p *Postgres) probe(ctx context.Context) error {
	conn, err := pgx.Connect(ctx, p.AdminDSN()+"&connect_timeout=2")
	if err != nil {
		return err
	}
	return conn.Close(ctx)
}

// Addr returns the server's host:port on 127.0.0.1.
func (p *Postgres) Addr() string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(p.port)) }

// Port returns the server's TCP port.
func (p *Postgres) Port() int { return p.port }

// SocketDir returns the directory of the server's unix socket (libpq's host=DIR).
// Only root and the server's user can connect through it.
func (p *Postgres) SocketDir() string { return p.sockDir }

// DataDir returns the server's data directory, owned by the server's user.
func (p *Postgres) DataDir() string { return p.dataDir }

// AdminDSN returns a postgres:// URL for the superuser and the "postgres" database.
func (p *Postgres) AdminDSN() string { return p.DSN("postgres") }

// DSN returns a postgres:// URL for the superuser and database dbname.
func (p *Postgres) DSN(dbname string) string {
	u := url.URL{
		Scheme:   "postgres",
		User:     url.UserPassword(PostgresUser, PostgresPassword),
		Host:     p.Addr(),
		Path:     "/" + dbname,
		RawQuery: "sslmode=disable",
	}
	return u.String()
}

// Log returns the server's log so far (every run of it), for failure messages.
func (p *Postgres) Log() string {
	b, err := os.ReadFile(p.logPath)
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	return string(b)
}

// NewDatabase creates a new empty database, owned by the superuser, and returns its
// postgres:// URL (user, password, 127.0.0.1:port, sslmode=disable). On the shared
// server the database is dropped in t.Cleanup, with any connections still open to it.
func (p *Postgres) NewDatabase(t testing.TB) (dsn string) {
	t.Helper()
	name := databaseName(t.Name(), p.dbSeq.Add(1))
	p.Query(t, p.AdminDSN(), "CREATE DATABASE "+pgx.Identifier{name}.Sanitize())
	if p.shared {
		t.Cleanup(func() {
			if err := execSQL(p.AdminDSN(), "DROP DATABASE IF EXISTS "+pgx.Identifier{name}.Sanitize()+" WITH (FORCE)"); err != nil {
				t.Errorf("testenv: drop database %s: %v", name, err)
			}
		})
	}
	return p.DSN(name)
}

// databaseName makes a database name from a test name and a sequence number:
// lower case letters, digits and underscores, at most 63 bytes.
func databaseName(testName string, seq int64) string {
	var b strings.Builder
	b.WriteString("t_")
	for _, r := range strings.ToLower(testName) {
		if b.Len() >= 48 {
			break
		}
		if r >= 'a' && r <= 'z' || r >= '0' && r <= '9' {
			b.WriteRune(r)
		} else {
			b.WriteByte('_')
		}
	}
	return b.String() + "_" + strconv.FormatInt(seq, 10)
}

// Query runs one SQL command (with $1-style args) on a new connection to dsn, or to
// AdminDSN when dsn is "", and fails the test if it errs. Without args the SQL may
// hold several statements. It uses no named prepared statements, so it also works
// through PgBouncer in transaction mode.
func (p *Postgres) Query(t testing.TB, dsn, sql string, args ...any) {
	t.Helper()
	if dsn == "" {
		dsn = p.AdminDSN()
	}
	if err := execSQL(dsn, sql, args...); err != nil {
		t.Fatalf("testenv: %s: %v", oneLine(sql), err)
	}
}

// QueryRows runs a query like Query and returns every row's values as pgx decodes
// them (int64, string, time.Time, ...).
func (p *Postgres) QueryRows(t testing.TB, dsn, sql string, args ...any) [][]any {
	t.Helper()
	if dsn == "" {
		dsn = p.AdminDSN()
	}
	var out [][]any
	err := withConn(dsn, func(ctx context.Context, conn *pgx.Conn) error {
		rows, err := conn.Query(ctx, sql, args...)
		if err != nil {
			return err
		}
		defer rows.Close()
		for rows.Next() {
			vals, err := rows.Values()
			if err != nil {
				return err
			}
			out = append(out, vals)
		}
		return rows.Err()
	})
	if err != nil {
		t.Fatalf("testenv: %s: %v", oneLine(sql), err)
	}
	return out
}

func execSQL(dsn, sql string, args ...any) error {
	return withConn(dsn, func(ctx context.Context, conn *pgx.Conn) error {
		_, err := conn.Exec(ctx, sql, args...)
		return err
	})
}

// withConn runs fn on a new connection, in exec mode (unnamed statements only),
// within 30 seconds.
func withConn(dsn string, fn func(context.Context, *pgx.Conn) error) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		return err
	}
	cfg.DefaultQueryExecMode = pgx.QueryExecModeExec
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	return fn(ctx, conn)
}

func oneLine(sql string) string {
	sql = strings.Join(strings.Fields(sql), " ")
	if len(sql) > 80 {
		sql = sql[:77] + "..."
	}
	return sql
}

// Stop shuts the server down the way pg_ctl stop -m fast does (SIGINT to the
// postmaster: open transactions are rolled back, clients disconnected, a checkpoint
// written) and waits until it has exited. A stopped server is left alone.
func (p *Postgres) Stop(t testing.TB) {
	t.Helper()
	p.notShared(t, "Stop")
	if err := p.stop(); err != nil {
		t.Fatalf("testenv: stop Postgres: %v", err)
	}
}

// Kill SIGKILLs the postmaster and all its backends at once, as a power cut or an
// OOM kill of the whole server would, and waits until they are gone. The next Start
// runs crash recovery.
func (p *Postgres) Kill(t testing.TB) {
	t.Helper()
	p.notShared(t, "Kill")
	p.kill()
}

// Start starts a stopped or killed server again, on the same port and data
// directory, and waits until it accepts connections.
func (p *Postgres) Start(t testing.TB) {
	t.Helper()
	p.notShared(t, "Start")
	if err := p.launch(true); err != nil {
		t.Fatalf("testenv: restart Postgres: %v\n--- postgres log (%s) ---\n%s", err, p.logPath, logTail(p.logPath, 16<<10))
	}
}

func (p *Postgres) notShared(t testing.TB, op string) {
	t.Helper()
	if p.shared {
		t.Fatalf("testenv: %s on the shared Postgres would break other tests; use StartPostgres", op)
	}
}

// stop is a fast shutdown; after StartTimeout it kills the server instead.
func (p *Postgres) stop() error {
	err := p.proc.stop(syscall.SIGINT, StartTimeout)
	if err != nil {
		p.removeSharedMemory()
	}
	return err
}

// kill SIGKILLs the server's process group and removes the System V shared memory
// segment it leaves behind (a clean shutdown removes it; after a SIGKILL nothing does,
// and each one counts against the kernel's limit until reboot).
func (p *Postgres) kill() {
	p.proc.kill()
	p.removeSharedMemory()
}

// removeSharedMemory removes the segment named in postmaster.pid, if the file is
// still there (only after a crash) and nothing is attached to the segment.
func (p *Postgres) removeSharedMemory() {
	f, err := os.Open(filepath.Join(p.dataDir, "postmaster.pid"))
	if err != nil {
		return
	}
	defer f.Close()
	// Line 7 is "<key> <shmid>".
	sc := bufio.NewScanner(f)
	for i := 1; sc.Scan(); i++ {
		if i != 7 {
			continue
		}
		fields := strings.Fields(sc.Text())
		if len(fields) != 2 {
			return
		}
		id, err := strconv.Atoi(fields[1])
		if err != nil {
			return
		}
		var ds unix.SysvShmDesc
		if _, err := unix.SysvShmCtl(id, unix.IPC_STAT, &ds); err != nil || ds.Nattch != 0 {
			return
		}
		if _, err := unix.SysvShmCtl(id, unix.IPC_RMID, nil); err != nil && !errors.Is(err, unix.EINVAL) {
			return
		}
		return
	}
}
