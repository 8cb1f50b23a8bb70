//! What a process tells its operators: logs (human-readable by default, JSON with
//! `MLSCHED__LOG__FORMAT=json`; `RUST_LOG` overrides the level; payloads and secrets
//! are never logged), Prometheus [`metrics`], and the [`server`] that serves
//! `/metrics`, `/healthz` and `/readyz`.

pub mod metrics;
pub mod server;

use tracing_subscriber::EnvFilter;

use crate::config::LogSettings;

/// Installs the global subscriber (once; later calls are no-ops).
pub fn init(settings: &LogSettings) {
    // async-nats logs every (re)connect at info; our own lines say what matters.
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(format!("async_nats=warn,{}", settings.level)))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if settings.format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
