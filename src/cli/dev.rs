//! `mlsched dev`: the whole pipeline on one machine.
//!
//! Without `NATS_URL` / `DATABASE_URL` it starts a private `nats-server` (JetStream,
//! monitoring on) and a throwaway Postgres cluster in a data folder, migrates, applies
//! the streams, starts the predictor and the executors (the sibling binaries next to
//! this one), submits a demo workload and prints a summary. `--keep-running` leaves
//! everything up until Ctrl-C.

use std::future::IntoFuture;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use serde_json::json;
use sqlx::{PgPool, Row};

use crate::client::Producer;
use crate::config::{Secret, Settings};
use crate::job::{self, JobId, Kind};
use crate::stack::{self, NatsServer, PgCluster};

/// `mlsched dev` options.
#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// Folder for the private servers' data and the workers' logs; wiped at start
    /// (default: <temp dir>/mlsched-dev).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Jobs in the demo workload (0: none).
    #[arg(long, default_value_t = 2000)]
    pub jobs: u64,
    /// Executor processes to start.
    #[arg(long, default_value_t = 2)]
    pub executors: u32,
    /// Leave the stack running after the demo, until Ctrl-C.
    #[arg(long)]
    pub keep_running: bool,
}

struct Workers(Vec<(String, Child)>);

impl Workers {
    fn stop(&mut self) {
        for (_, c) in &self.0 {
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
        }
        for (name, c) in &mut self.0 {
            match c.wait() {
                Ok(s) if s.success() => {}
                Ok(s) => eprintln!("{name} exited with {s}"),
                Err(e) => eprintln!("{name}: {e}"),
            }
        }
        self.0.clear();
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop();
    }
}

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating this executable")?;
    let path = exe.with_file_name(name);
    if !path.is_file() {
        bail!(
            "{} not found next to {}: build the workers too (cargo build --release --workspace)",
            name,
            exe.display()
        );
    }
    Ok(path)
}

pub(super) async fn run(args: DevArgs, mut settings: Settings) -> anyhow::Result<()> {
    let data = args
        .data_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("mlsched-dev"));
    if data.exists() {
        std::fs::remove_dir_all(&data).with_context(|| format!("wiping {}", data.display()))?;
    }
    std::fs::create_dir_all(data.join("logs"))?;

    let _nats = if std::env::var_os("NATS_URL").is_none() {
        let server = NatsServer::start(&stack::nats_server_binary()?, &data.join("nats"))?;
        println!(
            "nats-server      {}  (monitoring {})",
            server.url(),
            server.monitor_url()
        );
        settings.nats.url = Secret::new(server.url());
        Some(server)
    } else {
        None
    };
    let _pg = if std::env::var_os("DATABASE_URL").is_none() {
        let cluster = PgCluster::start(&data.join("pg"), false)?;
        let admin = PgPool::connect(&cluster.url("postgres")).await?;
        sqlx::query("CREATE DATABASE mlsched").execute(&admin).await?;
        admin.close().await;
        settings.database.url = Secret::new(cluster.url("mlsched"));
        println!("postgres         {}", cluster.url("mlsched"));
        Some(cluster)
    } else {
        None
    };

    let pool = crate::store::pool(&settings.database)?;
    crate::store::migrate(&pool).await.context("migrating")?;
    let client = super::nats(&settings).await?;
    let args_apply = super::ApplyArgs {
        dir: None,
        overrides: None,
        replicas: None,
    };
    for change in super::apply_streams(&client, &settings, &args_apply).await? {
        println!("streams          {change}");
    }

    let mut workers = Workers(Vec::new());
    let mut metrics_urls = Vec::new();
    let mut targets = Vec::new();
    let env = [
        ("NATS_URL", settings.nats.url.expose().to_string()),
        ("DATABASE_URL", settings.database.url.expose().to_string()),
    ];
    let mut spawn = |bin: &str, name: String| -> anyhow::Result<()> {
        let log = std::fs::File::create(data.join("logs").join(format!("{name}.log")))?;
        let mut cmd = Command::new(sibling(bin)?);
        cmd.envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if std::env::var_os("MLSCHED__RETRY__BASE_MS").is_none() {
            cmd.env("MLSCHED__RETRY__BASE_MS", "200");
        }
        // Each process gets its own operations port on this machine.
        let port = stack::free_port()?;
        cmd.env("MLSCHED__METRICS__LISTEN", format!("127.0.0.1:{port}"));
        metrics_urls.push(format!("{name} http://127.0.0.1:{port}/metrics"));
        targets.push(serde_json::json!({"targets": [format!("127.0.0.1:{port}")], "labels": {"component": name}}));
        workers
            .0
            .push((name, cmd.spawn().with_context(|| format!("starting {bin}"))?));
        Ok(())
    };
    spawn("mlsched-predictor", "predictor".into())?;
    for i in 1..=args.executors {
        spawn("mlsched-executor", format!("executor-{i}"))?;
    }
    let pids: Vec<String> = workers.0.iter().map(|(n, c)| format!("{n} (pid {})", c.id())).collect();
    println!(
        "workers          {}; logs in {}",
        pids.join(", "),
        data.join("logs").display()
    );
    println!("metrics          {}", metrics_urls.join(", "));
    let targets_file = data.join("prometheus-targets.json");
    std::fs::write(&targets_file, serde_json::to_vec_pretty(&targets)?)?;
    println!("prometheus       file_sd targets in {}", targets_file.display());

    if args.jobs > 0 {
        demo(&client, &pool, args.jobs).await?;
    }
    if args.keep_running {
        println!("\nThe stack is running. Publish a job from anywhere:");
        println!(
            "  NATS_URL={} mlsched submit --kind sleep --payload '{{\"ms\": 100}}' --wait",
            settings.nats.url.expose()
        );
        println!("  or with any NATS client: publish {{\"kind\":\"noop\",\"payload\":{{}}}} to jobs.submit.noop (README: publishing jobs)");
        println!("  DATABASE_URL={} mlsched status <id>", settings.database.url.expose());
        println!("Ctrl-C stops everything.");
        crate::runtime::shutdown_signal().await;
    }
    workers.stop();
    client.flush().await?;
    Ok(())
}

