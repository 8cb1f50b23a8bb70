//! What operators see: `/metrics`, `/healthz` and `/readyz` on real worker processes,
//! and the backlog SLIs sampled from JetStream.

use std::time::Duration;

use serde_json::json;

use crate::harness::{eventually, TestEnv, DEADLINE};

async fn get(url: &str) -> Option<(u16, String)> {
    let resp = reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    let code = resp.status().as_u16();
    Some((code, resp.text().await.ok()?))
}

/// The value of the sample `series` (name with labels, exactly as rendered).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

async fn wait_for_sample(base: &str, series: &str, want: impl Fn(f64) -> bool) -> String {
    eventually(&format!("{series} on {base}/metrics"), DEADLINE, || async {
        let (_, text) = get(&format!("{base}/metrics")).await?;
        sample(&text, series).filter(|v| want(*v)).map(|_| text)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_outcomes_and_readiness_are_visible_to_operators() {
    let mut env = TestEnv::start_with_own_postgres().await;
    let p_port = mlsched::stack::free_port().unwrap().to_string();
    let predictor_base = format!("http://127.0.0.1:{p_port}");
    let listen = format!("127.0.0.1:{p_port}");
    let mut predictor = env.spawn_process("predictor", &[("MLSCHED__METRICS__LISTEN", &listen)]);
    eventually("the predictor to be ready", DEADLINE, || async {
        let (code, body) = get(&format!("{predictor_base}/readyz")).await?;
        (code == 200 && body.contains(r#""ready":true"#)).then_some(())
    })
    .await;
    assert_eq!(
        get(&format!("{predictor_base}/healthz")).await.unwrap(),
        (200, "ok".into())
    );
    // The image's health check: `mlsched health` against the worker's port.
    let (ok, out) = env.cli(&["health", "--addr", &listen]);
    assert!(ok && out.contains("/readyz: ok"), "{out}");
    let closed = format!("127.0.0.1:{}", mlsched::stack::free_port().unwrap());
    let (ok, _) = env.cli(&["health", "--addr", &closed, "--path", "/healthz"]);
    assert!(!ok, "nothing listening: unhealthy");

    // No executor yet: the backlog builds up where KEDA and the alerts look for it.
    for _ in 0..50 {
        env.submit("noop", json!({})).await;
    }
    let text = wait_for_sample(
        &predictor_base,
        r#"mlsched_queue_backlog{stream="JOBS_RUN",consumer="executor-fast"}"#,
        |v| v == 50.0,
    )
    .await;
    assert_eq!(
        sample(&text, r#"mlsched_jobs_routed_total{kind="noop",lane="fast"}"#),
        Some(50.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"mlsched_queue_backlog{stream="JOBS_SUBMIT",consumer="predictor"}"#
        ),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"mlsched_queue_stuck{stream="JOBS_RUN",consumer="executor-fast"}"#
        ),
        Some(0.0)
    );
    assert_eq!(
        sample(&text, r#"mlsched_stream_messages{stream="JOBS_RUN"}"#),
        Some(50.0)
    );
    assert!(sample(&text, r#"mlsched_backlog_predicted_seconds{lane="slow"}"#).is_some());
    assert!(text.contains("# TYPE mlsched_prediction_seconds histogram"));
    wait_for_sample(
        &predictor_base,
        r#"mlsched_queue_oldest_age_seconds{stream="JOBS_RUN",consumer="executor-fast"}"#,
        |v| v > 0.0,
    )
    .await;

    let e_port = mlsched::stack::free_port().unwrap().to_string();
    let executor_base = format!("http://127.0.0.1:{e_port}");
    let listen = format!("127.0.0.1:{e_port}");
    let mut executor = env.spawn_process("executor", &[("MLSCHED__METRICS__LISTEN", &listen)]);
    env.wait_for_finished(50).await;
    let text = wait_for_sample(
        &executor_base,
        r#"mlsched_jobs_total{kind="noop",outcome="succeeded"}"#,
        |v| v == 50.0,
    )
    .await;
    assert_eq!(
        sample(&text, r#"mlsched_job_wait_seconds_count{kind="noop",lane="fast"}"#),
        Some(50.0)
    );
    assert_eq!(
        sample(&text, r#"mlsched_job_run_seconds_count{kind="noop",lane="fast"}"#),
        Some(50.0)
    );
    assert!(sample(&text, "mlsched_store_batch_size_count").is_some_and(|n| n >= 1.0));
    assert_eq!(sample(&text, r#"mlsched_jobs_in_flight{lane="fast"}"#), Some(0.0));
    wait_for_sample(
        &predictor_base,
        r#"mlsched_queue_backlog{stream="JOBS_RUN",consumer="executor-fast"}"#,
        |v| v == 0.0,
    )
    .await;
    let (_, text) = get(&format!("{predictor_base}/metrics")).await.unwrap();
    assert!(
        sample(
            &text,
            r#"mlsched_http_requests_total{route="/metrics",method="GET",code="200"}"#
        )
        .is_some_and(|n| n >= 1.0),
        "the endpoint counts its own requests"
    );

    // Postgres goes away: readiness says so, and says why.
    env.own_postgres().stop();
    let body = eventually("readiness to drop", DEADLINE, || async {
        let (code, body) = get(&format!("{executor_base}/readyz")).await?;
        (code == 503).then_some(body)
    })
    .await;
    assert!(
        body.contains(r#""postgres":false"#) && body.contains(r#""nats":true"#),
        "{body}"
    );
    env.own_postgres().resume().unwrap();
    eventually("readiness to return", DEADLINE, || async {
        let (code, _) = get(&format!("{executor_base}/readyz")).await?;
        (code == 200).then_some(())
    })
    .await;
    for w in [&mut predictor, &mut executor] {
        w.kill().unwrap();
        w.wait().unwrap();
    }
}

/// A real Prometheus scraping a real predictor, with the shipped alert rules (their
/// `for` and evaluation interval shortened, nothing else changed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_sees_the_backlog_alert_go_pending_then_firing() {
    let mut env = TestEnv::start().await;
    let p_port = mlsched::stack::free_port().unwrap();
    let listen = format!("127.0.0.1:{p_port}");
    let mut predictor = env.spawn_process(
        "predictor",
        &[
            ("MLSCHED__METRICS__LISTEN", &listen),
            ("MLSCHED__METRICS__SAMPLE_INTERVAL_MS", "200"),
        ],
    );

    let dir = tempfile::tempdir().unwrap();
    let rules = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../infra/prometheus/alerts/slo-alerts.yml"
    ))
    .unwrap()
    .replace("interval: 30s", "interval: 1s")
    .replace("for: 10m", "for: 3s")
    .replace("for: 5m", "for: 3s");
    std::fs::write(dir.path().join("rules.yml"), rules).unwrap();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [rules.yml]\n\
         scrape_configs:\n  - job_name: mlsched\n    static_configs:\n      - targets: ['{listen}']\n"
    );
    std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
    let prom_port = mlsched::stack::free_port().unwrap();
    let binary = std::env::var("MLSCHED_PROMETHEUS").unwrap_or_else(|_| "prometheus".into());
    let mut prometheus = std::process::Command::new(&binary)
        .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {binary} (apt-get install prometheus): {e}"));
    let api = format!("http://127.0.0.1:{prom_port}/api/v1");

    // Executors are stopped (none running); jobs pile up in the fast lane.
    for _ in 0..150 {
        env.submit("noop", json!({})).await;
    }
    let alert_state = |body: &str| -> Option<String> {
        let v: serde_json::Value = serde_json::from_str(body).ok()?;
        v["data"]["alerts"]
            .as_array()?
            .iter()
            .find(|a| {
                a["labels"]["alertname"] == "MlschedQueueBacklogHigh" && a["labels"]["consumer"] == "executor-fast"
            })
            .and_then(|a| a["state"].as_str().map(String::from))
    };
    let mut seen: Vec<String> = Vec::new();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while seen.last().map(String::as_str) != Some("firing") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "MlschedQueueBacklogHigh did not fire; states seen: {seen:?}"
        );
        if let Some(state) = get(&format!("{api}/alerts"))
            .await
            .and_then(|(_, body)| alert_state(&body))
        {
            if seen.last() != Some(&state) {
                seen.push(state);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        seen,
        vec!["pending".to_string(), "firing".to_string()],
        "went pending, then firing"
    );

    // The SLI itself, through Prometheus's query API.
    let (_, body) = get(&format!("{api}/query?query=mlsched:queue_backlog:max_all"))
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let value: f64 = v["data"]["result"][0]["value"][1].as_str().unwrap().parse().unwrap();
    assert!(value >= 150.0, "backlog SLI {value}");

    // Executors come back; the backlog drains and the alert resolves.
    env.start_executor();
    env.wait_for_finished(150).await;
    eventually("the alert to resolve", DEADLINE, || {
        let api = api.clone();
        async move {
            let (_, body) = get(&format!("{api}/alerts")).await?;
            alert_state(&body).is_none().then_some(())
        }
    })
    .await;
    for p in [&mut predictor, &mut prometheus] {
        p.kill().unwrap();
        p.wait().unwrap();
    }
}
