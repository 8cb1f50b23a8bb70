//! The routing stage: validate a group of submissions, record them `queued`, publish
//! them to their lane, and ack each submission only when its row is committed and
//! its `jobs.run.*` publish is acknowledged.
//!
//! A group is whatever has arrived when the stage is free (up to
//! `predictor.batch_size`), so the record writes and publishes of many submissions
//! share one statement and one round of acks. An invalid body is dead-lettered with its
//! reason and terminated; it never holds up the valid ones around it.

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, context::PublishAckFuture, message::AckKind, Message};
use chrono::{DateTime, Utc};
use futures::FutureExt;
use mlsched::config::Settings;
use mlsched::job::{self, envelope::IdSource, Job, JobId, Lane, Status};
use mlsched::runtime::{backoff, carried_headers, dead_letter, with_heartbeat, Fetcher};
use mlsched::store::{Record, StoreError, Writer};
use mlsched::telemetry::metrics::{dead_kind_label, DEAD_LETTERS, JOBS_ROUTED, PREDICTION};
use mlsched::telemetry::server::Health;

use crate::predict::Predictor;
use mlsched::telemetry::trace;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub(crate) struct Stage {
    pub(crate) settings: Settings,
    pub(crate) writer: Writer,
    pub(crate) js: jetstream::Context,
    pub(crate) health: Health,
    pub(crate) predictor: Predictor,
}

/// Groups routed at once. Routing a group is mostly waiting (the record commit, the
/// publish acks); with a few in flight the stage keeps Postgres and NATS busy instead
/// of taking one group per round trip. Jobs carry no order, so nothing is lost by it.
const IN_FLIGHT: usize = 4;

/// Consumes `predictor` until `soft` fires; returns when every group taken is routed.
pub(crate) async fn run(stage: Stage, client: async_nats::Client, soft: CancellationToken) {
    let max = stage.settings.predictor.batch_size;
    let stage = Arc::new(stage);
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let groups = TaskTracker::new();
    let mut fetcher = Fetcher::new(client, job::SUBMIT_STREAM, job::PREDICTOR_CONSUMER);
    tracing::info!(batch_size = max, "routing submissions");
    while let Some(mut batch) = fetcher.batch(max, &soft).await {
        stage.health.set_consuming();
        while let Some(first) = fetcher.next(&mut batch).await {
            let mut group = vec![first];
            // Take what has already arrived; do not wait to fill the group.
            while group.len() < max {
                match fetcher.next(&mut batch).now_or_never() {
                    Some(Some(m)) => group.push(m),
                    _ => break,
                }
            }
            // Submissions already delivered are routed even after a soft stop: handing
            // them back would spend one of their deliveries for nothing.
            let Ok(slot) = slots.clone().acquire_owned().await else {
                break;
            };
            let stage = stage.clone();
            groups.spawn(async move {
                stage.route(group).await;
                drop(slot);
            });
        }
    }
    groups.close();
    groups.wait().await;
    tracing::info!("stopped fetching");
}

/// The span of one submission, child of the producer's trace; none when tracing is off.
fn route_span(msg: &Message, job: &Job) -> tracing::Span {
    if !trace::enabled() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        "route",
        id = %job.id,
        kind = %job.kind,
        otel.name = %format!("{} process", msg.subject),
        otel.kind = "consumer",
        messaging.system = "nats",
        messaging.operation.type = "process",
        messaging.destination.name = %msg.subject,
        messaging.message.id = %job.id,
    );
    trace::continue_from(&span, msg.headers.as_ref());
    span
}

async fn settle_all(msgs: &[Message], kind: AckKind) {
    for m in msgs {
        // During a NATS outage an ack may not go out; the submission is redelivered then.
        let sent = tokio::time::timeout(Duration::from_secs(5), m.ack_with(kind)).await;
        if !matches!(sent, Ok(Ok(()))) {
            tracing::warn!("ack not sent; the submission will be redelivered");
        }
    }
}

async fn settle(msg: &Message, kind: AckKind) {
    settle_all(std::slice::from_ref(msg), kind).await;
}

struct Valid {
    msg: Message,
    job: Job,
    lane: Lane,
    submitted_at: DateTime<Utc>,
    /// This submission's span, continuing the producer's trace (tracing on only).
    span: tracing::Span,
    /// Upper bound of the predicted run time, ms.
    upper_ms: f64,
}

