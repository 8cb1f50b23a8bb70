//! `mlsched-predictor`: the routing stage between `JOBS_SUBMIT` and `JOBS_RUN`.
//!
//! It validates each submission, predicts its run time (`predict`: the active model of
//! the registry, else per-kind medians), assigns a lane (a per-kind rule from
//! `[predictor.lanes]`, else by `predictor.fast_threshold_ms`), records the job `queued` in
//! Postgres, publishes it to `jobs.run.<lane>.<kind>` with the job id as
//! `Nats-Msg-Id`, and acks the submission only once both are durable. Invalid bodies
//! go to `jobs.dead.<kind>` with their reason. See `route` for the details.
//!
//! Every predictor replica also answers `mlsched.predict` requests (`serve`), samples
//! the backlog SLIs ([`mlsched::slo`]) and serves
//! `/metrics`, `/healthz` and `/readyz` on `metrics.listen`.

mod predict;
mod route;
mod serve;

use anyhow::Context as _;
use mlsched::config::Settings;
use mlsched::runtime::{DeadLetterer, Shutdown};
use mlsched::slo;
use mlsched::store::{self, Writer};
use mlsched::telemetry::server::{self, Health};
use predict::Predictor;
use tokio_util::task::TaskTracker;

/// Runs the routing stage until `shutdown`.
pub async fn run(settings: Settings, shutdown: Shutdown) -> anyhow::Result<()> {
    settings.validate()?;
    let health = Health::new();
    let _ops = server::start(&settings.metrics.listen, health.clone())
        .await
        .with_context(|| format!("metrics.listen {:?}", settings.metrics.listen))?;
    tokio::spawn(shutdown.grace_timer(settings.grace()));
    tokio::spawn(health.stopping_on(shutdown.soft.clone()));
    let client = match mlsched::client::connect(&settings.nats, "mlsched-predictor", &shutdown.soft).await {
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
        pool.clone(),
        Some(client.clone()),
        &settings.store,
        shutdown.hard.clone(),
        &writer_tasks,
    );
    let predictor = Predictor::new(&settings);
    predictor.refresh(&pool).await;
    let stage = route::Stage {
        settings: settings.clone(),
        writer: writer.clone(),
        js: async_nats::jetstream::new(client.clone()),
        health,
        predictor: predictor.clone(),
    };
    let tasks = TaskTracker::new();
    tasks.spawn(route::run(stage, client.clone(), shutdown.soft.clone()));
    let refresh = std::time::Duration::from_secs(settings.predictor.model_refresh_s);
    tasks.spawn(serve::run(client.clone(), predictor.clone(), shutdown.soft.clone()));
    tasks.spawn(predictor.run(pool.clone(), refresh, shutdown.soft.clone()));
    tasks.spawn(DeadLetterer::new(client.clone(), writer.clone(), settings.clone()).run(shutdown.soft.clone()));
    let every = std::time::Duration::from_millis(settings.metrics.sample_interval_ms);
    let mut lanes = settings.executor_lanes();
    lanes.extend(
        settings
            .predictor
            .lanes
            .values()
            .filter_map(|l| mlsched::job::Lane::new(l.as_str()).ok()),
    );
    lanes.sort();
    lanes.dedup();
    tasks.spawn(slo::run(client.clone(), pool, lanes, every, shutdown.soft.clone()));
    tasks.close();
    tasks.wait().await;
    drop(writer);
    writer_tasks.close();
    writer_tasks.wait().await;
    match tokio::time::timeout(std::time::Duration::from_secs(5), client.flush()).await {
        Ok(Ok(())) => {}
        _ => tracing::warn!("could not flush the last acks; those messages will be redelivered"),
    }
    tracing::info!("predictor stopped");
    Ok(())
}
