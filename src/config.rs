//! Typed settings, layered: defaults → `mlsched.toml` → `MLSCHED__SECTION__KEY`
//! environment variables → `NATS_URL` / `DATABASE_URL`.
//!
//! Every field documents its default; README.md's configuration reference lists the
//! same keys. [`Settings::validate`] reports every problem at once, each naming its key,
//! so a bad deployment fails at start with a message an operator can act on. Unknown
//! keys are errors too: a typo in an environment variable never silently does nothing.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::job::{Kind, Lane};

/// A configuration problem, naming the key(s).
#[derive(Debug, Error)]
pub enum ConfigError {
    /// A source could not be read or a value has the wrong type or an unknown key.
    #[error("configuration: {0}")]
    Load(String),
    /// Values parsed but are not acceptable; one line per key.
    #[error("configuration is invalid:\n  {}", .0.join("\n  "))]
    Invalid(Vec<String>),
}

/// A string that must not appear in logs (a URL with a password).
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    /// The secret value, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// Serialized hidden: `***` when set, empty when not.
impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if self.0.is_empty() { "" } else { "***" })
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// All settings of every mlsched process.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// `[nats]`
    pub nats: NatsSettings,
    /// `[database]`
    pub database: DatabaseSettings,
    /// `[executor]`
    pub executor: ExecutorSettings,
    /// `[predictor]`
    pub predictor: PredictorSettings,
    /// `[retry]`
    pub retry: RetrySettings,
    /// `[shutdown]`
    pub shutdown: ShutdownSettings,
    /// `[store]`
    pub store: StoreSettings,
    /// `[log]`
    pub log: LogSettings,
    /// `[metrics]`
    pub metrics: MetricsSettings,
}

/// `[nats]`: the NATS connection.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsSettings {
    /// Server URL(s), comma-separated. `NATS_URL` overrides. Default `nats://127.0.0.1:4222`.
    pub url: Secret,
    /// Timeout of JetStream API requests and publish acks, ms. Default 5000.
    pub request_timeout_ms: u64,
}

impl Default for NatsSettings {
    fn default() -> Self {
        Self {
            url: Secret::new("nats://127.0.0.1:4222"),
            request_timeout_ms: 5000,
        }
    }
}

/// `[database]`: the Postgres connection.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseSettings {
    /// Connection URL. `DATABASE_URL` overrides. Default `postgres://127.0.0.1:5432/mlsched`.
    pub url: Secret,
    /// Pool size. Default 8.
    pub max_connections: u32,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: Secret::new("postgres://127.0.0.1:5432/mlsched"),
            max_connections: 8,
        }
    }
}

/// `[executor]`: the job workers.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExecutorSettings {
    /// Lanes this process consumes (`executor-<lane>` consumers). Default `["fast", "slow"]`.
    /// As an environment variable: `MLSCHED__EXECUTOR__LANES=fast,slow`.
    pub lanes: Vec<String>,
    /// Jobs run at once per lane (each lane has its own consumer and slots). Most of a
    /// short job's time is spent waiting for its two record commits, so one process
    /// needs many in flight to keep busy. Default 256.
    pub concurrency: usize,
    /// Most messages asked for in one pull request. Default 128.
    pub fetch_batch: usize,
    /// Per-attempt timeout when the envelope sets none, ms. Default 300000 (5 min).
    pub default_timeout_ms: u64,
    /// Interval of in-progress acks for a running job, ms; keep it well below the
    /// consumer's `ack_wait` (30 s in streams/). Default 10000.
    pub heartbeat_ms: u64,
    /// A job without `timeout_ms` but with a predicted upper bound gets this many times
    /// that bound as its timeout. Default 10.
    pub predicted_timeout_factor: u64,
    /// The shortest timeout derived from a prediction, ms. Default 60000.
    pub min_predicted_timeout_ms: u64,
}

impl Default for ExecutorSettings {
    fn default() -> Self {
        Self {
            lanes: vec!["fast".into(), "slow".into()],
            concurrency: 256,
            fetch_batch: 128,
            default_timeout_ms: 300_000,
            heartbeat_ms: 10_000,
            predicted_timeout_factor: 10,
            min_predicted_timeout_ms: 60_000,
        }
    }
}

