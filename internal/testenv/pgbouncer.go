package testenv

import (
	"context"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// StartPgBouncer starts PgBouncer in transaction pooling mode in front of pg, on a free
// port on 127.0.0.1, and returns dsn rewritten to go through it: same user, password
// and database. Every database of pg is reachable through it, as the user of dsn.
//
// Like the PgBouncer 1.18 of Debian 12 it does not carry named prepared statements
// across transactions: connect with pgx's QueryExecModeExec (or SimpleProtocol), as
// the uplink does. The DSN deliberately does not set that mode for you.
//
// It is stopped in t.Cleanup; its log is printed if the test failed. A missing
// pgbouncer skips the test (see Require).
func StartPgBouncer(t testing.TB, pg *Postgres, dsn string) (bouncerDSN string) {
	t.Helper()
	bin, ok := findBinary("pgbouncer")
	if !ok {
		missing(t, "pgbouncer", "pgbouncer")
	}
	cfg, err := pgconn.ParseConfig(dsn)
	if err != nil {
		t.Fatalf("testenv: StartPgBouncer: parse dsn: %v", err)
	}
	u := postgresUser(t)
	dir, err := makeServerDir("pgbouncer", u)
	if err != nil {
		t.Fatalf("testenv: StartPgBouncer: %v", err)
	}
	b := &pgBouncer{
		dir:  dir,
		user: cfg.User,
		pass: cfg.Password,
		db:   cfg.Database,
		pg:   pg,
		proc: &process{
			name:     "pgbouncer",
			path:     bin,
			args:     []string{filepath.Join(dir, "pgbouncer.ini")},
			cred:     u.cred,
			deathSig: syscall.SIGKILL,
			logPath:  filepath.Join(dir, "pgbouncer.log"),
		},
	}
	t.Cleanup(func() {
		// SIGTERM is PgBouncer's immediate shutdown.
		if err := b.proc.stop(syscall.SIGTERM, StartTimeout); err != nil {
			t.Logf("testenv: stop pgbouncer: %v", err)
		}
		os.RemoveAll(dir)
	})
	logOnFailure(t, "pgbouncer", b.proc.logPath)
	quote := func(s string) string { return `"` + strings.ReplaceAll(s, `"`, `""`) + `"` }
	userlist := quote(cfg.User) + " " + quote(cfg.Password) + "\n"
	if err := writeFileAs(filepath.Join(dir, "userlist.txt"), []byte(userlist), 0o600, u); err != nil {
		t.Fatalf("testenv: StartPgBouncer: %v", err)
	}
	if err := b.launch(u); err != nil {
		t.Fatalf("testenv: start pgbouncer: %v\n--- pgbouncer log (%s) ---\n%s", err, b.proc.logPath, logTail(b.proc.logPath, 16<<10))
	}
	return b.dsn()
}

type pgBouncer struct {
	dir            string
	user, pass, db string
	pg             *Postgres
	port           int
	proc           *process
}

// launch writes the configuration and starts PgBouncer; a port that another process
// took meanwhile is replaced, up to three times.
func (b *pgBouncer) launch(u serverUser) error {
	for attempt := 1; ; attempt++ {
		port, err := freePort()
		if err != nil {
			return err
		}
		b.port = port
		ini := strings.Join([]string{
			"[databases]",
			// Any database name the client asks for, on pg.
			"* = host=127.0.0.1 port=" + strconv.Itoa(b.pg.Port()),
			"",
			"[pgbouncer]",
			"listen_addr = 127.0.0.1",
			"listen_port = " + strconv.Itoa(port),
			"unix_socket_dir =",
			"auth_type = scram-sha-256",
			"auth_file = " + filepath.Join(b.dir, "userlist.txt"),
			"admin_users = " + b.user,
			"pool_mode = transaction",
			"max_client_conn = 1000",
			"default_pool_size = 20",
			// Try the server again one second after a failed login (default 15 s), so
			// a test that restarts Postgres behind PgBouncer does not wait long.
			"server_login_retry = 1",
			"ignore_startup_parameters = extra_float_digits",
			"log_connections = 1",
			"log_disconnections = 1",
			"",
		}, "\n")
		if err := writeFileAs(filepath.Join(b.dir, "pgbouncer.ini"), []byte(ini), 0o600, u); err != nil {
			return err
		}
		since := logSize(b.proc.logPath)
		if err := b.proc.start(); err != nil {
			return err
		}
		err = b.proc.waitReady(b.probe)
		if err == nil {
			return nil
		}
		b.proc.kill()
		if attempt == 3 || !addrInUse(b.proc.logPath, since) {
			return err
		}
	}
}

// probe runs a query through PgBouncer: it succeeds once PgBouncer listens and can
// log in to the server.
func (b *pgBouncer) probe(ctx context.Context) error {
	cfg, err := pgx.ParseConfig(b.dsn() + "&connect_timeout=2")
	if err != nil {
		return err
	}
	cfg.DefaultQueryExecMode = pgx.QueryExecModeSimpleProtocol
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	var one int
	if err := conn.QueryRow(ctx, "SELECT 1").Scan(&one); err != nil {
		return fmt.Errorf("query through pgbouncer: %w", err)
	}
	return nil
}

func (b *pgBouncer) dsn() string {
	u := url.URL{
		Scheme:   "postgres",
		User:     url.UserPassword(b.user, b.pass),
		Host:     net.JoinHostPort("127.0.0.1", strconv.Itoa(b.port)),
		Path:     "/" + b.db,
		RawQuery: "sslmode=disable",
	}
	return u.String()
}
