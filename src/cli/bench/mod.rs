//! `mlsched bench`: measurements on a stack it starts (or the one `NATS_URL` /
//! `DATABASE_URL` name), printed as tables and written as JSON with `--json FILE`.
//!
//! Scenarios (all by default, or those named with `--scenario`):
//! - `throughput`: raw JetStream baselines (one hop, two hops) beside mlsched end to
//!   end and direct to a lane, latency at fixed offered loads, scaling over executor
//!   processes, CPU and memory per process, and a chart (see `throughput`).
//! - `predict`: prediction latency, in-process and over the `mlsched.predict`
//!   request/reply service.
//! - `hol`: head-of-line blocking: a flood of long jobs mixed with short ones on two
//!   executors, short jobs' wait with prediction-based lanes versus a single lane.
//!
//! The scenarios publish jobs and train and activate models of their own: point a
//! bench at a scratch stack, never at production.
//!
//! `--quick` shrinks every scenario so the whole run takes about a minute (for CI); it
//! fails only when something is broken, never on a speed number.

mod baseline;
mod chart;
mod hol;
mod predict;
mod procstat;
mod throughput;

use std::path::PathBuf;

use anyhow::Context as _;
use serde_json::{json, Map, Value};

use super::lab::Lab;
use crate::config::Settings;

/// `mlsched bench` options.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Run only these scenarios (repeat the flag; default: all).
    #[arg(long, value_enum)]
    pub scenario: Vec<Scenario>,
    /// Jobs (and baseline messages) per throughput run [default: 100000; 2000 with
    /// --quick].
    #[arg(long)]
    pub jobs: Option<usize>,
    /// Small sizes so the run takes about a minute
    /// (CI); it checks that everything works, never a speed number.
    #[arg(long)]
    pub quick: bool,
    /// Where to write the chart (SVG): latency against offered load, throughput
    /// against executor processes.
    #[arg(long, default_value = "mlsched-bench.svg")]
    pub chart: PathBuf,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Folder for the private servers' data and the workers' logs; wiped at start
    /// (default: <temp dir>/mlsched-bench).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

/// What `mlsched bench` can measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Throughput and latency against raw JetStream, scaling, resources, chart.
    Throughput,
    /// Prediction latency in-process and over request/reply.
    Predict,
    /// Short jobs' wait behind a flood of long ones: prediction lanes vs one lane.
    Hol,
}

pub(super) async fn run(args: BenchArgs, settings: Settings) -> anyhow::Result<()> {
    let scenarios = if args.scenario.is_empty() {
        vec![Scenario::Throughput, Scenario::Predict, Scenario::Hol]
    } else {
        args.scenario.clone()
    };
    let data = args
        .data_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("mlsched-bench"));
    let lab = Lab::start(&data, settings, true, false).await?;
    let mut report = Map::new();
    report.insert("machine".into(), machine(&lab).await);
    report.insert("quick".into(), args.quick.into());
    let jobs = args.jobs.unwrap_or(if args.quick { 2000 } else { 100_000 });
    for scenario in scenarios {
        match scenario {
            Scenario::Throughput => report.extend(throughput::run(&lab, jobs, args.quick, &args.chart).await?),
            Scenario::Predict => {
                report.insert("predict".into(), predict::run(&lab, args.quick).await?);
            }
            Scenario::Hol => {
                report.insert("hol".into(), hol::run(&lab, args.quick).await?);
            }
        }
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&Value::Object(report))?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("\nresults written to {}", path.display());
    }
    Ok(())
}

/// What the numbers were measured on.
async fn machine(lab: &Lab) -> Value {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let nats = lab.client.server_info().version;
    let postgres: Option<String> = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&lab.pool)
        .await
        .ok();
    let line = format!(
        "machine: {cores} cores, nats-server {nats}, PostgreSQL {}",
        postgres.as_deref().unwrap_or("?")
    );
    println!("{line}");
    json!({"cores": cores, "nats_server": nats, "postgres": postgres})
}

/// Nearest-rank percentiles of `values` (sorted here).
pub(super) struct Percentiles {
    sorted: Vec<f64>,
}

impl Percentiles {
    pub(super) fn new(mut values: Vec<f64>) -> Percentiles {
        values.sort_by(f64::total_cmp);
        Percentiles { sorted: values }
    }

    /// The `q` quantile (0..=1); 0 when there are no values.
    pub(super) fn at(&self, q: f64) -> f64 {
        if self.sorted.is_empty() {
            return 0.0;
        }
        let rank = ((q * self.sorted.len() as f64).ceil() as usize).clamp(1, self.sorted.len());
        self.sorted[rank - 1]
    }

    pub(super) fn max(&self) -> f64 {
        self.sorted.last().copied().unwrap_or(0.0)
    }

    /// `{p50, p95, p99, max}` in the values' unit.
    pub(super) fn json(&self) -> Value {
        json!({"p50": self.at(0.5), "p95": self.at(0.95), "p99": self.at(0.99), "max": self.max(), "n": self.sorted.len()})
    }
}

#[cfg(test)]
mod tests {
    use super::Percentiles;

    #[test]
    fn percentiles_are_nearest_rank() {
        let p = Percentiles::new((1..=100).rev().map(f64::from).collect());
        assert_eq!(p.at(0.5), 50.0);
        assert_eq!(p.at(0.99), 99.0);
        assert_eq!(p.at(1.0), 100.0);
        assert_eq!(p.at(0.0), 1.0);
        assert_eq!(p.max(), 100.0);
        assert_eq!(Percentiles::new(vec![]).at(0.5), 0.0);
    }
}
