//! One lane's consume loop: it asks for as many messages as it has free slots
//! (`executor.concurrency` per lane) and runs each delivery on its own task
//! ([`crate::attempt`]), then settles the message as the attempt decided.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, message::AckKind, Message};
use mlsched::config::Settings;
use mlsched::job::{self, Lane};
use mlsched::runtime::Fetcher;
use mlsched::store::Writer;
use mlsched::telemetry::metrics::JOBS_IN_FLIGHT;
use mlsched::telemetry::server::Health;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::attempt::{attempt, Settle};
use crate::handler::Registry;

pub(crate) struct Ctx {
    pub(crate) settings: Settings,
    pub(crate) registry: Registry,
    pub(crate) writer: Writer,
    pub(crate) js: jetstream::Context,
    pub(crate) hard: CancellationToken,
    pub(crate) health: Health,
}

/// Consumes `executor-<lane>` until `soft` fires; attempts run on `tracker`.
pub(crate) async fn run(
    ctx: Arc<Ctx>,
    client: async_nats::Client,
    lane: Lane,
    soft: CancellationToken,
    tracker: TaskTracker,
) {
    let slots = Arc::new(Semaphore::new(ctx.settings.executor.concurrency));
    let mut fetcher = Fetcher::new(client, job::RUN_STREAM, &job::executor_consumer(&lane));
    tracing::info!(%lane, consumer = fetcher.consumer(), concurrency = ctx.settings.executor.concurrency, "consuming");
    loop {
        let first = tokio::select! {
            _ = soft.cancelled() => break,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let mut permits = vec![first];
        while permits.len() < ctx.settings.executor.fetch_batch {
            match slots.clone().try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        let Some(mut batch) = fetcher.batch(permits.len(), &soft).await else {
            break;
        };
        ctx.health.set_consuming();
        while let Some(msg) = fetcher.next(&mut batch).await {
            // A message already delivered is run even after a soft stop: handing it
            // back would spend one of its attempts without running it.
            match permits.pop() {
                Some(permit) => {
                    let ctx = ctx.clone();
                    let lane = lane.clone();
                    let in_flight = metrics::gauge!(JOBS_IN_FLIGHT, "lane" => lane.to_string());
                    in_flight.increment(1.0);
                    tracker.spawn(async move {
                        let settle = attempt(&ctx, &msg, &lane).await;
                        apply(&msg, settle).await;
                        in_flight.decrement(1.0);
                        drop(permit);
                    });
                }
                // The server sent more than asked for: hand it back at once.
                None => apply(&msg, Settle::Requeue).await,
            }
        }
    }
    tracing::info!(%lane, "stopped fetching");
}

async fn apply(msg: &Message, settle: Settle) {
    let kind = match settle {
        Settle::Ack => AckKind::Ack,
        Settle::Retry(d) => AckKind::Nak(Some(d)),
        Settle::Requeue => AckKind::Nak(None),
        Settle::Term => AckKind::Term,
    };
    // During a NATS outage an ack may not go out; the message is redelivered then.
    match tokio::time::timeout(Duration::from_secs(5), msg.ack_with(kind)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, subject = %msg.subject, "ack not sent; the message will be redelivered")
        }
        Err(_) => {
            tracing::warn!(subject = %msg.subject, "ack timed out; the message will be redelivered")
        }
    }
}
