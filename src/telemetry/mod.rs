//! What a process tells its operators: logs (human-readable by default, JSON with
//! `MLSCHED__LOG__FORMAT=json`; `RUST_LOG` overrides the level; job lines carry the job
//! id, kind and, with tracing on, the trace id; payloads and secrets are never logged),
//! Prometheus [`metrics`], the [`server`] that serves `/metrics`, `/healthz` and
//! `/readyz`, and OpenTelemetry [`trace`] export.

pub mod metrics;
pub mod server;
pub mod trace;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::config::LogSettings;

pub use trace::TraceGuard;

/// Installs the global subscriber for process `service` (once; later calls only
/// return an inert guard): logs to stderr, and spans over OTLP when
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is set. Keep the guard until the process ends.
pub fn init(settings: &LogSettings, service: &str) -> TraceGuard {
    // async-nats logs every (re)connect at info; our own lines say what matters.
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(format!("async_nats=warn,h2=warn,tonic=warn,{}", settings.level)))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let logs: Box<dyn Layer<Registry> + Send + Sync> = if settings.format == "json" {
        Box::new(
            tracing_subscriber::fmt::layer()
                .json()
                .with_current_span(true)
                .with_writer(std::io::stderr),
        )
    } else {
        Box::new(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
    };
    let (guard, tracer) = trace::pipeline(service);
    let spans = tracer.map(|t| tracing_opentelemetry::layer().with_tracer(t));
    let _ = tracing_subscriber::registry()
        .with(logs)
        .with(spans)
        .with(filter)
        .try_init();
    guard
}
