//! The model registry in Postgres (`models`): training from finished jobs, storing each
//! model with its holdout metrics, promoting only on improvement, and rolling back.
//!
//! A new model becomes active only if, on the same holdout, its error is below the
//! per-kind median's and at least 1% below the active model's. At most one model is active (a unique
//! partial index), and activation is one transaction.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgPool, Row};
use thiserror::Error;

use super::features::Features;
use super::model::{self, Model, Sample, TrainError, Trained};

/// A registry failure.
#[derive(Debug, Error)]
pub enum RegistryError {
    /// Postgres failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Not enough history, or smartcore failed.
    #[error(transparent)]
    Train(#[from] TrainError),
    /// `activate` named a version that does not exist.
    #[error("no model version {0}")]
    NoSuchVersion(i64),
    /// A stored model does not deserialize (corrupt or from an incompatible build).
    #[error("model version {version} cannot be loaded: {reason}")]
    Unloadable {
        /// The version.
        version: i64,
        /// Why.
        reason: String,
    },
}

/// One row of `models`, without the model bytes.
#[derive(Debug, Clone, Serialize)]
pub struct ModelRow {
    /// Version.
    pub version: i64,
    /// `random_forest` or `linear`.
    pub algorithm: String,
    /// When it was trained.
    pub trained_at: DateTime<Utc>,
    /// Training + holdout size.
    pub samples: i32,
    /// Holdout MAE, ms.
    pub holdout_mae_ms: f64,
    /// Holdout R² (log scale).
    pub holdout_r2: f64,
    /// The per-kind median's MAE on the same holdout, ms.
    pub baseline_mae_ms: f64,
    /// Whether predictors use it.
    pub active: bool,
}

/// The newest `limit` succeeded jobs as training samples.
pub async fn history(pool: &PgPool, limit: i64) -> Result<Vec<Sample>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT kind, features::text AS features, octet_length(payload::text) AS bytes, actual_ms
         FROM jobs WHERE status = 'succeeded' AND actual_ms IS NOT NULL
         ORDER BY finished_at DESC, id LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|r| {
            let kind: String = r.try_get("kind")?;
            let features: Option<String> = r.try_get("features")?;
            let bytes: i32 = r.try_get("bytes")?;
            let actual: i64 = r.try_get("actual_ms")?;
            Ok(Sample {
                features: Features::extract(&kind, features.as_deref(), bytes.max(0) as usize),
                actual_ms: actual as f64,
            })
        })
        .collect()
}

/// Every model, newest first.
pub async fn list(pool: &PgPool) -> Result<Vec<ModelRow>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT version, algorithm, trained_at, samples, holdout_mae_ms, holdout_r2, baseline_mae_ms, active
         FROM models ORDER BY version DESC",
    )
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(ModelRow {
                version: r.try_get("version")?,
                algorithm: r.try_get("algorithm")?,
                trained_at: r.try_get("trained_at")?,
                samples: r.try_get("samples")?,
                holdout_mae_ms: r.try_get("holdout_mae_ms")?,
                holdout_r2: r.try_get("holdout_r2")?,
                baseline_mae_ms: r.try_get("baseline_mae_ms")?,
                active: r.try_get("active")?,
            })
        })
        .collect()
}

