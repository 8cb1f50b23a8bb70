//! End-to-end throughput and latency of mlsched beside raw JetStream, in one run on one
//! server:
//!
//! - the baselines ([`super::baseline`]): one hop and two hops, async-nats only;
//! - mlsched through the predictor: `noop` jobs published to `jobs.submit.noop` while no
//!   worker runs (the submit rate), then a predictor and an executor started to drain
//!   them (the completion rate: jobs recorded `succeeded` in Postgres per second, from
//!   the first job's first record to the last job's success, both from `job_events`);
//! - the direct path: the same, published to `jobs.run.fast.noop`, executors only;
//! - scaling: the completion rate with 1, 2 and 4 executor processes;
//! - latency at a fixed offered load (open loop: jobs published on a schedule whatever
//!   happens) of 10, 20, 50 and 80% of the measured completion rate: submit → start
//!   and submit → recorded percentiles from the job records;
//! - resources: CPU seconds per 1,000 jobs of every process (Postgres with all its
//!   backends) and peak resident memory, and an idle executor's memory.
//!
//! Every run checks that each job was recorded `succeeded` exactly once.

use std::future::IntoFuture;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use serde_json::{json, Value};
use sqlx::Row;

use super::procstat::{cpu_s, peak_rss_mib, rss_mib, tree_cpu_s};
use super::{baseline, Percentiles};
use crate::cli::lab::{Lab, Proc};
use crate::cli::submit::{progress as bar, publish_all, Outgoing};
use crate::client::Producer;
use crate::job::{self, JobId, Kind, Lane};

/// Offered loads of the latency runs, in % of the measured completion rate.
const LOADS: [u32; 4] = [10, 20, 50, 80];
/// Executor processes of the scaling runs.
const SCALING: [usize; 3] = [1, 2, 4];

/// One drain of a pre-filled backlog.
struct Drain {
    submitted_per_s: f64,
    completed_per_s: f64,
    /// Per process: CPU seconds per 1,000 jobs and peak RSS in MiB.
    processes: Vec<(String, f64, Option<f64>)>,
}

impl Drain {
    fn json(&self) -> Value {
        let procs: serde_json::Map<String, Value> = self
            .processes
            .iter()
            .map(|(name, cpu, rss)| (name.clone(), json!({"cpu_s_per_1000_jobs": cpu, "peak_rss_mib": rss})))
            .collect();
        json!({"submitted_per_s": self.submitted_per_s, "completed_per_s": self.completed_per_s, "processes": procs})
    }
}

fn noop() -> Kind {
    Kind::new("noop").expect("built-in kind")
}

fn jobs(n: usize, subject: &str) -> (Vec<Outgoing>, Vec<uuid::Uuid>) {
    let payload = json!({});
    let kind = noop();
    (0..n)
        .map(|_| {
            let id = JobId::new_v7();
            (
                (subject.to_string(), id, Producer::envelope(id, &kind, &payload, None)),
                id.0,
            )
        })
        .unzip()
}

fn start_workers(lab: &Lab, predictor: bool, executors: usize, tag: &str) -> anyhow::Result<Vec<Proc>> {
    let mut procs = Vec::new();
    if predictor {
        procs.push(lab.spawn("mlsched-predictor", &format!("predictor-{tag}"), &[])?);
    }
    for i in 1..=executors {
        procs.push(lab.spawn("mlsched-executor", &format!("executor-{tag}-{i}"), &[])?);
    }
    Ok(procs)
}

async fn last_event_seq(lab: &Lab) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("SELECT COALESCE(max(seq), 0) FROM job_events")
        .fetch_one(&lab.pool)
        .await?)
}

