package uplink

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
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

// sqlHistory records the heartbeat in the bounded history the dashboard reads.
const sqlHistory = `
INSERT INTO sluice.gateway_heartbeats (
    gateway_id, backlog_readings, backlog_bytes, lag_seconds, readings_in_total,
    uploaded_total, dropped_total, rejected_total, dead_letters, disk_free_bytes,
    clock_synced, sensors_stale, sensor_gaps)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
ON CONFLICT (gateway_id, at) DO NOTHING`

// sqlSensors upserts the tracked sensors; last_seen arrives as an age.
const sqlSensors = `
INSERT INTO sluice.sensors AS s (gateway_id, sensor, last_seen, readings, gaps, stale, updated_at)
SELECT $1, u.sensor, now() - make_interval(secs => u.age), u.readings, u.gaps, u.stale, now()
FROM unnest($2::text[], $3::float8[], $4::int8[], $5::int8[], $6::bool[]) AS u(sensor, age, readings, gaps, stale)
ON CONFLICT (gateway_id, sensor) DO UPDATE SET
    last_seen = EXCLUDED.last_seen, readings = EXCLUDED.readings, gaps = EXCLUDED.gaps,
    stale = EXCLUDED.stale, updated_at = EXCLUDED.updated_at`

// SensorReport is one sensor's health as the heartbeat uploads it.
type SensorReport struct {
	Sensor      string
	LastSeenAge float64 // seconds since the sensor was last heard
	Readings    int64   // since the gateway started
	Gaps        int64   // since the gateway started
	Stale       bool
}

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
		recoveredAgo = nullableAge(rec.At)
		if rec.LostReadings >= 0 { // -1: the file was too damaged to count; NULL says unknown
			lost = rec.LostReadings
		}
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
		if ctx.Err() == nil {
			// An idle uplink learns of an outage only from its heartbeat.
			u.failed(err, u.opts.Heartbeat)
		}
		return fmt.Errorf("heartbeat: %w", err)
	}
	if status.State != StateRetrying || st.Readings == 0 {
		// The database is reachable; an upload failure still pending (a
		// backlog that did not go) keeps the uplink retrying until it goes.
		u.succeeded(0)
	}
	if u.opts.OnServerTime != nil {
		u.opts.OnServerTime(start.Add(rtt/2), server, rtt)
	}
	u.mu.Lock()
	u.status.LastHeartbeat = time.Now()
	u.mu.Unlock()
	// The gateway row is in; history and sensors follow in a transaction of
	// their own, so a role without grants on them still reports its health.
	lag := 0.0
	if st.Readings > 0 && !st.Oldest.IsZero() {
		lag = max(0, time.Since(st.Oldest).Seconds())
	}
	if err := pgx.BeginFunc(ctx, u.pool, func(tx pgx.Tx) error {
		return writeHeartbeatExtras(ctx, tx, u.opts.GatewayID, rep, heartbeatFigures{
			backlogReadings: st.Readings, backlogBytes: st.Bytes, lagSeconds: lag, uploaded: status.Uploaded,
			dropped: dropped, deadLetters: st.DeadLetters, disk: disk,
		})
	}); err != nil {
		return fmt.Errorf("heartbeat history and sensors: %w", err)
	}
	return nil
}

// heartbeatFigures are the buffer's and uplink's numbers of one heartbeat.
type heartbeatFigures struct {
	backlogReadings, backlogBytes int64
	lagSeconds                    float64
	uploaded, dropped             int64
	deadLetters                   int64
	disk                          any // nil when unknown
}

func writeHeartbeatExtras(ctx context.Context, tx pgx.Tx, gatewayID string, rep Report, f heartbeatFigures) error {
	var stale, gaps int64
	names := make([]string, len(rep.Sensors))
	ages := make([]float64, len(rep.Sensors))
	readings := make([]int64, len(rep.Sensors))
	sensorGaps := make([]int64, len(rep.Sensors))
	stales := make([]bool, len(rep.Sensors))
	for i, s := range rep.Sensors {
		names[i], ages[i], readings[i], sensorGaps[i], stales[i] = s.Sensor, s.LastSeenAge, s.Readings, s.Gaps, s.Stale
		gaps += s.Gaps
		if s.Stale {
			stale++
		}
	}
	if _, err := tx.Exec(ctx, sqlHistory, gatewayID, f.backlogReadings, f.backlogBytes, f.lagSeconds, rep.ReadingsIn,
		f.uploaded, f.dropped, rep.Rejected, f.deadLetters, f.disk, rep.ClockSynced, stale, gaps); err != nil {
		return fmt.Errorf("insert history: %w", err)
	}
	if _, err := tx.Exec(ctx, "SELECT sluice.prune_heartbeats($1)", gatewayID); err != nil {
		return fmt.Errorf("prune history: %w", err)
	}
	if len(names) > 0 {
		if _, err := tx.Exec(ctx, sqlSensors, gatewayID, names, ages, readings, sensorGaps, stales); err != nil {
			return fmt.Errorf("upsert sensors: %w", err)
		}
	}
	return nil
}