/// `[predictor]`: the routing stage.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PredictorSettings {
    /// Most submissions taken in one batch. Default 256.
    pub batch_size: usize,
    /// Lane of jobs predicted to run under `fast_threshold_ms`. Default `fast`.
    pub default_lane: String,
    /// Lane of jobs predicted to run `fast_threshold_ms` or longer. Default `slow`.
    pub slow_lane: String,
    /// Predicted run time from which a job goes to `slow_lane`, ms. Default 1000.
    pub fast_threshold_ms: u64,
    /// Prediction for a kind with no model and no history, ms. Default 100.
    pub default_ms: u64,
    /// How often the active model and the per-kind medians are reloaded, seconds.
    /// Default 30.
    pub model_refresh_s: u64,
    /// How often a predictor checks whether to retrain, seconds; 0 turns automatic
    /// retraining off. Default 600.
    pub retrain_interval_s: u64,
    /// Finished jobs since the last model that trigger a retraining. Default 500.
    pub retrain_min_jobs: u64,
    /// Per-kind lane rules that override the prediction, e.g. `[predictor.lanes]`
    /// `train = "gpu"`. Default: none; every job goes where its prediction sends it.
    pub lanes: BTreeMap<String, String>,
}

impl Default for PredictorSettings {
    fn default() -> Self {
        Self {
            batch_size: 256,
            default_lane: "fast".into(),
            slow_lane: "slow".into(),
            fast_threshold_ms: 1000,
            default_ms: 100,
            model_refresh_s: 30,
            retrain_interval_s: 600,
            retrain_min_jobs: 500,
            lanes: BTreeMap::new(),
        }
    }
}

/// `[retry]`: what happens after a failed attempt.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetrySettings {
    /// Backoff before the second attempt, ms; doubles each attempt. Default 1000.
    pub base_ms: u64,
    /// Longest backoff, ms. Default 60000.
    pub max_ms: u64,
    /// Attempts when the envelope sets no `max_attempts`. Default 5 (at most 25).
    pub max_attempts: u32,
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self {
            base_ms: 1000,
            max_ms: 60_000,
            max_attempts: 5,
        }
    }
}

/// `[shutdown]`: SIGTERM behaviour.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownSettings {
    /// Time in-flight jobs get to finish after SIGTERM, seconds. Default 25; keep the
    /// pod's `terminationGracePeriodSeconds` above it.
    pub grace_s: u64,
}

impl Default for ShutdownSettings {
    fn default() -> Self {
        Self { grace_s: 25 }
    }
}

/// `[store]`: the group-committing Postgres writer.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSettings {
    /// Most job records in one statement. Default 512.
    pub batch_max: usize,
    /// How long a batch waits for more records before it is written, ms; 0 writes
    /// whatever is queued at once. Default 2.
    pub linger_ms: u64,
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            batch_max: 512,
            linger_ms: 2,
        }
    }
}

/// `[metrics]`: the operations endpoint and SLO sampling.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSettings {
    /// Address of `/metrics`, `/healthz` and `/readyz`; empty turns it off.
    /// Default `0.0.0.0:9464`.
    pub listen: String,
    /// How often the predictor samples stream backlog for the SLO metrics, ms.
    /// Default 5000.
    pub sample_interval_ms: u64,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:9464".into(),
            sample_interval_ms: 5000,
        }
    }
}

/// `[log]`: log output.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// `text` (default) or `json`.
    pub format: String,
    /// A tracing filter, e.g. `info` (default) or `mlsched=debug,info`. `RUST_LOG` overrides.
    pub level: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

