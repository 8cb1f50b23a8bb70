//! The job model and its wire names: validated identifiers, statuses, subjects and
//! header names.
//!
//! Every subject mlsched publishes or subscribes to is built by a function here, so the
//! contract in DESIGN.md ("Subjects and streams") lives in one place. The envelope (the
//! JSON body producers publish) is in [`envelope`].

pub mod envelope;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use uuid::Uuid;

pub use envelope::{Envelope, EnvelopeError, Job};

/// Header carrying the job id; JetStream deduplicates on it.
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";
/// Header on dead letters: why the job was dead-lettered.
pub const ERROR_HEADER: &str = "Mlsched-Error";
/// Header on dead letters: how many attempts were made.
pub const ATTEMPTS_HEADER: &str = "Mlsched-Attempts";
/// Header on dead letters: the subject the job was originally published to.
pub const SUBJECT_HEADER: &str = "Mlsched-Subject";
/// Header on `jobs.run.*` messages: the predicted run time, ms.
pub const PREDICTED_MS_HEADER: &str = "Mlsched-Predicted-Ms";
/// Header on `jobs.run.*` messages: the predicted upper bound of the run time, ms.
pub const PREDICTED_UPPER_MS_HEADER: &str = "Mlsched-Predicted-Upper-Ms";
/// Header on `jobs.run.*` messages: when the job was first submitted (RFC 3339).
pub const SUBMITTED_AT_HEADER: &str = "Mlsched-Submitted-At";

/// Stream that receives `jobs.submit.<kind>`.
pub const SUBMIT_STREAM: &str = "JOBS_SUBMIT";
/// Stream that receives `jobs.run.<lane>.<kind>`.
pub const RUN_STREAM: &str = "JOBS_RUN";
/// Stream that receives `jobs.dead.<kind>`.
pub const DEAD_STREAM: &str = "JOBS_DEAD";
/// Stream that receives `jobs.events.<kind>`.
pub const EVENTS_STREAM: &str = "JOBS_EVENTS";
/// Internal stream that keeps the server's max-deliveries advisories until handled.
pub const ADVISORY_STREAM: &str = "JOBS_ADVISORIES";
/// Durable consumer of the predictor on `JOBS_SUBMIT`.
pub const PREDICTOR_CONSUMER: &str = "predictor";
/// Kind token used on `jobs.dead.*` when a body arrived on a subject whose last token
/// is not a valid kind.
pub const INVALID_KIND_TOKEN: &str = "_invalid";

/// `jobs.submit.<kind>`
pub fn submit_subject(kind: &Kind) -> String {
    format!("jobs.submit.{kind}")
}

/// `jobs.run.<lane>.<kind>`
pub fn run_subject(lane: &Lane, kind: &Kind) -> String {
    format!("jobs.run.{lane}.{kind}")
}

/// `jobs.run.<lane>.>`: the filter of a lane's executor consumer.
pub fn run_lane_filter(lane: &Lane) -> String {
    format!("jobs.run.{lane}.>")
}

/// `jobs.dead.<token>`; `token` is a kind, or [`INVALID_KIND_TOKEN`].
pub fn dead_subject(token: &str) -> String {
    format!("jobs.dead.{token}")
}

/// `jobs.events.<kind>`
pub fn events_subject(kind: &Kind) -> String {
    format!("jobs.events.{kind}")
}

/// `jobs.events.>`: every status change.
pub const EVENTS_WILDCARD: &str = "jobs.events.>";

/// The name of a lane's executor consumer: `executor-<lane>`.
pub fn executor_consumer(lane: &Lane) -> String {
    format!("executor-{lane}")
}

/// The advisory subject the server publishes when a message of `consumer` on `stream`
/// reaches its MaxDeliver.
pub fn max_deliveries_advisory(stream: &str, consumer: &str) -> String {
    format!("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.{consumer}")
}

/// The last token of a subject, which names the job's kind.
pub fn kind_token(subject: &str) -> &str {
    subject.rsplit('.').next().unwrap_or(subject)
}

