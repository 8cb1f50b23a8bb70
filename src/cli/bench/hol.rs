//! Head-of-line blocking: two executors with the same number of slots either way; a
//! flood of long jobs mixed with as many short ones, all submitted at once. With one
//! lane the short jobs queue behind the long ones; with prediction-based lanes the
//! predictor (using a model trained on the jobs that ran before) sends them to the fast
//! lane and they overtake the flood. Measured: each class's wait (submit → start, from
//! the job records), where each class was routed, and when the last job finished.

use std::time::Duration;

use anyhow::{bail, Context as _};
use serde_json::{json, Value};
use sqlx::Row;

use super::Percentiles;
use crate::cli::lab::{wait_finished, wait_for_model, Lab, Proc};
use crate::cli::submit::{progress, publish_all, Outgoing};
use crate::client::Producer;
use crate::job::{self, JobId, Kind};
use crate::predict::registry;

const EXECUTORS: usize = 2;
/// Slots per executor process, split across its lanes.
const SLOTS: usize = 16;

struct Sizes {
    long_ms: u64,
    short_ms: u64,
    long: usize,
    short: usize,
}

#[derive(Clone, Copy)]
enum Mode {
    SingleLane,
    PredictionLanes,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::SingleLane => "single_lane",
            Mode::PredictionLanes => "prediction_lanes",
        }
    }

    fn start(self, lab: &Lab, sizes: &Sizes) -> anyhow::Result<Vec<Proc>> {
        let (threshold, lanes, slots) = match self {
            // Everything goes to `fast`, whatever the prediction.
            Mode::SingleLane => (u64::MAX / 2, "fast", SLOTS),
            // A threshold between the two classes; the slots split over two lanes.
            Mode::PredictionLanes => ((sizes.long_ms / 4).max(sizes.short_ms * 2), "fast,slow", SLOTS / 2),
        };
        let mut procs = vec![lab.spawn(
            "mlsched-predictor",
            &format!("predictor-{}", self.name()),
            &[
                ("MLSCHED__PREDICTOR__FAST_THRESHOLD_MS", threshold.to_string()),
                ("MLSCHED__PREDICTOR__MODEL_REFRESH_S", "1".into()),
                ("MLSCHED__PREDICTOR__RETRAIN_INTERVAL_S", "0".into()),
            ],
        )?];
        for i in 1..=EXECUTORS {
            procs.push(lab.spawn(
                "mlsched-executor",
                &format!("executor-{}-{i}", self.name()),
                &[
                    ("MLSCHED__EXECUTOR__LANES", lanes.into()),
                    ("MLSCHED__EXECUTOR__CONCURRENCY", slots.to_string()),
                ],
            )?);
        }
        Ok(procs)
    }
}