impl Settings {
    /// Loads settings from `file` (optional; `mlsched.toml` when `None`), the
    /// `MLSCHED__*` environment variables and `NATS_URL` / `DATABASE_URL`, then validates.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        let vars: Vec<(String, String)> = std::env::vars().collect();
        Self::load_from(file, &vars)
    }

    /// [`Settings::load`] with the environment given explicitly (for tests).
    pub fn load_from(file: Option<&Path>, env: &[(String, String)]) -> Result<Settings, ConfigError> {
        let mut builder = config::Config::builder();
        match file {
            Some(path) => builder = builder.add_source(config::File::from(path).required(true)),
            None => builder = builder.add_source(config::File::with_name("mlsched.toml").required(false)),
        }
        let source: std::collections::HashMap<String, String> = env
            .iter()
            .filter(|(k, _)| k.starts_with("MLSCHED__"))
            .cloned()
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix("MLSCHED")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("executor.lanes")
                .source(Some(source)),
        );
        for (var, key) in [("NATS_URL", "nats.url"), ("DATABASE_URL", "database.url")] {
            if let Some((_, v)) = env.iter().find(|(k, _)| k == var) {
                builder = builder
                    .set_override(key, v.clone())
                    .map_err(|e| ConfigError::Load(e.to_string()))?;
            }
        }
        let settings: Settings = builder
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| ConfigError::Load(e.to_string()))?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks every value, reporting all problems at once with their keys.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errs = Vec::new();
        let mut positive = |key: &str, v: u64| {
            if v == 0 {
                errs.push(format!("{key}: must be greater than 0"));
            }
        };
        positive("nats.request_timeout_ms", self.nats.request_timeout_ms);
        positive("database.max_connections", self.database.max_connections.into());
        positive("executor.concurrency", self.executor.concurrency as u64);
        positive("executor.fetch_batch", self.executor.fetch_batch as u64);
        positive("executor.default_timeout_ms", self.executor.default_timeout_ms);
        positive("executor.heartbeat_ms", self.executor.heartbeat_ms);
        positive(
            "executor.predicted_timeout_factor",
            self.executor.predicted_timeout_factor,
        );
        positive(
            "executor.min_predicted_timeout_ms",
            self.executor.min_predicted_timeout_ms,
        );
        positive("predictor.batch_size", self.predictor.batch_size as u64);
        positive("predictor.model_refresh_s", self.predictor.model_refresh_s);
        positive("retry.base_ms", self.retry.base_ms);
        positive("store.batch_max", self.store.batch_max as u64);
        positive("metrics.sample_interval_ms", self.metrics.sample_interval_ms);
        if !self.metrics.listen.is_empty() && self.metrics.listen.parse::<std::net::SocketAddr>().is_err() {
            errs.push(format!(
                "metrics.listen: {:?} is not an address like 0.0.0.0:9464 (empty turns it off)",
                self.metrics.listen
            ));
        }
        if self.executor.lanes.is_empty() {
            errs.push("executor.lanes: name at least one lane".into());
        }
        for lane in &self.executor.lanes {
            if let Err(e) = Lane::new(lane.as_str()) {
                errs.push(format!("executor.lanes: {e}"));
            }
        }
        if let Err(e) = Lane::new(self.predictor.default_lane.as_str()) {
            errs.push(format!("predictor.default_lane: {e}"));
        }
        if let Err(e) = Lane::new(self.predictor.slow_lane.as_str()) {
            errs.push(format!("predictor.slow_lane: {e}"));
        }
        for (kind, lane) in &self.predictor.lanes {
            if let Err(e) = Kind::new(kind.as_str()) {
                errs.push(format!("predictor.lanes.{kind}: {e}"));
            }
            if let Err(e) = Lane::new(lane.as_str()) {
                errs.push(format!("predictor.lanes.{kind}: {e}"));
            }
        }
        if self.retry.max_ms < self.retry.base_ms {
            errs.push(format!(
                "retry.max_ms: must be at least retry.base_ms ({}), got {}",
                self.retry.base_ms, self.retry.max_ms
            ));
        }
        let limit = crate::job::envelope::MAX_ATTEMPTS_LIMIT;
        if self.retry.max_attempts == 0 || self.retry.max_attempts > limit {
            errs.push(format!(
                "retry.max_attempts: must be 1..={limit}, got {}",
                self.retry.max_attempts
            ));
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            errs.push(format!(
                "log.format: must be \"text\" or \"json\", got {:?}",
                self.log.format
            ));
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(errs))
        }
    }

    /// Every key with its effective value, as `(section.key, value)` in order; secrets
    /// show as `***`.
    pub fn entries(&self) -> Vec<(String, serde_json::Value)> {
        let Ok(serde_json::Value::Object(sections)) = serde_json::to_value(self) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (section, keys) in sections {
            if let serde_json::Value::Object(keys) = keys {
                for (key, value) in keys {
                    out.push((format!("{section}.{key}"), value));
                }
            }
        }
        out
    }

    /// The executor's lanes, validated.
    pub fn executor_lanes(&self) -> Vec<Lane> {
        self.executor
            .lanes
            .iter()
            .filter_map(|l| Lane::new(l.as_str()).ok())
            .collect()
    }

    /// The lane the predictor routes a job of `kind` to, given its predicted run time:
    /// a per-kind rule if there is one, else by `predictor.fast_threshold_ms`.
    pub fn lane_for(&self, kind: &Kind, predicted_ms: f64) -> Lane {
        let p = &self.predictor;
        let name = match p.lanes.get(kind.as_str()) {
            Some(rule) => rule,
            None if predicted_ms >= p.fast_threshold_ms as f64 => &p.slow_lane,
            None => &p.default_lane,
        };
        Lane::new(name.as_str()).unwrap_or_else(|_| Lane::new("fast").expect("constant lane is valid"))
    }

    /// The timeout of one attempt: the envelope's `timeout_ms`; else, when the job has a
    /// predicted upper bound, `predicted_timeout_factor` times it (at least
    /// `min_predicted_timeout_ms`); else `executor.default_timeout_ms`.
    pub fn attempt_timeout(&self, timeout_ms: Option<u64>, predicted_upper_ms: Option<u64>) -> Duration {
        let e = &self.executor;
        let ms = match (timeout_ms, predicted_upper_ms) {
            (Some(t), _) => t,
            (None, Some(upper)) => upper
                .saturating_mul(e.predicted_timeout_factor)
                .max(e.min_predicted_timeout_ms)
                .min(crate::job::envelope::MAX_TIMEOUT_MS),
            (None, None) => e.default_timeout_ms,
        };
        Duration::from_millis(ms)
    }

    /// The drain grace period.
    pub fn grace(&self) -> Duration {
        Duration::from_secs(self.shutdown.grace_s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn entries_name_every_key_and_hide_secrets() {
        let env = vec![("DATABASE_URL".to_string(), "postgres://u:pw@db/x".to_string())];
        let s = Settings::load_from(None, &env).unwrap();
        let entries = s.entries();
        let get = |k: &str| entries.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
        assert_eq!(get("database.url"), Some(serde_json::json!("***")));
        assert_eq!(get("executor.concurrency"), Some(serde_json::json!(256)));
        assert_eq!(get("shutdown.grace_s"), Some(serde_json::json!(25)));
        assert!(entries.iter().all(|(k, _)| k.split('.').count() == 2), "{entries:?}");
        assert!(!format!("{entries:?}").contains("pw"));
    }

    #[test]
    fn defaults_are_valid() {
        let s = Settings::load_from(None, &[]).unwrap();
        assert_eq!(s.executor.concurrency, 256);
        assert_eq!(s.executor_lanes().len(), 2);
    }

    #[test]
    fn environment_layers_over_defaults() {
        let s = Settings::load_from(
            None,
            &env(&[
                ("MLSCHED__EXECUTOR__CONCURRENCY", "8"),
                ("MLSCHED__EXECUTOR__LANES", "fast,gpu"),
                ("MLSCHED__RETRY__BASE_MS", "50"),
                ("MLSCHED__PREDICTOR__LANES__TRAIN", "gpu"),
                ("NATS_URL", "nats://nats:4222"),
                ("DATABASE_URL", "postgres://db/x"),
            ]),
        )
        .unwrap();
        assert_eq!(s.executor.concurrency, 8);
        assert_eq!(s.executor.lanes, vec!["fast", "gpu"]);
        assert_eq!(s.retry.base_ms, 50);
        assert_eq!(s.lane_for(&Kind::new("train").unwrap(), 0.0).as_str(), "gpu");
        let etl = Kind::new("etl").unwrap();
        assert_eq!(s.lane_for(&etl, 999.0).as_str(), "fast");
        assert_eq!(s.lane_for(&etl, 1000.0).as_str(), "slow");
        assert_eq!(s.nats.url.expose(), "nats://nats:4222");
        assert_eq!(s.database.url.expose(), "postgres://db/x");
        assert!(
            !format!("{s:?}").contains("postgres://db/x"),
            "secrets stay out of Debug"
        );
    }

    #[test]
    fn timeouts_come_from_the_envelope_then_the_prediction_then_the_default() {
        let s = Settings::default();
        assert_eq!(s.attempt_timeout(Some(5), Some(1_000_000)), Duration::from_millis(5));
        assert_eq!(
            s.attempt_timeout(None, Some(100)),
            Duration::from_secs(60),
            "at least the minimum"
        );
        assert_eq!(
            s.attempt_timeout(None, Some(600_000)),
            Duration::from_secs(6000),
            "long jobs get room"
        );
        assert_eq!(
            s.attempt_timeout(None, None),
            Duration::from_millis(s.executor.default_timeout_ms)
        );
        assert!(s.attempt_timeout(None, Some(u64::MAX)) <= Duration::from_millis(crate::job::envelope::MAX_TIMEOUT_MS));
    }

    #[test]
    fn bad_values_name_their_keys() {
        let err = Settings::load_from(None, &env(&[("MLSCHED__EXECUTOR__CONCURRENCY", "lots")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("executor.concurrency"), "{err}");

        let err = Settings::load_from(None, &env(&[("MLSCHED__EXECUTOR__CONCURENCY", "4")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("concurency"), "typos are reported: {err}");

        let err = Settings::load_from(
            None,
            &env(&[
                ("MLSCHED__EXECUTOR__CONCURRENCY", "0"),
                ("MLSCHED__RETRY__MAX_MS", "10"),
                ("MLSCHED__LOG__FORMAT", "xml"),
            ]),
        )
        .unwrap_err()
        .to_string();
        for key in ["executor.concurrency", "retry.max_ms", "log.format"] {
            assert!(err.contains(key), "{key} missing from {err}");
        }
    }
}
