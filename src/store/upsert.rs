//! The one statement that writes a batch of job records: an upsert by id guarded by
//! `mlsched_is_forward`, which also appends a `job_events` row per applied change and
//! reports each record's outcome.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use super::{Commit, Record};
use crate::job::{events_subject, JobId, Status};

const UPSERT: &str = r#"
WITH input AS (
    SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int4[], $6::int4[], $7::int4[],
                         $8::text[], $9::text[], $10::int8[], $11::int8[], $12::timestamptz[], $13::timestamptz[],
                         $14::timestamptz[], $15::int8[], $16::text[], $17::text[])
        AS t(id, kind, lane, status, attempts, max_attempts, priority, payload, features, predicted_ms, timeout_ms,
             submitted_at, started_at, finished_at, actual_ms, error, result)
),
up AS (
    INSERT INTO jobs AS j (id, kind, lane, status, attempts, max_attempts, priority, payload, features, predicted_ms,
                           timeout_ms, submitted_at, started_at, finished_at, last_heartbeat_at, actual_ms, error, result)
    SELECT id, kind, lane, status, attempts, max_attempts, priority, payload::jsonb, features::jsonb, predicted_ms,
           timeout_ms, submitted_at, started_at, finished_at, CASE WHEN status = 'running' THEN started_at END,
           actual_ms, error, result::jsonb
    FROM input
    ON CONFLICT (id) DO UPDATE SET
        status            = EXCLUDED.status,
        attempts          = GREATEST(j.attempts, EXCLUDED.attempts),
        lane              = EXCLUDED.lane,
        started_at        = COALESCE(EXCLUDED.started_at, j.started_at),
        finished_at       = EXCLUDED.finished_at,
        last_heartbeat_at = COALESCE(EXCLUDED.last_heartbeat_at, j.last_heartbeat_at),
        actual_ms         = COALESCE(EXCLUDED.actual_ms, j.actual_ms),
        error             = CASE WHEN EXCLUDED.status = 'succeeded' THEN NULL ELSE COALESCE(EXCLUDED.error, j.error) END,
        result            = COALESCE(EXCLUDED.result, j.result),
        predicted_ms      = COALESCE(j.predicted_ms, EXCLUDED.predicted_ms),
        updated_at        = now()
    WHERE mlsched_is_forward(j.status, j.attempts, EXCLUDED.status, EXCLUDED.attempts)
    RETURNING j.id, j.status, j.attempts
),
ev AS (
    INSERT INTO job_events (job_id, status, attempt, error)
    SELECT up.id, up.status, up.attempts, i.error FROM up JOIN input i ON i.id = up.id
)
SELECT id, status, attempts FROM up
"#;

/// The current state of jobs a batch did not change (rare: duplicates, redeliveries,
/// records that were not a step forward).
const CURRENT: &str = "SELECT id, status, attempts FROM jobs WHERE id = ANY($1)";

pub(super) async fn execute(pool: &PgPool, records: &[&Record]) -> Result<Vec<(JobId, Commit)>, sqlx::Error> {
    let n = records.len();
    let mut ids: Vec<Uuid> = Vec::with_capacity(n);
    let mut kinds: Vec<&str> = Vec::with_capacity(n);
    let mut lanes: Vec<&str> = Vec::with_capacity(n);
    let mut statuses: Vec<&str> = Vec::with_capacity(n);
    let mut attempts: Vec<i32> = Vec::with_capacity(n);
    let mut max_attempts: Vec<i32> = Vec::with_capacity(n);
    let mut priority: Vec<Option<i32>> = Vec::with_capacity(n);
    let mut payload: Vec<&str> = Vec::with_capacity(n);
    let mut features: Vec<Option<&str>> = Vec::with_capacity(n);
    let mut predicted: Vec<Option<i64>> = Vec::with_capacity(n);
    let mut timeout: Vec<Option<i64>> = Vec::with_capacity(n);
    let mut submitted: Vec<DateTime<Utc>> = Vec::with_capacity(n);
    let mut started: Vec<Option<DateTime<Utc>>> = Vec::with_capacity(n);
    let mut finished: Vec<Option<DateTime<Utc>>> = Vec::with_capacity(n);
    let mut actual: Vec<Option<i64>> = Vec::with_capacity(n);
    let mut error: Vec<Option<&str>> = Vec::with_capacity(n);
    let mut result: Vec<Option<&str>> = Vec::with_capacity(n);
    for r in records {
        ids.push(r.id.0);
        kinds.push(r.kind.as_str());
        lanes.push(r.lane.as_str());
        statuses.push(r.status.as_str());
        attempts.push(r.attempts);
        max_attempts.push(r.max_attempts);
        priority.push(r.priority);
        payload.push(&r.payload);
        features.push(r.features.as_deref());
        predicted.push(r.predicted_ms);
        timeout.push(r.timeout_ms);
        submitted.push(r.submitted_at);
        started.push(r.started_at);
        finished.push(r.finished_at);
        actual.push(r.actual_ms);
        error.push(r.error.as_deref());
        result.push(r.result.as_deref());
    }
    let rows = sqlx::query(UPSERT)
        .bind(&ids)
        .bind(kinds)
        .bind(lanes)
        .bind(statuses)
        .bind(attempts)
        .bind(max_attempts)
        .bind(priority)
        .bind(payload)
        .bind(features)
        .bind(predicted)
        .bind(timeout)
        .bind(submitted)
        .bind(started)
        .bind(finished)
        .bind(actual)
        .bind(error)
        .bind(result)
        .fetch_all(pool)
        .await?;
    let mut state: HashMap<Uuid, Commit> = HashMap::with_capacity(n);
    read_states(&rows, true, &mut state)?;
    // The ones not applied report the job's current state, read after the commit (the
    // status only moves forward, so that is as good as the state the upsert saw).
    let unchanged: Vec<Uuid> = ids.iter().filter(|id| !state.contains_key(id)).copied().collect();
    if !unchanged.is_empty() {
        let rows = sqlx::query(CURRENT).bind(&unchanged).fetch_all(pool).await?;
        read_states(&rows, false, &mut state)?;
    }
    ids.iter()
        .map(|id| {
            state
                .remove(id)
                .map(|c| (JobId(*id), c))
                .ok_or_else(|| sqlx::Error::Protocol(format!("job {id}: neither written nor found")))
        })
        .collect()
}

fn read_states(
    rows: &[sqlx::postgres::PgRow],
    applied: bool,
    out: &mut HashMap<Uuid, Commit>,
) -> Result<(), sqlx::Error> {
    for row in rows {
        let id: Uuid = row.try_get("id")?;
        let status: String = row.try_get("status")?;
        let status = status
            .parse::<Status>()
            .map_err(|_| sqlx::Error::Protocol(format!("job {id}: unknown status {status:?}")))?;
        out.insert(
            id,
            Commit {
                applied,
                status,
                attempts: row.try_get("attempts")?,
            },
        );
    }
    Ok(())
}

pub(super) fn event_json(r: &Record, c: &Commit) -> (String, Vec<u8>) {
    let body = serde_json::json!({
        "id": r.id,
        "kind": r.kind,
        "lane": r.lane,
        "status": c.status,
        "attempts": c.attempts,
        "error": r.error,
        "at": Utc::now(),
    });
    (events_subject(&r.kind), body.to_string().into_bytes())
}