/// The lane token of a `jobs.run.<lane>.<kind>` subject.
pub fn lane_token(subject: &str) -> Option<&str> {
    let mut parts = subject.split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("jobs"), Some("run"), Some(lane), Some(_), None) => Some(lane),
        _ => None,
    }
}

/// A contract string that failed validation.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NameError {
    /// A kind or lane is not `[a-z0-9_-]{1,64}`.
    #[error("{what} {value:?} is not a valid token: use 1 to 64 characters of a-z, 0-9, '_' or '-'")]
    BadToken {
        /// `kind` or `lane`.
        what: &'static str,
        /// The rejected value (truncated).
        value: String,
    },
    /// A job id is not a UUID.
    #[error("job id {0:?} is not a UUID")]
    BadId(String),
    /// A status string is not one of the contract's statuses.
    #[error("unknown job status {0:?}")]
    BadStatus(String),
}

fn check_token(what: &'static str, value: &str) -> Result<(), NameError> {
    let ok = !value.is_empty()
        && value.len() <= 64
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(NameError::BadToken {
            what,
            value: value.chars().take(80).collect(),
        })
    }
}

macro_rules! token_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Validates `value` as a subject token.
            pub fn new(value: impl Into<String>) -> Result<Self, NameError> {
                let value = value.into();
                check_token($what, &value)?;
                Ok(Self(value))
            }

            /// The token as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                Self::new(s)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

token_type!(
    /// A job kind: one subject token, `[a-z0-9_-]{1,64}`.
    Kind,
    "kind"
);
token_type!(
    /// An executor lane (`fast`, `slow`, ...): one subject token, `[a-z0-9_-]{1,64}`.
    Lane,
    "lane"
);

/// A job's id: a UUID (v7 when mlsched generates it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(pub Uuid);

impl JobId {
    /// A fresh, time-ordered id (UUID v7).
    pub fn new_v7() -> Self {
        Self(Uuid::now_v7())
    }

    /// The id of a submission that carried neither an `id` field nor a `Nats-Msg-Id`:
    /// derived from the stream sequence and publish time, so a redelivery of the same
    /// message gets the same id and never creates a second job. Shaped as a UUID v7
    /// whose timestamp is the publish time.
    pub fn for_message(stream_seq: u64, published_unix_ms: u64) -> Self {
        let mut rand = [0u8; 10];
        rand[..8].copy_from_slice(&stream_seq.to_be_bytes());
        rand[8..].copy_from_slice(&[0x4d, 0x53]);
        Self(uuid::Builder::from_unix_timestamp_millis(published_unix_ms, &rand).into_uuid())
    }

    /// The id for a `Nats-Msg-Id` header that is not a UUID: a name-based UUID (v5), so
    /// the same header always maps to the same job.
    pub fn from_msg_id(header: &str) -> Self {
        match Uuid::parse_str(header) {
            Ok(id) => Self(id),
            Err(_) => Self(Uuid::new_v5(&Uuid::NAMESPACE_OID, header.as_bytes())),
        }
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for JobId {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        Uuid::parse_str(s)
            .map(Self)
            .map_err(|_| NameError::BadId(s.chars().take(80).collect()))
    }
}

/// A job's status in Postgres. Status only moves forward (see [`Status::is_forward`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Accepted, waiting for an executor.
    Queued,
    /// An executor is running it.
    Running,
    /// The last attempt failed; it will be retried.
    Failed,
    /// Finished successfully.
    Succeeded,
    /// Gave up: attempts exhausted or a permanent error. A copy is in `JOBS_DEAD`.
    Dead,
    /// Cancelled by an operator.
    Cancelled,
}

impl Status {
    /// Every status, in contract order.
    pub const ALL: [Status; 6] = [
        Status::Queued,
        Status::Running,
        Status::Failed,
        Status::Succeeded,
        Status::Dead,
        Status::Cancelled,
    ];

