//! `mlsched-executor`: runs jobs from `JOBS_RUN`, one durable pull consumer per lane.
//!
//! - [`handler`]: the contract users implement ([`Handler`], [`HandlerError`]) and the
//!   [`Registry`] of kinds.
//! - [`kinds`]: the built-in kinds `noop`, `sleep`, `cpu` and `http`.
//! - `lane`: the consume loop of one lane.
//! - `attempt`: the life of one attempt, and how its outcome settles the message.
//!
//! [`run`] runs the built-in kinds; [`run_with`] runs your own registry. Both return
//! after a graceful shutdown: cancel `shutdown.soft` (SIGTERM does, in the binary) and
//! in-flight jobs get `shutdown.grace_s` to finish before they are handed back.

mod attempt;
pub mod handler;
pub mod kinds;
mod lane;

use std::sync::Arc;

use anyhow::Context as _;
use mlsched::config::Settings;
use mlsched::runtime::{DeadLetterer, Shutdown};
use mlsched::store::{self, Writer};
use mlsched::telemetry::server::{self, Health};
use tokio_util::task::TaskTracker;

pub use handler::{Handler, HandlerError, HandlerResult, JobInput, Registry};

/// Runs an executor with the built-in kinds until `shutdown`.
pub async fn run(settings: Settings, shutdown: Shutdown) -> anyhow::Result<()> {
    run_with(settings, kinds::builtin(), shutdown).await
}

/// Runs an executor with `registry`'s kinds until `shutdown`.
pub async fn run_with(settings: Settings, registry: Registry, shutdown: Shutdown) -> anyhow::Result<()> {
    settings.validate()?;
    let health = Health::new();
    let _ops = server::start(&settings.metrics.listen, health.clone())
        .await
        .with_context(|| format!("metrics.listen {:?}", settings.metrics.listen))?;
    tokio::spawn(shutdown.grace_timer(settings.grace()));
    tokio::spawn(health.stopping_on(shutdown.soft.clone()));
    let client = match mlsched::client::connect(&settings.nats, "mlsched-executor", &shutdown.soft).await {
        Ok(c) => c,
        Err(mlsched::client::ConnectError::Cancelled) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    health.set_nats(client.clone());
    let pool = store::pool(&settings.database).context("database.url")?;
    health.set_pool(pool.clone());
    if store::wait_until_reachable(&pool, &shutdown.soft).await.is_err() {
        return Ok(());
    }
    let writer_tasks = TaskTracker::new();
    let writer = Writer::spawn(
        pool,
        Some(client.clone()),
        &settings.store,
        shutdown.hard.clone(),
        &writer_tasks,
    );
    let ctx = Arc::new(lane::Ctx {
        settings: settings.clone(),
        registry,
        writer: writer.clone(),
        js: async_nats::jetstream::new(client.clone()),
        hard: shutdown.hard.clone(),
        health,
    });
    tracing::info!(kinds = ?ctx.registry.kinds(), lanes = ?settings.executor.lanes, "executor starting");

    let tasks = TaskTracker::new();
    for lane in settings.executor_lanes() {
        tasks.spawn(lane::run(
            ctx.clone(),
            client.clone(),
            lane,
            shutdown.soft.clone(),
            tasks.clone(),
        ));
    }
    tasks.spawn(DeadLetterer::new(client.clone(), writer.clone(), settings.clone()).run(shutdown.soft.clone()));
    tasks.close();
    tasks.wait().await;

    // Every attempt has settled: let the writer drain and stop, then push out the acks.
    drop(ctx);
    drop(writer);
    writer_tasks.close();
    writer_tasks.wait().await;
    match tokio::time::timeout(std::time::Duration::from_secs(5), client.flush()).await {
        Ok(Ok(())) => {}
        _ => tracing::warn!("could not flush the last acks; those messages will be redelivered"),
    }
    tracing::info!("executor stopped");
    Ok(())
}
