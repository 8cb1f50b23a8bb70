//! The job envelope: the UTF-8 JSON body producers publish, parsed and validated into a
//! [`Job`], and written back to the wire.
//!
//! Parsing never panics and names the offending field. The payload, features and any
//! unknown fields are kept as raw JSON: they are validated as JSON but not re-encoded,
//! so a job travels through the pipeline byte for byte as the producer wrote it.

use serde::de::{MapAccess, Visitor};
use serde::Deserializer;
use serde_json::value::RawValue;
use thiserror::Error;

use super::{JobId, Kind};

/// Upper bound for `max_attempts`: the `MaxDeliver` of the executor consumers in
/// streams/, so the server never stops delivering a job the executor would still retry.
pub const MAX_ATTEMPTS_LIMIT: u32 = 25;
/// Upper bound for `timeout_ms`: seven days.
pub const MAX_TIMEOUT_MS: u64 = 7 * 24 * 3600 * 1000;

/// Why a body is not a valid envelope. The message is what operators see in the
/// `Mlsched-Error` header of the dead letter.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EnvelopeError {
    /// The body is not UTF-8.
    #[error("body is not UTF-8 (invalid byte at offset {0})")]
    NotUtf8(usize),
    /// The body is not JSON, or not a JSON object.
    #[error("body is not a JSON object: {0}")]
    NotJson(String),
    /// A required field is absent.
    #[error("missing required field `{0}`")]
    Missing(&'static str),
    /// A field has the wrong type or value.
    #[error("field `{field}`: {reason}")]
    BadField {
        /// The field name.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A field appears twice.
    #[error("field `{0}` appears more than once")]
    Duplicate(String),
    /// `kind` in the body differs from the subject's last token.
    #[error("field `kind` is {body:?} but the subject says {subject:?}")]
    KindMismatch {
        /// The kind in the body.
        body: String,
        /// The kind from the subject.
        subject: String,
    },
}

/// A validated job, as it travels from the predictor to the executor.
#[derive(Debug, Clone)]
pub struct Job {
    /// The job's id.
    pub id: JobId,
    /// The job's kind; equals the subject's last token.
    pub kind: Kind,
    /// The handler's input, raw JSON.
    pub payload: Box<RawValue>,
    /// Features for run-time prediction: a JSON object, raw.
    pub features: Option<Box<RawValue>>,
    /// Priority (higher is more urgent); informational for now.
    pub priority: Option<i32>,
    /// Attempts before the job is dead-lettered; `None` means the configured default.
    pub max_attempts: Option<u32>,
    /// Per-attempt timeout; `None` means the configured default.
    pub timeout_ms: Option<u64>,
    /// Predicted run time, set by the predictor.
    pub predicted_ms: Option<u64>,
    /// Fields the contract does not know, kept in order and passed on untouched.
    pub extra: Vec<(String, Box<RawValue>)>,
}

/// The raw fields of an envelope before validation.
#[derive(Default)]
struct RawEnvelope {
    fields: Vec<(String, Box<RawValue>)>,
}

impl<'de> serde::Deserialize<'de> for RawEnvelope {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawEnvelope;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawEnvelope, A::Error> {
                let mut fields = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    let value = map.next_value::<Box<RawValue>>()?;
                    fields.push((key, value));
                }
                Ok(RawEnvelope { fields })
            }
        }
        d.deserialize_map(V)
    }
}

/// Where a job's id comes from when the body has no `id` field.
#[derive(Debug, Clone, Copy)]
pub enum IdSource<'a> {
    /// The message's `Nats-Msg-Id` header.
    MsgId(&'a str),
    /// An id derived from the message's stream position (see [`JobId::for_message`]).
    Derived(JobId),
}

fn bad(field: &'static str, reason: impl Into<String>) -> EnvelopeError {
    EnvelopeError::BadField {
        field,
        reason: reason.into(),
    }
}

fn parse_field<T: serde::de::DeserializeOwned>(
    field: &'static str,
    raw: &RawValue,
    expected: &str,
) -> Result<T, EnvelopeError> {
    serde_json::from_str(raw.get()).map_err(|_| {
        let got: String = raw.get().chars().take(40).collect();
        bad(field, format!("expected {expected}, got {got}"))
    })
}

