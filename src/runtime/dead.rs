//! Dead-lettering: copying a job that will not run again to `jobs.dead.<kind>` with its
//! reason, and catching the messages the server itself gave up on.
//!
//! A message that reaches its consumer's MaxDeliver without a worker deciding (a crash
//! loop, a hung worker) stays in the work-queue stream but is never delivered again.
//! The server announces it with a max-deliveries advisory, which the
//! `JOBS_ADVISORIES` stream keeps until a [`DeadLetterer`] (every worker runs one on
//! the shared `dead-letterer` consumer) moves the message to `jobs.dead.<kind>`, marks
//! its row `dead` and deletes it from the work queue.

use std::time::Duration;

use async_nats::jetstream::{self, context::PublishError};
use async_nats::HeaderMap;
use bytes::Bytes;
use chrono::Utc;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::Fetcher;
use crate::config::Settings;
use crate::job::{self, envelope::IdSource, Job, JobId, Kind, Lane, Status};
use crate::store::{Record, StoreError, Writer};
use crate::telemetry::metrics::{dead_kind_label, DEAD_LETTERS, JOBS_TOTAL};

/// Header values cannot hold line breaks; keep reasons on one line and bounded.
fn header_safe(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(1024)
        .collect()
}

/// Publishes `payload` (originally on `subject`) to `jobs.dead.<kind>` with
/// `Mlsched-Error`, `Mlsched-Attempts` and `Mlsched-Subject`, and waits for JetStream
/// to store it. `dedup` makes repeated dead-lettering of the same job idempotent.
pub async fn dead_letter(
    js: &jetstream::Context,
    subject: &str,
    headers: Option<&HeaderMap>,
    payload: Bytes,
    dedup: &str,
    error: &str,
    attempts: i64,
) -> Result<(), PublishError> {
    let token = job::kind_token(subject);
    let token = if Kind::new(token).is_ok() {
        token
    } else {
        job::INVALID_KIND_TOKEN
    };
    let mut out = super::carried_headers(headers);
    out.insert(job::MSG_ID_HEADER, format!("{dedup}:dead").as_str());
    out.insert(job::ERROR_HEADER, header_safe(error).as_str());
    out.insert(job::ATTEMPTS_HEADER, attempts.to_string().as_str());
    out.insert(job::SUBJECT_HEADER, subject);
    js.publish_with_headers(job::dead_subject(token), out, payload)
        .await?
        .await?;
    Ok(())
}

#[derive(Deserialize)]
struct MaxDeliveriesAdvisory {
    stream: String,
    consumer: String,
    stream_seq: u64,
    deliveries: i64,
}

/// Moves messages that exhausted MaxDeliver to the dead-letter stream.
pub struct DeadLetterer {
    client: async_nats::Client,
    writer: Writer,
    settings: Settings,
}

impl DeadLetterer {
    /// A dead-letterer that records dead jobs through `writer`.
    pub fn new(client: async_nats::Client, writer: Writer, settings: Settings) -> DeadLetterer {
        DeadLetterer {
            client,
            writer,
            settings,
        }
    }

    /// Handles advisories until `cancel` fires.
    pub async fn run(self, cancel: CancellationToken) {
        let mut fetcher =
            Fetcher::new(self.client.clone(), job::ADVISORY_STREAM, "dead-letterer").expires(Duration::from_secs(5));
        let js = jetstream::new(self.client.clone());
        while let Some(mut batch) = fetcher.batch(16, &cancel).await {
            loop {
                let next = tokio::select! {
                    _ = cancel.cancelled() => return,
                    m = fetcher.next(&mut batch) => m,
                };
                let Some(msg) = next else { break };
                let handled = match serde_json::from_slice::<MaxDeliveriesAdvisory>(&msg.payload) {
                    Ok(adv) => self.handle(&js, &adv).await,
                    Err(e) => {
                        tracing::warn!(error = %e, "ignoring an advisory that does not parse");
                        Ok(())
                    }
                };
                let ack = match handled {
                    Ok(()) => msg.ack().await,
                    Err(e) => {
                        tracing::warn!(error = %e, "dead-lettering after MaxDeliver failed; will retry");
                        msg.ack_with(jetstream::AckKind::Nak(Some(Duration::from_secs(1))))
                            .await
                    }
                };
                if let Err(e) = ack {
                    tracing::debug!(error = %e, "advisory ack not sent");
                }
            }
        }
    }

    async fn handle(&self, js: &jetstream::Context, adv: &MaxDeliveriesAdvisory) -> Result<(), String> {
        let stream = js.get_stream(&adv.stream).await.map_err(|e| e.to_string())?;
        let raw = match stream.get_raw_message(adv.stream_seq).await {
            Ok(m) => m,
            Err(e) if matches!(e.kind(), jetstream::stream::RawMessageErrorKind::NoMessageFound) => {
                return Ok(()); // already acked, deleted or dead-lettered
            }
            Err(e) => return Err(e.to_string()),
        };
        let reason = format!(
            "no outcome after {} deliveries to consumer {} (its MaxDeliver): the worker crashed, hung or was killed while handling it",
            adv.deliveries, adv.consumer
        );
        let msg_id = raw.headers.get(job::MSG_ID_HEADER).map(|v| v.as_str().to_string());
        let published_ms = raw.time.timestamp_millis().max(0) as u64;
        let id_source = match &msg_id {
            Some(h) => IdSource::MsgId(h),
            None => IdSource::Derived(JobId::for_message(raw.sequence, published_ms)),
        };
        let parsed = Job::parse(job::kind_token(&raw.subject), &raw.payload, id_source);
        // Record first: a job that finished after all (its ack was lost) is not
        // dead-lettered, only removed from the work queue.
        let mut finished = false;
        if let Ok(job) = &parsed {
            let lane = job::lane_token(&raw.subject)
                .and_then(|l| Lane::new(l).ok())
                .unwrap_or_else(|| self.settings.lane_for(&job.kind, 0.0));
            let max = job.max_attempts.unwrap_or(self.settings.retry.max_attempts);
            let mut rec = Record::new(job, lane, Status::Dead, adv.deliveries as i32, max, raw.time);
            rec.finished_at = Some(Utc::now());
            rec.error = Some(reason.clone());
            match self.writer.write_dead(rec).await {
                Ok(c) => {
                    finished = c.status != Status::Dead;
                    if c.applied {
                        metrics::counter!(JOBS_TOTAL, "kind" => job.kind.to_string(), "outcome" => "dead").increment(1);
                    }
                }
                Err(StoreError::Rejected(e)) => {
                    tracing::error!(error = %e, "dead record refused; dead-lettering anyway")
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        if !finished {
            let dedup = match &parsed {
                Ok(j) => j.id.to_string(),
                Err(_) => format!("{}:{}", adv.stream, adv.stream_seq),
            };
            dead_letter(
                js,
                &raw.subject,
                Some(&raw.headers),
                raw.payload.clone(),
                &dedup,
                &reason,
                adv.deliveries,
            )
            .await
            .map_err(|e| e.to_string())?;
            let kind = dead_kind_label(&raw.subject);
            metrics::counter!(DEAD_LETTERS, "kind" => kind, "stage" => "max_deliver").increment(1);
        }
        stream.delete_message(adv.stream_seq).await.map_err(|e| e.to_string())?;
        tracing::warn!(stream = %adv.stream, seq = adv.stream_seq, deliveries = adv.deliveries, "dead-lettered a message that reached MaxDeliver");
        Ok(())
    }
}
