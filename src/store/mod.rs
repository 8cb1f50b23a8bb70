//! Postgres: the durable record of every job (`jobs`) and its history (`job_events`).
//!
//! Writes go through the group-committing [`Writer`]; this module owns the pool,
//! migrations and the read queries the CLI uses. Status only moves forward: the
//! `mlsched_is_forward` SQL function guards every write, so a redelivered message never
//! creates a second row or undoes a finished job.

mod record;
mod upsert;
mod writer;

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Row};
use thiserror::Error;
use tokio_util::sync::CancellationToken;

pub use record::{Commit, Record};
pub use writer::Writer;

use crate::config::DatabaseSettings;
use crate::job::JobId;

/// The embedded migrations (migrations/).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A store failure, by what the caller should do about it.
#[derive(Debug, Clone, Error)]
pub enum StoreError {
    /// The database is unreachable or restarting; the write was not committed.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The database refused this record for good (e.g. a payload jsonb cannot hold).
    #[error("database rejected the record: {0}")]
    Rejected(String),
    /// The writer stopped before the record was committed.
    #[error("store is shutting down; record not committed")]
    ShuttingDown,
}

impl StoreError {
    pub(crate) fn classify(e: &sqlx::Error) -> StoreError {
        match e {
            sqlx::Error::Database(db) => {
                let code = db.code().map(|c| c.to_string()).unwrap_or_default();
                // Only the record's own data can make a write fail for good: 21
                // cardinality, 22 data exception (e.g. a payload jsonb cannot hold), 23
                // integrity. Anything else (missing tables before `migrate`, a read-only
                // failover, timeouts, connection trouble) is retried until it clears.
                if code.starts_with("21") || code.starts_with("22") || code.starts_with("23") {
                    StoreError::Rejected(format!("{} ({code})", db.message()))
                } else {
                    StoreError::Unavailable(format!("{} ({code})", db.message()))
                }
            }
            other => StoreError::Unavailable(other.to_string()),
        }
    }
}

/// Builds a pool without connecting; the first query connects.
pub fn pool(settings: &DatabaseSettings) -> Result<PgPool, sqlx::Error> {
    let opts: PgConnectOptions = settings.url.expose().parse()?;
    Ok(PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(opts.application_name("mlsched")))
}

/// Waits until Postgres answers, retrying with backoff and logging each failure, or
/// until `cancel` fires.
pub async fn wait_until_reachable(pool: &PgPool, cancel: &CancellationToken) -> Result<(), StoreError> {
    let mut delay = Duration::from_millis(200);
    loop {
        match sqlx::query("SELECT 1").execute(pool).await {
            Ok(_) => return Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "Postgres unreachable; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => return Err(StoreError::ShuttingDown),
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Applies pending migrations.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// One row of `jobs`, as `mlsched status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct JobRow {
    /// Job id.
    pub id: uuid::Uuid,
    /// Kind.
    pub kind: String,
    /// Lane.
    pub lane: String,
    /// Status.
    pub status: String,
    /// Attempts made so far.
    pub attempts: i32,
    /// Attempts allowed.
    pub max_attempts: i32,
    /// Input.
    pub payload: serde_json::Value,
    /// Prediction features.
    pub features: Option<serde_json::Value>,
    /// Predicted run time.
    pub predicted_ms: Option<i64>,
    /// Measured run time of the last attempt.
    pub actual_ms: Option<i64>,
    /// When it was submitted.
    pub submitted_at: DateTime<Utc>,
    /// When the last attempt started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it finished.
    pub finished_at: Option<DateTime<Utc>>,
    /// Last heartbeat of a running attempt.
    pub last_heartbeat_at: Option<DateTime<Utc>>,
    /// Last error.
    pub error: Option<String>,
    /// Handler result.
    pub result: Option<serde_json::Value>,
}

/// One row of `job_events`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EventRow {
    /// Status entered.
    pub status: String,
    /// Attempt number.
    pub attempt: i32,
    /// Error, for failed and dead.
    pub error: Option<String>,
    /// When.
    pub at: DateTime<Utc>,
}

/// Reads a job's row.
pub async fn job(pool: &PgPool, id: JobId) -> Result<Option<JobRow>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT id, kind, lane, status, attempts, max_attempts, payload, features, predicted_ms, actual_ms,
                submitted_at, started_at, finished_at, last_heartbeat_at, error, result
         FROM jobs WHERE id = $1",
    )
    .bind(id.0)
    .fetch_optional(pool)
    .await?;
    row.map(|r| {
        Ok(JobRow {
            id: r.try_get("id")?,
            kind: r.try_get("kind")?,
            lane: r.try_get("lane")?,
            status: r.try_get("status")?,
            attempts: r.try_get("attempts")?,
            max_attempts: r.try_get("max_attempts")?,
            payload: r.try_get("payload")?,
            features: r.try_get("features")?,
            predicted_ms: r.try_get("predicted_ms")?,
            actual_ms: r.try_get("actual_ms")?,
            submitted_at: r.try_get("submitted_at")?,
            started_at: r.try_get("started_at")?,
            finished_at: r.try_get("finished_at")?,
            last_heartbeat_at: r.try_get("last_heartbeat_at")?,
            error: r.try_get("error")?,
            result: r.try_get("result")?,
        })
    })
    .transpose()
}

/// Reads a job's status history, oldest first.
pub async fn events(pool: &PgPool, id: JobId) -> Result<Vec<EventRow>, sqlx::Error> {
    let rows = sqlx::query("SELECT status, attempt, error, at FROM job_events WHERE job_id = $1 ORDER BY seq")
        .bind(id.0)
        .fetch_all(pool)
        .await?;
    rows.into_iter()
        .map(|r| {
            Ok(EventRow {
                status: r.try_get("status")?,
                attempt: r.try_get("attempt")?,
                error: r.try_get("error")?,
                at: r.try_get("at")?,
            })
        })
        .collect()
}

/// Number of jobs per status.
pub async fn status_counts(pool: &PgPool) -> Result<Vec<(String, i64)>, sqlx::Error> {
    let rows = sqlx::query("SELECT status, count(*) AS n FROM jobs GROUP BY status ORDER BY status")
        .fetch_all(pool)
        .await?;
    rows.into_iter()
        .map(|r| Ok((r.try_get("status")?, r.try_get("n")?)))
        .collect()
}
