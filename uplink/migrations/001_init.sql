-- Sluice central schema, version 1.

CREATE TABLE sluice.readings (
    gateway_id   text             NOT NULL,
    site         text             NOT NULL,
    name         text             NOT NULL,
    sensor       text             NOT NULL,
    metric       text             NOT NULL,
    unit         text             NOT NULL DEFAULT '',
    ts           timestamptz      NOT NULL,
    value        double precision,
    value_text   text,
    value_bool   boolean,
    value_data   bytea,
    value_sum    double precision,
    sensor_seq   bigint,
    received_at  timestamptz      NOT NULL,
    clock_synced boolean          NOT NULL,
    -- The natural key: a redelivered or retransmitted reading is one row.
    CONSTRAINT readings_natural_key UNIQUE (site, name, unit, ts)
) PARTITION BY RANGE (ts);

-- Times no daily partition covers (a backlog from long ago, a clock that was
-- never synchronised) land here instead of being refused.
CREATE TABLE sluice.readings_default PARTITION OF sluice.readings DEFAULT;

CREATE INDEX readings_gateway_ts ON sluice.readings (gateway_id, ts);

-- One row per buffer stream: acked_seq advances in the same transaction
-- that inserts the stream's readings.
CREATE TABLE sluice.streams (
    stream_id  uuid        PRIMARY KEY,
    gateway_id text        NOT NULL,
    acked_seq  bigint      NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- One row per gateway, upserted by every heartbeat. Times a gateway reports
-- are sent as ages and turned into times by this server's clock, so a wrong
-- gateway clock cannot fake health.
CREATE TABLE sluice.gateways (
    gateway_id         text PRIMARY KEY,
    site               text        NOT NULL,
    profile            text        NOT NULL DEFAULT '',
    version            text        NOT NULL DEFAULT '',
    started_at         timestamptz,
    last_seen          timestamptz NOT NULL,
    heartbeat_seconds  double precision NOT NULL,
    lag_alert_seconds  double precision NOT NULL,
    backlog_readings   bigint      NOT NULL DEFAULT 0,
    backlog_bytes      bigint      NOT NULL DEFAULT 0,
    oldest_backlog_at  timestamptz,
    last_upload_at     timestamptz,
    readings_in_total  bigint      NOT NULL DEFAULT 0,
    uploaded_total     bigint      NOT NULL DEFAULT 0,
    dropped_total      bigint      NOT NULL DEFAULT 0,
    rejected_total     bigint      NOT NULL DEFAULT 0,
    dead_letters       bigint      NOT NULL DEFAULT 0,
    disk_free_bytes    bigint,
    clock_synced       boolean     NOT NULL DEFAULT false,
    last_error         text        NOT NULL DEFAULT '',
    -- Beyond the first contract: a damaged buffer file moved aside.
    buffer_recovered_at   timestamptz,
    buffer_lost_readings  bigint
);

CREATE VIEW sluice.uplink_health AS
SELECT g.gateway_id,
       g.site,
       CASE
           WHEN g.last_seen < now() - make_interval(secs => 10 * g.heartbeat_seconds) THEN 'offline'
           WHEN g.last_seen < now() - make_interval(secs => 2 * g.heartbeat_seconds) THEN 'stale'
           WHEN l.lag_seconds > g.lag_alert_seconds THEN 'lagging'
           ELSE 'ok'
       END AS status,
       g.last_seen,
       l.lag_seconds,
       g.backlog_readings
FROM sluice.gateways g
CROSS JOIN LATERAL (
    SELECT CASE
               WHEN g.backlog_readings > 0 AND g.oldest_backlog_at IS NOT NULL
                   THEN greatest(0, extract(epoch FROM now() - g.oldest_backlog_at))::double precision
               ELSE 0
           END AS lag_seconds
) l;

-- Daily partitions ahead of time. SECURITY DEFINER so that a gateway role
-- that may only insert readings can still call it; a day whose rows already
-- sit in the default partition is left there.
CREATE FUNCTION sluice.ensure_partitions(days_ahead integer) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    d date;
    part text;
    created integer := 0;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('sluice.ensure_partitions'));
    FOR i IN 0 .. greatest(days_ahead, 0) LOOP
        d := (now() AT TIME ZONE 'UTC')::date + i;
        part := 'readings_' || to_char(d, 'YYYYMMDD');
        IF to_regclass('sluice.' || part) IS NULL THEN
            BEGIN
                EXECUTE format(
                    'CREATE TABLE sluice.%I PARTITION OF sluice.readings FOR VALUES FROM (%L) TO (%L)',
                    part, d::timestamp AT TIME ZONE 'UTC', (d + 1)::timestamp AT TIME ZONE 'UTC');
                created := created + 1;
            EXCEPTION WHEN check_violation THEN
                -- Rows for that day are already in the default partition.
                NULL;
            END;
        END IF;
    END LOOP;
    RETURN created;
END
$$;
