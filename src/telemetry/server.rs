//! The operations endpoint of every worker: `/metrics` (Prometheus text format),
//! `/healthz` (the process is alive) and `/readyz` (connected to NATS and Postgres,
//! consuming, and not shutting down), on `metrics.listen`.
//!
//! Readiness is checked live on each probe: the NATS connection's state, a `SELECT 1`
//! with a one-second budget, and whether the consume loops have pulled since start.
//! Every request is counted in `mlsched_http_requests_total` and timed in
//! `mlsched_http_request_duration_seconds`, by matched route.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::metrics::{HTTP_DURATION, HTTP_REQUESTS};

/// What `/readyz` looks at; cheap to clone, shared by a worker's tasks.
#[derive(Clone, Default)]
pub struct Health {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    nats: OnceLock<async_nats::Client>,
    pool: OnceLock<PgPool>,
    consuming: AtomicBool,
    stopping: AtomicBool,
}

impl Health {
    /// Nothing connected yet: not ready.
    pub fn new() -> Health {
        Health::default()
    }

    /// The NATS connection to watch.
    pub fn set_nats(&self, client: async_nats::Client) {
        let _ = self.inner.nats.set(client);
    }

    /// The Postgres pool to probe.
    pub fn set_pool(&self, pool: PgPool) {
        let _ = self.inner.pool.set(pool);
    }

    /// A consume loop has an open pull request.
    pub fn set_consuming(&self) {
        self.inner.consuming.store(true, Ordering::Relaxed);
    }

    /// Shutdown began: report not ready so no new traffic is sent here.
    pub fn set_stopping(&self) {
        self.inner.stopping.store(true, Ordering::Relaxed);
    }

    /// Marks the process stopping when `soft` fires.
    pub fn stopping_on(&self, soft: CancellationToken) -> impl std::future::Future<Output = ()> + Send + 'static {
        let health = self.clone();
        async move {
            soft.cancelled().await;
            health.set_stopping();
        }
    }

    async fn check(&self) -> (bool, serde_json::Value) {
        let nats = self
            .inner
            .nats
            .get()
            .is_some_and(|c| c.connection_state() == async_nats::connection::State::Connected);
        let postgres = match self.inner.pool.get() {
            Some(pool) => matches!(
                tokio::time::timeout(Duration::from_secs(1), sqlx::query("SELECT 1").execute(pool)).await,
                Ok(Ok(_))
            ),
            None => false,
        };
        let consuming = self.inner.consuming.load(Ordering::Relaxed);
        let stopping = self.inner.stopping.load(Ordering::Relaxed);
        let ready = nats && postgres && consuming && !stopping;
        (
            ready,
            json!({"ready": ready, "nats": nats, "postgres": postgres, "consuming": consuming, "stopping": stopping}),
        )
    }
}

#[derive(Clone)]
struct AppState {
    health: Health,
    metrics: PrometheusHandle,
}

/// The routes, for serving or for driving in tests.
pub fn router(health: Health, metrics: PrometheusHandle) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .layer(middleware::from_fn(track))
        .with_state(AppState { health, metrics })
}

async fn render_metrics(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
}

async fn ready(State(s): State<AppState>) -> impl IntoResponse {
    let (ok, body) = s.health.check().await;
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body))
}

/// Counts and times every request by matched route (unmatched paths share one label,
/// so scanners cannot blow up the series count).
pub async fn track(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().as_str().to_string();
    let started = Instant::now();
    let resp = next.run(req).await;
    let code = resp.status().as_u16().to_string();
    metrics::counter!(HTTP_REQUESTS, "route" => route.clone(), "method" => method.clone(), "code" => code).increment(1);
    metrics::histogram!(HTTP_DURATION, "route" => route, "method" => method).record(started.elapsed().as_secs_f64());
    resp
}

/// A running operations endpoint; dropping it stops serving.
pub struct OpsServer {
    stop: CancellationToken,
    addr: Option<SocketAddr>,
}

impl OpsServer {
    /// Where it listens (`None` when `metrics.listen` is empty).
    pub fn addr(&self) -> Option<SocketAddr> {
        self.addr
    }
}

impl Drop for OpsServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Installs the metrics recorder, binds `listen` (an error here should stop the
/// process: the port is taken or the address is wrong) and serves `/metrics`,
/// `/healthz` and `/readyz` until the returned [`OpsServer`] is dropped. An empty
/// `listen` serves nothing (metrics are still recorded).
pub async fn start(listen: &str, health: Health) -> std::io::Result<OpsServer> {
    let metrics = super::metrics::install();
    let stop = CancellationToken::new();
    if listen.is_empty() {
        return Ok(OpsServer { stop, addr: None });
    }
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    let app = router(health, metrics);
    let until = stop.clone();
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { until.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "operations endpoint stopped");
        }
    });
    Ok(OpsServer { stop, addr: Some(addr) })
}
