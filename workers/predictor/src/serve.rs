//! `mlsched.predict`: predictions over NATS request/reply, as a NATS service
//! (`mlsched-predict`), so it shows up in service discovery (`$SRV.PING`, `$SRV.INFO`,
//! `$SRV.STATS`) with request counts and processing time. Every predictor replica
//! serves it in one queue group.
//!
//! Request: a job envelope (`kind` required; `payload` optional here). Reply:
//! `{"predicted_ms", "upper_ms", "model_version"}` (`model_version` null on a cold
//! start), or a service error with code 400 and the reason.

use std::time::Instant;

use async_nats::service::{self, ServiceExt};
use futures::StreamExt;
use mlsched::job::{envelope::IdSource, Job, JobId};
use mlsched::telemetry::metrics::PREDICTION;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::predict::Predictor;

/// The request subject.
pub(crate) const SUBJECT: &str = "mlsched.predict";

/// Answers prediction requests until `cancel` fires.
pub(crate) async fn run(client: async_nats::Client, predictor: Predictor, cancel: CancellationToken) {
    let started = client
        .service_builder()
        .description("mlsched run-time predictions: send a job envelope, get predicted_ms, upper_ms, model_version")
        .start("mlsched-predict", env!("CARGO_PKG_VERSION"))
        .await;
    let service = match started {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "mlsched.predict service not started");
            return;
        }
    };
    let mut endpoint = match service.endpoint_builder().name("predict").add(SUBJECT).await {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(error = %e, "mlsched.predict endpoint not added");
            return;
        }
    };
    loop {
        let request = tokio::select! {
            _ = cancel.cancelled() => break,
            r = endpoint.next() => match r { Some(r) => r, None => break },
        };
        let began = Instant::now();
        let reply = answer(&predictor, &request.message.payload);
        metrics::histogram!(PREDICTION).record(began.elapsed().as_secs_f64());
        let response = reply
            .map(|v| v.to_string().into())
            .map_err(|reason| service::error::Error {
                status: reason,
                code: 400,
            });
        if let Err(e) = request.respond(response).await {
            tracing::debug!(error = %e, "prediction reply not sent");
        }
    }
    let _ = service.stop().await;
}

fn answer(predictor: &Predictor, body: &[u8]) -> Result<Value, String> {
    let mut envelope: Value = serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?;
    let kind = envelope
        .get("kind")
        .and_then(Value::as_str)
        .ok_or("missing required field `kind`")?
        .to_string();
    if let Some(obj) = envelope.as_object_mut() {
        obj.entry("payload").or_insert(Value::Null);
    }
    let job = Job::parse(
        &kind,
        envelope.to_string().as_bytes(),
        IdSource::Derived(JobId::new_v7()),
    )
    .map_err(|e| e.to_string())?;
    let (p, version) = predictor.predict(&job);
    Ok(json!({"predicted_ms": p.predicted_ms.round(), "upper_ms": p.upper_ms.round(), "model_version": version}))
}