pub(super) async fn run(lab: &Lab, quick: bool) -> anyhow::Result<Value> {
    let sizes = if quick {
        Sizes {
            long_ms: 300,
            short_ms: 10,
            long: 64,
            short: 64,
        }
    } else {
        Sizes {
            long_ms: 1000,
            short_ms: 10,
            long: 128,
            short: 128,
        }
    };
    println!(
        "\n== hol: head-of-line blocking ({EXECUTORS} executors, {} slots; {} long jobs of {} ms mixed with {} short ones of {} ms)",
        EXECUTORS * SLOTS,
        sizes.long,
        sizes.long_ms,
        sizes.short,
        sizes.short_ms
    );
    let mut results = serde_json::Map::new();
    let mut version = None;
    for mode in [Mode::SingleLane, Mode::PredictionLanes] {
        let mut procs = mode.start(lab, &sizes)?;
        for p in &mut procs {
            p.wait_ready(Duration::from_secs(30)).await?;
        }
        let v = match version {
            Some(v) => v,
            None => {
                let v = learn(lab, &sizes).await?;
                version = Some(v);
                v
            }
        };
        wait_for_model(&lab.client, v, Duration::from_secs(30)).await?;
        let ids = flood(lab, &sizes).await?;
        for mut p in procs {
            p.stop()?;
        }
        let measured = measure(lab, &ids).await?;
        if let Mode::PredictionLanes = mode {
            // Not a speed number: the routing itself. Every short job must have been
            // predicted short and every long one long.
            for (class, lane) in [("short", "fast"), ("long", "slow")] {
                let lanes = &measured[format!("{class}_lanes")];
                if lanes.as_object().map(|m| m.len()) != Some(1) || lanes.get(lane).is_none() {
                    bail!("prediction-based routing is broken: {class} jobs went to {lanes}, not only {lane}");
                }
            }
        }
        results.insert(mode.name().into(), measured);
    }
    print(&results);
    let p95 = |mode: &str| results[mode]["short_wait_ms"]["p95"].as_f64().unwrap_or(0.0);
    let ratio = p95("single_lane") / p95("prediction_lanes").max(0.001);
    println!("short jobs' wait p95: {ratio:.0}x shorter with prediction-based lanes");
    results.insert("short_wait_p95_ratio".into(), ratio.into());
    results.insert(
        "setup".into(),
        json!({"executors": EXECUTORS, "slots_per_executor": SLOTS, "long_ms": sizes.long_ms,
               "short_ms": sizes.short_ms, "long_jobs": sizes.long, "short_jobs": sizes.short}),
    );
    Ok(Value::Object(results))
}

fn envelope(id: JobId, long: bool, sizes: &Sizes) -> Outgoing {
    let kind = Kind::new("sleep").expect("built-in kind");
    let (ms, features) = if long {
        (sizes.long_ms, json!({"task_type": "train", "size": "large"}))
    } else {
        (sizes.short_ms, json!({"task_type": "infer", "size": "small"}))
    };
    let body = json!({"id": id, "kind": kind, "payload": {"ms": ms}, "features": features});
    (job::submit_subject(&kind), id, body.to_string().into())
}

/// Runs a history of both classes through the pipeline (cold-start predictions), then
/// trains a model on it and activates it; returns its version.
async fn learn(lab: &Lab, sizes: &Sizes) -> anyhow::Result<i64> {
    let jobs: Vec<_> = (0..160).map(|i| envelope(JobId::new_v7(), i % 4 == 0, sizes)).collect();
    let ids: Vec<uuid::Uuid> = jobs.iter().map(|(_, id, _)| id.0).collect();
    let bar = progress(ids.len() as u64, "history");
    publish_all(&Producer::new(lab.client.clone()), jobs, &bar).await?;
    wait_finished(&lab.pool, &ids, Duration::from_secs(120), &bar).await?;
    bar.finish_and_clear();
    let outcome = registry::train_and_promote(&lab.pool, 50_000, 1)
        .await
        .context("training on the history")?;
    registry::activate(&lab.pool, outcome.version).await?;
    let best = &outcome.trained.best;
    println!(
        "model            {} (version {}) trained on {} finished jobs: holdout MAE {:.1} ms",
        best.algorithm, outcome.version, outcome.trained.sizes.0, best.mae_ms
    );
    Ok(outcome.version)
}

/// Submits the long and short jobs interleaved, all at once, and waits for them.
async fn flood(lab: &Lab, sizes: &Sizes) -> anyhow::Result<Vec<uuid::Uuid>> {
    let n = sizes.long.max(sizes.short);
    let mut jobs = Vec::new();
    for i in 0..n {
        if i < sizes.long {
            jobs.push(envelope(JobId::new_v7(), true, sizes));
        }
        if i < sizes.short {
            jobs.push(envelope(JobId::new_v7(), false, sizes));
        }
    }
    let ids: Vec<uuid::Uuid> = jobs.iter().map(|(_, id, _)| id.0).collect();
    let bar = progress(ids.len() as u64, "flood");
    publish_all(&Producer::new(lab.client.clone()), jobs, &bar).await?;
    wait_finished(&lab.pool, &ids, Duration::from_secs(600), &bar).await?;
    bar.finish_and_clear();
    Ok(ids)
}

