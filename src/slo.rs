//! The backlog SLIs, sampled from JetStream: for every consumer of the work-queue
//! streams, `mlsched_queue_backlog` (pending + ack-pending, the lag KEDA's
//! nats-jetstream scaler computes), `mlsched_queue_oldest_age_seconds` (age of the
//! oldest message the consumer has not finished) and `mlsched_queue_stuck` (messages
//! stored under the consumer's filter that it will never deliver again: MaxDeliver
//! exhausted); per stream `mlsched_stream_messages`; per lane
//! `mlsched_backlog_predicted_seconds` (predicted run time of queued jobs, from
//! Postgres).
//!
//! Who samples: every predictor replica, every `metrics.sample_interval_ms`. The
//! predictor always runs, while KEDA scales executors (the slow lane to zero), and a
//! backlog must be visible exactly when no executor is up. A sample costs a few
//! JetStream API requests and one indexed query, so several replicas may sample;
//! alerts aggregate with `max by (stream, consumer)`.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::{self, stream::Stream};
use chrono::Utc;
use futures::TryStreamExt;
use sqlx::{PgPool, Row};
use tokio_util::sync::CancellationToken;

use crate::job;
use crate::telemetry::metrics::{BACKLOG_PREDICTED, QUEUE_BACKLOG, QUEUE_OLDEST_AGE, QUEUE_STUCK, STREAM_MESSAGES};

/// One consumer's backlog at one instant.
#[derive(Debug, Clone, PartialEq)]
pub struct Backlog {
    /// Stream name.
    pub stream: String,
    /// Consumer name.
    pub consumer: String,
    /// Pending + ack-pending.
    pub backlog: u64,
    /// Age of the oldest unfinished message (0 when none).
    pub oldest_age_seconds: f64,
    /// Stored messages the consumer will not deliver again.
    pub stuck: u64,
}

/// Samples every consumer of the work-queue streams.
pub async fn sample_backlog(js: &jetstream::Context) -> Result<Vec<Backlog>, jetstream::context::GetStreamError> {
    let mut out = Vec::new();
    for name in [job::SUBMIT_STREAM, job::RUN_STREAM] {
        let stream = js.get_stream(name).await?;
        let infos: Vec<_> = match stream.consumers().try_collect().await {
            Ok(v) => v,
            Err(e) => {
                tracing::debug!(stream = name, error = %e, "cannot list consumers");
                continue;
            }
        };
        for info in infos {
            let filter = info.config.filter_subject.clone();
            let backlog = info.num_pending + info.num_ack_pending as u64;
            let oldest_age_seconds = oldest_age(&stream, &filter).await;
            let stored = stored_under(&stream, &filter).await.unwrap_or(backlog);
            out.push(Backlog {
                stream: name.to_string(),
                consumer: info.name.clone(),
                backlog,
                oldest_age_seconds,
                stuck: stored.saturating_sub(backlog),
            });
        }
    }
    Ok(out)
}

async fn oldest_age(stream: &Stream, filter: &str) -> f64 {
    let filter = if filter.is_empty() { ">" } else { filter };
    match stream
        .raw_message_builder()
        .next_by_subject(filter.to_string())
        .sequence(1)
        .send()
        .await
    {
        Ok(m) => ((Utc::now() - m.time).num_milliseconds().max(0) as f64) / 1000.0,
        Err(_) => 0.0,
    }
}

async fn stored_under(stream: &Stream, filter: &str) -> Option<u64> {
    let filter = if filter.is_empty() { ">" } else { filter };
    let info = stream.info_with_subjects(filter).await.ok()?;
    let counts: Vec<(String, usize)> = info.try_collect().await.ok()?;
    Some(counts.into_iter().map(|(_, n)| n as u64).sum())
}

/// Predicted run time of queued jobs per lane, seconds.
pub async fn predicted_backlog(pool: &PgPool) -> Result<BTreeMap<String, f64>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT lane, COALESCE(sum(predicted_ms), 0)::float8 / 1000 AS s FROM jobs WHERE status = 'queued' GROUP BY lane",
    )
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|r| Ok((r.try_get("lane")?, r.try_get("s")?)))
        .collect()
}

/// Publishes the samples as gauges every `every` until `cancel` fires. `lanes` get a
/// predicted-backlog series even when nothing is queued for them.
pub async fn run(
    client: async_nats::Client,
    pool: PgPool,
    lanes: Vec<job::Lane>,
    every: Duration,
    cancel: CancellationToken,
) {
    let js = jetstream::new(client);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        match sample_backlog(&js).await {
            Ok(samples) => {
                for b in samples {
                    let labels = [("stream", b.stream.clone()), ("consumer", b.consumer.clone())];
                    metrics::gauge!(QUEUE_BACKLOG, &labels).set(b.backlog as f64);
                    metrics::gauge!(QUEUE_OLDEST_AGE, &labels).set(b.oldest_age_seconds);
                    metrics::gauge!(QUEUE_STUCK, &labels).set(b.stuck as f64);
                }
            }
            Err(e) => tracing::debug!(error = %e, "backlog not sampled"),
        }
        for name in [
            job::SUBMIT_STREAM,
            job::RUN_STREAM,
            job::DEAD_STREAM,
            job::EVENTS_STREAM,
        ] {
            if let Ok(mut s) = js.get_stream(name).await {
                if let Ok(info) = s.info().await {
                    metrics::gauge!(STREAM_MESSAGES, "stream" => name).set(info.state.messages as f64);
                }
            }
        }
        match predicted_backlog(&pool).await {
            Ok(mut by_lane) => {
                for lane in &lanes {
                    by_lane.entry(lane.to_string()).or_insert(0.0);
                }
                for (lane, seconds) in by_lane {
                    metrics::gauge!(BACKLOG_PREDICTED, "lane" => lane).set(seconds);
                }
            }
            Err(e) => tracing::debug!(error = %e, "predicted backlog not sampled"),
        }
    }
}
