//! The `mlsched` CLI and the workers' start-up, run as processes against a live stack.

use serde_json::{json, Value};

use crate::harness::{eventually, TestEnv, DEADLINE};
use crate::http::http_server;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_apply_is_idempotent_and_reports_what_it_changed() {
    let env = TestEnv::start().await;
    // The harness applied shorter ack waits; the shipped definitions put them back.
    let (ok, out) = env.cli(&["streams", "apply"]);
    assert!(ok, "{out}");
    assert!(out.contains("updated   JOBS_RUN/executor-fast (ack_wait)"), "{out}");
    assert!(out.contains("unchanged JOBS_DEAD"), "{out}");
    let (ok, out) = env.cli(&["streams", "apply"]);
    assert!(ok);
    assert_eq!(out.lines().count(), 9, "{out}");
    assert!(
        out.lines().all(|l| l.starts_with("unchanged")),
        "a second run changes nothing:\n{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_wait_status_queues_and_dlq_work_end_to_end() {
    let mut env = TestEnv::start().await;
    env.start_predictor();
    env.start_executor();

    let (ok, out) = env.cli(&["submit", "--kind", "noop", "--count", "50", "--wait"]);
    assert!(ok, "{out}");
    assert!(out.contains("submitted 50 jobs to jobs.submit.noop"), "{out}");
    assert!(out.contains("50 succeeded"), "{out}");

    let (ok, out) = env.cli(&[
        "submit",
        "--kind",
        "sleep",
        "--payload",
        r#"{"ms": 1, "fail_first": 1}"#,
        "--wait",
    ]);
    assert!(ok);
    let mut lines = out.lines();
    let id = lines.next().unwrap().to_string();
    assert_eq!(lines.next(), Some("succeeded"));
    let (ok, out) = env.cli(&["status", &id, "--json"]);
    assert!(ok);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["job"]["status"], "succeeded");
    assert_eq!(v["job"]["attempts"], 2);
    assert_eq!(v["job"]["lane"], "fast");
    assert_eq!(v["events"].as_array().unwrap().len(), 5, "{v}");
    let (ok, out) = env.cli(&["status", &id]);
    assert!(ok && out.contains("attempt 2 of 5"), "{out}");
    let predicted = v["job"]["predicted_ms"].as_i64().unwrap();
    let actual = v["job"]["actual_ms"].as_i64().unwrap();
    assert!(
        out.contains(&format!("prediction off by {} ms", (actual - predicted).abs())),
        "{out}"
    );

    let (ok, out) = env.cli(&["queues"]);
    assert!(ok);
    for name in [
        "JOBS_SUBMIT",
        "JOBS_RUN",
        "JOBS_DEAD",
        "predictor",
        "executor-fast",
        "executor-slow",
    ] {
        assert!(out.contains(name), "{name} missing from\n{out}");
    }
    assert!(
        out.contains("EST. DRAIN") && out.contains("PREDICTED WORK"),
        "drain estimates per lane:\n{out}"
    );
    let accuracy = out
        .lines()
        .find(|l| l.starts_with("noop "))
        .unwrap_or_else(|| panic!("prediction accuracy of noop jobs missing from\n{out}"));
    assert!(
        out.contains("PREDICTED p50") && accuracy.split_whitespace().nth(1) == Some("50"),
        "50 noop jobs finished with predictions:\n{out}"
    );

    // A job that dies on its first try (404), then works when retried from the DLQ.
    let server = http_server(vec![("/later", vec![404, 200])]).await;
    let dead = env.submit("http", json!({"url": format!("{server}/later")})).await;
    env.wait_for_status(dead, "dead").await;
    let (ok, out) = env.cli(&["dlq", "list"]);
    assert!(
        ok && out.contains("jobs.dead.http") && out.contains("HTTP 404"),
        "{out}"
    );
    let (ok, out) = env.cli(&["dlq", "retry", "--all"]);
    assert!(ok && out.contains("1 retried"), "{out}");
    let new_id: mlsched::job::JobId = out
        .split_whitespace()
        .skip_while(|w| *w != "as")
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    env.wait_for_status(new_id, "succeeded").await;
    assert_eq!(
        env.row(dead).await.unwrap().status,
        "dead",
        "the dead job's record is history"
    );
    assert!(env.dead_letters().await.is_empty(), "the retried dead letter is gone");
    let (ok, out) = env.cli(&["dlq", "purge"]);
    assert!(ok && out.contains("purged 0"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_prints_every_effective_key_without_secrets_and_names_a_bad_one() {
    let env = TestEnv::start().await;
    let (ok, out) = env.cli(&["config"]);
    assert!(ok, "{out}");
    assert!(out.contains("database.url = \"***\""), "{out}");
    assert!(out.contains("executor.lanes = [\"fast\",\"slow\"]"), "{out}");
    assert!(out.contains("shutdown.grace_s = "), "{out}");
    assert!(
        !out.contains("postgres://"),
        "no connection string in the output: {out}"
    );

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_it-mlsched"))
        .arg("config")
        .env_clear()
        .envs(env.process_env())
        .env("MLSCHED__EXECUTOR__CONCURENCY", "16")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("concurency"), "the unknown key is named: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_setting_stops_a_worker_at_start_naming_the_key() {
    let env = TestEnv::start().await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_it-worker"))
        .arg("executor")
        .envs(env.process_env())
        .env("MLSCHED__EXECUTOR__CONCURRENCY", "lots")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("executor.concurrency"), "{err}");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_it-worker"))
        .arg("predictor")
        .envs(env.process_env())
        .env("MLSCHED__RETRY__MAX_MS", "1")
        .env("MLSCHED__PREDICTOR__DEFAULT_LANE", "Not A Lane")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("retry.max_ms") && err.contains("predictor.default_lane"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_wait_for_an_unreachable_nats_and_start_when_it_appears() {
    let mut env = TestEnv::start().await;
    env.nats.stop();
    let mut worker = env.spawn_process("executor", &[]);
    env.nats.resume().unwrap();
    let client = eventually("the test client to reconnect", DEADLINE, || async {
        async_nats::connect(env.nats.url()).await.ok()
    })
    .await;
    let js = async_nats::jetstream::new(client);
    let id = mlsched::job::JobId::new_v7();
    let body = serde_json::to_vec(&json!({"id": id, "kind": "noop", "payload": {}})).unwrap();
    js.publish("jobs.run.fast.noop", body.into())
        .await
        .unwrap()
        .await
        .unwrap();
    env.wait_for_status(id, "succeeded").await;
    assert!(worker.try_wait().unwrap().is_none(), "the worker kept running");
    worker.kill().unwrap();
    worker.wait().unwrap();
}
