//! The life of one job attempt.
//!
//! Claim the row (`running`, committed before the handler starts, so a job already
//! finished is acked and never run again), run the handler under its timeout with
//! in-progress acks, record the outcome, and only then say how to settle the message.
//! [`decide`] is the one place that maps a handler's outcome to what happens next.

use std::time::{Duration, Instant};

use async_nats::jetstream::Message;
use chrono::{DateTime, Utc};
use mlsched::config::Settings;
use mlsched::job::{self, envelope::IdSource, Job, JobId, Lane, Status};
use mlsched::runtime::{backoff, dead_letter, with_heartbeat};
use mlsched::store::{Record, StoreError};
use mlsched::telemetry::metrics::{
    dead_kind_label, DEAD_LETTERS, JOBS_TOTAL, JOB_RUN, JOB_WAIT, PREDICTION_ABS_ERROR, REDELIVERIES,
};
use mlsched::telemetry::trace;
use tracing::Instrument;

use crate::handler::{HandlerError, HandlerResult, JobInput};
use crate::lane::Ctx;

/// What to do with a message once its attempt is over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Settle {
    /// Done (recorded, or finished before): remove it.
    Ack,
    /// Deliver again after the delay.
    Retry(Duration),
    /// Deliver again now: this worker is stopping.
    Requeue,
    /// Dead-lettered and recorded: never deliver again.
    Term,
}

/// Maps a handler outcome to what happens next: succeeded, retry after a backoff, or
/// dead.
pub(crate) fn decide(
    outcome: &HandlerResult,
    attempt: u32,
    max_attempts: u32,
    settings: &Settings,
) -> (Status, Option<Duration>) {
    match outcome {
        Ok(_) => (Status::Succeeded, None),
        Err(HandlerError::Retry { after, .. }) if attempt < max_attempts => {
            let max = Duration::from_millis(settings.retry.max_ms);
            let delay = match after {
                Some(d) => (*d).min(max),
                None => backoff(attempt, Duration::from_millis(settings.retry.base_ms), max),
            };
            (Status::Failed, Some(delay))
        }
        Err(_) => (Status::Dead, None),
    }
}

/// Runs one delivery of a message to completion and says how to settle it.
pub(crate) async fn attempt(ctx: &Ctx, msg: &Message, lane: &Lane) -> Settle {
    let Ok(info) = msg.info() else {
        return Settle::Requeue;
    };
    let delivered = info.delivered.max(1) as u32;
    if delivered > 1 {
        metrics::counter!(REDELIVERIES, "stream" => job::RUN_STREAM, "consumer" => info.consumer.to_string())
            .increment(1);
    }
    let seq = info.stream_sequence;
    let published: DateTime<Utc> = info.published;
    let subject = msg.subject.to_string();
    let header = |name: &str| {
        msg.headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_string())
    };
    let msg_id = header(job::MSG_ID_HEADER);
    let id_source = match &msg_id {
        Some(h) => IdSource::MsgId(h),
        None => IdSource::Derived(JobId::for_message(seq, published.timestamp_millis().max(0) as u64)),
    };
    let job = match Job::parse(job::kind_token(&subject), &msg.payload, id_source) {
        Ok(j) => j,
        Err(e) => {
            let dedup = format!("{}:{seq}", job::RUN_STREAM);
            return match dead_letter(
                &ctx.js,
                &subject,
                msg.headers.as_ref(),
                msg.payload.clone(),
                &dedup,
                &e.to_string(),
                delivered.into(),
            )
            .await
            {
                Ok(()) => {
                    tracing::warn!(%subject, error = %e, "malformed job dead-lettered");
                    let kind = dead_kind_label(&subject);
                    metrics::counter!(DEAD_LETTERS, "kind" => kind, "stage" => "executor").increment(1);
                    Settle::Term
                }
                Err(pe) => {
                    tracing::warn!(error = %pe, "dead letter not stored; will retry");
                    Settle::Retry(Duration::from_secs(1))
                }
            };
        }
    };
    // Every log line about the job carries its id, kind and attempt; the span's
    // OpenTelemetry fields (and their formatting, on every job) only when tracing is on.
    let span = if trace::enabled() {
        let span = tracing::info_span!(
            "job",
            id = %job.id,
            kind = %job.kind,
            attempt = delivered,
            trace_id = tracing::field::Empty,
            otel.name = %format!("{subject} process"),
            otel.kind = "consumer",
            messaging.system = "nats",
            messaging.operation.type = "process",
            messaging.destination.name = %subject,
            messaging.message.id = %job.id,
        );
        trace::continue_from(&span, msg.headers.as_ref());
        if let Some(id) = trace::trace_id(&span) {
            span.record("trace_id", id.as_str());
        }
        span
    } else {
        tracing::info_span!("job", id = %job.id, kind = %job.kind, attempt = delivered)
    };
    let delivery = Delivery {
        delivered,
        published,
        submitted_header: header(job::SUBMITTED_AT_HEADER),
        predicted_upper_ms: header(job::PREDICTED_UPPER_MS_HEADER).and_then(|v| v.parse::<u64>().ok()),
    };
    run_job(ctx, msg, job, lane, delivery).instrument(span).await
}