/// Waits until `n` jobs have been recorded `succeeded` since event `seq0`. It watches
/// the work queues' consumers (cheap for the system measured: workers ack only after
/// the record commits, so drained queues mean the records are in), then confirms in
/// Postgres.
async fn wait_succeeded(lab: &Lab, seq0: i64, n: usize, bar: &indicatif::ProgressBar) -> anyhow::Result<()> {
    let js = async_nats::jetstream::new(lab.client.clone());
    let deadline = Instant::now() + Duration::from_secs(120 + n as u64 / 200);
    let consumers = [
        (job::SUBMIT_STREAM, job::PREDICTOR_CONSUMER.to_string()),
        (job::RUN_STREAM, job::executor_consumer(&Lane::new("fast")?)),
    ];
    loop {
        let mut left = 0;
        for (stream, consumer) in &consumers {
            let info = js.get_stream(stream).await?.consumer_info(consumer).await?;
            left += info.num_pending as usize + info.num_ack_pending;
        }
        // A job is counted once in each queue it still has to pass.
        bar.set_position(n.saturating_sub(left) as u64);
        if left == 0 {
            let done: i64 =
                sqlx::query_scalar("SELECT count(*) FROM job_events WHERE seq > $1 AND status = 'succeeded'")
                    .bind(seq0)
                    .fetch_one(&lab.pool)
                    .await?;
            if done as usize >= n {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("jobs still unfinished after the deadline ({left} in the queues); see the workers' logs");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every job of `ids` recorded `succeeded`, each exactly once; returns the seconds from
/// the run's first record to its last success.
async fn verify(lab: &Lab, ids: &[uuid::Uuid], seq0: i64) -> anyhow::Result<f64> {
    let ok: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE id = ANY($1) AND status = 'succeeded'")
        .bind(ids)
        .fetch_one(&lab.pool)
        .await?;
    let row = sqlx::query(
        "SELECT count(*) FILTER (WHERE status = 'succeeded') AS succeeded,
                count(DISTINCT job_id) FILTER (WHERE status = 'succeeded') AS jobs,
                EXTRACT(EPOCH FROM max(at) FILTER (WHERE status = 'succeeded') - min(at))::float8 AS span_s
         FROM job_events WHERE seq > $1",
    )
    .bind(seq0)
    .fetch_one(&lab.pool)
    .await?;
    let succeeded: i64 = row.try_get("succeeded")?;
    let distinct: i64 = row.try_get("jobs")?;
    if ok as usize != ids.len() || succeeded != distinct || distinct as usize != ids.len() {
        bail!(
            "records do not add up: {ok} of {} jobs succeeded, {succeeded} success events for {distinct} jobs",
            ids.len()
        );
    }
    Ok(row.try_get::<Option<f64>, _>("span_s")?.unwrap_or(0.0).max(1e-6))
}

/// Fills the queue with `n` jobs while no worker runs, then drains it.
async fn drain(lab: &Lab, n: usize, direct: bool, executors: usize) -> anyhow::Result<Drain> {
    let subject = if direct {
        job::run_subject(&Lane::new("fast")?, &noop())
    } else {
        job::submit_subject(&noop())
    };
    let tag = format!("{}{executors}", if direct { "direct" } else { "e2e" });
    let seq0 = last_event_seq(lab).await?;
    let (outgoing, ids) = jobs(n, &subject);
    let b = bar(n as u64, &format!("submit {tag}"));
    let began = Instant::now();
    publish_all(&Producer::new(lab.client.clone()), outgoing, &b).await?;
    let submitted_per_s = n as f64 / began.elapsed().as_secs_f64();
    b.finish_and_clear();

    let (nats, pg) = lab.server_pids();
    let servers0 = (nats.map(|p| cpu_s(p, false)), pg.map(tree_cpu_s));
    let mut procs = start_workers(lab, !direct, executors, &tag)?;
    let b = bar(n as u64, &format!("drain {tag}"));
    wait_succeeded(lab, seq0, n, &b).await?;
    b.finish_and_clear();
    let per_1000 = |cpu: f64| cpu / n as f64 * 1000.0;
    let mut processes = Vec::new();
    for p in &procs {
        processes.push((
            p.name.clone(),
            per_1000(cpu_s(p.pid(), false)),
            Some(peak_rss_mib(p.pid())),
        ));
    }
    if let (Some(pid), Some(before)) = (nats, servers0.0) {
        processes.push((
            "nats-server".into(),
            per_1000(cpu_s(pid, false) - before),
            Some(peak_rss_mib(pid)),
        ));
    }
    if let (Some(pid), Some(before)) = (pg, servers0.1) {
        processes.push(("postgres".into(), per_1000(tree_cpu_s(pid) - before), None));
    }
    for p in &mut procs {
        p.stop()?;
    }
    let span = verify(lab, &ids, seq0).await?;
    Ok(Drain {
        submitted_per_s,
        completed_per_s: n as f64 / span,
        processes,
    })
}

/// Publishes jobs at `rate` per second for `secs` on a fixed schedule (never waiting
/// for the system), then reports each job's submit → start and submit → recorded.
async fn open_loop(lab: &Lab, rate: f64, secs: f64) -> anyhow::Result<Value> {
    let n = ((rate * secs) as usize).max(50);
    let seq0 = last_event_seq(lab).await?;
    let (outgoing, ids) = jobs(n, &job::submit_subject(&noop()));
    let producer = Producer::new(lab.client.clone());
    let b = bar(n as u64, &format!("{rate:.0}/s"));
    let mut acks = FuturesUnordered::new();
    let t0 = tokio::time::Instant::now();
    for (i, (subject, id, body)) in outgoing.into_iter().enumerate() {
        tokio::time::sleep_until(t0 + Duration::from_secs_f64(i as f64 / rate)).await;
        acks.push(producer.send(subject, id, body).await?.into_future());
        while let Some(Some(ack)) = acks.next().now_or_never() {
            ack.context("publish not acknowledged")?;
        }
    }
    let offered = n as f64 / t0.elapsed().as_secs_f64();
    while let Some(ack) = acks.next().await {
        ack.context("publish not acknowledged")?;
    }
    wait_succeeded(lab, seq0, n, &b).await?;
    b.finish_and_clear();
    verify(lab, &ids, seq0).await?;
    let rows = sqlx::query(
        "SELECT EXTRACT(EPOCH FROM started_at - submitted_at)::float8 * 1000 AS start_ms,
                EXTRACT(EPOCH FROM updated_at - submitted_at)::float8 * 1000 AS recorded_ms
         FROM jobs WHERE id = ANY($1)",
    )
    .bind(&ids)
    .fetch_all(&lab.pool)
    .await?;
    let col = |name: &str| -> anyhow::Result<Percentiles> {
        let v: Result<Vec<f64>, sqlx::Error> = rows
            .iter()
            .map(|r| r.try_get::<Option<f64>, _>(name).map(|x| x.unwrap_or(0.0)))
            .collect();
        Ok(Percentiles::new(v?))
    };
    Ok(json!({
        "offered_per_s": offered,
        "jobs": n,
        "submit_to_start_ms": col("start_ms")?.json(),
        "submit_to_recorded_ms": col("recorded_ms")?.json(),
    }))
}

/// An executor's resident memory once it is ready with nothing to do, MiB.
async fn idle_executor_rss(lab: &Lab) -> anyhow::Result<f64> {
    let mut p = lab.spawn("mlsched-executor", "executor-idle", &[])?;
    p.wait_ready(Duration::from_secs(30)).await?;
    let rss = rss_mib(p.pid());
    p.stop()?;
    Ok(rss)
}

/// The whole scenario; returns the report's top-level entries.
pub(super) async fn run(lab: &Lab, n: usize, quick: bool, chart: &Path) -> anyhow::Result<Vec<(String, Value)>> {
    println!("\n== throughput: {n} noop jobs; JetStream file storage, Postgres with fsync, all on this machine");
    let idle_rss = idle_executor_rss(lab).await?;
    let body = Producer::envelope(JobId::new_v7(), &noop(), &json!({}), None);
    let one = baseline::one_hop(&lab.client, n, &body).await?;
    let two = baseline::two_hop(&lab.client, n, &body).await?;
    let mut scaling = Vec::new();
    for executors in SCALING {
        scaling.push((executors, drain(lab, n, false, executors).await?));
    }
    let e2e = &scaling[0].1;
    let direct = drain(lab, n, true, 1).await?;

    let secs = if quick { 1.0 } else { 8.0 };
    let mut procs = start_workers(lab, true, 1, "latency")?;
    for p in &mut procs {
        p.wait_ready(Duration::from_secs(30)).await?;
    }
    open_loop(lab, 200.0, 0.5).await.context("warming up")?;
    let mut latency = Vec::new();
    for load in LOADS {
        let rate = e2e.completed_per_s * f64::from(load) / 100.0;
        latency.push((load, open_loop(lab, rate, secs).await?));
    }
    for p in &mut procs {
        p.stop()?;
    }

    let ratio_e2e = e2e.completed_per_s / two.consume_per_s;
    let ratio_direct = direct.completed_per_s / one.consume_per_s;
    println!(
        "{:<28} {:>12} {:>12} {:>22}",
        "", "publish/s", "consume/s", "vs raw JetStream"
    );
    println!(
        "{:<28} {:>12.0} {:>12.0}",
        "JetStream one hop", one.publish_per_s, one.consume_per_s
    );
    println!(
        "{:<28} {:>12.0} {:>12.0}",
        "JetStream two hops", two.publish_per_s, two.consume_per_s
    );
    println!(
        "{:<28} {:>12.0} {:>12.0} {:>15.0}% of two hops",
        "mlsched via the predictor",
        e2e.submitted_per_s,
        e2e.completed_per_s,
        ratio_e2e * 100.0
    );
    println!(
        "{:<28} {:>12.0} {:>12.0} {:>16.0}% of one hop",
        "mlsched direct to a lane",
        direct.submitted_per_s,
        direct.completed_per_s,
        ratio_direct * 100.0
    );
    println!("(mlsched consume/s = jobs recorded succeeded in Postgres per second)");
    let rates: Vec<String> = scaling
        .iter()
        .map(|(e, d)| format!("{e}: {:.0}/s", d.completed_per_s))
        .collect();
    println!("scaling          executors {}", rates.join(", "));
    println!(
        "\n{:>5} {:>10}   {:<34} {:<34}",
        "load", "offered/s", "submit→start p50/p95/p99/max ms", "submit→recorded p50/p95/p99/max ms"
    );
    for (load, l) in &latency {
        let q = |key: &str| {
            let v = &l[key];
            let f = |k: &str| v[k].as_f64().unwrap_or(0.0);
            format!("{:.1} / {:.1} / {:.1} / {:.0}", f("p50"), f("p95"), f("p99"), f("max"))
        };
        println!(
            "{:>4}% {:>10.0}   {:<34} {:<34}",
            load,
            l["offered_per_s"].as_f64().unwrap_or(0.0),
            q("submit_to_start_ms"),
            q("submit_to_recorded_ms")
        );
    }
    println!("\nresources of the drain via the predictor (1 executor), per 1,000 jobs");
    for (name, cpu, rss) in &e2e.processes {
        let rss = rss.map(|r| format!("peak RSS {r:.0} MiB")).unwrap_or_default();
        println!("  {name:<18} {cpu:>6.3} CPU s   {rss}");
    }
    println!("  idle executor      RSS {idle_rss:.1} MiB");

    let p99_at = |load: u32| {
        latency
            .iter()
            .find(|(l, _)| *l == load)
            .and_then(|(_, v)| v["submit_to_start_ms"]["p99"].as_f64())
            .unwrap_or(0.0)
    };
    super::chart::write(
        chart,
        &latency
            .iter()
            .map(|(load, v)| {
                let s = &v["submit_to_start_ms"];
                let f = |k: &str| s[k].as_f64().unwrap_or(0.0);
                (f64::from(*load), [f("p50"), f("p95"), f("p99")])
            })
            .collect::<Vec<_>>(),
        &scaling
            .iter()
            .map(|(e, d)| (*e as f64, d.completed_per_s))
            .collect::<Vec<_>>(),
        two.consume_per_s,
    )?;
    println!("chart            {}", chart.display());

    Ok(vec![
        (
            "baseline".into(),
            json!({"publish_per_s": one.publish_per_s, "consume_per_s": one.consume_per_s}),
        ),
        (
            "baseline_two_hop".into(),
            json!({"publish_per_s": two.publish_per_s, "consume_per_s": two.consume_per_s}),
        ),
        (
            "mlsched".into(),
            json!({
                "jobs": n,
                "submitted_per_s": e2e.submitted_per_s,
                "completed_per_s": e2e.completed_per_s,
                "ratio_to_baseline_two_hop": ratio_e2e,
                "start_latency_p99_ms": p99_at(20),
                "start_latency_p99_ms_load_pct": 20,
                "direct": {
                    "submitted_per_s": direct.submitted_per_s,
                    "completed_per_s": direct.completed_per_s,
                    "ratio_to_baseline": ratio_direct,
                },
                "drain": e2e.json(),
                "direct_drain": direct.json(),
                "idle_executor_rss_mib": idle_rss,
            }),
        ),
        (
            "scaling".into(),
            json!(scaling
                .iter()
                .map(|(e, d)| json!({"executors": e, "completed_per_s": d.completed_per_s}))
                .collect::<Vec<_>>()),
        ),
        (
            "latency".into(),
            json!(latency
                .iter()
                .map(|(load, v)| {
                    let mut v = v.clone();
                    v["load_pct"] = (*load).into();
                    v
                })
                .collect::<Vec<_>>()),
        ),
    ])
}
