//! Run-time prediction, the "ML" of mlsched: [`features`] turns a job into a vector;
//! [`model`] trains, scores and serves smartcore models on finished jobs.
//!
//! This is the pure part: no I/O. Training from Postgres, the model registry and
//! routing on predictions build on it.

pub mod features;
pub mod model;

pub use features::{FeatureSpace, Features};
pub use model::{train, Model, Prediction, Sample, Score, Trained};