/// What the message says about this delivery besides the envelope.
struct Delivery {
    /// JetStream's delivery count: this attempt's number.
    delivered: u32,
    /// When the message was stored.
    published: DateTime<Utc>,
    /// `Mlsched-Submitted-At`.
    submitted_header: Option<String>,
    /// `Mlsched-Predicted-Upper-Ms`.
    predicted_upper_ms: Option<u64>,
}

async fn run_job(ctx: &Ctx, msg: &Message, job: Job, lane: &Lane, delivery: Delivery) -> Settle {
    let Delivery {
        delivered,
        published,
        submitted_header,
        predicted_upper_ms,
    } = delivery;
    let subject = msg.subject.as_str();
    let s = &ctx.settings;
    let max_attempts = job.max_attempts.unwrap_or(s.retry.max_attempts);
    let submitted_at = submitted_header
        .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or(published);
    let lane = job::lane_token(subject)
        .and_then(|l| Lane::new(l).ok())
        .unwrap_or_else(|| lane.clone());
    let base = Record::new(
        &job,
        lane,
        Status::Running,
        delivered as i32,
        max_attempts,
        submitted_at,
    );
    let every = Duration::from_millis(s.executor.heartbeat_ms);

    if delivered > max_attempts {
        let reason = format!(
            "attempts exhausted: delivered {delivered} times with {max_attempts} allowed; earlier attempts ended without an outcome (worker lost)"
        );
        return give_up(ctx, msg, &job, base, reason, delivered).await;
    }

    // Claim: `running` is committed before the handler starts.
    let mut start = base.clone();
    start.started_at = Some(Utc::now());
    let claim = tokio::select! {
        r = with_heartbeat(std::slice::from_ref(&msg), every, ctx.writer.write(start), || {}) => r,
        _ = ctx.hard.cancelled() => return Settle::Requeue,
    };
    match claim {
        Ok(c) if c.applied => {
            if delivered == 1 {
                let waited = (Utc::now() - submitted_at).num_milliseconds().max(0) as f64 / 1000.0;
                metrics::histogram!(JOB_WAIT, "kind" => job.kind.to_string(), "lane" => base.lane.to_string())
                    .record(waited);
            }
        }
        Ok(c) if c.status == Status::Dead => {
            let reason = "recorded dead by an earlier delivery".to_string();
            return give_up(ctx, msg, &job, base, reason, delivered).await;
        }
        Ok(c) if c.status.is_terminal() => {
            tracing::info!(status = %c.status, "job already finished; acking without running it again");
            return Settle::Ack;
        }
        Ok(c) => {
            tracing::info!(status = %c.status, attempts = c.attempts, "another attempt holds the job; retrying later");
            return Settle::Retry(backoff(
                delivered,
                Duration::from_millis(s.retry.base_ms),
                Duration::from_millis(s.retry.max_ms),
            ));
        }
        Err(StoreError::Rejected(e)) => {
            return give_up(ctx, msg, &job, base, format!("cannot record the job: {e}"), delivered).await
        }
        Err(_) => return Settle::Requeue,
    }

    let timeout = s.attempt_timeout(job.timeout_ms, predicted_upper_ms);
    let started = Instant::now();
    let outcome = match ctx.registry.get(&job.kind) {
        None => Err(HandlerError::retry(format!(
            "no handler for kind {} on this executor",
            job.kind
        ))),
        Some(handler) => {
            let input = JobInput {
                id: job.id,
                kind: job.kind.clone(),
                payload: job.payload.clone(),
                attempt: delivered,
                max_attempts,
                timeout,
            };
            // A task of its own isolates panics and lets a timeout abort the handler.
            let task = tokio::spawn(handler.call(input));
            let beat = || ctx.writer.touch(job.id, delivered as i32);
            let abort = task.abort_handle();
            tokio::select! {
                r = with_heartbeat(std::slice::from_ref(&msg), every, tokio::time::timeout(timeout, task), beat) => match r {
                    Ok(Ok(res)) => res,
                    Ok(Err(e)) if e.is_panic() => Err(HandlerError::retry("handler panicked")),
                    Ok(Err(_)) => Err(HandlerError::retry("handler task was cancelled")),
                    Err(_) => {
                        abort.abort();
                        Err(HandlerError::retry(format!("timed out after {} ms", timeout.as_millis())))
                    }
                },
                _ = ctx.hard.cancelled() => {
                    abort.abort();
                    tracing::warn!("abandoned at hard stop; handing the job back");
                    return Settle::Requeue;
                }
            }
        }
    };
    let ran = started.elapsed();
    let ran_ms = ran.as_millis() as i64;
    metrics::histogram!(JOB_RUN, "kind" => job.kind.to_string(), "lane" => base.lane.to_string())
        .record(ran.as_secs_f64());

    let (status, delay) = decide(&outcome, delivered, max_attempts, s);
    let mut rec = base.moved(status);
    rec.actual_ms = Some(ran_ms);
    match (&outcome, status) {
        (Ok(v), _) => {
            rec.finished_at = Some(Utc::now());
            rec.result = (!v.is_null()).then(|| v.to_string());
        }
        (Err(e), Status::Dead) => {
            let reason = match e {
                HandlerError::Fatal { reason } => reason.clone(),
                HandlerError::Retry { reason, .. } => {
                    format!("failed {delivered} of {max_attempts} attempts; last: {reason}")
                }
            };
            return give_up(ctx, msg, &job, rec, reason, delivered).await;
        }
        (Err(e), _) => {
            tracing::info!(error = e.reason(), "attempt failed; will retry");
            rec.error = Some(e.reason().to_string());
        }
    }
    let recorded = tokio::select! {
        r = with_heartbeat(std::slice::from_ref(&msg), every, ctx.writer.write(rec), || {}) => r,
        _ = ctx.hard.cancelled() => return Settle::Requeue,
    };
    if let Ok(c) = &recorded {
        if c.applied {
            let outcome = if delay.is_some() { "failed" } else { "succeeded" };
            metrics::counter!(JOBS_TOTAL, "kind" => job.kind.to_string(), "outcome" => outcome).increment(1);
            if let (None, Some(predicted)) = (delay, job.predicted_ms) {
                let error = (ran_ms as f64 - predicted as f64).abs() / 1000.0;
                metrics::histogram!(PREDICTION_ABS_ERROR, "kind" => job.kind.to_string()).record(error);
            }
        }
    }
    match (recorded, delay) {
        (Ok(_), None) => Settle::Ack,
        (Ok(_), Some(d)) => Settle::Retry(d),
        (Err(e), _) => {
            tracing::warn!(error = %e, "outcome not recorded; handing the job back");
            Settle::Requeue
        }
    }
}

