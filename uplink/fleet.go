package uplink

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// FleetRow is one gateway in the central view: its uplink health and what
// its last heartbeat said.
type FleetRow struct {
	GatewayID       string     `json:"gateway_id"`
	Site            string     `json:"site"`
	Status          string     `json:"status"` // offline | stale | lagging | ok (sluice.uplink_health)
	LastSeen        time.Time  `json:"last_seen"`
	LastSeenAgo     float64    `json:"last_seen_seconds_ago"` // by the server's clock
	LagSeconds      float64    `json:"lag_seconds"`           // age of the oldest unsent reading
	OldestBacklogAt *time.Time `json:"oldest_backlog_at"`
	BacklogReadings int64      `json:"backlog_readings"`
	BacklogBytes    int64      `json:"backlog_bytes"`
	Dropped         int64      `json:"dropped_total"`
	Rejected        int64      `json:"rejected_total"`
	DeadLetters     int64      `json:"dead_letters"`
	Version         string     `json:"version"`
	ClockSynced     bool       `json:"clock_synced"`
	LastError       string     `json:"last_error,omitempty"`
	SensorsStale    int64      `json:"sensors_stale"`
	SensorGaps      int64      `json:"sensor_gaps"`
}

// sqlFleet reads one row per gateway, worst first: offline, stale,
// lagging, ok; within a status the largest lag and the longest silence first.
const sqlFleet = `
SELECT h.gateway_id, h.site, h.status, h.last_seen,
       greatest(0, extract(epoch FROM now() - h.last_seen))::float8,
       h.lag_seconds, g.oldest_backlog_at, h.backlog_readings, g.backlog_bytes,
       g.dropped_total, g.rejected_total, g.dead_letters, g.version, g.clock_synced, g.last_error,
       coalesce(s.stale, 0), coalesce(s.gaps, 0)
FROM sluice.uplink_health h
JOIN sluice.gateways g USING (gateway_id)
LEFT JOIN (
    SELECT gateway_id, count(*) FILTER (WHERE stale) AS stale, sum(gaps)::bigint AS gaps
    FROM sluice.sensors GROUP BY gateway_id
) s USING (gateway_id)
ORDER BY CASE h.status WHEN 'offline' THEN 0 WHEN 'stale' THEN 1 WHEN 'lagging' THEN 2 ELSE 3 END,
         h.lag_seconds DESC, h.last_seen, h.gateway_id`

// Fleet reads the central view of every gateway, worst first. It needs
// read access to sluice.uplink_health, sluice.gateways and sluice.sensors.
func Fleet(ctx context.Context, db Execer) ([]FleetRow, error) {
	rows, err := db.Query(ctx, sqlFleet)
	if err != nil {
		return nil, fmt.Errorf("fleet: query: %w", err)
	}
	out, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (FleetRow, error) {
		var r FleetRow
		err := row.Scan(&r.GatewayID, &r.Site, &r.Status, &r.LastSeen, &r.LastSeenAgo,
			&r.LagSeconds, &r.OldestBacklogAt, &r.BacklogReadings, &r.BacklogBytes,
			&r.Dropped, &r.Rejected, &r.DeadLetters, &r.Version, &r.ClockSynced, &r.LastError,
			&r.SensorsStale, &r.SensorGaps)
		return r, err
	})
	if err != nil {
		return nil, fmt.Errorf("fleet: read rows: %w", err)
	}
	return out, nil
}

// Connect opens one connection to the central database the way the uplink
// talks to it: unnamed statements only, so it works through PgBouncer.
func Connect(ctx context.Context, dsn string) (*pgx.Conn, error) {
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		// The parse error may quote the DSN; keep the password out of it.
		return nil, fmt.Errorf("dsn is not a valid Postgres connection string")
	}
	cfg.DefaultQueryExecMode = queryExecMode
	cfg.StatementCacheCapacity = 0
	cfg.DescriptionCacheCapacity = 0
	if cfg.ConnectTimeout == 0 {
		cfg.ConnectTimeout = 10 * time.Second
	}
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("connect: %w", err)
	}
	return conn, nil
}
