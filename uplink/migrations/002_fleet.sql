-- Sluice central schema, version 2: sensor health at the edge and a bounded
-- history of heartbeats for dashboards.

-- One row per sensor a gateway tracks, upserted by every heartbeat. last_seen
-- is computed by this server from the age the gateway sends; readings and
-- gaps count since the gateway last started.
CREATE TABLE sluice.sensors (
    gateway_id text        NOT NULL,
    sensor     text        NOT NULL,
    last_seen  timestamptz NOT NULL,
    readings   bigint      NOT NULL DEFAULT 0,
    gaps       bigint      NOT NULL DEFAULT 0,
    stale      boolean     NOT NULL DEFAULT false,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (gateway_id, sensor)
);

-- One row per heartbeat, for the same view over time (grafana/sluice-fleet.json).
-- Kept bounded: each heartbeat calls sluice.prune_heartbeats for its gateway.
CREATE TABLE sluice.gateway_heartbeats (
    gateway_id        text             NOT NULL,
    at                timestamptz      NOT NULL DEFAULT now(),
    backlog_readings  bigint           NOT NULL,
    backlog_bytes     bigint           NOT NULL,
    lag_seconds       double precision NOT NULL,
    readings_in_total bigint           NOT NULL,
    uploaded_total    bigint           NOT NULL,
    dropped_total     bigint           NOT NULL,
    rejected_total    bigint           NOT NULL,
    dead_letters      bigint           NOT NULL,
    disk_free_bytes   bigint,
    clock_synced      boolean          NOT NULL,
    sensors_stale     integer          NOT NULL,
    sensor_gaps       bigint           NOT NULL,
    PRIMARY KEY (gateway_id, at)
);

CREATE INDEX gateway_heartbeats_at ON sluice.gateway_heartbeats (at);

-- How long heartbeat history is kept. To keep another span:
--   CREATE OR REPLACE FUNCTION sluice.heartbeat_retention() RETURNS interval
--   LANGUAGE sql IMMUTABLE AS $$ SELECT interval '30 days' $$;
CREATE FUNCTION sluice.heartbeat_retention() RETURNS interval
LANGUAGE sql IMMUTABLE AS $$ SELECT interval '14 days' $$;

-- Deletes one gateway's history older than the retention. SECURITY DEFINER,
-- so a gateway role needs no DELETE grant; it only ever touches the rows of
-- the gateway id it is given.
CREATE FUNCTION sluice.prune_heartbeats(gw text) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n bigint;
BEGIN
    DELETE FROM sluice.gateway_heartbeats
    WHERE gateway_id = gw AND at < now() - sluice.heartbeat_retention();
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;
