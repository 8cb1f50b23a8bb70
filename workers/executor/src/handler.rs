//! The handler contract: what users implement to run their own job kinds.
//!
//! A handler is any `Fn(JobInput) -> impl Future<Output = HandlerResult>`; its error
//! says what happens next: [`HandlerError::Retry`] (with an optional delay) until the
//! job's attempts are used up, or [`HandlerError::Fatal`] to dead-letter it now.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use mlsched::job::{JobId, Kind, NameError};
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;

/// What a handler returns: a JSON result stored in the job's `result` column
/// (`Value::Null` stores nothing), or what to do about the failure.
pub type HandlerResult = Result<serde_json::Value, HandlerError>;

/// A failed attempt, by what should happen next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandlerError {
    /// Try again (after `after`, or the configured backoff) while attempts remain.
    Retry {
        /// Why this attempt failed.
        reason: String,
        /// Delay before the next attempt, overriding the backoff.
        after: Option<Duration>,
    },
    /// Give up now: the job goes to `jobs.dead.<kind>` with `reason`.
    Fatal {
        /// Why the job can never succeed.
        reason: String,
    },
}

impl HandlerError {
    /// A retryable failure with the configured backoff.
    pub fn retry(reason: impl Into<String>) -> HandlerError {
        HandlerError::Retry {
            reason: reason.into(),
            after: None,
        }
    }

    /// A retryable failure, retried after `after`.
    pub fn retry_after(reason: impl Into<String>, after: Duration) -> HandlerError {
        HandlerError::Retry {
            reason: reason.into(),
            after: Some(after),
        }
    }

    /// A permanent failure.
    pub fn fatal(reason: impl Into<String>) -> HandlerError {
        HandlerError::Fatal { reason: reason.into() }
    }

    /// The failure's reason.
    pub fn reason(&self) -> &str {
        match self {
            HandlerError::Retry { reason, .. } | HandlerError::Fatal { reason } => reason,
        }
    }
}

/// One attempt of a job, as a handler sees it.
#[derive(Debug, Clone)]
pub struct JobInput {
    /// The job's id.
    pub id: JobId,
    /// The job's kind.
    pub kind: Kind,
    /// The payload, raw JSON.
    pub payload: Box<RawValue>,
    /// This attempt's number, from 1.
    pub attempt: u32,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// Time this attempt may take before it is cancelled and retried.
    pub timeout: Duration,
}

impl JobInput {
    /// The payload as `T`; a payload of the wrong shape is a [`HandlerError::Fatal`]
    /// (retrying cannot fix it).
    pub fn payload<T: DeserializeOwned>(&self) -> Result<T, HandlerError> {
        serde_json::from_str(self.payload.get()).map_err(|e| {
            let why = without_quoted_values(&e.to_string());
            HandlerError::fatal(format!("payload does not fit kind {}: {why}", self.kind))
        })
    }
}

/// serde's messages quote the offending value (`invalid type: string "s3cret"`); reasons
/// end up in logs and headers, so values are elided and only field names remain.
fn without_quoted_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut in_quotes = false;
    for c in message.chars() {
        match (c, in_quotes) {
            ('"', false) => {
                in_quotes = true;
                out.push_str("\"…");
            }
            ('"', true) => {
                in_quotes = false;
                out.push('"');
            }
            (_, true) => {}
            (c, false) => out.push(c),
        }
    }
    out
}

/// A boxed handler future.
pub type BoxFuture = Pin<Box<dyn Future<Output = HandlerResult> + Send + 'static>>;

/// Runs one job kind. Implemented for every `Fn(JobInput) -> Future` closure.
pub trait Handler: Send + Sync + 'static {
    /// Runs one attempt.
    fn call(&self, job: JobInput) -> BoxFuture;
}

impl<F, Fut> Handler for F
where
    F: Fn(JobInput) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    fn call(&self, job: JobInput) -> BoxFuture {
        Box::pin(self(job))
    }
}

/// The handlers an executor knows, by kind.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: HashMap<String, Arc<dyn Handler>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Registers `handler` for `kind` (replacing any earlier one).
    pub fn register(&mut self, kind: &str, handler: impl Handler) -> Result<&mut Registry, NameError> {
        let kind = Kind::new(kind)?;
        self.handlers.insert(kind.as_str().to_string(), Arc::new(handler));
        Ok(self)
    }

    /// The handler of `kind`.
    pub fn get(&self, kind: &Kind) -> Option<Arc<dyn Handler>> {
        self.handlers.get(kind.as_str()).cloned()
    }

    /// Registered kinds, sorted.
    pub fn kinds(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.handlers.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_errors_name_fields_but_not_values() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Args {
            ms: u64,
        }
        let job = JobInput {
            id: JobId::new_v7(),
            kind: Kind::new("sleep").unwrap(),
            payload: RawValue::from_string(r#"{"ms": "s3cret"}"#.into()).unwrap(),
            attempt: 1,
            max_attempts: 1,
            timeout: Duration::from_secs(1),
        };
        let err = job.payload::<Args>().unwrap_err();
        assert!(matches!(err, HandlerError::Fatal { .. }));
        assert!(err.reason().contains("invalid type: string"), "{}", err.reason());
        assert!(!err.reason().contains("s3cret"), "{}", err.reason());
    }
}
