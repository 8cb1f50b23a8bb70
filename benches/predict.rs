//! In-process prediction latency: `cargo bench --bench predict`.
//!
//! A model trained on synthetic history (run time = base[kind] × size factor ×
//! (1 + memory_mb / 1024)), then the two steps of a prediction in the routing stage:
//! feature extraction from the envelope's raw `features`, and the model's answer.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use mlsched::predict::{model::train, synthetic, Features};

fn bench(c: &mut Criterion) {
    let trained = train(&synthetic::history(5000, 7), 1).expect("trains");
    let raw = r#"{"size":"large","memory_mb":2048,"task_type":"cpu"}"#;
    let features = Features::extract("etl", Some(raw), 200);
    c.bench_function("features/extract", |b| {
        b.iter(|| Features::extract(black_box("etl"), black_box(Some(raw)), 200))
    });
    c.bench_function(&format!("predict/{}", trained.model.algorithm()), |b| {
        b.iter(|| trained.model.predict(black_box(&features)))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
