//! Prometheus metrics through the `metrics` facade: the names (DESIGN.md's table plus
//! what operators need), their help texts and histogram buckets, and the recorder.
//!
//! Everything is recorded with the `metrics` macros at the point where it happens;
//! this module only says what exists. [`install`] sets the global recorder once per
//! process and returns the handle `/metrics` renders.

use std::sync::OnceLock;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Messages waiting for a consumer: pending + ack-pending (KEDA's lag). `stream`, `consumer`.
pub const QUEUE_BACKLOG: &str = "mlsched_queue_backlog";
/// Age of the oldest message a consumer has not finished. `stream`, `consumer`.
pub const QUEUE_OLDEST_AGE: &str = "mlsched_queue_oldest_age_seconds";
/// Messages in a work queue that its consumer will never deliver again. `stream`, `consumer`.
pub const QUEUE_STUCK: &str = "mlsched_queue_stuck";
/// Sum of the predicted run time of queued jobs. `lane`.
pub const BACKLOG_PREDICTED: &str = "mlsched_backlog_predicted_seconds";
/// Finished attempts by outcome (`succeeded`, `failed` = will retry, `dead`). `kind`, `outcome`.
pub const JOBS_TOTAL: &str = "mlsched_jobs_total";
/// Submit → start of a job's first attempt. `kind`, `lane`.
pub const JOB_WAIT: &str = "mlsched_job_wait_seconds";
/// Handler run time of an attempt. `kind`, `lane`.
pub const JOB_RUN: &str = "mlsched_job_run_seconds";
/// Time to answer one prediction.
pub const PREDICTION: &str = "mlsched_prediction_seconds";
/// |actual − predicted| run time of a finished job. `kind`.
pub const PREDICTION_ABS_ERROR: &str = "mlsched_prediction_abs_error_seconds";
/// HTTP requests answered. `route`, `method`, `code`.
pub const HTTP_REQUESTS: &str = "mlsched_http_requests_total";
/// HTTP request latency. `route`, `method`.
pub const HTTP_DURATION: &str = "mlsched_http_request_duration_seconds";
/// Jobs routed by the predictor. `kind`, `lane`.
pub const JOBS_ROUTED: &str = "mlsched_jobs_routed_total";
/// Messages published to `jobs.dead.*`. `kind`, `stage` (`predictor`, `executor`, `max_deliver`).
pub const DEAD_LETTERS: &str = "mlsched_dead_letters_total";
/// Deliveries that were redeliveries. `stream`, `consumer`.
pub const REDELIVERIES: &str = "mlsched_redeliveries_total";
/// Attempts running now. `lane`.
pub const JOBS_IN_FLIGHT: &str = "mlsched_jobs_in_flight";
/// Records per group commit.
pub const STORE_BATCH_SIZE: &str = "mlsched_store_batch_size";
/// Time to commit one batch.
pub const STORE_COMMIT: &str = "mlsched_store_commit_seconds";
/// Failed batch writes. `error` (`unavailable`, `rejected`).
pub const STORE_ERRORS: &str = "mlsched_store_errors_total";
/// NATS disconnects (each followed by reconnect attempts).
pub const NATS_DISCONNECTS: &str = "mlsched_nats_disconnects_total";
/// Messages in each stream. `stream`.
pub const STREAM_MESSAGES: &str = "mlsched_stream_messages";

/// The `kind` label of a dead letter from its subject: the kind, or `_invalid` (so a
/// flood of junk subjects cannot create unbounded series).
pub fn dead_kind_label(subject: &str) -> String {
    let token = crate::job::kind_token(subject);
    if crate::job::Kind::new(token).is_ok() {
        token.to_string()
    } else {
        crate::job::INVALID_KIND_TOKEN.to_string()
    }
}

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    1800.0, 3600.0,
];
const SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder (once per process) and describes every metric.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(STORE_BATCH_SIZE.into()), SIZE_BUCKETS));
            let recorder = match builder {
                Ok(b) => b.build_recorder(),
                Err(_) => PrometheusBuilder::new().build_recorder(),
            };
            let handle = recorder.handle();
            // Tests build several workers in one process; only the first install wins.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

