//! The group-committing writer: a cloneable handle in front of one task that writes
//! job records in batches, one statement per batch.
//!
//! Each record's caller gets a signal when its batch has committed, and only then acks
//! the message. A batch is what is queued when the writer is free, topped up for at
//! most `store.linger_ms` and capped at `store.batch_max`; while one batch commits the
//! next one fills, so batches grow with load. When Postgres is unreachable the batch is
//! retried with backoff until it commits or the hard stop fires; a record Postgres
//! refuses for good is isolated so the rest of its batch still commits. After a commit
//! the writer publishes one `jobs.events.<kind>` message per status change.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use super::{Commit, Record, StoreError};
use crate::config::StoreSettings;
use crate::job::{events_subject, JobId, Status};

struct Pending {
    record: Record,
    done: oneshot::Sender<Result<Commit, StoreError>>,
}

// Nearly every op is a write; boxing it would cost an allocation per record.
#[allow(clippy::large_enum_variant)]
enum Op {
    Write(Pending),
    /// A running attempt is alive: refresh `last_heartbeat_at` (best effort).
    Touch(JobId, i32),
}

/// Handle to the writer task. Clone it freely; the task stops (after writing what is
/// queued) when the last handle is dropped.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Op>,
}

impl Writer {
    /// Starts the writer task on `tracker`. `events` receives status-change
    /// notifications; `hard_stop` makes pending writes fail with
    /// [`StoreError::ShuttingDown`] instead of retrying.
    pub fn spawn(
        pool: PgPool,
        events: Option<async_nats::Client>,
        settings: &StoreSettings,
        hard_stop: CancellationToken,
        tracker: &TaskTracker,
    ) -> Writer {
        let (tx, rx) = mpsc::channel(settings.batch_max * 4);
        let task = Task {
            pool,
            events,
            batch_max: settings.batch_max,
            linger: Duration::from_millis(settings.linger_ms),
            hard_stop,
        };
        tracker.spawn(task.run(rx));
        Writer { tx }
    }

    /// Writes one record; resolves once its batch has committed.
    pub async fn write(&self, record: Record) -> Result<Commit, StoreError> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Op::Write(Pending { record, done }))
            .await
            .map_err(|_| StoreError::ShuttingDown)?;
        rx.await.unwrap_or(Err(StoreError::ShuttingDown))
    }

    /// Writes many records (they may share batches); resolves when all have committed,
    /// with one result per record in order.
    pub async fn write_all(&self, records: Vec<Record>) -> Vec<Result<Commit, StoreError>> {
        let mut waits = Vec::with_capacity(records.len());
        for record in records {
            let (done, rx) = oneshot::channel();
            match self.tx.send(Op::Write(Pending { record, done })).await {
                Ok(()) => waits.push(Some(rx)),
                Err(_) => waits.push(None),
            }
        }
        let mut out = Vec::with_capacity(waits.len());
        for w in waits {
            out.push(match w {
                Some(rx) => rx.await.unwrap_or(Err(StoreError::ShuttingDown)),
                None => Err(StoreError::ShuttingDown),
            });
        }
        out
    }

    /// Writes a `dead` record. If Postgres refuses the job's own data (say, a payload
    /// `jsonb` cannot hold), the record is written again without payload, features or
    /// result, so a job that can never be stored can still be recorded dead.
    pub async fn write_dead(&self, mut record: Record) -> Result<Commit, StoreError> {
        match self.write(record.clone()).await {
            Err(StoreError::Rejected(e)) => {
                record.payload = "null".into();
                record.features = None;
                record.result = None;
                let reason = record.error.take().unwrap_or_default();
                record.error = Some(format!("{reason} (payload not stored: {e})"));
                self.write(record).await
            }
            other => other,
        }
    }

    /// Records that attempt `attempt` of job `id` is still running. Never waits: when
    /// the writer is backed up the heartbeat is skipped (the next one will do).
    pub fn touch(&self, id: JobId, attempt: i32) {
        let _ = self.tx.try_send(Op::Touch(id, attempt));
    }
}

