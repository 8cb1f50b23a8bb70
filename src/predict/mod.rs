//! Run-time prediction, the "ML" of mlsched: [`features`] turns a job into a vector;
//! [`model`] trains, scores and serves smartcore models (pure, no I/O); [`registry`]
//! trains from Postgres history and keeps every model with its metrics in `models`.

pub mod features;
pub mod model;
pub mod registry;
pub mod synthetic;

pub use features::{FeatureSpace, Features};
pub use model::{train, Model, Prediction, Sample, Score, Trained};
