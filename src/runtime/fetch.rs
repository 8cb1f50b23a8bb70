//! Batch fetching from a durable pull consumer.
//!
//! Each call issues one pull request for as many messages as the caller has room for,
//! open for at most `expires`; the caller consumes the batch as it arrives. One pull
//! request per batch (instead of a long-lived `messages()` stream) means a stalled
//! subscription can never leave work pending unseen: the next batch is a new request.
//! Errors (server restarting, consumer missing) are logged and retried with backoff.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, consumer::Consumer};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::backoff;

/// A durable pull consumer, looked up lazily and again after errors.
pub struct Fetcher {
    js: jetstream::Context,
    stream: String,
    consumer: String,
    handle: Option<Consumer<pull::Config>>,
    expires: Duration,
    failures: u32,
    /// The last batch ended with an error status (consumer deleted, no responders):
    /// back off and look the consumer up again before the next pull.
    broken: bool,
}

impl Fetcher {
    /// A fetcher of `consumer` on `stream`.
    pub fn new(client: async_nats::Client, stream: &str, consumer: &str) -> Fetcher {
        Fetcher {
            js: jetstream::new(client),
            stream: stream.to_string(),
            consumer: consumer.to_string(),
            handle: None,
            expires: Duration::from_secs(1),
            failures: 0,
            broken: false,
        }
    }

    /// Sets how long one pull request stays open (default 1 s).
    pub fn expires(mut self, expires: Duration) -> Fetcher {
        self.expires = expires;
        self
    }

    /// The consumer's name.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    async fn pause(&mut self, cancel: &CancellationToken) {
        self.failures += 1;
        let delay = backoff(self.failures, Duration::from_millis(200), Duration::from_secs(5));
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = tokio::time::sleep(delay) => {}
        }
    }

    /// Opens one pull request for up to `max` messages. Returns `None` once `cancel`
    /// fires; retries errors until then.
    pub async fn batch(&mut self, max: usize, cancel: &CancellationToken) -> Option<pull::Batch> {
        loop {
            if cancel.is_cancelled() {
                return None;
            }
            if std::mem::take(&mut self.broken) {
                self.handle = None;
                self.pause(cancel).await;
                continue;
            }
            if self.handle.is_none() {
                let lookup = async {
                    let stream = self.js.get_stream(&self.stream).await.map_err(|e| e.to_string())?;
                    stream
                        .get_consumer::<pull::Config>(&self.consumer)
                        .await
                        .map_err(|e| e.to_string())
                };
                match lookup.await {
                    Ok(c) => self.handle = Some(c),
                    Err(e) => {
                        tracing::error!(stream = %self.stream, consumer = %self.consumer, error = %e,
                            "cannot bind consumer (does `mlsched streams apply` need to run?); retrying");
                        self.pause(cancel).await;
                        continue;
                    }
                }
            }
            let Some(consumer) = &self.handle else {
                continue;
            };
            let req = consumer.batch().max_messages(max).expires(self.expires).messages();
            let res = tokio::select! {
                _ = cancel.cancelled() => return None,
                r = req => r,
            };
            match res {
                Ok(b) => {
                    self.failures = 0;
                    return Some(b);
                }
                Err(e) => {
                    tracing::warn!(consumer = %self.consumer, error = %e, "pull request failed; retrying");
                    self.handle = None;
                    self.pause(cancel).await;
                }
            }
        }
    }

    /// Receives the next message of `batch`, skipping (and logging) status errors.
    /// `None` when the batch is over.
    pub async fn next(&mut self, batch: &mut pull::Batch) -> Option<jetstream::Message> {
        match batch.next().await? {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(consumer = %self.consumer, error = %e, "pull request failed; backing off");
                self.broken = true;
                None
            }
        }
    }
}
