//! The pipeline's promises: every valid job runs and is recorded once, duplicates are
//! absorbed, bad input is dead-lettered with its reason, retries count attempts right.

use std::collections::HashSet;

use mlsched::job::JobId;
use serde_json::json;

use crate::harness::{eventually, TestEnv, DEADLINE};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_jobs_flow_end_to_end_and_each_succeeds_once() {
    let mut env = TestEnv::start().await;
    env.start_predictor();
    env.start_executor();
    env.start_executor();
    let mut ids = Vec::new();
    for i in 0..1000 {
        let id = if i % 10 == 0 {
            env.submit("cpu", json!({"iterations": 1000})).await
        } else {
            env.submit("noop", json!({"n": i})).await
        };
        ids.push(id);
    }
    env.wait_for_finished(1000).await;
    let counts = env.counts().await;
    assert_eq!(counts.get("succeeded"), Some(&1000), "{counts:?}");
    let successes: i64 = sqlx::query_scalar("SELECT count(*) FROM job_events WHERE status = 'succeeded'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(successes, 1000, "exactly one recorded success per job");
    let cpu = env.row(ids[0]).await.unwrap();
    assert_eq!(cpu.attempts, 1);
    assert!(cpu.result.unwrap()["checksum"].is_string());
    assert_eq!(
        env.events(ids[1]).await,
        vec![("queued".into(), 0), ("running".into(), 1), ("succeeded".into(), 1)]
    );
    eventually("work queues to drain", DEADLINE, || async {
        (env.stream_len("JOBS_SUBMIT").await == 0 && env.stream_len("JOBS_RUN").await == 0).then_some(())
    })
    .await;
    env.stop_workers().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_submissions_are_absorbed() {
    let mut env = TestEnv::start().await;
    env.start_predictor();
    env.start_executor();
    let id = JobId::new_v7();
    let body = serde_json::to_vec(&json!({"id": id, "kind": "noop", "payload": {}})).unwrap();
    // The same job three times with its Msg-Id (JetStream dedup) ...
    for _ in 0..3 {
        env.publish("jobs.submit.noop", body.clone(), Some(&id.to_string()))
            .await;
    }
    env.wait_for_status(id, "succeeded").await;
    // ... and again after it finished, without the header and straight to a lane:
    // the record absorbs it and the job does not run again.
    env.publish("jobs.submit.noop", body.clone(), None).await;
    env.publish("jobs.run.fast.noop", body.clone(), None).await;
    let marker = env.submit("noop", json!({})).await;
    env.wait_for_status(marker, "succeeded").await;
    eventually("the duplicates to be consumed", DEADLINE, || async {
        (env.stream_len("JOBS_SUBMIT").await == 0 && env.stream_len("JOBS_RUN").await == 0).then_some(())
    })
    .await;
    let events = env.events(id).await;
    assert_eq!(events.iter().filter(|(s, _)| s == "succeeded").count(), 1, "{events:?}");
    assert_eq!(
        events.iter().filter(|(s, _)| s == "running").count(),
        1,
        "ran once: {events:?}"
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(rows, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_are_dead_lettered_with_reasons_while_valid_jobs_flow() {
    let mut env = TestEnv::start().await;
    env.start_predictor();
    env.start_executor();
    let bad: Vec<(&str, Vec<u8>, &str)> = vec![
        ("jobs.submit.noop", b"not json".to_vec(), "not a JSON object"),
        ("jobs.submit.noop", b"".to_vec(), "empty"),
        ("jobs.submit.noop", vec![0xff, 0xfe], "not UTF-8"),
        ("jobs.submit.noop", b"[1,2,3]".to_vec(), "not a JSON object"),
        (
            "jobs.submit.noop",
            br#"{"payload":{}}"#.to_vec(),
            "missing required field `kind`",
        ),
        (
            "jobs.submit.noop",
            br#"{"kind":"noop"}"#.to_vec(),
            "missing required field `payload`",
        ),
        (
            "jobs.submit.noop",
            br#"{"kind":"cpu","payload":{}}"#.to_vec(),
            "subject says \"noop\"",
        ),
        (
            "jobs.submit.noop",
            br#"{"kind":"noop","payload":{},"id":"x"}"#.to_vec(),
            "field `id`",
        ),
        (
            "jobs.submit.noop",
            br#"{"kind":"noop","payload":{},"max_attempts":1000}"#.to_vec(),
            "max_attempts",
        ),
        (
            "jobs.submit.Bad_Kind",
            br#"{"kind":"Bad_Kind","payload":{}}"#.to_vec(),
            "field `kind`",
        ),
        ("jobs.run.fast.noop", b"{broken".to_vec(), "not a JSON object"),
        // Valid JSON that Postgres jsonb cannot store.
        (
            "jobs.submit.noop",
            br#"{"kind":"noop","payload":{"s":"\u0000"}}"#.to_vec(),
            "cannot record the job",
        ),
        // The same on the direct path: recorded dead without its payload.
        (
            "jobs.run.fast.noop",
            br#"{"kind":"noop","payload":{"s":"\u0000"}}"#.to_vec(),
            "cannot record the job",
        ),
    ];
    let mut valid = Vec::new();
    for (subject, body, _) in &bad {
        env.publish(subject, body.clone(), None).await;
        valid.push(env.submit("noop", json!({})).await);
    }
    for id in &valid {
        env.wait_for_status(*id, "succeeded").await;
    }
    let dead = eventually("every malformed body in JOBS_DEAD", DEADLINE, || async {
        let d = env.dead_letters().await;
        (d.len() >= bad.len()).then_some(d)
    })
    .await;
    assert_eq!(dead.len(), bad.len(), "{dead:#?}");
    for (subject, body, reason) in &bad {
        let d = dead
            .iter()
            .find(|d| d.original_subject == *subject && d.payload == *body)
            .unwrap_or_else(|| panic!("no dead letter for {subject} {:?}", String::from_utf8_lossy(body)));
        assert!(
            d.error.contains(reason),
            "{subject}: error {:?} should mention {reason:?}",
            d.error
        );
    }
    let invalid_kind = dead
        .iter()
        .find(|d| d.original_subject == "jobs.submit.Bad_Kind")
        .unwrap();
    assert_eq!(invalid_kind.subject, "jobs.dead._invalid");
    assert_eq!(
        env.stream_len("JOBS_SUBMIT").await,
        0,
        "nothing is left behind in the work queue"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_jobs_retry_with_the_right_attempt_counts_then_succeed_or_die() {
    let mut env = TestEnv::start().await;
    env.start_predictor();
    env.start_executor();
    let flaky = env.submit("sleep", json!({"ms": 1, "fail_first": 2})).await;
    let doomed = env
        .submit_with("sleep", json!({"ms": 1, "fail_first": 99}), json!({"max_attempts": 3}))
        .await;
    let slow = env
        .submit_with(
            "sleep",
            json!({"ms": 5000}),
            json!({"max_attempts": 2, "timeout_ms": 100}),
        )
        .await;

    let row = env.wait_for_status(flaky, "succeeded").await;
    assert_eq!(row.attempts, 3);
    assert_eq!(
        row.lane, "fast",
        "routed on the prediction: without history, predictor.default_ms is under the threshold"
    );
    assert_eq!(row.error, None, "a success clears the last error");
    let history: Vec<(String, i32)> = env.events(flaky).await;
    let want: Vec<(String, i32)> = [
        ("queued", 0),
        ("running", 1),
        ("failed", 1),
        ("running", 2),
        ("failed", 2),
        ("running", 3),
        ("succeeded", 3),
    ]
    .iter()
    .map(|(s, a)| (s.to_string(), *a))
    .collect();
    assert_eq!(history, want);

    let row = env.wait_for_status(doomed, "dead").await;
    assert_eq!(row.attempts, 3);
    assert!(
        row.error.as_deref().unwrap().contains("failed 3 of 3 attempts"),
        "{row:?}"
    );
    let row = env.wait_for_status(slow, "dead").await;
    assert_eq!(row.attempts, 2);
    assert!(
        row.error.as_deref().unwrap().contains("timed out after 100 ms"),
        "{row:?}"
    );

    let dead = eventually("two dead letters", DEADLINE, || async {
        let d = env.dead_letters().await;
        (d.len() == 2).then_some(d)
    })
    .await;
    let d = dead
        .iter()
        .find(|d| d.payload.windows(8).any(|w| w == b"\"ms\":500"))
        .unwrap();
    assert_eq!(d.attempts, "2");
    assert_eq!(d.subject, "jobs.dead.sleep");
    assert_eq!(d.original_subject, "jobs.run.fast.sleep");
    let d = dead.iter().find(|d| d.error.contains("failed 3 of 3")).unwrap();
    assert_eq!(d.attempts, "3");
    assert_eq!(
        env.stream_len("JOBS_RUN").await,
        0,
        "dead jobs are removed from the work queue"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_jobs_succeed_on_2xx_retry_on_5xx_and_die_on_4xx() {
    let mut env = TestEnv::start().await;
    env.start_predictor();
    env.start_executor();
    let server = crate::http::http_server(vec![
        ("/ok", vec![200]),
        ("/flaky", vec![503, 200]),
        ("/missing", vec![404]),
    ])
    .await;
    let ok = env.submit("http", json!({"url": format!("{server}/ok")})).await;
    let flaky = env
        .submit(
            "http",
            json!({"url": format!("{server}/flaky"), "method": "POST", "body": {"a": 1}}),
        )
        .await;
    let missing = env.submit("http", json!({"url": format!("{server}/missing")})).await;
    let bad = env.submit("http", json!({"url": "ftp://example.invalid/x"})).await;
    assert_eq!(env.wait_for_status(ok, "succeeded").await.attempts, 1);
    let r = env.wait_for_status(flaky, "succeeded").await;
    assert_eq!(r.attempts, 2);
    assert_eq!(r.result.unwrap()["status"], 200);
    let r = env.wait_for_status(missing, "dead").await;
    assert_eq!((r.attempts, r.error.as_deref()), (1, Some("HTTP 404")));
    let r = env.wait_for_status(bad, "dead").await;
    assert!(r.error.unwrap().contains("scheme"));
    let kinds: HashSet<String> = env.dead_letters().await.into_iter().map(|d| d.subject).collect();
    assert_eq!(kinds, HashSet::from(["jobs.dead.http".to_string()]));
}
