//! Predictions in the routing stage: the active model from the registry, reloaded every
//! `predictor.model_refresh_s` (so every replica picks up a promoted model without a
//! restart), with a cold start that never stalls routing: no model → the per-kind
//! median of finished jobs; no history → `predictor.default_ms`.
//!
//! A stored model that cannot be loaded is skipped with a logged reason and the model
//! already in use stays; a Postgres outage pauses the reloads, not the predictions.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use mlsched::config::Settings;
use mlsched::job::Job;
use mlsched::predict::model::KindMedians;
use mlsched::predict::registry::{self, RegistryError};
use mlsched::predict::{Features, Model, Prediction};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// History used for the cold-start medians.
const MEDIAN_HISTORY: i64 = 10_000;

#[derive(Default)]
struct State {
    model: Option<(i64, Arc<Model>)>,
    medians: KindMedians,
}

/// The current model (if any) and medians, shared by the routing loop.
#[derive(Clone, Default)]
pub(crate) struct Predictor {
    state: Arc<RwLock<State>>,
    default_ms: f64,
}

impl Predictor {
    pub(crate) fn new(settings: &Settings) -> Predictor {
        Predictor {
            state: Arc::default(),
            default_ms: settings.predictor.default_ms as f64,
        }
    }

    /// The prediction for `job` and the model version that made it (`None`: cold start).
    pub(crate) fn predict(&self, job: &Job) -> (Prediction, Option<i64>) {
        let features = Features::extract(
            job.kind.as_str(),
            job.features.as_ref().map(|f| f.get()),
            job.payload.get().len(),
        );
        let Ok(state) = self.state.read() else {
            return (self.fallback(None, &features), None);
        };
        match &state.model {
            Some((version, model)) => (model.predict(&features), Some(*version)),
            None => (self.fallback(Some(&state.medians), &features), None),
        }
    }

    fn fallback(&self, medians: Option<&KindMedians>, f: &Features) -> Prediction {
        let ms = match medians {
            Some(m) if !m.is_empty() => m.get(&f.kind),
            _ => self.default_ms,
        };
        // Without a model, the bound is a generous guess: twice the median.
        Prediction {
            predicted_ms: ms,
            upper_ms: ms * 2.0,
        }
    }

    /// Loads the active model and the medians once.
    pub(crate) async fn refresh(&self, pool: &PgPool) {
        let active = registry::active(pool).await;
        let medians = registry::history(pool, MEDIAN_HISTORY)
            .await
            .map(|h| KindMedians::fit(&h));
        let Ok(mut state) = self.state.write() else { return };
        match active {
            Ok(Some((version, model))) => {
                if state.model.as_ref().map(|(v, _)| *v) != Some(version) {
                    tracing::info!(version, algorithm = model.algorithm(), "using model");
                    state.model = Some((version, Arc::new(model)));
                }
            }
            Ok(None) => {
                if state.model.take().is_some() {
                    tracing::info!("no active model; predicting per-kind medians");
                }
            }
            Err(RegistryError::Unloadable { version, reason }) => {
                tracing::warn!(version, %reason, "active model cannot be loaded; keeping the one in use");
            }
            Err(e) => tracing::warn!(error = %e, "model registry unreachable; keeping the model in use"),
        }
        match medians {
            Ok(m) => state.medians = m,
            Err(e) => tracing::debug!(error = %e, "medians not refreshed"),
        }
    }

    /// Refreshes every `every` until `cancel` fires.
    pub(crate) async fn run(self, pool: PgPool, every: Duration, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => self.refresh(&pool).await,
            }
        }
    }
}
