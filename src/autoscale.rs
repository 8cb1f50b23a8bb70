//! What KEDA does with our ScaledObjects, computed here: the lag its `nats-jetstream`
//! scaler reads from the NATS monitoring endpoint and the replica count the HPA then
//! asks for. `mlsched dev --autoscale` scales local executor processes with it, and
//! the scaling tests check the shipped thresholds against a live server.
//!
//! The scaler asks `/jsz?acc=<account>&consumers=true&config=true` and takes
//! `num_pending + num_ack_pending` of the named consumer as the lag (the stream's last
//! sequence when the consumer is missing). The metric is an `AverageValue` target of
//! `lagThreshold` per pod, so the HPA wants `ceil(lag / lagThreshold)` replicas, held
//! between `minReplicaCount` (at least 1 while active) and `maxReplicaCount`, and
//! leaves the count alone while the per-pod lag is within 10% of the target. The
//! scaler is active while lag > `activationLagThreshold`; an inactive object goes to
//! `minReplicaCount`, which may be zero.

use std::time::Duration;

use anyhow::{bail, Context as _};
use serde::Deserialize;
use serde_json::Value;

/// The HPA's default tolerance: no change while |per-pod lag / target - 1| <= 10%.
pub const HPA_TOLERANCE: f64 = 0.1;

/// The ScaledObjects in keda/, as shipped (rendered from the Helm chart's defaults).
const SHIPPED: [&str; 3] = [
    include_str!("../keda/scaledobject-executor-fast.yaml"),
    include_str!("../keda/scaledobject-executor-slow.yaml"),
    include_str!("../keda/scaledobject-predictor.yaml"),
];