impl Job {
    /// Parses and validates `body`, published on a subject whose last token is
    /// `subject_kind`.
    pub fn parse(subject_kind: &str, body: &[u8], id_source: IdSource<'_>) -> Result<Job, EnvelopeError> {
        let text = std::str::from_utf8(body).map_err(|e| EnvelopeError::NotUtf8(e.valid_up_to()))?;
        let raw: RawEnvelope = serde_json::from_str(text).map_err(|e| {
            if text.trim().is_empty() {
                EnvelopeError::NotJson("body is empty".into())
            } else {
                EnvelopeError::NotJson(e.to_string())
            }
        })?;

        let mut id = None;
        let mut kind = None;
        let mut payload = None;
        let mut features = None;
        let mut priority = None;
        let mut max_attempts = None;
        let mut timeout_ms = None;
        let mut extra = Vec::new();
        let mut extra_keys = std::collections::HashSet::new();
        for (key, value) in raw.fields {
            let slot = match key.as_str() {
                "id" => &mut id,
                "kind" => &mut kind,
                "payload" => &mut payload,
                "features" => &mut features,
                "priority" => &mut priority,
                "max_attempts" => &mut max_attempts,
                "timeout_ms" => &mut timeout_ms,
                _ => {
                    if !extra_keys.insert(key.clone()) {
                        return Err(EnvelopeError::Duplicate(key));
                    }
                    extra.push((key, value));
                    continue;
                }
            };
            let slot_taken = slot.replace(value).is_some().then_some(key);
            if let Some(name) = slot_taken {
                return Err(EnvelopeError::Duplicate(name.to_string()));
            }
        }

        let kind_raw = kind.ok_or(EnvelopeError::Missing("kind"))?;
        let kind_str: String = parse_field("kind", &kind_raw, "a string")?;
        let kind = Kind::new(kind_str.clone()).map_err(|e| bad("kind", e.to_string()))?;
        if kind.as_str() != subject_kind {
            return Err(EnvelopeError::KindMismatch {
                body: kind_str,
                subject: subject_kind.to_string(),
            });
        }
        let payload = payload.ok_or(EnvelopeError::Missing("payload"))?;

        let id = match id {
            Some(raw) if raw.get() != "null" => {
                let s: String = parse_field("id", &raw, "a UUID string")?;
                s.parse::<JobId>().map_err(|e| bad("id", e.to_string()))?
            }
            _ => match id_source {
                IdSource::MsgId(h) => JobId::from_msg_id(h),
                IdSource::Derived(id) => id,
            },
        };
        let features = match features {
            Some(raw) if raw.get() == "null" => None,
            Some(raw) if raw.get().trim_start().starts_with('{') => Some(raw),
            Some(raw) => {
                let got: String = raw.get().chars().take(40).collect();
                return Err(bad("features", format!("expected a JSON object, got {got}")));
            }
            None => None,
        };
        let priority = optional(priority, |raw| parse_field::<i32>("priority", raw, "a 32-bit integer"))?;
        let max_attempts = optional(max_attempts, |raw| {
            let n: u32 = parse_field("max_attempts", raw, "a positive integer")?;
            if n == 0 || n > MAX_ATTEMPTS_LIMIT {
                return Err(bad(
                    "max_attempts",
                    format!("must be 1..={MAX_ATTEMPTS_LIMIT}, got {n}"),
                ));
            }
            Ok(n)
        })?;
        let timeout_ms = optional(timeout_ms, |raw| {
            let n: u64 = parse_field("timeout_ms", raw, "a positive integer")?;
            if n == 0 || n > MAX_TIMEOUT_MS {
                return Err(bad("timeout_ms", format!("must be 1..={MAX_TIMEOUT_MS}, got {n}")));
            }
            Ok(n)
        })?;

        Ok(Job {
            id,
            kind,
            payload,
            features,
            priority,
            max_attempts,
            timeout_ms,
            predicted_ms: None,
            extra,
        })
    }

    /// The job as an envelope body, with its id set. Unknown fields are kept.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = String::with_capacity(96 + self.payload.get().len());
        out.push_str("{\"id\":\"");
        out.push_str(&self.id.to_string());
        out.push_str("\",\"kind\":\"");
        out.push_str(self.kind.as_str());
        out.push_str("\",\"payload\":");
        out.push_str(self.payload.get());
        if let Some(f) = &self.features {
            out.push_str(",\"features\":");
            out.push_str(f.get());
        }
        let mut num = |name: &str, v: Option<String>| {
            if let Some(v) = v {
                out.push_str(",\"");
                out.push_str(name);
                out.push_str("\":");
                out.push_str(&v);
            }
        };
        num("priority", self.priority.map(|v| v.to_string()));
        num("max_attempts", self.max_attempts.map(|v| v.to_string()));
        num("timeout_ms", self.timeout_ms.map(|v| v.to_string()));
        num("predicted_ms", self.predicted_ms.map(|v| v.to_string()));
        for (k, v) in &self.extra {
            if k == "predicted_ms" {
                continue;
            }
            out.push(',');
            out.push_str(&serde_json::to_string(k).unwrap_or_else(|_| "\"?\"".into()));
            out.push(':');
            out.push_str(v.get());
        }
        out.push('}');
        out.into_bytes()
    }
}

