//! Prediction latency: in-process (feature extraction from the envelope's raw
//! `features` plus the model's answer, timed one prediction at a time) and over the
//! `mlsched.predict` request/reply service of a real predictor process (one request at
//! a time, then many in flight).

use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::stream::{self, StreamExt};
use serde_json::{json, Value};

use super::Percentiles;
use crate::cli::lab::{wait_for_model, Lab};
use crate::predict::{model::train, registry, synthetic, Features};

/// Requests in flight in the concurrent request/reply run.
const IN_FLIGHT: usize = 32;

pub(super) async fn run(lab: &Lab, quick: bool) -> anyhow::Result<Value> {
    let (history, timed, requests) = if quick {
        (1000, 2000, 300)
    } else {
        (5000, 100_000, 5000)
    };
    println!("\n== predict: prediction latency ({history} training jobs)");
    let trained = train(&synthetic::history(history, 7), 1).context("training the benchmark model")?;
    let algorithm = trained.model.algorithm();

    // In-process: what the routing stage spends per job.
    let jobs = synthetic::jobs(timed, 8);
    let mut ns = Vec::with_capacity(jobs.len());
    for job in &jobs {
        let began = Instant::now();
        let f = Features::extract(job.kind, Some(&job.features), job.payload_bytes);
        std::hint::black_box(trained.model.predict(&f));
        ns.push(began.elapsed().as_nanos() as f64);
    }
    let in_process = Percentiles::new(ns.iter().map(|n| n / 1000.0).collect());

    // Over request/reply, from a real predictor serving the same model.
    let version = registry::store_and_promote(&lab.pool, trained).await?.version;
    registry::activate(&lab.pool, version).await?;
    let mut predictor = lab.spawn(
        "mlsched-predictor",
        "predictor-bench",
        &[("MLSCHED__PREDICTOR__MODEL_REFRESH_S", "1".into())],
    )?;
    predictor.wait_ready(Duration::from_secs(30)).await?;
    wait_for_model(&lab.client, version, Duration::from_secs(30)).await?;
    let bodies: Vec<bytes::Bytes> = synthetic::jobs(requests, 9)
        .iter()
        .map(|j| {
            let features: Value = serde_json::from_str(&j.features).unwrap_or_default();
            let pad = "x".repeat(j.payload_bytes);
            json!({"kind": j.kind, "features": features, "payload": {"pad": pad}})
                .to_string()
                .into()
        })
        .collect();
    let ask = |body: bytes::Bytes| {
        let client = lab.client.clone();
        async move {
            let began = Instant::now();
            let reply = client.request("mlsched.predict", body).await?;
            let elapsed = began.elapsed();
            let v: Value = serde_json::from_slice(&reply.payload).context("reply is not JSON")?;
            anyhow::ensure!(v["model_version"].as_i64() == Some(version), "unexpected reply {v}");
            anyhow::Ok(elapsed.as_secs_f64() * 1000.0)
        }
    };
    let mut serial = Vec::with_capacity(requests);
    for body in &bodies {
        serial.push(ask(body.clone()).await?);
    }
    let serial = Percentiles::new(serial);
    let began = Instant::now();
    let concurrent: Vec<f64> = stream::iter(bodies.iter().cloned().map(ask))
        .buffer_unordered(IN_FLIGHT)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    let per_s = concurrent.len() as f64 / began.elapsed().as_secs_f64();
    let concurrent = Percentiles::new(concurrent);
    predictor.stop()?;

    println!("model            {algorithm} (version {version})");
    println!(
        "in-process       p50 {:.2} µs   p99 {:.2} µs   max {:.1} µs   ({timed} predictions)",
        in_process.at(0.5),
        in_process.at(0.99),
        in_process.max()
    );
    println!(
        "request/reply    p50 {:.3} ms   p99 {:.3} ms   max {:.2} ms   ({requests} requests, one at a time)",
        serial.at(0.5),
        serial.at(0.99),
        serial.max()
    );
    println!(
        "                 p50 {:.3} ms   p99 {:.3} ms   {per_s:.0} requests/s   ({IN_FLIGHT} in flight)",
        concurrent.at(0.5),
        concurrent.at(0.99),
    );
    Ok(json!({
        "model": algorithm,
        "in_process_us": in_process.json(),
        "request_reply_ms": serial.json(),
        "request_reply_concurrent_ms": concurrent.json(),
        "request_reply_concurrent_per_s": per_s,
        "in_flight": IN_FLIGHT,
    }))
}