impl Stage {
    async fn route(&self, group: Vec<Message>) {
        let mut valid = Vec::with_capacity(group.len());
        for msg in group {
            let Ok(info) = msg.info() else {
                settle(&msg, AckKind::Nak(None)).await;
                continue;
            };
            let seq = info.stream_sequence;
            let delivered = info.delivered;
            let published: DateTime<Utc> = info.published;
            let msg_id = msg
                .headers
                .as_ref()
                .and_then(|h| h.get(job::MSG_ID_HEADER))
                .map(|v| v.as_str().to_string());
            let id_source = match &msg_id {
                Some(h) => IdSource::MsgId(h),
                None => IdSource::Derived(JobId::for_message(seq, published.timestamp_millis().max(0) as u64)),
            };
            match Job::parse(job::kind_token(&msg.subject), &msg.payload, id_source) {
                Ok(mut job) => {
                    let started = Instant::now();
                    let (prediction, _version) = self.predictor.predict(&job);
                    let lane = self.settings.lane_for(&job.kind, prediction.predicted_ms);
                    metrics::histogram!(PREDICTION).record(started.elapsed().as_secs_f64());
                    job.predicted_ms = Some(prediction.predicted_ms.round() as u64);
                    let span = route_span(&msg, &job);
                    valid.push(Valid {
                        msg,
                        job,
                        lane,
                        submitted_at: published,
                        span,
                        upper_ms: prediction.upper_ms,
                    })
                }
                Err(e) => {
                    self.reject(
                        &msg,
                        &format!("{}:{seq}", job::SUBMIT_STREAM),
                        &e.to_string(),
                        delivered,
                    )
                    .await
                }
            }
        }
        if valid.is_empty() {
            return;
        }

        let records: Vec<Record> = valid
            .iter()
            .map(|v| {
                let max = v.job.max_attempts.unwrap_or(self.settings.retry.max_attempts);
                Record::new(&v.job, v.lane.clone(), Status::Queued, 0, max, v.submitted_at)
            })
            .collect();
        let msgs: Vec<&Message> = valid.iter().map(|v| &v.msg).collect();
        // Written together (they share batches), each inside its submission's span.
        let writes = records
            .into_iter()
            .zip(&valid)
            .map(|(r, v)| self.writer.write(r).instrument(v.span.clone()));
        let every = Duration::from_millis(self.settings.executor.heartbeat_ms);
        let commits = with_heartbeat(&msgs, every, futures::future::join_all(writes), || {}).await;

        let mut publishes: Vec<(Valid, PublishAckFuture)> = Vec::with_capacity(valid.len());
        for (v, commit) in valid.into_iter().zip(commits) {
            match commit {
                // New, or recorded earlier but maybe not published: publish (JetStream
                // drops the duplicate by Nats-Msg-Id).
                Ok(c) if c.applied || c.status == Status::Queued => match self.publish(&v).await {
                    Ok(ack) => publishes.push((v, ack)),
                    Err(e) => {
                        tracing::warn!(id = %v.job.id, error = %e, "publish to the run stream failed; will retry");
                        settle(&v.msg, AckKind::Nak(Some(self.retry_delay(&v.msg)))).await;
                    }
                },
                // Already running or finished: it was routed before.
                Ok(_) => settle(&v.msg, AckKind::Ack).await,
                Err(StoreError::Rejected(e)) => {
                    let attempts = v.msg.info().map(|i| i.delivered).unwrap_or(1);
                    self.reject(
                        &v.msg,
                        &v.job.id.to_string(),
                        &format!("cannot record the job: {e}"),
                        attempts,
                    )
                    .await;
                }
                Err(e) => {
                    tracing::warn!(id = %v.job.id, error = %e, "job not recorded; handing the submission back");
                    settle(&v.msg, AckKind::Nak(None)).await;
                }
            }
        }
        // Await the acks together: each has its own timeout, and after a NATS restart
        // the lost ones must time out at once, not one after another.
        let (routed, acks): (Vec<Valid>, Vec<PublishAckFuture>) = publishes.into_iter().unzip();
        let results = futures::future::join_all(acks.into_iter().map(|a| a.into_future())).await;
        for (v, ack) in routed.into_iter().zip(results) {
            match ack {
                Ok(_) => {
                    settle(&v.msg, AckKind::Ack).await;
                    metrics::counter!(JOBS_ROUTED, "kind" => v.job.kind.to_string(), "lane" => v.lane.to_string())
                        .increment(1);
                }
                Err(e) => {
                    tracing::warn!(id = %v.job.id, error = %e, "run publish not acknowledged; will retry");
                    settle(&v.msg, AckKind::Nak(Some(self.retry_delay(&v.msg)))).await;
                }
            }
        }
    }

    /// Backoff before a submission is offered again after a failure of ours (a full run
    /// stream, NATS trouble), from its delivery count, so a long outage spends few of
    /// its deliveries.
    fn retry_delay(&self, msg: &Message) -> Duration {
        let delivered = msg.info().map(|i| i.delivered.max(1) as u32).unwrap_or(1);
        backoff(
            delivered,
            Duration::from_millis(self.settings.retry.base_ms),
            Duration::from_millis(self.settings.retry.max_ms),
        )
    }

    async fn publish(&self, v: &Valid) -> Result<PublishAckFuture, jetstream::context::PublishError> {
        let lane = &v.lane;
        let mut headers = carried_headers(v.msg.headers.as_ref());
        headers.insert(job::MSG_ID_HEADER, v.job.id.to_string().as_str());
        headers.insert(job::SUBMITTED_AT_HEADER, v.submitted_at.to_rfc3339().as_str());
        if let Some(ms) = v.job.predicted_ms {
            headers.insert(job::PREDICTED_MS_HEADER, ms.to_string().as_str());
        }
        headers.insert(job::PREDICTED_UPPER_MS_HEADER, format!("{:.0}", v.upper_ms).as_str());
        trace::inject(&v.span, &mut headers);
        self.js
            .publish_with_headers(job::run_subject(lane, &v.job.kind), headers, v.job.to_json().into())
            .await
    }

    async fn reject(&self, msg: &Message, dedup: &str, reason: &str, attempts: i64) {
        match dead_letter(
            &self.js,
            &msg.subject,
            msg.headers.as_ref(),
            msg.payload.clone(),
            dedup,
            reason,
            attempts,
        )
        .await
        {
            Ok(()) => {
                tracing::warn!(subject = %msg.subject, error = %reason, "invalid submission dead-lettered");
                let kind = dead_kind_label(&msg.subject);
                metrics::counter!(DEAD_LETTERS, "kind" => kind, "stage" => "predictor").increment(1);
                settle(msg, AckKind::Term).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "dead letter not stored; will retry");
                settle(msg, AckKind::Nak(Some(self.retry_delay(msg)))).await;
            }
        }
    }
}
