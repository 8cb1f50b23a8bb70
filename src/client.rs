//! Connecting to NATS, and publishing jobs the way every mlsched producer should.
//!
//! [`connect`] retries an unreachable server with backoff and a clear log line, checks
//! the server is one mlsched supports, and keeps reconnecting forever after a drop.
//! [`Producer`] publishes envelopes with `Nats-Msg-Id` = job id (JetStream's
//! deduplication) and pipelines the publish acks.

use std::time::Duration;

use async_nats::jetstream::{self, context::PublishAckFuture};
use async_nats::HeaderMap;
use bytes::Bytes;
use thiserror::Error;
use tokio_util::sync::CancellationToken;

use crate::config::NatsSettings;
use crate::job::{self, JobId, Kind};
use crate::streams::ServerVersion;

/// Why a NATS connection could not be made.
#[derive(Debug, Error)]
pub enum ConnectError {
    /// Shut down while still trying to connect.
    #[error("shut down before NATS was reachable")]
    Cancelled,
    /// The URL cannot be used.
    #[error("nats.url is invalid: {0}")]
    BadUrl(String),
    /// The server is older than 2.9.0 or has JetStream off.
    #[error("nats-server {0} is not supported: mlsched needs 2.9.0 or newer with JetStream enabled")]
    Unsupported(String),
}

/// Connects to NATS as `name`, retrying with backoff until the server answers or
/// `cancel` fires. After that, the client reconnects on its own forever.
pub async fn connect(
    settings: &NatsSettings,
    name: &str,
    cancel: &CancellationToken,
) -> Result<async_nats::Client, ConnectError> {
    let url = settings.url.expose().to_string();
    let mut delay = Duration::from_millis(200);
    loop {
        let opts = async_nats::ConnectOptions::new()
            .name(name)
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(5))
            .request_timeout(Some(Duration::from_millis(settings.request_timeout_ms)))
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Disconnected => {
                        metrics::counter!(crate::telemetry::metrics::NATS_DISCONNECTS).increment(1);
                        tracing::warn!("NATS connection lost; reconnecting")
                    }
                    async_nats::Event::Connected => tracing::info!("NATS connected"),
                    async_nats::Event::SlowConsumer(sid) => {
                        tracing::warn!(sid, "NATS slow consumer")
                    }
                    other => tracing::debug!(event = %other, "NATS event"),
                }
            });
        let attempt = tokio::select! {
            _ = cancel.cancelled() => return Err(ConnectError::Cancelled),
            r = opts.connect(url.as_str()) => r,
        };
        match attempt {
            Ok(client) => {
                let info = client.server_info();
                let ok = ServerVersion::parse(&info.version).is_some_and(|v| v >= ServerVersion(2, 9, 0));
                if !ok || !info.jetstream {
                    return Err(ConnectError::Unsupported(info.version));
                }
                tracing::info!(server = %info.version, "connected to NATS");
                return Ok(client);
            }
            Err(e) if matches!(e.kind(), async_nats::ConnectErrorKind::ServerParse) => {
                return Err(ConnectError::BadUrl(e.to_string()));
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "NATS unreachable; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => return Err(ConnectError::Cancelled),
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Publishes job envelopes to `jobs.submit.<kind>` (or straight to a lane).
#[derive(Clone)]
pub struct Producer {
    js: jetstream::Context,
}

impl Producer {
    /// A producer on `client`.
    pub fn new(client: async_nats::Client) -> Producer {
        Producer {
            js: jetstream::new(client),
        }
    }

    /// Sends one envelope with `Nats-Msg-Id` = `id` (and the current span's
    /// `traceparent` when tracing is on) and returns the future of its publish ack;
    /// await it (a dropped ack future is a job you cannot vouch for).
    pub async fn send(
        &self,
        subject: String,
        id: JobId,
        body: Bytes,
    ) -> Result<PublishAckFuture, async_nats::jetstream::context::PublishError> {
        let mut headers = HeaderMap::new();
        headers.insert(job::MSG_ID_HEADER, id.to_string().as_str());
        crate::telemetry::trace::inject(&tracing::Span::current(), &mut headers);
        self.js.publish_with_headers(subject, headers, body).await
    }

    /// Builds the envelope body of a job of `kind` with `payload`.
    pub fn envelope(
        id: JobId,
        kind: &Kind,
        payload: &serde_json::Value,
        features: Option<&serde_json::Value>,
    ) -> Bytes {
        let env = job::Envelope {
            id: Some(id),
            kind,
            payload,
            features,
            priority: None,
            max_attempts: None,
            timeout_ms: None,
        };
        Bytes::from(serde_json::to_vec(&env).unwrap_or_default())
    }
}
