//! `mlsched submit`: pipelined publishes with a progress bar; `--wait` follows
//! `jobs.events.<kind>` until every job submitted has finished.

use std::collections::HashMap;
use std::future::IntoFuture;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use tracing::Instrument;

use crate::client::Producer;
use crate::config::Settings;
use crate::job::{self, JobId, Kind, Lane, Status};

/// `mlsched submit` options.
#[derive(Debug, clap::Args)]
pub struct SubmitArgs {
    /// Job kind (the last subject token).
    #[arg(long)]
    pub kind: String,
    /// Payload, as JSON.
    #[arg(long, default_value = "{}")]
    pub payload: String,
    /// Prediction features, as a JSON object.
    #[arg(long)]
    pub features: Option<String>,
    /// How many copies to submit (each with its own id).
    #[arg(long, default_value_t = 1)]
    pub count: u64,
    /// Publish straight to jobs.run.<lane>.<kind>, skipping the predictor.
    #[arg(long)]
    pub lane: Option<String>,
    /// Attempts before the job is dead-lettered.
    #[arg(long)]
    pub max_attempts: Option<u32>,
    /// Per-attempt timeout in ms.
    #[arg(long)]
    pub timeout_ms: Option<u64>,
    /// Wait until every job has succeeded or is dead, following jobs.events.<kind>.
    #[arg(long)]
    pub wait: bool,
    /// Give up waiting after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub wait_timeout_s: u64,
}

const WINDOW: usize = 2048;

pub(super) async fn run(args: SubmitArgs, settings: Settings) -> anyhow::Result<()> {
    let kind = Kind::new(args.kind.as_str())?;
    let payload: serde_json::Value = serde_json::from_str(&args.payload).context("--payload is not JSON")?;
    let features: Option<serde_json::Value> = match &args.features {
        Some(f) => Some(serde_json::from_str(f).context("--features is not JSON")?),
        None => None,
    };
    let subject = match &args.lane {
        Some(l) => job::run_subject(&Lane::new(l.as_str())?, &kind),
        None => job::submit_subject(&kind),
    };
    let client = super::nats(&settings).await?;
    let producer = Producer::new(client.clone());
    let mut events = if args.wait {
        Some(client.subscribe(job::events_subject(&kind)).await?)
    } else {
        None
    };

    let bar = progress(args.count, "submitting");
    let started = Instant::now();
    let mut ids = Vec::with_capacity(args.count.min(1_000_000) as usize);
    let jobs = (0..args.count).map(|_| {
        let id = JobId::new_v7();
        let mut env = serde_json::json!({"id": id, "kind": kind, "payload": payload});
        if let Some(f) = &features {
            env["features"] = f.clone();
        }
        if let Some(m) = args.max_attempts {
            env["max_attempts"] = m.into();
        }
        if let Some(t) = args.timeout_ms {
            env["timeout_ms"] = t.into();
        }
        ids.push(id);
        (subject.clone(), id, Bytes::from(env.to_string()))
    });
    publish_all(&producer, jobs, &bar).await?;
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    if args.count == 1 {
        println!("{}", ids[0]);
    } else {
        println!(
            "submitted {} jobs to {subject} in {secs:.2}s ({:.0}/s)",
            args.count,
            args.count as f64 / secs
        );
    }

    let Some(events) = events.as_mut() else {
        return Ok(());
    };
    let mut open: HashMap<JobId, ()> = ids.iter().map(|id| (*id, ())).collect();
    let mut outcomes: HashMap<Status, u64> = HashMap::new();
    let mut last_error: HashMap<JobId, String> = HashMap::new();
    let bar = progress(args.count, "waiting");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.wait_timeout_s);
    while !open.is_empty() {
        let msg = tokio::select! {
            m = events.next() => m,
            _ = tokio::time::sleep_until(deadline) => bail!("{} jobs still unfinished after {}s", open.len(), args.wait_timeout_s),
        };
        let Some(msg) = msg else {
            bail!("event subscription closed")
        };
        let Ok(ev) = serde_json::from_slice::<serde_json::Value>(&msg.payload) else {
            continue;
        };
        let (Some(id), Some(status)) = (
            ev["id"].as_str().and_then(|s| s.parse::<JobId>().ok()),
            ev["status"].as_str().and_then(|s| s.parse::<Status>().ok()),
        ) else {
            continue;
        };
        if let Some(e) = ev["error"].as_str() {
            last_error.insert(id, e.to_string());
        }
        if status.is_terminal() && open.remove(&id).is_some() {
            *outcomes.entry(status).or_default() += 1;
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    if args.count == 1 {
        let (status, _) = outcomes
            .iter()
            .next()
            .map(|(s, n)| (*s, *n))
            .unwrap_or((Status::Dead, 0));
        match last_error.get(&ids[0]) {
            Some(e) if status != Status::Succeeded => println!("{status}: {e}"),
            _ => println!("{status}"),
        }
    } else {
        let mut parts: Vec<String> = outcomes.iter().map(|(s, n)| format!("{n} {s}")).collect();
        parts.sort();
        println!(
            "finished in {:.2}s: {}",
            started.elapsed().as_secs_f64(),
            parts.join(", ")
        );
    }
    Ok(())
}

/// A job ready to publish: subject, id, envelope.
pub(super) type Outgoing = (String, JobId, Bytes);

/// Publishes `jobs` (subject, id, envelope) pipelined, at most [`WINDOW`] acks
/// outstanding, and awaits every ack; `bar` counts the acked ones. With tracing on,
/// each job's trace starts at its publish.
pub(super) async fn publish_all(
    producer: &Producer,
    jobs: impl IntoIterator<Item = Outgoing>,
    bar: &ProgressBar,
) -> anyhow::Result<()> {
    let mut acks = FuturesUnordered::new();
    for (subject, id, body) in jobs {
        let span = publish_span(&subject, id);
        acks.push(producer.send(subject, id, body).instrument(span).await?.into_future());
        while acks.len() >= WINDOW {
            if let Some(ack) = acks.next().await {
                ack.context("publish not acknowledged")?;
                bar.inc(1);
            }
        }
    }
    while let Some(ack) = acks.next().await {
        ack.context("publish not acknowledged")?;
        bar.inc(1);
    }
    Ok(())
}

/// A producer span per job when tracing is on, so the job's trace starts here.
fn publish_span(subject: &str, id: JobId) -> tracing::Span {
    if !crate::telemetry::trace::enabled() {
        return tracing::Span::none();
    }
    tracing::info_span!(
        "publish",
        otel.name = %format!("{subject} publish"),
        otel.kind = "producer",
        messaging.system = "nats",
        messaging.operation.type = "send",
        messaging.destination.name = %subject,
        messaging.message.id = %id,
    )
}

pub(super) fn progress(len: u64, what: &str) -> ProgressBar {
    if len <= 1 {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} {per_sec} eta {eta}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    bar
}
