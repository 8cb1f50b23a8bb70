//! One job is one trace across processes: a real OTLP receiver in this test process
//! collects the spans that the CLI (producer), the predictor and the executor export.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;

use crate::harness::{eventually, TestEnv, DEADLINE};

/// (service.name, trace id, span name, attributes)
type Spans = Arc<Mutex<Vec<(String, String, String, BTreeMap<String, String>)>>>;

struct Receiver(Spans);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let text = |v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>| match v
            .as_ref()
            .and_then(|v| v.value.as_ref())
        {
            Some(Value::StringValue(s)) => s.clone(),
            Some(Value::IntValue(i)) => i.to_string(),
            _ => String::new(),
        };
        let mut spans = self.0.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .map(|kv| text(&kv.value))
                .unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                let trace: String = span.trace_id.iter().map(|b| format!("{b:02x}")).collect();
                let attrs = span
                    .attributes
                    .iter()
                    .map(|kv| (kv.key.clone(), text(&kv.value)))
                    .collect();
                spans.push((service.clone(), trace, span.name.clone(), attrs));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_is_one_trace_from_producer_through_predictor_and_executor_to_postgres() {
    let env = TestEnv::start().await;
    let spans: Spans = Arc::default();
    let port = mlsched::stack::free_port().unwrap();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(Receiver(spans.clone())))
        .serve(addr);
    tokio::spawn(server);
    let endpoint = format!("http://127.0.0.1:{port}");
    let otel = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "200"),
    ];
    let mut predictor = env.spawn_process("predictor", &otel);
    let mut executor = env.spawn_process("executor", &otel);

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_it-mlsched"))
        .args(["submit", "--kind", "noop", "--wait"])
        .envs(env.process_env())
        .envs(otel)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let id = stdout.lines().next().unwrap().to_string();

    // The producer's trace id, from the span that published the job.
    let trace = eventually("the producer's span", DEADLINE, || async {
        let spans = spans.lock().unwrap();
        spans
            .iter()
            .find(|(svc, _, _, a)| svc == "mlsched" && a.get("messaging.message.id") == Some(&id))
            .map(|(_, t, _, _)| t.clone())
    })
    .await;
    let services = eventually("spans of every process in one trace", DEADLINE, || async {
        let spans = spans.lock().unwrap();
        let in_trace: BTreeSet<(String, String)> = spans
            .iter()
            .filter(|(_, t, _, _)| *t == trace)
            .map(|(svc, _, name, _)| (svc.clone(), name.clone()))
            .collect();
        let want = [
            ("mlsched", "jobs.submit.noop publish"),
            ("mlsched-predictor", "jobs.submit.noop process"),
            ("mlsched-predictor", "store.write"),
            ("mlsched-executor", "jobs.run.fast.noop process"),
            ("mlsched-executor", "store.write"),
        ];
        want.iter()
            .all(|(s, n)| in_trace.contains(&(s.to_string(), n.to_string())))
            .then_some(in_trace)
    })
    .await;
    assert!(services.len() >= 5, "{services:?}");
    let spans = spans.lock().unwrap();
    let consumer = spans
        .iter()
        .find(|(svc, t, name, _)| svc == "mlsched-executor" && *t == trace && name.ends_with("process"))
        .unwrap();
    assert_eq!(consumer.3.get("messaging.system").map(String::as_str), Some("nats"));
    assert_eq!(
        consumer.3.get("messaging.destination.name").map(String::as_str),
        Some("jobs.run.fast.noop")
    );
    drop(spans);
    for p in [&mut predictor, &mut executor] {
        p.kill().unwrap();
        p.wait().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_job_id_kind_and_trace_id_but_never_the_payload() {
    let mut env = TestEnv::start().await;
    env.start_predictor();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("executor.log");
    // Tracing on (to a receiver that is not there: export fails quietly), JSON logs.
    let mut executor = env.spawn_process_logging(
        "executor",
        &[
            ("MLSCHED__LOG__FORMAT", "json"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9"),
        ],
        &log,
    );
    let secret = "hunter2-do-not-log";
    // Envelope data (features, unknown fields) must stay out of the logs like payloads.
    let id = env
        .submit_with(
            "sleep",
            serde_json::json!({"ms": 1, "fail_first": 1}),
            serde_json::json!({"features": {"note": secret}, "owner": secret}),
        )
        .await;
    env.wait_for_status(id, "succeeded").await;
    let line = eventually("the retry log line", DEADLINE, || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        async move {
            text.lines()
                .find(|l| l.contains("attempt failed; will retry"))
                .map(String::from)
        }
    })
    .await;
    let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON log line");
    let span = &v["span"];
    assert_eq!(span["id"], id.to_string(), "{line}");
    assert_eq!(span["kind"], "sleep", "{line}");
    assert_eq!(span["trace_id"].as_str().map(str::len), Some(32), "{line}");
    executor.kill().unwrap();
    executor.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains(secret), "job data never reaches the logs");
    assert!(!text.contains("postgres://"), "connection strings never reach the logs");
}