fn describe() {
    describe_gauge!(
        QUEUE_BACKLOG,
        Unit::Count,
        "Messages waiting for a consumer: pending + ack-pending (the lag KEDA scales on)"
    );
    describe_gauge!(
        QUEUE_OLDEST_AGE,
        Unit::Seconds,
        "Age of the oldest message a consumer has not finished"
    );
    describe_gauge!(
        QUEUE_STUCK,
        Unit::Count,
        "Messages in a work queue that its consumer will never deliver again"
    );
    describe_gauge!(
        BACKLOG_PREDICTED,
        Unit::Seconds,
        "Sum of the predicted run time of queued jobs"
    );
    describe_counter!(
        JOBS_TOTAL,
        Unit::Count,
        "Finished attempts by outcome: succeeded, failed (will retry), dead"
    );
    describe_histogram!(JOB_WAIT, Unit::Seconds, "Submit to start of a job's first attempt");
    describe_histogram!(JOB_RUN, Unit::Seconds, "Handler run time of an attempt");
    describe_histogram!(PREDICTION, Unit::Seconds, "Time to answer one prediction");
    describe_histogram!(
        PREDICTION_ABS_ERROR,
        Unit::Seconds,
        "Absolute error of a job's predicted run time"
    );
    describe_counter!(HTTP_REQUESTS, Unit::Count, "HTTP requests answered");
    describe_histogram!(HTTP_DURATION, Unit::Seconds, "HTTP request latency");
    describe_counter!(JOBS_ROUTED, Unit::Count, "Jobs routed to a lane by the predictor");
    describe_counter!(DEAD_LETTERS, Unit::Count, "Messages published to jobs.dead.*");
    describe_counter!(REDELIVERIES, Unit::Count, "Deliveries that were redeliveries");
    describe_gauge!(JOBS_IN_FLIGHT, Unit::Count, "Attempts running now");
    describe_histogram!(STORE_BATCH_SIZE, Unit::Count, "Records per group commit");
    describe_histogram!(STORE_COMMIT, Unit::Seconds, "Time to commit one batch of records");
    describe_counter!(STORE_ERRORS, Unit::Count, "Failed batch writes");
    describe_counter!(NATS_DISCONNECTS, Unit::Count, "NATS disconnects");
    describe_gauge!(STREAM_MESSAGES, Unit::Count, "Messages stored in each stream");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The metric table of the public contract (DESIGN.md), which dashboards, alerts and
    /// KEDA triggers are written against: renaming one breaks users.
    #[test]
    fn contract_metrics_keep_their_names() {
        let contract = [
            (QUEUE_BACKLOG, "mlsched_queue_backlog"),
            (QUEUE_OLDEST_AGE, "mlsched_queue_oldest_age_seconds"),
            (BACKLOG_PREDICTED, "mlsched_backlog_predicted_seconds"),
            (JOBS_TOTAL, "mlsched_jobs_total"),
            (JOB_WAIT, "mlsched_job_wait_seconds"),
            (JOB_RUN, "mlsched_job_run_seconds"),
            (PREDICTION, "mlsched_prediction_seconds"),
            (PREDICTION_ABS_ERROR, "mlsched_prediction_abs_error_seconds"),
            (HTTP_REQUESTS, "mlsched_http_requests_total"),
            (HTTP_DURATION, "mlsched_http_request_duration_seconds"),
        ];
        for (ours, theirs) in contract {
            assert_eq!(ours, theirs);
        }
    }

    #[test]
    fn histograms_render_as_prometheus_histograms_with_buckets() {
        let handle = install();
        metrics::histogram!(JOB_RUN, "kind" => "noop", "lane" => "fast").record(0.003);
        metrics::counter!(JOBS_TOTAL, "kind" => "noop", "outcome" => "succeeded").increment(1);
        let text = handle.render();
        assert!(text.contains("# TYPE mlsched_job_run_seconds histogram"), "{text}");
        assert!(
            text.contains(r#"mlsched_job_run_seconds_bucket{kind="noop",lane="fast",le="0.005"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"mlsched_jobs_total{kind="noop",outcome="succeeded"} 1"#),
            "{text}"
        );
        assert!(text.contains("# HELP mlsched_jobs_total"), "{text}");
    }
}
