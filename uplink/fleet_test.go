package uplink

import (
	"context"
	"encoding/json"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/sluice-gw/sluice/internal/testenv"
)

// migratedDB is a fresh database with the sluice schema.
func migratedDB(t *testing.T) (*testenv.Postgres, string) {
	t.Helper()
	pg := testenv.SharedPostgres(t)
	dsn := pg.NewDatabase(t)
	ctx := context.Background()
	conn, err := Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	if _, _, err := Migrate(ctx, conn); err != nil {
		t.Fatal(err)
	}
	return pg, dsn
}

// TestFleetWorstFirst: one row per gateway, offline before stale before
// lagging before ok, with the heartbeat's figures and the sensor summary.
func TestFleetWorstFirst(t *testing.T) {
	pg, dsn := migratedDB(t)
	pg.Query(t, dsn, `INSERT INTO sluice.gateways (gateway_id, site, last_seen, heartbeat_seconds, lag_alert_seconds,
	    backlog_readings, backlog_bytes, oldest_backlog_at, dropped_total, dead_letters, last_error) VALUES
	  ('gw-ok',      's1', now(),                       30, 60, 0,    0,     NULL,                          0, 0, ''),
	  ('gw-lag-1',   's1', now(),                       30, 60, 10,   1000,  now() - interval '5 minutes',  0, 0, ''),
	  ('gw-lag-2',   's2', now(),                       30, 60, 500,  50000, now() - interval '50 minutes', 7, 1, ''),
	  ('gw-stale',   's2', now() - interval '2 minutes', 30, 60, 0,    0,     NULL,                          0, 0, ''),
	  ('gw-offline', 's3', now() - interval '1 hour',   30, 60, 3,    300,   now() - interval '2 hours',    0, 0, 'dial tcp: refused')`)
	pg.Query(t, dsn, `INSERT INTO sluice.sensors (gateway_id, sensor, last_seen, readings, gaps, stale) VALUES
	  ('gw-lag-2', 'a', now(), 10, 2, false), ('gw-lag-2', 'b', now() - interval '1 hour', 5, 3, true)`)
	conn, err := Connect(context.Background(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	rows, err := Fleet(context.Background(), conn)
	if err != nil {
		t.Fatal(err)
	}
	var order []string
	for _, r := range rows {
		order = append(order, r.GatewayID+":"+r.Status)
	}
	if got, want := strings.Join(order, " "), "gw-offline:offline gw-stale:stale gw-lag-2:lagging gw-lag-1:lagging gw-ok:ok"; got != want {
		t.Fatalf("order %s, want %s", got, want)
	}
	lag := rows[2]
	if lag.BacklogReadings != 500 || lag.BacklogBytes != 50000 || lag.Dropped != 7 || lag.DeadLetters != 1 ||
		lag.SensorsStale != 1 || lag.SensorGaps != 5 || lag.LagSeconds < 2999 || lag.OldestBacklogAt == nil {
		t.Fatalf("gw-lag-2 row %+v", lag)
	}
	if off := rows[0]; off.LastError != "dial tcp: refused" || off.LastSeenAgo < 3599 {
		t.Fatalf("gw-offline row %+v", off)
	}
	if ok := rows[4]; ok.LagSeconds != 0 || ok.OldestBacklogAt != nil || ok.SensorGaps != 0 {
		t.Fatalf("gw-ok row %+v", ok)
	}
}

// TestHeartbeatHistoryAndSensors: each heartbeat adds a history row, keeps
// the history bounded, and upserts the sensors with server-side times.
func TestHeartbeatHistoryAndSensors(t *testing.T) {
	pg, dsn := migratedDB(t)
	sensors := []SensorReport{{Sensor: "meter-1", LastSeenAge: 5, Readings: 10, Gaps: 2}, {Sensor: "pump-2", LastSeenAge: 3600, Readings: 1, Stale: true}}
	u := newUplink(t, dsn, openBuffer(t), func(o *Options) {
		o.Report = func() Report {
			return Report{ReadingsIn: 11, ClockSynced: true, DiskFreeBytes: 1 << 30, Sensors: sensors}
		}
	})
	ctx := context.Background()
	if err := u.Heartbeat(ctx); err != nil {
		t.Fatal(err)
	}
	if st := u.Status(); st.State != StateUp || st.LastSuccess.IsZero() {
		t.Fatalf("after a heartbeat the uplink is %+v, want up", st)
	}
	sensors[0].Readings, sensors[0].Gaps = 12, 3
	if err := u.Heartbeat(ctx); err != nil {
		t.Fatal(err)
	}
	if n := count(t, dsn, "SELECT count(*) FROM sluice.gateway_heartbeats WHERE gateway_id = 'gw-test' AND sensors_stale = 1 AND readings_in_total = 11"); n != 2 {
		t.Fatalf("%d history rows, want 2", n)
	}
	if n := count(t, dsn, `SELECT count(*) FROM sluice.sensors WHERE gateway_id = 'gw-test' AND sensor = 'meter-1' AND readings = 12 AND gaps = 3
	    AND NOT stale AND last_seen BETWEEN now() - interval '10 seconds' AND now() - interval '4 seconds'`); n != 1 {
		t.Fatalf("meter-1 not upserted with a server-side last_seen")
	}
	if n := count(t, dsn, "SELECT count(*) FROM sluice.sensors WHERE sensor = 'pump-2' AND stale AND last_seen < now() - interval '59 minutes'"); n != 1 {
		t.Fatalf("pump-2 not stored stale")
	}
	// Rows past the retention go at the next heartbeat; other gateways' stay.
	pg.Query(t, dsn, `INSERT INTO sluice.gateway_heartbeats (gateway_id, at, backlog_readings, backlog_bytes, lag_seconds,
	    readings_in_total, uploaded_total, dropped_total, rejected_total, dead_letters, clock_synced, sensors_stale, sensor_gaps)
	  SELECT g, now() - interval '20 days', 0, 0, 0, 0, 0, 0, 0, 0, true, 0, 0 FROM unnest(ARRAY['gw-test', 'gw-other']) g`)
	if err := u.Heartbeat(ctx); err != nil {
		t.Fatal(err)
	}
	if n := count(t, dsn, "SELECT count(*) FROM sluice.gateway_heartbeats WHERE at < now() - sluice.heartbeat_retention()"); n != 1 {
		t.Fatalf("%d rows past the retention, want only gw-other's", n)
	}
}

// TestHeartbeatFailureMarksUplink: an idle uplink learns of an outage from
// its heartbeat.
func TestHeartbeatFailureMarksUplink(t *testing.T) {
	pg := testenv.SharedPostgres(t)
	proxy := testenv.StartProxy(t, pg.Addr())
	dsn := pg.NewDatabase(t)
	u := newUplink(t, replaceHost(t, dsn, proxy.Addr()), openBuffer(t), nil)
	ctx := context.Background()
	if err := u.Heartbeat(ctx); err != nil {
		t.Fatal(err)
	}
	proxy.Cut()
	hctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := u.Heartbeat(hctx); err == nil {
		t.Fatal("heartbeat through a cut link succeeded")
	}
	if st := u.Status(); st.State != StateRetrying || st.LastError == "" {
		t.Fatalf("uplink %+v after a failed heartbeat, want retrying", st)
	}
	proxy.Heal()
	if err := u.Heartbeat(ctx); err != nil {
		t.Fatal(err)
	}
	if st := u.Status(); st.State != StateUp {
		t.Fatalf("uplink %s after the link healed, want up", st.State)
	}
}

// TestGrafanaDashboardQueries runs every query of grafana/sluice-fleet.json
// against the real schema, with Grafana's macros expanded as its Postgres
// data source does.
func TestGrafanaDashboardQueries(t *testing.T) {
	pg, dsn := migratedDB(t)
	u := newUplink(t, dsn, openBuffer(t), func(o *Options) {
		o.Report = func() Report { return Report{Sensors: []SensorReport{{Sensor: "s", Stale: true, Gaps: 4}}} }
	})
	for range 2 {
		if err := u.Heartbeat(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	data, err := os.ReadFile("../grafana/sluice-fleet.json")
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		UID        string `json:"uid"`
		Templating struct {
			List []struct {
				Name, Query string
				Type        string `json:"type"`
			} `json:"list"`
		} `json:"templating"`
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				RawSQL string `json:"rawSql"`
				Format string `json:"format"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(data, &dash); err != nil {
		t.Fatalf("dashboard JSON: %v", err)
	}
	expand := strings.NewReplacer(
		"$__timeFilter(at)", "at BETWEEN now() - interval '1 day' AND now() + interval '1 minute'",
		"$__timeGroupAlias(at, '5m')", "to_timestamp(floor(extract(epoch FROM at) / 300) * 300) AS time",
		"${gateway:sqlstring}", "'gw-test','gw-none'",
	)
	queries := map[string]string{}
	for _, v := range dash.Templating.List {
		if v.Type == "query" {
			queries["variable "+v.Name] = v.Query
		}
	}
	for _, p := range dash.Panels {
		for _, tg := range p.Targets {
			queries[p.Title] = tg.RawSQL
		}
	}
	if dash.UID == "" || len(queries) < 8 {
		t.Fatalf("dashboard uid %q with %d queries", dash.UID, len(queries))
	}
	for title, sql := range queries {
		sql = expand.Replace(sql)
		if strings.Contains(sql, "$") {
			t.Errorf("%s: unexpanded macro in %s", title, sql)
			continue
		}
		rows := pg.QueryRows(t, dsn, sql)
		if len(rows) == 0 {
			t.Errorf("%s: no rows from %s", title, sql)
		}
	}
}