/// Makes `version` the only active model.
pub async fn activate(pool: &PgPool, version: i64) -> Result<(), RegistryError> {
    let mut tx = pool.begin().await?;
    let exists: Option<i64> = sqlx::query_scalar("SELECT version FROM models WHERE version = $1 FOR UPDATE")
        .bind(version)
        .fetch_optional(&mut *tx)
        .await?;
    if exists.is_none() {
        return Err(RegistryError::NoSuchVersion(version));
    }
    sqlx::query("UPDATE models SET active = false WHERE active")
        .execute(&mut *tx)
        .await?;
    sqlx::query("UPDATE models SET active = true WHERE version = $1")
        .bind(version)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// The active model, if any.
pub async fn active(pool: &PgPool) -> Result<Option<(i64, Model)>, RegistryError> {
    let row = sqlx::query("SELECT version, model FROM models WHERE active")
        .fetch_optional(pool)
        .await?;
    let Some(row) = row else { return Ok(None) };
    let version: i64 = row.try_get("version")?;
    let bytes: Vec<u8> = row.try_get("model")?;
    let model = serde_json::from_slice(&bytes).map_err(|e| RegistryError::Unloadable {
        version,
        reason: e.to_string(),
    })?;
    Ok(Some((version, model)))
}

/// How much lower (relative) a new model's holdout MAE must be than the active one's.
pub const PROMOTION_MARGIN: f64 = 0.01;

/// What [`train_and_promote`] did.
#[derive(Debug)]
pub struct Outcome {
    /// The training result (scores of every candidate and the baseline).
    pub trained: Trained,
    /// The new model's version.
    pub version: i64,
    /// The active model before, and its MAE on the new holdout.
    pub previous: Option<(i64, f64)>,
    /// Whether the new model is now active.
    pub promoted: bool,
}

/// Trains on the newest `limit` finished jobs, stores the best candidate and activates
/// it if it beats the per-kind median, and the active model by [`PROMOTION_MARGIN`], on
/// the same holdout. The training itself runs on the blocking pool.
pub async fn train_and_promote(pool: &PgPool, limit: i64, seed: u64) -> Result<Outcome, RegistryError> {
    let samples = history(pool, limit).await?;
    let trained = tokio::task::spawn_blocking(move || model::train(&samples, seed))
        .await
        .map_err(|e| RegistryError::Unloadable {
            version: 0,
            reason: format!("training task failed: {e}"),
        })??;
    store_and_promote(pool, trained).await
}

/// Stores a trained model and activates it if it is better (see [`train_and_promote`]).
pub async fn store_and_promote(pool: &PgPool, trained: Trained) -> Result<Outcome, RegistryError> {
    let baseline = trained
        .scores
        .iter()
        .find(|s| s.algorithm == "kind_median")
        .map(|s| s.mae_ms)
        .unwrap_or(f64::INFINITY);
    let previous = match active(pool).await {
        Ok(Some((v, m))) => Some((v, m.mae_ms(&trained.holdout))),
        Ok(None) => None,
        Err(RegistryError::Unloadable { version, reason }) => {
            tracing::warn!(version, %reason, "active model cannot be loaded; any better model replaces it");
            None
        }
        Err(e) => return Err(e),
    };
    // Noise between two trainings is not an improvement: a new model must be at least
    // PROMOTION_MARGIN better than the active one.
    let better = trained.best.mae_ms < baseline
        && previous.is_none_or(|(_, mae)| trained.best.mae_ms < mae * (1.0 - PROMOTION_MARGIN));
    let bytes = serde_json::to_vec(&trained.model).map_err(|e| RegistryError::Unloadable {
        version: 0,
        reason: e.to_string(),
    })?;
    let features = serde_json::to_value(trained.model.space()).unwrap_or_default();
    let version: i64 = sqlx::query_scalar(
        "INSERT INTO models (algorithm, features, samples, holdout_mae_ms, holdout_r2, baseline_mae_ms, model)
         VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING version",
    )
    .bind(trained.best.algorithm)
    .bind(features)
    .bind((trained.sizes.0 + trained.sizes.1) as i32)
    .bind(trained.best.mae_ms)
    .bind(trained.best.r2)
    .bind(baseline)
    .bind(bytes)
    .fetch_one(pool)
    .await?;
    if better {
        activate(pool, version).await?;
    }
    Ok(Outcome {
        trained,
        version,
        previous,
        promoted: better,
    })
}

/// Finished jobs since the newest model was trained (all of them when there is none).
pub async fn new_jobs_since_last_model(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM jobs WHERE status = 'succeeded' AND actual_ms IS NOT NULL
           AND finished_at > COALESCE((SELECT max(trained_at) FROM models), '-infinity')",
    )
    .fetch_one(pool)
    .await
}

/// Retrains if at least `min_new_jobs` jobs finished since the last model, with a
/// Postgres advisory lock so only one predictor replica trains at a time. Returns the
/// outcome when it trained.
pub async fn retrain_if_due(pool: &PgPool, min_new_jobs: i64, limit: i64) -> Result<Option<Outcome>, RegistryError> {
    const LOCK: i64 = 0x6d6c_7363_6864; // "mlschd"
    let mut conn = pool.acquire().await?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(LOCK)
        .fetch_one(&mut *conn)
        .await?;
    if !locked {
        return Ok(None);
    }
    let result = async {
        if new_jobs_since_last_model(pool).await? < min_new_jobs {
            return Ok(None);
        }
        let seed = chrono::Utc::now().timestamp_millis() as u64;
        train_and_promote(pool, limit, seed).await.map(Some)
    }
    .await;
    let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(LOCK)
        .execute(&mut *conn)
        .await;
    result
}
