//! Predictions in the routing stage: the active model from the registry, reloaded every
//! `predictor.model_refresh_s` (so every replica picks up a promoted model without a
//! restart), with a cold start that never stalls routing: no model → the per-kind
//! median of finished jobs; no history → `predictor.default_ms`.
//!
//! A stored model that cannot be loaded is skipped with a logged reason and the model
//! already in use stays; a Postgres outage pauses the reloads, not the predictions.
//! Every `predictor.retrain_interval_s`, if `predictor.retrain_min_jobs` jobs finished
//! since the last model, one replica (a Postgres advisory lock) trains a new one; it is
//! promoted only if it is better (see `mlsched::predict::registry`).

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
/// History used for retraining.
const RETRAIN_HISTORY: i64 = 50_000;

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
    retrain_every: Option<Duration>,
    retrain_min_jobs: i64,
}

impl Predictor {
    pub(crate) fn new(settings: &Settings) -> Predictor {
        let p = &settings.predictor;
        Predictor {
            state: Arc::default(),
            default_ms: p.default_ms as f64,
            retrain_every: (p.retrain_interval_s > 0).then(|| Duration::from_secs(p.retrain_interval_s)),
            retrain_min_jobs: p.retrain_min_jobs as i64,
        }
    }

    /// The prediction for `job` and the model version that made it (`None`: cold start).
    pub(crate) fn predict(&self, job: &Job) -> (Prediction, Option<i64>) {
        let features = Features::extract(
            job.kind.as_str(),
            job.features.as_ref().map(|f| f.get()),
            mlsched::predict::features::stored_size(job.payload.get()),
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

    /// Refreshes every `every`, and retrains when due, until `cancel` fires.
    pub(crate) async fn run(self, pool: PgPool, every: Duration, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut retrain = tokio::time::interval(self.retrain_every.unwrap_or(Duration::from_secs(3600)));
        retrain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        retrain.tick().await; // the first tick is immediate; wait a full period first
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => self.refresh(&pool).await,
                _ = retrain.tick(), if self.retrain_every.is_some() => self.retrain(&pool).await,
            }
        }
    }

    async fn retrain(&self, pool: &PgPool) {
        match registry::retrain_if_due(pool, self.retrain_min_jobs, RETRAIN_HISTORY).await {
            Ok(Some(out)) => {
                tracing::info!(
                    version = out.version,
                    algorithm = out.trained.best.algorithm,
                    mae_ms = out.trained.best.mae_ms,
                    promoted = out.promoted,
                    "retrained the run-time model"
                );
                self.refresh(pool).await;
            }
            Ok(None) => {}
            // Too little history or Postgres trouble: routing goes on with what it has.
            Err(e) => tracing::info!(error = %e, "no retraining this time"),
        }
    }
}