/// One ScaledObject's `nats-jetstream` trigger and replica bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The Deployment it scales (`scaleTargetRef.name`).
    pub target: String,
    /// The stream and durable consumer whose lag it reads.
    pub stream: String,
    /// See `stream`.
    pub consumer: String,
    /// Lag one replica should carry.
    pub lag_threshold: u64,
    /// Lag above which the object is active (scales from zero).
    pub activation_lag_threshold: u64,
    /// `minReplicaCount`.
    pub min_replicas: u32,
    /// `maxReplicaCount`.
    pub max_replicas: u32,
    /// `pollingInterval`, seconds.
    pub polling_interval_s: u64,
    /// `cooldownPeriod`, seconds: how long an inactive object waits before scaling to zero.
    pub cooldown_s: u64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ScaledObject {
    kind: String,
    spec: Spec,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Spec {
    scale_target_ref: TargetRef,
    #[serde(default = "default_polling")]
    polling_interval: u64,
    #[serde(default = "default_cooldown")]
    cooldown_period: u64,
    #[serde(default)]
    min_replica_count: u32,
    #[serde(default = "default_max")]
    max_replica_count: u32,
    triggers: Vec<Trigger>,
}

#[derive(Deserialize)]
struct TargetRef {
    name: String,
}

#[derive(Deserialize)]
struct Trigger {
    #[serde(rename = "type")]
    kind: String,
    metadata: std::collections::BTreeMap<String, String>,
}

// KEDA's defaults for the optional fields.
fn default_polling() -> u64 {
    30
}
fn default_cooldown() -> u64 {
    300
}
fn default_max() -> u32 {
    100
}

impl Policy {
    /// The policies of the ScaledObjects shipped in keda/.
    pub fn shipped() -> Vec<Policy> {
        SHIPPED
            .iter()
            .map(|text| Policy::from_yaml(text).expect("keda/ holds valid ScaledObjects (checked by the tests)"))
            .collect()
    }

    /// The shipped policy of the consumer `consumer`.
    pub fn shipped_for(consumer: &str) -> Option<Policy> {
        Self::shipped().into_iter().find(|p| p.consumer == consumer)
    }

    /// Reads a ScaledObject manifest with a `nats-jetstream` trigger.
    pub fn from_yaml(text: &str) -> anyhow::Result<Policy> {
        let so: ScaledObject = serde_yaml::from_str(text).context("parsing a ScaledObject")?;
        if so.kind != "ScaledObject" {
            bail!("kind is {}, not ScaledObject", so.kind);
        }
        let Some(t) = so.spec.triggers.iter().find(|t| t.kind == "nats-jetstream") else {
            bail!("{}: no nats-jetstream trigger", so.spec.scale_target_ref.name);
        };
        let field = |k: &str| {
            t.metadata
                .get(k)
                .with_context(|| format!("{}: trigger metadata {k} missing", so.spec.scale_target_ref.name))
        };
        let number = |k: &str, default: Option<u64>| -> anyhow::Result<u64> {
            match (t.metadata.get(k), default) {
                (Some(v), _) => v.parse().with_context(|| format!("trigger metadata {k}: {v:?}")),
                (None, Some(d)) => Ok(d),
                (None, None) => bail!("trigger metadata {k} missing"),
            }
        };
        Ok(Policy {
            target: so.spec.scale_target_ref.name.clone(),
            stream: field("stream")?.clone(),
            consumer: field("consumer")?.clone(),
            lag_threshold: number("lagThreshold", Some(10))?,
            activation_lag_threshold: number("activationLagThreshold", Some(0))?,
            min_replicas: so.spec.min_replica_count,
            max_replicas: so.spec.max_replica_count,
            polling_interval_s: so.spec.polling_interval,
            cooldown_s: so.spec.cooldown_period,
        })
    }

    /// Whether the scaler counts as active at `lag`.
    pub fn active(&self, lag: u64) -> bool {
        lag > self.activation_lag_threshold
    }

    /// The replica count KEDA and the HPA ask for at `lag` with `current` replicas
    /// (before the HPA's behaviour policies pace the change).
    pub fn desired(&self, lag: u64, current: u32) -> u32 {
        if !self.active(lag) {
            return self.min_replicas;
        }
        let floor = self.min_replicas.max(1);
        if current > 0 {
            let ratio = lag as f64 / current as f64 / self.lag_threshold as f64;
            if (ratio - 1.0).abs() <= HPA_TOLERANCE {
                return current.clamp(floor, self.max_replicas);
            }
        }
        let wanted = lag.div_ceil(self.lag_threshold).min(u64::from(u32::MAX)) as u32;
        wanted.clamp(floor, self.max_replicas)
    }
}

/// The URL KEDA's scaler reads: `<base>/jsz?acc=<account>&consumers=true&config=true`,
/// `base` being `http://host:port`.
pub fn jsz_url(base: &str, account: &str) -> String {
    format!(
        "{}/jsz?acc={account}&consumers=true&config=true",
        base.trim_end_matches('/')
    )
}

/// The lag of `stream`/`consumer` in a `/jsz` answer, as KEDA computes it; `None` when
/// the account or stream is missing. (KEDA itself then reads a lag of 0 on a single
/// server, so the object never activates; here it is an error worth reporting.)
pub fn lag_in_jsz(jsz: &Value, account: &str, stream: &str, consumer: &str) -> Option<u64> {
    let acc = jsz["account_details"]
        .as_array()?
        .iter()
        .find(|a| a["name"] == account)?;
    let st = acc["stream_detail"].as_array()?.iter().find(|s| s["name"] == stream)?;
    let consumers = st["consumer_detail"].as_array();
    match consumers.and_then(|cs| cs.iter().find(|c| c["name"] == consumer)) {
        Some(c) => Some(c["num_pending"].as_u64().unwrap_or(0) + c["num_ack_pending"].as_u64().unwrap_or(0)),
        None => st["state"]["last_seq"].as_u64(),
    }
}

/// Reads the NATS monitoring endpoint at `base` (`http://host:port`) like KEDA does.
pub struct LagReader {
    http: reqwest::Client,
    url: String,
    account: String,
}

impl LagReader {
    /// A reader of `base` for `account` (`$G` on a server without accounts).
    pub fn new(base: &str, account: &str) -> anyhow::Result<LagReader> {
        Ok(LagReader {
            http: reqwest::Client::builder().timeout(Duration::from_secs(3)).build()?,
            url: jsz_url(base, account),
            account: account.to_string(),
        })
    }

    /// The lag of `policy`'s consumer now.
    pub async fn lag(&self, policy: &Policy) -> anyhow::Result<u64> {
        let jsz: Value = self
            .http
            .get(&self.url)
            .send()
            .await
            .with_context(|| format!("reading {}", self.url))?
            .error_for_status()?
            .json()
            .await
            .with_context(|| format!("decoding {}", self.url))?;
        lag_in_jsz(&jsz, &self.account, &policy.stream, &policy.consumer)
            .with_context(|| format!("{}: no stream {} in account {}", self.url, policy.stream, self.account))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(min: u32, max: u32, threshold: u64) -> Policy {
        Policy {
            target: "t".into(),
            stream: "JOBS_RUN".into(),
            consumer: "executor-fast".into(),
            lag_threshold: threshold,
            activation_lag_threshold: 0,
            min_replicas: min,
            max_replicas: max,
            polling_interval_s: 10,
            cooldown_s: 300,
        }
    }

    #[test]
    fn the_shipped_objects_parse_and_keep_each_pods_in_flight_jobs_below_the_threshold() {
        let shipped = Policy::shipped();
        let consumers: Vec<&str> = shipped.iter().map(|p| p.consumer.as_str()).collect();
        assert_eq!(consumers, ["executor-fast", "executor-slow", "predictor"]);
        let slow = Policy::shipped_for("executor-slow").unwrap();
        assert_eq!(slow.min_replicas, 0, "the slow lane scales to zero");
        assert!(shipped
            .iter()
            .all(|p| p.lag_threshold > 0 && p.max_replicas >= p.min_replicas.max(1)));
        let fast = Policy::shipped_for("executor-fast").unwrap();
        assert!(
            fast.lag_threshold >= crate::config::Settings::default().executor.concurrency as u64,
            "a threshold under a pod's concurrency would never let a busy lane scale in"
        );
    }

    #[test]
    fn replicas_follow_lag_over_threshold_within_the_bounds() {
        let p = policy(1, 10, 256);
        assert_eq!(p.desired(0, 3), 1, "inactive: the minimum");
        assert_eq!(p.desired(1, 0), 1);
        assert_eq!(p.desired(1000, 1), 4, "ceil(1000 / 256)");
        assert_eq!(p.desired(100_000, 1), 10, "capped at max");
        assert_eq!(p.desired(1000, 4), 4, "within tolerance: unchanged");
        assert_eq!(p.desired(530, 2), 2, "530/2/256 = 1.035: within 10%");
        assert_eq!(p.desired(600, 2), 3, "600/2/256 = 1.17: out of tolerance");
        let zero = policy(0, 5, 8);
        assert_eq!(zero.desired(0, 2), 0, "scale to zero when idle");
        assert_eq!(zero.desired(3, 0), 1, "the first job wakes one pod");
        assert_eq!(zero.desired(20, 0), 3);
    }

    #[test]
    fn lag_is_pending_plus_ack_pending_or_the_last_sequence_without_the_consumer() {
        let jsz = json!({"account_details": [{"name": "$G", "stream_detail": [{
            "name": "JOBS_RUN", "state": {"last_seq": 999},
            "consumer_detail": [
                {"name": "executor-fast", "num_pending": 40, "num_ack_pending": 2},
                {"name": "executor-slow", "num_pending": 7, "num_ack_pending": 0}]}]}]});
        assert_eq!(lag_in_jsz(&jsz, "$G", "JOBS_RUN", "executor-fast"), Some(42));
        assert_eq!(lag_in_jsz(&jsz, "$G", "JOBS_RUN", "executor-gpu"), Some(999));
        assert_eq!(lag_in_jsz(&jsz, "$G", "JOBS_SUBMIT", "predictor"), None);
        assert_eq!(lag_in_jsz(&jsz, "other", "JOBS_RUN", "executor-fast"), None);
        assert_eq!(
            jsz_url("http://127.0.0.1:8222/", "$G"),
            "http://127.0.0.1:8222/jsz?acc=$G&consumers=true&config=true"
        );
    }
}
