//! Synthetic job history whose run time depends on the features in a known way:
//! `base[kind] × size factor × (1 + memory_mb / 1024)`, with ±10% noise. Used by
//! `mlsched bench` and the model's tests and benchmarks, where the truth must be known.

use super::{Features, Sample};

/// One synthetic job: its kind, its raw `features` JSON, its payload size and the run
/// time it "took".
#[derive(Debug, Clone)]
pub struct SyntheticJob {
    /// `train`, `etl` or `infer`.
    pub kind: &'static str,
    /// The envelope's `features` object, as JSON text.
    pub features: String,
    /// Payload size in bytes.
    pub payload_bytes: usize,
    /// The run time, ms.
    pub actual_ms: f64,
}

impl SyntheticJob {
    /// Draws one job.
    pub fn draw(rng: &mut fastrand::Rng) -> SyntheticJob {
        let (kind, base) = [("train", 4000.0), ("etl", 800.0), ("infer", 60.0)][rng.usize(..3)];
        let (size, factor) = [("small", 1.0), ("medium", 4.0), ("large", 16.0)][rng.usize(..3)];
        let memory = [256.0, 1024.0, 4096.0][rng.usize(..3)];
        let noise = 0.9 + rng.f64() * 0.2;
        SyntheticJob {
            kind,
            features: format!(r#"{{"size":"{size}","memory_mb":{memory},"task_type":"cpu"}}"#),
            payload_bytes: rng.usize(10..500),
            actual_ms: base * factor * (1.0 + memory / 1024.0) * noise,
        }
    }

    /// The training sample of this job.
    pub fn sample(&self) -> Sample {
        Sample {
            features: Features::extract(self.kind, Some(&self.features), self.payload_bytes),
            actual_ms: self.actual_ms,
        }
    }
}

/// `n` synthetic jobs, reproducible from `seed`.
pub fn jobs(n: usize, seed: u64) -> Vec<SyntheticJob> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..n).map(|_| SyntheticJob::draw(&mut rng)).collect()
}

/// The training samples of [`jobs`]`(n, seed)`.
pub fn history(n: usize, seed: u64) -> Vec<Sample> {
    jobs(n, seed).iter().map(SyntheticJob::sample).collect()
}
