//! What both workers share: shutdown signals, retry backoff, batch fetching from a
//! durable pull consumer, in-progress heartbeats and dead-lettering.
//!
//! Shutdown has two stages, both as [`CancellationToken`]s: *soft* (SIGTERM: stop
//! fetching, let in-flight work finish) and *hard* (the grace period is over: cancel
//! what is left and nak it without delay).

mod dead;
mod fetch;

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::{message::AckKind, Message};
use tokio_util::sync::CancellationToken;

pub use dead::{dead_letter, DeadLetterer};
pub use fetch::Fetcher;

/// Resolves on Ctrl-C or SIGTERM (what Kubernetes and KEDA scale-in send).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// The two stages of shutdown.
#[derive(Clone, Default)]
pub struct Shutdown {
    /// Stop taking new work.
    pub soft: CancellationToken,
    /// Abandon in-flight work (nak it) and stop.
    pub hard: CancellationToken,
}

impl Shutdown {
    /// A fresh pair of tokens.
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// Fires `hard` once `grace` has passed after `soft` fired. Workers spawn this
    /// themselves, so a caller only ever cancels `soft` (or `hard`, to stop at once).
    pub fn grace_timer(&self, grace: Duration) -> impl Future<Output = ()> + Send + 'static {
        let soft = self.soft.clone();
        let hard = self.hard.clone();
        async move {
            tokio::select! {
                _ = soft.cancelled() => {}
                _ = hard.cancelled() => return,
            }
            tracing::info!(
                grace_s = grace.as_secs_f64(),
                "shutting down: no new work; finishing in-flight jobs"
            );
            tokio::select! {
                _ = tokio::time::sleep(grace) => tracing::warn!("grace period over; abandoning in-flight work"),
                _ = hard.cancelled() => {}
            }
            hard.cancel();
        }
    }

    /// Cancels `soft` on the first Ctrl-C or SIGTERM and `hard` on the second.
    pub fn on_signals(&self) -> impl Future<Output = ()> + Send + 'static {
        let soft = self.soft.clone();
        let hard = self.hard.clone();
        async move {
            shutdown_signal().await;
            soft.cancel();
            shutdown_signal().await;
            tracing::warn!("second signal: stopping now");
            hard.cancel();
        }
    }
}

/// The delay before retrying after `attempt` failed attempts: exponential from `base`,
/// capped at `max`, with jitter in the upper half so a burst of failures spreads out.
pub fn backoff(attempt: u32, base: Duration, max: Duration) -> Duration {
    let exp = attempt.saturating_sub(1).min(30);
    let full = base.saturating_mul(1u32 << exp).min(max);
    let half = full / 2;
    half + full.saturating_sub(half).mul_f64(fastrand::f64())
}

/// Runs `work` while sending an in-progress ack for each of `msgs` every `every` (and
/// calling `on_beat`), so AckWait never expires under a live worker. Each ack gets at
/// most `every`, so a NATS outage cannot stall the beat.
pub async fn with_heartbeat<F: Future>(
    msgs: &[&Message],
    every: Duration,
    work: F,
    mut on_beat: impl FnMut(),
) -> F::Output {
    tokio::pin!(work);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = tick.tick() => {
                for msg in msgs {
                    if !matches!(tokio::time::timeout(every, msg.ack_with(AckKind::Progress)).await, Ok(Ok(()))) {
                        tracing::debug!("in-progress ack not sent");
                    }
                }
                on_beat();
            }
        }
    }
}

/// The headers of `incoming` to pass on to a message derived from it (trace context,
/// producer headers), without `Nats-Msg-Id` and mlsched's own `Mlsched-*` headers,
/// which the new message sets for itself.
pub fn carried_headers(incoming: Option<&async_nats::HeaderMap>) -> async_nats::HeaderMap {
    let mut out = async_nats::HeaderMap::new();
    for (name, values) in incoming.into_iter().flat_map(|h| h.iter()) {
        let n: &str = name.as_ref();
        if n.eq_ignore_ascii_case(crate::job::MSG_ID_HEADER) || n.starts_with("Mlsched-") {
            continue;
        }
        for v in values {
            out.append(n, v.as_str());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_stays_within_bounds() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(5);
        for attempt in 1..40 {
            let cap = (base * 2u32.pow((attempt - 1).min(20))).min(max);
            for _ in 0..200 {
                let d = backoff(attempt, base, max);
                assert!(
                    d >= cap / 2 && d <= cap,
                    "attempt {attempt}: {d:?} not in [{:?}, {cap:?}]",
                    cap / 2
                );
            }
        }
        assert!(backoff(1, base, max) <= base);
        assert!(backoff(30, base, max) >= max / 2);
    }

    #[tokio::test(start_paused = true)]
    async fn hard_stop_follows_soft_stop_after_the_grace_period() {
        let s = Shutdown::new();
        let task = tokio::spawn(s.grace_timer(Duration::from_secs(10)));
        tokio::time::sleep(Duration::from_secs(100)).await;
        assert!(!s.hard.is_cancelled(), "no hard stop without a soft stop");
        s.soft.cancel();
        tokio::task::yield_now().await;
        assert!(!s.hard.is_cancelled());
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert!(!s.hard.is_cancelled());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(s.hard.is_cancelled());
        task.await.unwrap();
    }
}