fn optional<T>(
    raw: Option<Box<RawValue>>,
    f: impl FnOnce(&RawValue) -> Result<T, EnvelopeError>,
) -> Result<Option<T>, EnvelopeError> {
    match raw {
        Some(r) if r.get() == "null" => Ok(None),
        Some(r) => f(&r).map(Some),
        None => Ok(None),
    }
}

/// A borrowed view used by the wire format test and by producers in Rust.
#[derive(Debug, serde::Serialize)]
pub struct Envelope<'a> {
    /// Job id; omitted to let mlsched derive one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<JobId>,
    /// Job kind.
    pub kind: &'a Kind,
    /// Handler input.
    pub payload: &'a serde_json::Value,
    /// Prediction features.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub features: Option<&'a serde_json::Value>,
    /// Priority.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// Attempts before dead-lettering.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Per-attempt timeout.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn derived() -> IdSource<'static> {
        IdSource::Derived(JobId::for_message(1, 1_700_000_000_000))
    }

    fn parse(body: &str) -> Result<Job, EnvelopeError> {
        Job::parse("train", body.as_bytes(), derived())
    }

    #[test]
    fn minimal_envelope_gets_a_derived_id() {
        let job = parse(r#"{"kind":"train","payload":{"a":1}}"#).unwrap();
        assert_eq!(job.kind.as_str(), "train");
        assert_eq!(job.payload.get(), r#"{"a":1}"#);
        assert_eq!(job.id, JobId::for_message(1, 1_700_000_000_000));
        assert_eq!(job.max_attempts, None);
    }

    #[test]
    fn id_comes_from_body_then_header() {
        let id = "0192f7d2-7c1e-7a3b-9f00-5b1d2c3e4f50";
        let body = format!(r#"{{"id":"{id}","kind":"train","payload":null}}"#);
        assert_eq!(parse(&body).unwrap().id.to_string(), id);
        let job = Job::parse("train", br#"{"kind":"train","payload":1}"#, IdSource::MsgId(id)).unwrap();
        assert_eq!(job.id.to_string(), id);
    }

    #[test]
    fn full_envelope_round_trips_with_unknown_fields() {
        let body = r#"{"id":"0192f7d2-7c1e-7a3b-9f00-5b1d2c3e4f50","kind":"train","payload":{"any":"json"},
            "features":{"task_type":"cpu","size":"large","priority":5},"priority":5,"max_attempts":5,
            "timeout_ms":600000,"owner":{"team":"ml"}}"#;
        let job = parse(body).unwrap();
        assert_eq!(job.priority, Some(5));
        assert_eq!(job.max_attempts, Some(5));
        assert_eq!(job.timeout_ms, Some(600_000));
        assert_eq!(job.extra.len(), 1);
        let again = Job::parse("train", &job.to_json(), derived()).unwrap();
        assert_eq!(again.id, job.id);
        assert_eq!(again.payload.get(), job.payload.get());
        assert_eq!(
            again.features.as_ref().map(|f| f.get()),
            job.features.as_ref().map(|f| f.get())
        );
        assert_eq!(again.extra[0].0, "owner");
        assert_eq!(again.extra[0].1.get(), r#"{"team":"ml"}"#);
    }

    #[test]
    fn malformed_bodies_get_precise_reasons() {
        let cases: &[(&[u8], &str)] = &[
            (b"\xff\xfe", "not UTF-8"),
            (b"", "empty"),
            (b"not json", "not a JSON object"),
            (b"[1,2]", "not a JSON object"),
            (br#"{"payload":{}}"#, "missing required field `kind`"),
            (br#"{"kind":"train"}"#, "missing required field `payload`"),
            (br#"{"kind":7,"payload":{}}"#, "field `kind`: expected a string"),
            (br#"{"kind":"Train","payload":{}}"#, "field `kind`"),
            (br#"{"kind":"other","payload":{}}"#, "subject says \"train\""),
            (br#"{"kind":"train","payload":{},"id":"nope"}"#, "field `id`"),
            (
                br#"{"kind":"train","payload":{},"max_attempts":0}"#,
                "field `max_attempts`: must be 1..=25",
            ),
            (
                br#"{"kind":"train","payload":{},"max_attempts":-1}"#,
                "field `max_attempts`: expected a positive integer",
            ),
            (
                br#"{"kind":"train","payload":{},"timeout_ms":"5"}"#,
                "field `timeout_ms`",
            ),
            (
                br#"{"kind":"train","payload":{},"features":[1]}"#,
                "field `features`: expected a JSON object",
            ),
            (
                br#"{"kind":"train","kind":"train","payload":{}}"#,
                "`kind` appears more than once",
            ),
            (br#"{"kind":"train","payload":{},"priority":1e99}"#, "field `priority`"),
        ];
        for (body, want) in cases {
            let err = Job::parse("train", body, derived()).unwrap_err().to_string();
            assert!(
                err.contains(want),
                "body {:?}: got {err:?}, want {want:?}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
