//! The group-committing writer: a cloneable handle in front of one task that writes
//! job records in batches, one statement per batch.
//!
//! Each record's caller gets a signal when its batch has committed, and only then acks
//! the message. A batch is what is queued when the writer is free, topped up for at
//! most `store.linger_ms` and capped at `store.batch_max`; while a few batches commit
//! the next one fills, so batches grow with load. When Postgres is unreachable the batch is
//! retried with backoff until it commits or the hard stop fires; a record Postgres
//! refuses for good is isolated so the rest of its batch still commits. After a commit
//! the writer publishes one `jobs.events.<kind>` message per status change.

use std::collections::HashMap;
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use super::upsert::{event_json, execute};
use super::{Commit, Record, StoreError};
use crate::config::StoreSettings;
use crate::job::JobId;
use crate::telemetry::metrics::{STORE_BATCH_SIZE, STORE_COMMIT, STORE_ERRORS};

struct Pending {
    record: Record,
    done: oneshot::Sender<Result<Commit, StoreError>>,
    /// The caller's span, so the write shows up in the job's trace (tracing on only).
    span: Option<tracing::Span>,
}

fn caller_span() -> Option<tracing::Span> {
    crate::telemetry::trace::enabled().then(tracing::Span::current)
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
            .send(Op::Write(Pending {
                record,
                done,
                span: caller_span(),
            }))
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
            match self
                .tx
                .send(Op::Write(Pending {
                    record,
                    done,
                    span: caller_span(),
                }))
                .await
            {
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

/// Batches being written at once. One would leave the writer idle while a commit
/// waits for its fsync; a few let the next batches go out meanwhile, so one process's
/// throughput is not one batch per commit latency. Rows are locked in id order within
/// each statement, so concurrent batches cannot deadlock, and a caller's next record
/// for a job is only sent after the previous one committed.
const IN_FLIGHT: usize = 4;

type Work<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>;

impl Task {
    async fn run(self, mut rx: mpsc::Receiver<Op>) {
        let mut batch: Vec<Pending> = Vec::with_capacity(self.batch_max);
        let mut touches: Vec<(JobId, i32)> = Vec::new();
        let mut inflight: FuturesUnordered<Work<'_>> = FuturesUnordered::new();
        fn take(op: Op, batch: &mut Vec<Pending>, touches: &mut Vec<(JobId, i32)>) {
            match op {
                Op::Write(p) => batch.push(p),
                Op::Touch(id, attempt) => touches.push((id, attempt)),
            }
        }
        loop {
            // The next record, while the batches in flight go on committing.
            let first = loop {
                tokio::select! {
                    op = rx.recv() => break op,
                    Some(()) = inflight.next(), if !inflight.is_empty() => {}
                }
            };
            let Some(first) = first else { break };
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
                        Some(()) = inflight.next(), if !inflight.is_empty() => {}
                        _ = tokio::time::sleep_until(deadline) => break,
                    }
                }
            }
            if !batch.is_empty() {
                while inflight.len() >= IN_FLIGHT {
                    inflight.next().await;
                }
                inflight.push(Box::pin(self.commit(std::mem::take(&mut batch))));
            }
            let beats = std::mem::take(&mut touches);
            if !beats.is_empty() {
                inflight.push(Box::pin(self.touch(beats)));
            }
        }
        while inflight.next().await.is_some() {}
        tracing::debug!("store writer stopped");
    }

    async fn touch(&self, beats: Vec<(JobId, i32)>) {
        let (ids, attempts): (Vec<Uuid>, Vec<i32>) = beats.into_iter().map(|(id, a)| (id.0, a)).unzip();
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

        // One child span per traced record, open for as long as its batch is written.
        let write_spans: Vec<tracing::Span> = batch
            .iter()
            .filter_map(|p| p.span.as_ref())
            .map(|parent| {
                tracing::info_span!(
                    parent: parent,
                    "store.write",
                    otel.kind = "client",
                    db.system.name = "postgresql",
                    db.operation.name = "upsert",
                    db.collection.name = "jobs",
                    db.operation.batch.size = records.len(),
                )
            })
            .collect();
        let results: HashMap<JobId, Result<Commit, StoreError>> = match self.execute_with_retry(&records).await {
            Ok(commits) => commits.into_iter().map(|(id, c)| (id, Ok(c))).collect(),
            Err(StoreError::Rejected(_)) if records.len() > 1 => {
                let mut out = HashMap::with_capacity(records.len());
                for r in &records {
                    let res = self.execute_with_retry(&[*r]).await.map(|mut v| v.remove(0).1);
                    out.insert(r.id, res);
                }
                out
            }
            Err(e) => records.iter().map(|r| (r.id, Err(e.clone()))).collect(),
        };

        drop(write_spans); // the spans end when the batch has committed
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

    async fn execute_with_retry(&self, records: &[&Record]) -> Result<Vec<(JobId, Commit)>, StoreError> {
        let mut delay = Duration::from_millis(100);
        // After the hard stop a statement gets a last few seconds, so a half-open
        // connection cannot hold the shutdown forever.
        let deadline = async {
            self.hard_stop.cancelled().await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        };
        tokio::pin!(deadline);
        loop {
            let started = std::time::Instant::now();
            let result = tokio::select! {
                r = execute(&self.pool, records) => r,
                _ = &mut deadline => return Err(StoreError::ShuttingDown),
            };
            match result {
                Ok(v) => {
                    metrics::histogram!(STORE_BATCH_SIZE).record(records.len() as f64);
                    metrics::histogram!(STORE_COMMIT).record(started.elapsed().as_secs_f64());
                    return Ok(v);
                }
                Err(e) => match StoreError::classify(&e) {
                    StoreError::Unavailable(msg) => {
                        metrics::counter!(STORE_ERRORS, "error" => "unavailable").increment(1);
                        tracing::warn!(error = %msg, records = records.len(), retry_in_ms = delay.as_millis() as u64,
                            "Postgres write failed; holding acks and retrying");
                        tokio::select! {
                            _ = self.hard_stop.cancelled() => return Err(StoreError::ShuttingDown),
                            _ = tokio::time::sleep(delay) => {}
                        }
                        delay = (delay * 2).min(Duration::from_secs(5));
                    }
                    other => {
                        metrics::counter!(STORE_ERRORS, "error" => "rejected").increment(1);
                        return Err(other);
                    }
                },
            }
        }
    }
}
