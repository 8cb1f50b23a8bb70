//! In-process prediction latency: `cargo bench --bench predict`.
//!
//! A model trained on synthetic history (run time = base[kind] × size factor ×
//! (1 + memory_mb / 1024)), then the two steps of a prediction in the routing stage:
//! feature extraction from the envelope's raw `features`, and the model's answer.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use mlsched::predict::{model::train, Features, Sample};

fn history(n: usize) -> Vec<Sample> {
    let mut rng = fastrand::Rng::with_seed(7);
    let kinds = [("train", 4000.0), ("etl", 800.0), ("infer", 60.0)];
    let sizes = [("small", 1.0), ("medium", 4.0), ("large", 16.0)];
    (0..n)
        .map(|_| {
            let (kind, base) = kinds[rng.usize(..kinds.len())];
            let (size, factor) = sizes[rng.usize(..sizes.len())];
            let memory = [256.0, 1024.0, 4096.0][rng.usize(..3)];
            let features = format!(r#"{{"size":"{size}","memory_mb":{memory}}}"#);
            Sample {
                features: Features::extract(kind, Some(&features), rng.usize(10..500)),
                actual_ms: base * factor * (1.0 + memory / 1024.0) * (0.9 + rng.f64() * 0.2),
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let trained = train(&history(5000), 1).expect("trains");
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
