-- The durable record of every job mlsched accepted (DESIGN.md, "Postgres").

CREATE TABLE jobs (
    id                uuid PRIMARY KEY,
    kind              text        NOT NULL,
    lane              text        NOT NULL,
    status            text        NOT NULL CHECK (status IN ('queued', 'running', 'failed', 'succeeded', 'dead', 'cancelled')),
    attempts          integer     NOT NULL DEFAULT 0,
    max_attempts      integer     NOT NULL,
    priority          integer,
    payload           jsonb       NOT NULL,
    features          jsonb,
    predicted_ms      bigint,
    actual_ms         bigint,
    timeout_ms        bigint,
    submitted_at      timestamptz NOT NULL,
    started_at        timestamptz,
    finished_at       timestamptz,
    last_heartbeat_at timestamptz,
    error             text,
    result            jsonb,
    updated_at        timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX jobs_status_kind_idx ON jobs (status, kind);
CREATE INDEX jobs_submitted_at_idx ON jobs (submitted_at);

-- Append-only history: one row per status change that was applied.
CREATE TABLE job_events (
    seq     bigserial   PRIMARY KEY,
    job_id  uuid        NOT NULL,
    status  text        NOT NULL,
    attempt integer     NOT NULL,
    error   text,
    at      timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX job_events_job_idx ON job_events (job_id, seq);

-- Status only moves forward; the same rule as mlsched::job::Status::is_forward.
CREATE FUNCTION mlsched_is_forward(cur_status text, cur_attempts integer, next_status text, next_attempts integer)
RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN cur_status IN ('succeeded', 'dead', 'cancelled') THEN false
        WHEN next_status IN ('succeeded', 'dead', 'cancelled') THEN true
        ELSE (next_attempts, CASE next_status WHEN 'queued' THEN 0 WHEN 'running' THEN 1 ELSE 2 END)
           > (cur_attempts,  CASE cur_status  WHEN 'queued' THEN 0 WHEN 'running' THEN 1 ELSE 2 END)
    END
$$;
