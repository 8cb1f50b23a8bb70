//! `mlsched dev`: the whole pipeline on one machine.
//!
//! Without `NATS_URL` / `DATABASE_URL` it starts a private `nats-server` (JetStream,
//! monitoring on) and a throwaway Postgres cluster in a data folder, migrates, applies
//! the streams, starts the predictor and the executors (the sibling binaries next to
//! this one) and plays the demo: a mixed workload predicted cold, a model trained on
//! it, and a flood of long jobs mixed with short ones that the model routes apart.
//! `--keep-running` leaves everything up until Ctrl-C. `--autoscale` runs the executors
//! the way KEDA would instead (src/cli/autoscale.rs) and plays a burst that scales them
//! out and back in.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::json;
use sqlx::{PgPool, Row};

use super::autoscale::{Autoscaler, Timing};
use super::lab::{finished, wait_finished, wait_for_model, Lab};
use super::submit::{publish_all, Outgoing};
use crate::client::Producer;
use crate::config::Settings;
use crate::job::{self, JobId, Kind};
use crate::predict::registry;

/// `mlsched dev` options.
#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// Folder for the private servers' data and the workers' logs; wiped at start
    /// (default: <temp dir>/mlsched-dev).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Jobs in the demo's first, mixed workload (0: no demo).
    #[arg(long, default_value_t = 2000)]
    pub jobs: u64,
    /// Long jobs (1 s) in the demo's flood, mixed with as many short ones (10 ms).
    #[arg(long, default_value_t = 512)]
    pub flood: u64,
    /// Executor processes to start.
    #[arg(long, default_value_t = 2)]
    pub executors: u32,
    /// Leave the stack running after the demo, until Ctrl-C.
    #[arg(long)]
    pub keep_running: bool,
    /// Scale executor processes per lane on consumer lag with the ScaledObjects of
    /// keda/ (as KEDA would, with timings in seconds) instead of starting --executors,
    /// and play a burst that scales them out and back in.
    #[arg(long)]
    pub autoscale: bool,
    /// With --autoscale: short jobs (300 ms) in the burst to the fast lane, plus one long
    /// job (3 s) to the slow lane per 80 of them (0: no burst).
    #[arg(long, default_value_t = 4000)]
    pub burst: u64,
    /// With --autoscale and NATS_URL: the server's monitoring endpoint, http://host:port
    /// (default: the private server's).
    #[arg(long)]
    pub nats_monitor: Option<String>,
}

pub(super) async fn run(args: DevArgs, settings: Settings) -> anyhow::Result<()> {
    let data = args
        .data_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("mlsched-dev"));
    let lab = Lab::start(&data, settings, false, true).await?;

    // Quicker retries and model reloads than in production, unless set.
    let env: Vec<(&'static str, String)> = [
        ("MLSCHED__RETRY__BASE_MS", "200"),
        ("MLSCHED__PREDICTOR__MODEL_REFRESH_S", "2"),
    ]
    .into_iter()
    .filter(|(k, _)| std::env::var_os(k).is_none())
    .map(|(k, v)| (k, v.to_string()))
    .collect();
    let mut workers = vec![lab.spawn("mlsched-predictor", "predictor", &env)?];
    if args.autoscale {
        let result = autoscaled(&lab, &args, env).await;
        for mut w in workers {
            w.stop()?;
        }
        return result;
    }
    for i in 1..=args.executors {
        workers.push(lab.spawn("mlsched-executor", &format!("executor-{i}"), &env)?);
    }
    let pids: Vec<String> = workers
        .iter()
        .map(|w| format!("{} (pid {})", w.name, w.pid()))
        .collect();
    println!(
        "workers          {}; logs in {}",
        pids.join(", "),
        data.join("logs").display()
    );
    let metrics: Vec<String> = workers
        .iter()
        .map(|w| format!("{} http://127.0.0.1:{}/metrics", w.name, w.port))
        .collect();
    println!("metrics          {}", metrics.join(", "));
    let targets: Vec<serde_json::Value> = workers
        .iter()
        .map(|w| json!({"targets": [format!("127.0.0.1:{}", w.port)], "labels": {"component": w.name}}))
        .collect();
    let targets_file = data.join("prometheus-targets.json");
    std::fs::write(&targets_file, serde_json::to_vec_pretty(&targets)?)?;
    println!("prometheus       file_sd targets in {}", targets_file.display());

    if args.jobs > 0 {
        demo(&lab, args.jobs, args.flood).await?;
    }
    if args.keep_running {
        println!("\nThe stack is running. Publish a job from anywhere:");
        println!(
            "  NATS_URL={} mlsched submit --kind sleep --payload '{{\"ms\": 100}}' --wait",
            lab.settings.nats.url.expose()
        );
        println!("  or with any NATS client: publish {{\"kind\":\"noop\",\"payload\":{{}}}} to jobs.submit.noop (README: publishing jobs)");
        println!(
            "  DATABASE_URL={} mlsched status <id>",
            lab.settings.database.url.expose()
        );
        println!("Ctrl-C stops everything.");
        crate::runtime::shutdown_signal().await;
    }
    for mut w in workers {
        w.stop()?;
    }
    lab.client.flush().await?;
    Ok(())
}