/// The demo workload: mostly quick jobs, some compute, some sleeps, some that fail and
/// retry, a few that exhaust their attempts, and a few malformed bodies.
fn workload(n: u64) -> Vec<(Kind, serde_json::Value, Option<u32>)> {
    let k = |s: &str| Kind::new(s).expect("built-in kind");
    (0..n)
        .map(|i| match i % 100 {
            0..=69 => (k("noop"), json!({}), None),
            70..=84 => (k("cpu"), json!({"iterations": 200_000}), None),
            85..=94 => (k("sleep"), json!({"ms": 20}), None),
            95..=98 => (k("sleep"), json!({"ms": 5, "fail_first": 1}), None),
            _ => (k("sleep"), json!({"ms": 1, "fail_first": 99}), Some(2)),
        })
        .collect()
}

const MALFORMED: &[(&str, &[u8])] = &[
    ("noop", b"this is not json"),
    ("noop", br#"{"kind":"noop"}"#),
    ("noop", br#"{"kind":"cpu","payload":{}}"#),
    ("sleep", br#"{"kind":"sleep","payload":{},"max_attempts":0}"#),
    ("cpu", b"\xff\xfe\x00"),
];

async fn demo(client: &async_nats::Client, pool: &PgPool, n: u64) -> anyhow::Result<()> {
    let producer = Producer::new(client.clone());
    let jobs = workload(n);
    let bar = super::submit::progress(n, "submitting");
    let started = Instant::now();
    let mut ids = Vec::with_capacity(jobs.len());
    let mut acks = FuturesUnordered::new();
    for (kind, payload, max_attempts) in &jobs {
        let id = JobId::new_v7();
        let mut env = json!({"id": id, "kind": kind, "payload": payload});
        if let Some(m) = max_attempts {
            env["max_attempts"] = (*m).into();
        }
        acks.push(
            producer
                .send(job::submit_subject(kind), id, serde_json::to_vec(&env)?.into())
                .await?
                .into_future(),
        );
        ids.push(id.0);
        if acks.len() >= 1024 {
            if let Some(a) = acks.next().await {
                a?;
                bar.inc(1);
            }
        }
    }
    while let Some(a) = acks.next().await {
        a?;
        bar.inc(1);
    }
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
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let done: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM jobs WHERE id = ANY($1) AND status IN ('succeeded', 'dead', 'cancelled')",
        )
        .bind(&ids)
        .fetch_one(pool)
        .await?;
        bar.set_position(done as u64);
        if done as u64 >= n {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {done} of {n} jobs finished within 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bar.finish_and_clear();
    summary(client, pool, &ids).await
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