/// Records the job `dead`, then publishes it to `jobs.dead.<kind>`, then terminates
/// the message. Recording first means a job that already succeeded (its ack was lost)
/// is never dead-lettered; a crash between the two steps finds the row dead on the next
/// delivery and publishes the dead letter then (deduplicated by job id).
async fn give_up(ctx: &Ctx, msg: &Message, job: &Job, base: Record, reason: String, attempts: u32) -> Settle {
    let mut rec = base.moved(Status::Dead);
    rec.finished_at = Some(Utc::now());
    rec.error = Some(reason.clone());
    match ctx.writer.write_dead(rec).await {
        Ok(c) if c.status != Status::Dead => {
            tracing::info!(status = %c.status, "job already finished; not dead-lettering it");
            return Settle::Ack;
        }
        Ok(c) => {
            if c.applied {
                metrics::counter!(JOBS_TOTAL, "kind" => job.kind.to_string(), "outcome" => "dead").increment(1);
            }
        }
        Err(StoreError::Rejected(e)) => {
            tracing::error!(error = %e, "dead record refused; dead-lettering anyway")
        }
        Err(e) => {
            tracing::warn!(error = %e, "dead record not written; handing the job back");
            return Settle::Requeue;
        }
    }
    let published = dead_letter(
        &ctx.js,
        &msg.subject,
        msg.headers.as_ref(),
        msg.payload.clone(),
        &job.id.to_string(),
        &reason,
        attempts.into(),
    )
    .await;
    match published {
        Ok(()) => {
            tracing::warn!(%reason, "job dead-lettered");
            metrics::counter!(DEAD_LETTERS, "kind" => job.kind.to_string(), "stage" => "executor").increment(1);
            Settle::Term
        }
        Err(e) => {
            tracing::warn!(error = %e, "dead letter not stored; will retry");
            Settle::Retry(Duration::from_secs(1))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_map_to_the_right_next_step() {
        let s = Settings::default();
        assert_eq!(
            decide(&Ok(serde_json::Value::Null), 1, 5, &s),
            (Status::Succeeded, None)
        );
        let (st, d) = decide(&Err(HandlerError::retry("x")), 1, 5, &s);
        assert_eq!(st, Status::Failed);
        assert!(d.unwrap() <= Duration::from_millis(s.retry.base_ms));
        let (st, d) = decide(&Err(HandlerError::retry_after("x", Duration::from_secs(7))), 2, 5, &s);
        assert_eq!((st, d), (Status::Failed, Some(Duration::from_secs(7))));
        assert_eq!(decide(&Err(HandlerError::retry("x")), 5, 5, &s), (Status::Dead, None));
        assert_eq!(decide(&Err(HandlerError::fatal("x")), 1, 5, &s), (Status::Dead, None));
    }
}