/// The demo's first workload: mostly quick jobs, some compute, sleeps standing in for
/// inference and training (their `features` say which), some that fail and retry, a few
/// that exhaust their attempts, and a few malformed bodies.
fn workload(n: u64) -> Vec<(Kind, serde_json::Value, Option<serde_json::Value>, Option<u32>)> {
    let k = |s: &str| Kind::new(s).expect("built-in kind");
    (0..n)
        .map(|i| match i % 100 {
            0..=67 => (k("noop"), json!({}), None, None),
            68..=82 => (k("cpu"), json!({"iterations": 200_000}), None, None),
            83..=92 => (k("sleep"), json!({"ms": SHORT_MS}), Some(infer()), None),
            93..=94 => (k("sleep"), json!({"ms": LONG_MS}), Some(train()), None),
            95..=98 => (k("sleep"), json!({"ms": 5, "fail_first": 1}), None, None),
            _ => (k("sleep"), json!({"ms": 1, "fail_first": 99}), None, Some(2)),
        })
        .collect()
}

const SHORT_MS: u64 = 10;
const LONG_MS: u64 = 1000;

fn infer() -> serde_json::Value {
    json!({"task_type": "infer", "size": "small"})
}

fn train() -> serde_json::Value {
    json!({"task_type": "train", "size": "large"})
}

