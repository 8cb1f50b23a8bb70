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
