//! `mlsched streams apply`: create or update each definition through the JetStream
//! API, comparing only the keys a definition sets, so a second run changes nothing.

use std::fmt;

use async_nats::jetstream;
use serde_json::{json, Map, Value};

use super::{Definitions, ServerVersion, StreamsError};

/// What `apply` did to one stream or consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Did not exist; created.
    Created(String),
    /// Existed with different values for these keys; updated.
    Updated(String, Vec<String>),
    /// Already as defined.
    Unchanged(String),
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::Created(n) => write!(f, "created   {n}"),
            Change::Updated(n, keys) => write!(f, "updated   {n} ({})", keys.join(", ")),
            Change::Unchanged(n) => write!(f, "unchanged {n}"),
        }
    }
}

/// Keys of `desired` whose values differ from `current`.
fn differing_keys(desired: &Map<String, Value>, current: &Map<String, Value>) -> Vec<String> {
    desired
        .iter()
        .filter(|(k, v)| current.get(k.as_str()) != Some(v))
        .filter(|(k, v)| {
            // The server omits empty descriptions and zero values it treats as unset.
            !(current.get(k.as_str()).is_none() && (v.as_str() == Some("") || v.as_i64() == Some(0)))
        })
        .map(|(k, _)| k.clone())
        .collect()
}

async fn api(
    js: &jetstream::Context,
    what: &str,
    subject: String,
    body: Value,
) -> Result<Option<Map<String, Value>>, StreamsError> {
    let resp: Value = js
        .request(subject, &body)
        .await
        .map_err(|source| StreamsError::Request {
            what: what.to_string(),
            source,
        })?;
    if let Some(err) = resp.get("error") {
        let code = err.get("err_code").and_then(Value::as_u64).unwrap_or(0);
        let http = err.get("code").and_then(Value::as_u64).unwrap_or(0);
        // 10059 stream not found, 10014 consumer not found.
        if http == 404 && matches!(code, 10059 | 10014) {
            return Ok(None);
        }
        return Err(StreamsError::Api {
            what: what.to_string(),
            code,
            description: err.get("description").and_then(Value::as_str).unwrap_or("").to_string(),
        });
    }
    Ok(resp.get("config").and_then(Value::as_object).cloned())
}

fn verify_kept(
    what: &str,
    desired: &Map<String, Value>,
    got: &Map<String, Value>,
    server: ServerVersion,
) -> Result<(), StreamsError> {
    let lost = differing_keys(desired, got);
    match lost.first() {
        None => Ok(()),
        Some(key) => Err(StreamsError::Unsupported {
            what: what.to_string(),
            key: key.clone(),
            needs: "a version that keeps it (the server dropped or changed it)",
            server: server.to_string(),
        }),
    }
}

/// Creates or updates every stream and consumer in `defs`. Idempotent: a definition
/// that matches the server is left alone and reported [`Change::Unchanged`].
pub async fn apply(client: &async_nats::Client, defs: &Definitions) -> Result<Vec<Change>, StreamsError> {
    let version_text = client.server_info().version;
    let server = ServerVersion::parse(&version_text).ok_or_else(|| StreamsError::ServerTooOld(version_text.clone()))?;
    if server < ServerVersion(2, 9, 0) {
        return Err(StreamsError::ServerTooOld(version_text));
    }
    defs.check_supported(server)?;
    let js = jetstream::new(client.clone());
    let mut changes = Vec::new();
    for s in &defs.streams {
        let name = &s.name;
        let current = api(&js, name, format!("STREAM.INFO.{name}"), json!({})).await?;
        let change = match current {
            None => {
                let got = api(
                    &js,
                    name,
                    format!("STREAM.CREATE.{name}"),
                    Value::Object(s.config.clone()),
                )
                .await?;
                verify_kept(name, &s.config, &got.unwrap_or_default(), server)?;
                Change::Created(name.clone())
            }
            Some(cur) => {
                let keys = differing_keys(&s.config, &cur);
                if keys.is_empty() {
                    Change::Unchanged(name.clone())
                } else {
                    let mut merged = cur.clone();
                    merged.extend(s.config.clone());
                    let got = api(&js, name, format!("STREAM.UPDATE.{name}"), Value::Object(merged)).await?;
                    verify_kept(name, &s.config, &got.unwrap_or_default(), server)?;
                    Change::Updated(name.clone(), keys)
                }
            }
        };
        changes.push(change);
    }
    for c in &defs.consumers {
        let what = format!("{}/{}", c.stream, c.name);
        let current = api(&js, &what, format!("CONSUMER.INFO.{}.{}", c.stream, c.name), json!({})).await?;
        let create = |config: Map<String, Value>| {
            api(
                &js,
                &what,
                format!("CONSUMER.DURABLE.CREATE.{}.{}", c.stream, c.name),
                json!({"stream_name": c.stream, "config": config}),
            )
        };
        let change = match current {
            None => {
                let got = create(c.config.clone()).await?;
                verify_kept(&what, &c.config, &got.unwrap_or_default(), server)?;
                Change::Created(what.clone())
            }
            Some(cur) => {
                let keys = differing_keys(&c.config, &cur);
                if keys.is_empty() {
                    Change::Unchanged(what.clone())
                } else {
                    let mut merged = cur.clone();
                    merged.extend(c.config.clone());
                    let got = create(merged).await?;
                    verify_kept(&what, &c.config, &got.unwrap_or_default(), server)?;
                    Change::Updated(what.clone(), keys)
                }
            }
        };
        changes.push(change);
    }
    Ok(changes)
}