/// Each class's wait, lanes and predictions, from the job records.
async fn measure(lab: &Lab, ids: &[uuid::Uuid]) -> anyhow::Result<Value> {
    let rows = sqlx::query(
        "SELECT features->>'task_type' AS class, lane, status::text AS status, predicted_ms, actual_ms,
                EXTRACT(EPOCH FROM started_at - submitted_at)::float8 * 1000 AS wait_ms,
                EXTRACT(EPOCH FROM finished_at - min(submitted_at) OVER ())::float8 AS done_s
         FROM jobs WHERE id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(&lab.pool)
    .await?;
    let mut out = serde_json::Map::new();
    let mut makespan: f64 = 0.0;
    for (class, label) in [("infer", "short"), ("train", "long")] {
        let mut waits = Vec::new();
        let mut lanes = std::collections::BTreeMap::<String, u64>::new();
        let (mut predicted, mut actual) = (Vec::new(), Vec::new());
        for r in rows
            .iter()
            .filter(|r| r.try_get::<Option<String>, _>("class").ok().flatten().as_deref() == Some(class))
        {
            let status: String = r.try_get("status")?;
            if status != "succeeded" {
                bail!("a {label} job ended {status}; see the executors' logs");
            }
            waits.push(r.try_get::<Option<f64>, _>("wait_ms")?.unwrap_or(0.0));
            *lanes.entry(r.try_get("lane")?).or_default() += 1;
            predicted.push(r.try_get::<Option<i64>, _>("predicted_ms")?.unwrap_or(0) as f64);
            actual.push(r.try_get::<Option<i64>, _>("actual_ms")?.unwrap_or(0) as f64);
            makespan = makespan.max(r.try_get::<Option<f64>, _>("done_s")?.unwrap_or(0.0));
        }
        out.insert(format!("{label}_wait_ms"), Percentiles::new(waits).json());
        out.insert(format!("{label}_lanes"), json!(lanes));
        out.insert(
            format!("{label}_predicted_ms_p50"),
            Percentiles::new(predicted).at(0.5).into(),
        );
        out.insert(
            format!("{label}_actual_ms_p50"),
            Percentiles::new(actual).at(0.5).into(),
        );
    }
    out.insert("all_done_s".into(), makespan.into());
    Ok(Value::Object(out))
}

fn print(results: &serde_json::Map<String, Value>) {
    println!(
        "{:<18} {:>30} {:>22} {:>10} {:>18} {:>18}",
        "", "short wait p50 / p95 / p99 ms", "long wait p50 / p95", "all done", "short: lane, pred", "long: lane, pred"
    );
    for (mode, label) in [("single_lane", "single lane"), ("prediction_lanes", "prediction lanes")] {
        let r = &results[mode];
        let w = |class: &str, q: &str| r[format!("{class}_wait_ms")][q].as_f64().unwrap_or(0.0);
        let lanes = |class: &str| {
            r[format!("{class}_lanes")]
                .as_object()
                .map(|m| m.keys().cloned().collect::<Vec<_>>().join("+"))
                .unwrap_or_default()
        };
        let pred = |class: &str| r[format!("{class}_predicted_ms_p50")].as_f64().unwrap_or(0.0);
        println!(
            "{label:<18} {:>30} {:>22} {:>8.1} s {:>18} {:>18}",
            format!(
                "{:.0} / {:.0} / {:.0}",
                w("short", "p50"),
                w("short", "p95"),
                w("short", "p99")
            ),
            format!("{:.0} / {:.0}", w("long", "p50"), w("long", "p95")),
            r["all_done_s"].as_f64().unwrap_or(0.0),
            format!("{}, {:.0} ms", lanes("short"), pred("short")),
            format!("{}, {:.0} ms", lanes("long"), pred("long")),
        );
    }
}
