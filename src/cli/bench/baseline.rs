//! What NATS JetStream itself does on this machine, with async-nats and no mlsched
//! code, on the same server as the mlsched runs:
//!
//! - one hop: a work-queue stream on file storage, pipelined publishes with acks, one
//!   durable pull consumer fetching in batches and acking each message;
//! - two hops: the same, where a first consumer republishes each message (awaiting the
//!   publish acks of a batch before acking the batch) to a second work-queue stream
//!   that a second consumer drains: the raw cost of a routing stage before the workers.
//!
//! Each hop's streams are created fresh, filled first (the publish rate), then drained
//! (the consume rate: messages acked at the last hop per second), then deleted.

use std::future::IntoFuture;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use async_nats::jetstream::{self, consumer::pull, stream};
use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use indicatif::ProgressBar;

use crate::cli::submit::progress;

/// Publish acks outstanding at once (as mlsched's own producers).
const WINDOW: usize = 2048;
/// Messages per pull request.
const BATCH: usize = 512;

/// Publish and consume rates of one baseline run.
pub(super) struct Rates {
    pub(super) publish_per_s: f64,
    pub(super) consume_per_s: f64,
}

async fn fresh_stream(js: &jetstream::Context, name: &str) -> anyhow::Result<stream::Stream> {
    let _ = js.delete_stream(name).await;
    js.create_stream(stream::Config {
        name: name.to_string(),
        subjects: vec![subject(name)],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .with_context(|| format!("creating stream {name}"))
}

fn subject(stream: &str) -> String {
    format!("bench.{}", stream.to_lowercase())
}

async fn consumer(stream: &stream::Stream) -> anyhow::Result<jetstream::consumer::Consumer<pull::Config>> {
    Ok(stream
        .create_consumer(pull::Config {
            durable_name: Some("bench".into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            max_ack_pending: 20_000,
            ..Default::default()
        })
        .await?)
}

/// Publishes `n` copies of `body` to `stream`'s subject, pipelined; returns msgs/s.
async fn fill(js: &jetstream::Context, stream: &str, n: usize, body: &Bytes, bar: &ProgressBar) -> anyhow::Result<f64> {
    let subject = subject(stream);
    let began = Instant::now();
    let mut acks = FuturesUnordered::new();
    for _ in 0..n {
        acks.push(js.publish(subject.clone(), body.clone()).await?.into_future());
        while acks.len() >= WINDOW {
            if let Some(ack) = acks.next().await {
                ack?;
                bar.inc(1);
            }
        }
    }
    while let Some(ack) = acks.next().await {
        ack?;
        bar.inc(1);
    }
    Ok(n as f64 / began.elapsed().as_secs_f64())
}

/// Drains `n` messages from `consumer`, acking each; with `forward`, republishes each
/// to that stream first and acks a batch only when its publishes are acknowledged.
async fn drain(
    js: &jetstream::Context,
    consumer: jetstream::consumer::Consumer<pull::Config>,
    n: usize,
    forward: Option<String>,
    bar: Option<&ProgressBar>,
) -> anyhow::Result<()> {
    let mut done = 0;
    while done < n {
        let mut batch = consumer
            .batch()
            .max_messages(BATCH.min(n - done))
            .expires(Duration::from_secs(1))
            .messages()
            .await?;
        let mut msgs = Vec::with_capacity(BATCH);
        while let Some(m) = batch.next().await {
            msgs.push(m.map_err(|e| anyhow::anyhow!("fetching: {e}"))?);
        }
        if let Some(to) = &forward {
            let mut acks = Vec::with_capacity(msgs.len());
            for m in &msgs {
                acks.push(js.publish(to.clone(), m.payload.clone()).await?.into_future());
            }
            for a in acks {
                a.await?;
            }
        }
        for m in &msgs {
            m.ack().await.map_err(|e| anyhow::anyhow!("acking: {e}"))?;
        }
        done += msgs.len();
        if let Some(bar) = bar {
            bar.inc(msgs.len() as u64);
        }
    }
    Ok(())
}

/// One hop: fill, then drain with one consumer.
pub(super) async fn one_hop(client: &async_nats::Client, n: usize, body: &Bytes) -> anyhow::Result<Rates> {
    let js = jetstream::new(client.clone());
    let s = fresh_stream(&js, "BENCH_ONE").await?;
    let bar = progress(n as u64 * 2, "one hop");
    let publish_per_s = fill(&js, "BENCH_ONE", n, body, &bar).await?;
    let c = consumer(&s).await?;
    let began = Instant::now();
    drain(&js, c, n, None, Some(&bar)).await?;
    let consume_per_s = n as f64 / began.elapsed().as_secs_f64();
    bar.finish_and_clear();
    check_empty(&js, "BENCH_ONE").await?;
    js.delete_stream("BENCH_ONE").await?;
    Ok(Rates {
        publish_per_s,
        consume_per_s,
    })
}

/// Two hops: fill the first stream, then drain it through the second.
pub(super) async fn two_hop(client: &async_nats::Client, n: usize, body: &Bytes) -> anyhow::Result<Rates> {
    let js = jetstream::new(client.clone());
    let first = fresh_stream(&js, "BENCH_TWO_A").await?;
    let second = fresh_stream(&js, "BENCH_TWO_B").await?;
    let bar = progress(n as u64 * 2, "two hops");
    let publish_per_s = fill(&js, "BENCH_TWO_A", n, body, &bar).await?;
    let (c1, c2) = (consumer(&first).await?, consumer(&second).await?);
    let began = Instant::now();
    let hop1 = drain(&js, c1, n, Some(subject("BENCH_TWO_B")), None);
    let hop2 = drain(&js, c2, n, None, Some(&bar));
    tokio::try_join!(hop1, hop2)?;
    let consume_per_s = n as f64 / began.elapsed().as_secs_f64();
    bar.finish_and_clear();
    for name in ["BENCH_TWO_A", "BENCH_TWO_B"] {
        check_empty(&js, name).await?;
        js.delete_stream(name).await?;
    }
    Ok(Rates {
        publish_per_s,
        consume_per_s,
    })
}

/// Acks are sent without waiting for confirmation; the work queue must still end empty.
async fn check_empty(js: &jetstream::Context, name: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = js.get_stream(name).await?.info().await?.state.messages;
        if left == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{left} messages still in {name} after every ack was sent");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
