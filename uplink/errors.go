package uplink

import (
	"errors"
	"strings"

	"github.com/jackc/pgx/v5/pgconn"
)

// errClass is how the uplink reacts to a failed batch.
type errClass int

const (
	// classRetry: the connection or the server failed; the batch is fine.
	// Retry with backoff, never give up.
	classRetry errClass = iota
	// classOverload: the server says it is overloaded; retry and slow down.
	classOverload
	// classContent: Postgres refused the data itself; bisect the batch to
	// isolate the readings it refuses.
	classContent
)

// isUniqueViolation reports SQLSTATE 23505: a natural key already stored.
func isUniqueViolation(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == "23505"
}

// classify decides once, here, what a Postgres error means for the batch.
func classify(err error) errClass {
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) {
		return classRetry // network, TLS, timeouts, a closed pool
	}
	switch {
	case strings.HasPrefix(pgErr.Code, "22"), // data exception: out of range, bad encoding
		strings.HasPrefix(pgErr.Code, "23"), // integrity constraint violation
		pgErr.Code == "54000":               // program limit exceeded, e.g. an index row too large
		return classContent
	case strings.HasPrefix(pgErr.Code, "53"), // insufficient resources, too many connections
		pgErr.Code == "57P03": // cannot connect now
		return classOverload
	}
	return classRetry
}

// errSummary is an error's text for status and heartbeat, bounded in size.
func errSummary(err error) string {
	if err == nil {
		return ""
	}
	s := err.Error()
	if len(s) > 300 {
		s = s[:300] + "…"
	}
	return s
}
