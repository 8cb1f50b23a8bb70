//! A job record as the writer stores it: the whole row in its new state, so every write
//! is an idempotent upsert by job id guarded by the forward-only rule.

use chrono::{DateTime, Utc};

use crate::job::{Job, JobId, Kind, Lane, Status};

/// The state of one job to write.
#[derive(Debug, Clone)]
pub struct Record {
    /// Job id (the primary key).
    pub id: JobId,
    /// Kind.
    pub kind: Kind,
    /// Lane.
    pub lane: Lane,
    /// The status to move to.
    pub status: Status,
    /// The attempt this record belongs to (0 while queued).
    pub attempts: i32,
    /// Attempts allowed.
    pub max_attempts: i32,
    /// Priority.
    pub priority: Option<i32>,
    /// Payload, raw JSON.
    pub payload: String,
    /// Features, raw JSON.
    pub features: Option<String>,
    /// Predicted run time.
    pub predicted_ms: Option<i64>,
    /// Per-attempt timeout.
    pub timeout_ms: Option<i64>,
    /// When the job was submitted.
    pub submitted_at: DateTime<Utc>,
    /// When this attempt started.
    pub started_at: Option<DateTime<Utc>>,
    /// When the job finished (succeeded or dead).
    pub finished_at: Option<DateTime<Utc>>,
    /// Run time of this attempt.
    pub actual_ms: Option<i64>,
    /// Error of this attempt.
    pub error: Option<String>,
    /// Handler result, raw JSON.
    pub result: Option<String>,
}

/// The outcome of one record's write, known once its batch committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    /// Whether this record changed the row (created it or moved its status forward).
    pub applied: bool,
    /// The row's status after the write.
    pub status: Status,
    /// The row's attempts after the write.
    pub attempts: i32,
}

impl Record {
    /// A new record of `job` in `status`, with nothing measured yet.
    pub fn new(
        job: &Job,
        lane: Lane,
        status: Status,
        attempts: i32,
        max_attempts: u32,
        submitted_at: DateTime<Utc>,
    ) -> Record {
        Record {
            id: job.id,
            kind: job.kind.clone(),
            lane,
            status,
            attempts,
            max_attempts: max_attempts as i32,
            priority: job.priority,
            payload: job.payload.get().to_string(),
            features: job.features.as_ref().map(|f| f.get().to_string()),
            predicted_ms: job.predicted_ms.map(|v| v as i64),
            timeout_ms: job.timeout_ms.map(|v| v as i64),
            submitted_at,
            started_at: None,
            finished_at: None,
            actual_ms: None,
            error: None,
            result: None,
        }
    }

    /// The same job moved to `status`.
    pub fn moved(&self, status: Status) -> Record {
        Record { status, ..self.clone() }
    }
}
