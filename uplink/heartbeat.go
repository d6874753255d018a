package uplink

import (
	"context"
	"fmt"
	"time"
)

// sqlHeartbeat upserts the gateway's row. Times are sent as ages and turned
// into times by the server's clock, so a wrong gateway clock cannot fake
// health; the server's clock comes back for the clock-trust check.
const sqlHeartbeat = `
INSERT INTO sluice.gateways AS g (
    gateway_id, site, profile, version, started_at, last_seen,
    heartbeat_seconds, lag_alert_seconds, backlog_readings, backlog_bytes,
    oldest_backlog_at, last_upload_at, readings_in_total, uploaded_total,
    dropped_total, rejected_total, dead_letters, disk_free_bytes, clock_synced,
    last_error, buffer_recovered_at, buffer_lost_readings)
VALUES (
    $1, $2, $3, $4, now() - make_interval(secs => $5::float8), now(),
    $6, $7, $8, $9,
    now() - make_interval(secs => $10::float8), now() - make_interval(secs => $11::float8), $12, $13,
    $14, $15, $16, $17, $18,
    $19, now() - make_interval(secs => $20::float8), $21)
ON CONFLICT (gateway_id) DO UPDATE SET
    site = EXCLUDED.site, profile = EXCLUDED.profile, version = EXCLUDED.version,
    started_at = EXCLUDED.started_at, last_seen = EXCLUDED.last_seen,
    heartbeat_seconds = EXCLUDED.heartbeat_seconds, lag_alert_seconds = EXCLUDED.lag_alert_seconds,
    backlog_readings = EXCLUDED.backlog_readings, backlog_bytes = EXCLUDED.backlog_bytes,
    oldest_backlog_at = EXCLUDED.oldest_backlog_at, last_upload_at = EXCLUDED.last_upload_at,
    readings_in_total = EXCLUDED.readings_in_total, uploaded_total = EXCLUDED.uploaded_total,
    dropped_total = EXCLUDED.dropped_total, rejected_total = EXCLUDED.rejected_total,
    dead_letters = EXCLUDED.dead_letters, disk_free_bytes = EXCLUDED.disk_free_bytes,
    clock_synced = EXCLUDED.clock_synced, last_error = EXCLUDED.last_error,
    buffer_recovered_at = EXCLUDED.buffer_recovered_at, buffer_lost_readings = EXCLUDED.buffer_lost_readings
RETURNING clock_timestamp()`

var processStart = time.Now()

func (u *Uplink) heartbeatLoop(ctx context.Context) {
	t := time.NewTicker(u.opts.Heartbeat)
	defer t.Stop()
	lastPartitions := time.Now()
	for {
		if err := u.Heartbeat(ctx); err != nil && ctx.Err() == nil {
			u.opts.Logger.Debug("uplink heartbeat failed", "err", err)
		}
		if time.Since(lastPartitions) > time.Hour {
			if _, err := u.pool.Exec(ctx, "SELECT sluice.ensure_partitions($1)", u.opts.PartitionDaysAhead); err == nil {
				lastPartitions = time.Now()
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// nullableAge turns a time into seconds ago, nil for the zero time.
func nullableAge(t time.Time) any {
	if t.IsZero() {
		return nil
	}
	return max(0, time.Since(t).Seconds())
}

// Heartbeat upserts the gateway's row once.
func (u *Uplink) Heartbeat(ctx context.Context) error {
	if err := u.ensureSchema(ctx); err != nil {
		return err
	}
	st := u.src.Stats()
	rep := u.opts.Report()
	status := u.Status()
	var dropped int64
	for _, n := range st.Dropped {
		dropped += n
	}
	var oldest any
	if st.Readings > 0 {
		oldest = nullableAge(st.Oldest)
	}
	var recoveredAgo, lost any
	if rec := u.src.Recovered(); rec != nil {
		recoveredAgo, lost = nullableAge(rec.At), rec.LostReadings
	}
	var disk any
	if rep.DiskFreeBytes >= 0 {
		disk = rep.DiskFreeBytes
	}
	lastErr := ""
	if status.State == StateRetrying {
		lastErr = status.LastError
	}
	start := time.Now()
	var server time.Time
	err := u.pool.QueryRow(ctx, sqlHeartbeat,
		u.opts.GatewayID, u.opts.Site, u.opts.Profile, u.opts.Version, time.Since(processStart).Seconds(),
		u.opts.Heartbeat.Seconds(), u.opts.LagAlert.Seconds(), st.Readings, st.Bytes,
		oldest, nullableAge(status.LastUpload), rep.ReadingsIn, status.Uploaded,
		dropped, rep.Rejected, st.DeadLetters, disk, rep.ClockSynced,
		lastErr, recoveredAgo, lost,
	).Scan(&server)
	rtt := time.Since(start)
	if err != nil {
		return fmt.Errorf("heartbeat: %w", err)
	}
	if u.opts.OnServerTime != nil {
		u.opts.OnServerTime(start.Add(rtt/2), server, rtt)
	}
	u.mu.Lock()
	u.status.LastHeartbeat = time.Now()
	u.mu.Unlock()
	return nil
}
