package uplink

import (
	"context"
	"embed"
	"errors"
	"fmt"
	"io/fs"
	"sort"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

//go:embed migrations/*.sql
var migrationFiles embed.FS

// migrationLockKey names the advisory lock that serialises migrations across
// a fleet starting together. A transaction-level lock: a session lock would
// not hold through PgBouncer's transaction pooling.
const migrationLockKey = "sluice.migrate"

type migration struct {
	version int
	name    string
	sql     string
}

func migrations() ([]migration, error) {
	entries, err := fs.ReadDir(migrationFiles, "migrations")
	if err != nil {
		return nil, err
	}
	var ms []migration
	for _, e := range entries {
		num, _, ok := strings.Cut(e.Name(), "_")
		v, err := strconv.Atoi(num)
		if !ok || err != nil {
			return nil, fmt.Errorf("migration file %s: name must start with a version number", e.Name())
		}
		body, err := migrationFiles.ReadFile("migrations/" + e.Name())
		if err != nil {
			return nil, err
		}
		ms = append(ms, migration{version: v, name: e.Name(), sql: string(body)})
	}
	sort.Slice(ms, func(i, j int) bool { return ms[i].version < ms[j].version })
	for i, m := range ms {
		if m.version != i+1 {
			return nil, fmt.Errorf("migration %s: versions must run 1, 2, 3... without gaps", m.name)
		}
	}
	return ms, nil
}

// SchemaVersion is the schema version this build needs.
func SchemaVersion() int {
	ms, err := migrations()
	if err != nil || len(ms) == 0 {
		return 0
	}
	return ms[len(ms)-1].version
}

// Execer runs statements on a pool, a connection or a transaction.
type Execer interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// Beginner starts transactions: *pgxpool.Pool and *pgx.Conn.
type Beginner interface {
	Begin(ctx context.Context) (pgx.Tx, error)
}

// Migrate brings the sluice schema up to SchemaVersion in one transaction
// under an advisory transaction lock, so gateways starting together apply
// each migration once. It returns the version found before and after.
func Migrate(ctx context.Context, db Beginner) (from, to int, err error) {
	ms, err := migrations()
	if err != nil {
		return 0, 0, err
	}
	tx, err := db.Begin(ctx)
	if err != nil {
		return 0, 0, fmt.Errorf("migrate: begin: %w", err)
	}
	defer func() { _ = tx.Rollback(context.WithoutCancel(ctx)) }()
	if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock(hashtext($1))", migrationLockKey); err != nil {
		return 0, 0, fmt.Errorf("migrate: take lock: %w", err)
	}
	if _, err := tx.Exec(ctx, `CREATE SCHEMA IF NOT EXISTS sluice;
CREATE TABLE IF NOT EXISTS sluice.schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)`, pgx.QueryExecModeSimpleProtocol); err != nil {
		return 0, 0, fmt.Errorf("migrate: create schema: %w", err)
	}
	if err := tx.QueryRow(ctx, "SELECT coalesce(max(version), 0) FROM sluice.schema_migrations").Scan(&from); err != nil {
		return 0, 0, fmt.Errorf("migrate: read version: %w", err)
	}
	if from > len(ms) {
		return from, from, fmt.Errorf("migrate: schema is at version %d, newer than this build's %d: upgrade sluice", from, len(ms))
	}
	for _, m := range ms[from:] {
		if _, err := tx.Exec(ctx, m.sql, pgx.QueryExecModeSimpleProtocol); err != nil {
			return from, from, fmt.Errorf("migrate: apply %s: %w", m.name, err)
		}
		if _, err := tx.Exec(ctx, "INSERT INTO sluice.schema_migrations (version, name) VALUES ($1, $2)", m.version, m.name); err != nil {
			return from, from, fmt.Errorf("migrate: record %s: %w", m.name, err)
		}
	}
	if err := tx.Commit(ctx); err != nil {
		return from, from, fmt.Errorf("migrate: commit: %w", err)
	}
	return from, len(ms), nil
}

// CurrentVersion reads the applied schema version, 0 when there is no schema.
func CurrentVersion(ctx context.Context, db Execer) (int, error) {
	var v int
	err := db.QueryRow(ctx, `SELECT coalesce((SELECT max(version) FROM sluice.schema_migrations), 0)`).Scan(&v)
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "42P01" { // undefined_table
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("read schema version: %w", err)
	}
	return v, nil
}

// ensureSchema migrates, or, for a gateway role that may not change the
// schema, accepts a schema that an owner already brought up to date.
func ensureSchema(ctx context.Context, db interface {
	Beginner
	Execer
}) (int, error) {
	_, to, err := Migrate(ctx, db)
	if err == nil {
		return to, nil
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "42501" { // insufficient_privilege
		v, verr := CurrentVersion(ctx, db)
		if verr == nil && v >= SchemaVersion() {
			return v, nil
		}
		return v, fmt.Errorf("schema at version %d, this build needs %d, and this role may not migrate (run `sluice migrate --dsn` with the schema owner): %w", v, SchemaVersion(), err)
	}
	return 0, err
}