const MALFORMED: &[(&str, &[u8])] = &[
    ("noop", b"this is not json"),
    ("noop", br#"{"kind":"noop"}"#),
    ("noop", br#"{"kind":"cpu","payload":{}}"#),
    ("sleep", br#"{"kind":"sleep","payload":{},"max_attempts":0}"#),
    ("cpu", b"\xff\xfe\x00"),
];

/// Builds the envelopes of `jobs` with fresh ids.
fn envelopes(
    jobs: Vec<(Kind, serde_json::Value, Option<serde_json::Value>, Option<u32>)>,
) -> anyhow::Result<(Vec<Outgoing>, Vec<uuid::Uuid>)> {
    let mut out = Vec::with_capacity(jobs.len());
    let mut ids = Vec::with_capacity(jobs.len());
    for (kind, payload, features, max_attempts) in jobs {
        let id = JobId::new_v7();
        let mut env = json!({"id": id, "kind": kind, "payload": payload});
        if let Some(f) = features {
            env["features"] = f;
        }
        if let Some(m) = max_attempts {
            env["max_attempts"] = m.into();
        }
        out.push((job::submit_subject(&kind), id, serde_json::to_vec(&env)?.into()));
        ids.push(id.0);
    }
    Ok((out, ids))
}

/// Three acts: a mixed workload predicted cold; a model trained on its history; a
/// flood of long jobs mixed with short ones, which the model routes apart.
async fn demo(lab: &Lab, n: u64, flood: u64) -> anyhow::Result<()> {
    let (client, pool) = (&lab.client, &lab.pool);
    let producer = Producer::new(client.clone());
    println!("\n1. A mixed workload of {n} jobs. No model yet: predictions are per-kind medians of the history.");
    let (jobs, ids) = envelopes(workload(n))?;
    let bar = super::submit::progress(n, "submitting");
    let started = Instant::now();
    publish_all(&producer, jobs, &bar).await?;
    let js = async_nats::jetstream::new(client.clone());
    for (kind, body) in MALFORMED {
        js.publish(format!("jobs.submit.{kind}"), body.to_vec().into())
            .await?
            .await?;
    }
    bar.finish_and_clear();
    println!(
        "submitted        {n} jobs + {} malformed bodies in {:.2}s",
        MALFORMED.len(),
        started.elapsed().as_secs_f64()
    );
    let bar = super::submit::progress(n, "running");
    wait_finished(pool, &ids, Duration::from_secs(600), &bar).await?;
    bar.finish_and_clear();
    summary(client, pool, &ids).await?;
    let cold = prediction_error(pool, &ids).await?;

    println!("\n2. Training a run-time model on the finished jobs (what `mlsched model train` does).");
    let outcome = registry::train_and_promote(pool, 50_000, 42).await?;
    super::model::print_outcome(&outcome);
    if !outcome.promoted {
        println!("(the flood below runs on the per-kind medians)");
    } else {
        wait_for_model(client, outcome.version, Duration::from_secs(60)).await?;
        println!("the predictor serves version {} now", outcome.version);
    }

    if flood == 0 {
        return Ok(());
    }
    println!(
        "\n3. A flood: {flood} long `train` jobs ({LONG_MS} ms) mixed with {flood} short `infer` jobs ({SHORT_MS} ms), all at once."
    );
    let k = Kind::new("sleep").expect("built-in kind");
    let mixed = (0..flood).flat_map(|_| {
        [
            (k.clone(), json!({"ms": LONG_MS}), Some(train()), None),
            (k.clone(), json!({"ms": SHORT_MS}), Some(infer()), None),
        ]
    });
    let (jobs, ids) = envelopes(mixed.collect())?;
    let bar = super::submit::progress(ids.len() as u64, "submitting");
    publish_all(&producer, jobs, &bar).await?;
    bar.finish_and_clear();
    let bar = super::submit::progress(ids.len() as u64, "running");
    wait_finished(pool, &ids, Duration::from_secs(600), &bar).await?;
    bar.finish_and_clear();
    let rows = sqlx::query(
        "SELECT features->>'task_type' AS class, string_agg(DISTINCT lane, '+') AS lanes,
                percentile_cont(ARRAY[0.5, 0.95]) WITHIN GROUP
                    (ORDER BY EXTRACT(EPOCH FROM started_at - submitted_at) * 1000) AS wait_ms,
                EXTRACT(EPOCH FROM max(finished_at) - (SELECT min(submitted_at) FROM jobs WHERE id = ANY($1)))::float8 AS done_s,
                percentile_cont(0.5) WITHIN GROUP (ORDER BY predicted_ms) AS predicted,
                percentile_cont(0.5) WITHIN GROUP (ORDER BY actual_ms) AS actual
         FROM jobs WHERE id = ANY($1) GROUP BY 1 ORDER BY 1",
    )
    .bind(&ids)
    .fetch_all(pool)
    .await?;
    println!(
        "{:<8} {:<6} {:>14} {:>14} {:>12} {:>10} {:>18}",
        "", "LANE", "PREDICTED p50", "ACTUAL p50", "WAIT p50", "WAIT p95", "ALL DONE AFTER"
    );
    for r in rows {
        let class: Option<String> = r.try_get("class")?;
        let wait: Vec<f64> = r.try_get::<Option<Vec<f64>>, _>("wait_ms")?.unwrap_or_default();
        println!(
            "{:<8} {:<6} {:>11.0} ms {:>11.0} ms {:>9.0} ms {:>7.0} ms {:>16.2} s",
            class.unwrap_or_default(),
            r.try_get::<Option<String>, _>("lanes")?.unwrap_or_default(),
            r.try_get::<Option<f64>, _>("predicted")?.unwrap_or(0.0),
            r.try_get::<Option<f64>, _>("actual")?.unwrap_or(0.0),
            wait.first().copied().unwrap_or(0.0),
            wait.get(1).copied().unwrap_or(0.0),
            r.try_get::<Option<f64>, _>("done_s")?.unwrap_or(0.0),
        );
    }
    let warm = prediction_error(pool, &ids).await?;
    println!(
        "prediction error of sleep jobs (mean |actual - predicted|): {cold:.0} ms in act 1 (cold start), {warm:.0} ms in act 3 (model)"
    );
    println!("short jobs overtake the flood: they run on the fast lane while the long ones queue on the slow lane");
    Ok(())
}

/// Mean |actual − predicted| of the succeeded `sleep` jobs among `ids`, ms.
async fn prediction_error(pool: &PgPool, ids: &[uuid::Uuid]) -> anyhow::Result<f64> {
    let err: Option<f64> = sqlx::query_scalar(
        "SELECT avg(abs(actual_ms - predicted_ms))::float8 FROM jobs
         WHERE id = ANY($1) AND kind = 'sleep' AND status = 'succeeded' AND features IS NOT NULL",
    )
    .bind(ids)
    .fetch_one(pool)
    .await?;
    Ok(err.unwrap_or(0.0))
}

async fn summary(client: &async_nats::Client, pool: &PgPool, ids: &[uuid::Uuid]) -> anyhow::Result<()> {
    let row = sqlx::query(
        "SELECT count(*) FILTER (WHERE status = 'succeeded') AS ok,
                count(*) FILTER (WHERE status = 'dead') AS dead,
                count(*) FILTER (WHERE attempts > 1) AS retried,
                EXTRACT(EPOCH FROM max(finished_at) - min(submitted_at))::float8 AS span_s,
                percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP
                    (ORDER BY EXTRACT(EPOCH FROM started_at - submitted_at) * 1000) AS wait_ms,
                percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY actual_ms) AS run_ms
         FROM jobs WHERE id = ANY($1)",
    )
    .bind(ids)
    .fetch_one(pool)
    .await?;
    let ok: i64 = row.try_get("ok")?;
    let dead: i64 = row.try_get("dead")?;
    let retried: i64 = row.try_get("retried")?;
    let span: f64 = row.try_get::<Option<f64>, _>("span_s")?.unwrap_or(0.0);
    let wait: Vec<f64> = row.try_get::<Option<Vec<f64>>, _>("wait_ms")?.unwrap_or_default();
    let run: Vec<f64> = row.try_get::<Option<Vec<f64>>, _>("run_ms")?.unwrap_or_default();
    let js = async_nats::jetstream::new(client.clone());
    let dead_letters = js.get_stream(job::DEAD_STREAM).await?.info().await?.state.messages;
    let pct = |v: &[f64]| match v {
        [a, b, c] => format!("p50 {a:.1} ms   p95 {b:.1} ms   p99 {c:.1} ms"),
        _ => "-".into(),
    };
    println!();
    println!(
        "jobs             {} ({ok} succeeded, {dead} dead, {retried} retried at least once)",
        ids.len()
    );
    println!(
        "throughput       {:.0} jobs/s end to end ({span:.2}s from first submit to last finish)",
        ids.len() as f64 / span.max(1e-9)
    );
    println!("wait (submit→start)   {}", pct(&wait));
    println!("run                   {}", pct(&run));
    println!("dead letters     {dead_letters} in JOBS_DEAD (see `mlsched dlq list`)");
    Ok(())
}

/// Fast-lane burst jobs run this long, ms.
const BURST_SHORT_MS: u64 = 300;
/// Slow-lane burst jobs run this long, ms.
const BURST_LONG_MS: u64 = 3000;

/// `--autoscale`: executors scaled on lag until the burst is done and every lane is
/// back at its minimum (or until Ctrl-C with --keep-running).
async fn autoscaled(lab: &Lab, args: &DevArgs, env: Vec<(&'static str, String)>) -> anyhow::Result<()> {
    let monitor = match (&args.nats_monitor, lab.monitor_url()) {
        (Some(m), _) => m.clone(),
        (None, Some(m)) => m,
        (None, None) => anyhow::bail!("--autoscale with NATS_URL needs --nats-monitor http://<host>:8222"),
    };
    let timing = Timing::local();
    let mut scaler = Autoscaler::new(&monitor, timing, env)?;
    println!("\nAutoscaling executors with the ScaledObjects of keda/: replicas = ceil(lag / lagThreshold),");
    println!("lag = pending + in flight of the lane's consumer, read from {monitor}/jsz as KEDA reads it.");
    for (lane, p) in scaler.policies() {
        println!(
            "  {lane:<5} lagThreshold {:>4} (each executor runs that many jobs at once), replicas {}..{}",
            p.lag_threshold, p.min_replicas, p.max_replicas
        );
    }
    let chart_timing = scaler
        .policies()
        .next()
        .map_or((0, 0), |(_, p)| (p.polling_interval_s, p.cooldown_s));
    println!(
        "  timings shortened for one machine: poll {:?}, scale-down window {:?} and a step per {:?}, cooldown to zero {:?}\n  (keda/: {}s, 300s and 60s, {}s)",
        timing.poll,
        timing.stabilization,
        timing.scale_down_period,
        timing.cooldown,
        chart_timing.0,
        chart_timing.1
    );
    scaler.start(lab)?;
    let started = Instant::now();
    let stamp = |c: &super::autoscale::Change| {
        println!(
            "{:>7.1}s  executor-{:<5} lag {:>6}  {} -> {} executors",
            started.elapsed().as_secs_f64(),
            c.lane,
            c.lag,
            c.from,
            c.to
        )
    };

    let short = (args.burst, BURST_SHORT_MS, "fast");
    let long = (args.burst.div_ceil(80), BURST_LONG_MS, "slow");
    let mut ids = Vec::new();
    if args.burst > 0 {
        let kind = Kind::new("sleep").expect("built-in kind");
        let mut jobs = Vec::new();
        for (n, ms, lane) in [short, long] {
            let lane = crate::job::Lane::new(lane)?;
            for _ in 0..n {
                let id = JobId::new_v7();
                let body = json!({"id": id, "kind": kind, "payload": {"ms": ms}});
                jobs.push((job::run_subject(&lane, &kind), id, serde_json::to_vec(&body)?.into()));
                ids.push(id.0);
            }
        }
        println!(
            "\nA burst, published straight to the lanes: {} jobs of {} ms to jobs.run.fast.sleep, {} of {} ms to jobs.run.slow.sleep.",
            short.0, short.1, long.0, long.1
        );
        let bar = super::submit::progress(ids.len() as u64, "submitting");
        publish_all(&Producer::new(lab.client.clone()), jobs, &bar).await?;
        bar.finish_and_clear();
    }
    if args.keep_running {
        println!("\nPublish a burst of your own and watch (Ctrl-C stops everything):");
        println!(
            "  NATS_URL={} mlsched submit --kind sleep --payload '{{\"ms\": 500}}' --count 5000",
            lab.settings.nats.url.expose()
        );
    }
    let mut stop = std::pin::pin!(crate::runtime::shutdown_signal());
    let mut done_at = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(timing.poll) => {}
            _ = &mut stop => break,
        }
        for change in scaler.step(lab).await? {
            stamp(&change);
        }
        if done_at.is_none() && !ids.is_empty() && finished(&lab.pool, &ids).await? == ids.len() as i64 {
            done_at = Some(started.elapsed());
        }
        let at_minimum = scaler
            .policies()
            .all(|(lane, p)| scaler.replicas(lane) == p.min_replicas);
        if !args.keep_running && (ids.is_empty() || done_at.is_some()) && at_minimum {
            break;
        }
    }
    if let Some(done) = done_at {
        println!(
            "\nburst finished   {} jobs in {:.1}s; every lane back at its minimum after {:.1}s",
            ids.len(),
            done.as_secs_f64(),
            started.elapsed().as_secs_f64()
        );
        for (n, _, lane) in [short, long] {
            let p = scaler.policies().find(|(l, _)| *l == lane).map(|(_, p)| p.clone());
            if let Some(p) = p {
                println!(
                    "  {lane:<5} peak {} executors (the formula for the whole burst at once: ceil({n} / {}) = {}, at most {})",
                    scaler.peak(lane),
                    p.lag_threshold,
                    n.div_ceil(p.lag_threshold),
                    p.max_replicas
                );
            }
        }
        let row = sqlx::query(
            "SELECT count(*) FILTER (WHERE status = 'succeeded') AS ok,
                    (SELECT count(*) FROM (SELECT job_id FROM job_events WHERE job_id = ANY($1) AND status = 'running'
                        GROUP BY job_id HAVING count(*) > 1) twice) AS twice
             FROM jobs WHERE id = ANY($1)",
        )
        .bind(&ids)
        .fetch_one(&lab.pool)
        .await?;
        let (ok, twice): (i64, i64) = (row.get("ok"), row.get("twice"));
        println!("  records: {ok} of {} succeeded, {twice} started twice", ids.len());
    }
    scaler.stop().await
}