    /// The status as stored in Postgres.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Running => "running",
            Status::Failed => "failed",
            Status::Succeeded => "succeeded",
            Status::Dead => "dead",
            Status::Cancelled => "cancelled",
        }
    }

    /// Whether the job is finished for good.
    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Succeeded | Status::Dead | Status::Cancelled)
    }

    fn phase(self) -> u8 {
        match self {
            Status::Queued => 0,
            Status::Running => 1,
            Status::Failed => 2,
            Status::Succeeded | Status::Dead | Status::Cancelled => 3,
        }
    }

    /// Whether moving from `(self, attempts)` to `(next, next_attempts)` is forward.
    /// Terminal states never change; a terminal state replaces any other; otherwise
    /// `(attempts, phase)` must grow, so a retry (`failed` → `running` with one more
    /// attempt) is forward but a stale or repeated write is not. The SQL function
    /// `mlsched_is_forward` in migrations/ is the same rule.
    pub fn is_forward(self, attempts: i32, next: Status, next_attempts: i32) -> bool {
        if self.is_terminal() {
            return false;
        }
        if next.is_terminal() {
            return true;
        }
        (next_attempts, next.phase()) > (attempts, self.phase())
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Status {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        Status::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| NameError::BadStatus(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_accept_the_contract_alphabet_only() {
        assert!(Kind::new("train_v2-gpu").is_ok());
        assert!(Kind::new("a".repeat(64)).is_ok());
        for bad in ["", "Train", "a.b", "a b", "*", ">", "é", &"a".repeat(65)] {
            assert!(Kind::new(bad).is_err(), "{bad:?} must be rejected");
        }
        let err = Lane::new("Fast").unwrap_err().to_string();
        assert!(err.contains("lane") && err.contains("Fast"), "{err}");
    }

    #[test]
    fn subjects_follow_the_contract() {
        let kind = Kind::new("train").unwrap();
        let lane = Lane::new("fast").unwrap();
        assert_eq!(submit_subject(&kind), "jobs.submit.train");
        assert_eq!(run_subject(&lane, &kind), "jobs.run.fast.train");
        assert_eq!(run_lane_filter(&lane), "jobs.run.fast.>");
        assert_eq!(dead_subject(kind.as_str()), "jobs.dead.train");
        assert_eq!(events_subject(&kind), "jobs.events.train");
        assert_eq!(executor_consumer(&lane), "executor-fast");
        assert_eq!(kind_token("jobs.run.fast.train"), "train");
        assert_eq!(lane_token("jobs.run.fast.train"), Some("fast"));
        assert_eq!(lane_token("jobs.submit.train"), None);
    }

    #[test]
    fn status_moves_only_forward() {
        use Status::*;
        assert!(Queued.is_forward(0, Running, 1));
        assert!(Running.is_forward(1, Failed, 1));
        assert!(Failed.is_forward(1, Running, 2));
        assert!(Running.is_forward(2, Succeeded, 2));
        assert!(
            Running.is_forward(3, Succeeded, 1),
            "a late success still finishes the job"
        );
        assert!(!Running.is_forward(1, Running, 1), "a repeated start is not forward");
        assert!(!Failed.is_forward(2, Running, 2));
        assert!(!Running.is_forward(1, Queued, 0));
        for t in [Succeeded, Dead, Cancelled] {
            for next in Status::ALL {
                assert!(!t.is_forward(1, next, 9), "{t} must never change");
            }
        }
    }

    #[test]
    fn message_derived_ids_are_stable_and_distinct() {
        let a = JobId::for_message(7, 1_700_000_000_000);
        assert_eq!(a, JobId::for_message(7, 1_700_000_000_000));
        assert_ne!(a, JobId::for_message(8, 1_700_000_000_000));
        assert_eq!(a.0.get_version_num(), 7);
        let h = JobId::from_msg_id("order-42");
        assert_eq!(h, JobId::from_msg_id("order-42"));
        let u = Uuid::now_v7();
        assert_eq!(JobId::from_msg_id(&u.to_string()).0, u);
    }
}