struct Task {
    pool: PgPool,
    events: Option<async_nats::Client>,
    batch_max: usize,
    linger: Duration,
    hard_stop: CancellationToken,
}

impl Task {
    async fn run(self, mut rx: mpsc::Receiver<Op>) {
        let mut batch: Vec<Pending> = Vec::with_capacity(self.batch_max);
        let mut touches: Vec<(JobId, i32)> = Vec::new();
        fn take(op: Op, batch: &mut Vec<Pending>, touches: &mut Vec<(JobId, i32)>) {
            match op {
                Op::Write(p) => batch.push(p),
                Op::Touch(id, attempt) => touches.push((id, attempt)),
            }
        }
        while let Some(first) = rx.recv().await {
            take(first, &mut batch, &mut touches);
            while batch.len() < self.batch_max {
                match rx.try_recv() {
                    Ok(op) => take(op, &mut batch, &mut touches),
                    Err(_) => break,
                }
            }
            if !self.linger.is_zero() && !batch.is_empty() && batch.len() < self.batch_max {
                let deadline = Instant::now() + self.linger;
                while batch.len() < self.batch_max {
                    tokio::select! {
                        op = rx.recv() => match op {
                            Some(op) => take(op, &mut batch, &mut touches),
                            None => break,
                        },
                        _ = tokio::time::sleep_until(deadline) => break,
                    }
                }
            }
            if !batch.is_empty() {
                self.commit(std::mem::take(&mut batch)).await;
            }
            let beats = std::mem::take(&mut touches);
            if !beats.is_empty() {
                self.touch(beats).await;
            }
        }
        tracing::debug!("store writer stopped");
    }

    async fn touch(&self, beats: Vec<(JobId, i32)>) {
        let (ids, attempts): (Vec<Uuid>, Vec<i32>) =
            beats.into_iter().map(|(id, a)| (id.0, a)).unzip();
        let res = sqlx::query(
            "UPDATE jobs SET last_heartbeat_at = now()
             FROM UNNEST($1::uuid[], $2::int4[]) AS t(id, attempts)
             WHERE jobs.id = t.id AND jobs.status = 'running' AND jobs.attempts = t.attempts",
        )
        .bind(ids)
        .bind(attempts)
        .execute(&self.pool)
        .await;
        if let Err(e) = res {
            tracing::debug!(error = %e, "heartbeats not recorded");
        }
    }

    async fn commit(&self, batch: Vec<Pending>) {
        // One row per id per statement: keep the most forward record of each id.
        let mut winner: HashMap<JobId, usize> = HashMap::with_capacity(batch.len());
        for (i, p) in batch.iter().enumerate() {
            let r = &p.record;
            winner
                .entry(r.id)
                .and_modify(|w| {
                    let cur = &batch[*w].record;
                    if cur.status.is_forward(cur.attempts, r.status, r.attempts) {
                        *w = i;
                    }
                })
                .or_insert(i);
        }
        // Lock rows in id order, so concurrent writers cannot deadlock.
        let mut idx: Vec<usize> = winner.values().copied().collect();
        idx.sort_unstable_by_key(|&i| batch[i].record.id);
        let records: Vec<&Record> = idx.iter().map(|&i| &batch[i].record).collect();

        let results: HashMap<JobId, Result<Commit, StoreError>> =
            match self.execute_with_retry(&records).await {
                Ok(commits) => commits.into_iter().map(|(id, c)| (id, Ok(c))).collect(),
                Err(StoreError::Rejected(_)) if records.len() > 1 => {
                    let mut out = HashMap::with_capacity(records.len());
                    for r in &records {
                        let res = self
                            .execute_with_retry(&[*r])
                            .await
                            .map(|mut v| v.remove(0).1);
                        out.insert(r.id, res);
                    }
                    out
                }
                Err(e) => records.iter().map(|r| (r.id, Err(e.clone()))).collect(),
            };

        let mut published = Vec::new();
        for (i, p) in batch.into_iter().enumerate() {
            let is_winner = winner.get(&p.record.id) == Some(&i);
            let res = match results.get(&p.record.id) {
                Some(Ok(c)) => Ok(Commit {
                    applied: c.applied && is_winner,
                    ..*c
                }),
                Some(Err(e)) => Err(e.clone()),
                None => Err(StoreError::ShuttingDown),
            };
            if let Ok(c) = &res {
                if c.applied {
                    published.push(event_json(&p.record, c));
                }
            }
            // The caller may have given up (hard stop); nothing to do then.
            let _ = p.done.send(res);
        }
        if let Some(client) = &self.events {
            for (subject, body) in published {
                if let Err(e) = client.publish(subject, body.into()).await {
                    tracing::debug!(error = %e, "status event not published");
                }
            }
        }
    }

    async fn execute_with_retry(
        &self,
        records: &[&Record],
    ) -> Result<Vec<(JobId, Commit)>, StoreError> {
        let mut delay = Duration::from_millis(100);
        // After the hard stop a statement gets a last few seconds, so a half-open
        // connection cannot hold the shutdown forever.
        let deadline = async {
            self.hard_stop.cancelled().await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        };
        tokio::pin!(deadline);
        loop {
            let result = tokio::select! {
                r = execute(&self.pool, records) => r,
                _ = &mut deadline => return Err(StoreError::ShuttingDown),
            };
            match result {
                Ok(v) => return Ok(v),
                Err(e) => match StoreError::classify(&e) {
                    StoreError::Unavailable(msg) => {
                        tracing::warn!(error = %msg, records = records.len(), retry_in_ms = delay.as_millis() as u64,
                            "Postgres write failed; holding acks and retrying");
                        tokio::select! {
                            _ = self.hard_stop.cancelled() => return Err(StoreError::ShuttingDown),
                            _ = tokio::time::sleep(delay) => {}
                        }
                        delay = (delay * 2).min(Duration::from_secs(5));
                    }
                    other => return Err(other),
                },
            }
        }
    }
}

const UPSERT: &str = r#"
WITH input AS (
    SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int4[], $6::int4[], $7::int4[],
                         $8::text[], $9::text[], $10::int8[], $11::int8[], $12::timestamptz[], $13::timestamptz[],
                         $14::timestamptz[], $15::int8[], $16::text[], $17::text[])
        AS t(id, kind, lane, status, attempts, max_attempts, priority, payload, features, predicted_ms, timeout_ms,
             submitted_at, started_at, finished_at, actual_ms, error, result)
),
prior AS (SELECT j.id, j.status, j.attempts FROM jobs j JOIN input i ON j.id = i.id),
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
SELECT i.id, (up.id IS NOT NULL) AS applied, COALESCE(up.status, p.status) AS status,
       COALESCE(up.attempts, p.attempts) AS attempts
FROM input i LEFT JOIN up ON up.id = i.id LEFT JOIN prior p ON p.id = i.id
"#;

async fn execute(pool: &PgPool, records: &[&Record]) -> Result<Vec<(JobId, Commit)>, sqlx::Error> {
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
        .bind(ids)
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
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let id: Uuid = row.try_get("id")?;
        let applied: bool = row.try_get("applied")?;
        let status: Option<String> = row.try_get("status")?;
        let attempts: Option<i32> = row.try_get("attempts")?;
        let status = status
            .as_deref()
            .and_then(|s| s.parse::<Status>().ok())
            .ok_or_else(|| sqlx::Error::Protocol(format!("job {id}: row changed concurrently")))?;
        out.push((
            JobId(id),
            Commit {
                applied,
                status,
                attempts: attempts.unwrap_or(0),
            },
        ));
    }
    Ok(out)
}

fn event_json(r: &Record, c: &Commit) -> (String, Vec<u8>) {
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
