//! The run-time model registry through the CLI, on history in a real Postgres.

use crate::harness::{eventually, TestEnv, DEADLINE};

/// Finished jobs whose run time depends on their features in a known way.
async fn seed_history(env: &TestEnv, n: usize) {
    seed_history_scaled(env, n, 1.0).await
}

/// The same, with `infer` jobs `infer_scale` times slower.
async fn seed_history_scaled(env: &TestEnv, n: usize, infer_scale: f64) {
    let mut rng = fastrand::Rng::with_seed(3);
    for chunk in (0..n).collect::<Vec<_>>().chunks(200) {
        let mut ids = Vec::new();
        let mut kinds = Vec::new();
        let mut features = Vec::new();
        let mut actual = Vec::new();
        for _ in chunk {
            let (kind, base) = [("train", 4000.0), ("etl", 800.0), ("infer", 60.0 * infer_scale)][rng.usize(..3)];
            let (size, factor) = [("small", 1.0), ("medium", 4.0), ("large", 16.0)][rng.usize(..3)];
            let memory = [256.0, 1024.0, 4096.0][rng.usize(..3)];
            ids.push(uuid::Uuid::now_v7());
            kinds.push(kind.to_string());
            features.push(format!(r#"{{"size":"{size}","memory_mb":{memory}}}"#));
            actual.push((base * factor * (1.0 + memory / 1024.0) * (0.9 + rng.f64() * 0.2)) as i64);
        }
        sqlx::query(
            "INSERT INTO jobs (id, kind, lane, status, attempts, max_attempts, payload, features, actual_ms,
                               submitted_at, started_at, finished_at)
             SELECT id, kind, 'slow', 'succeeded', 1, 5, '{}'::jsonb, f::jsonb, ms, now(), now(), now()
             FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::int8[]) AS t(id, kind, f, ms)",
        )
        .bind(ids)
        .bind(kinds)
        .bind(features)
        .bind(actual)
        .execute(&env.pool)
        .await
        .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_are_trained_from_history_promoted_only_on_improvement_and_rolled_back() {
    let env = TestEnv::start().await;
    let (ok, out) = env.cli(&["model", "train"]);
    assert!(!ok && out.is_empty(), "no history, no model");
    let (ok, out) = env.cli(&["model", "list"]);
    assert!(ok && out.contains("no models yet"), "{out}");

    seed_history(&env, 1000).await;
    let (ok, out) = env.cli(&["model", "train"]);
    assert!(ok, "{out}");
    for want in [
        "trained on 1000 finished jobs (800 train, 200 holdout)",
        "random_forest",
        "linear",
        "kind_median",
        "(baseline)",
        "<- best",
        "stored as version 1 and activated",
    ] {
        assert!(out.contains(want), "{want:?} missing from\n{out}");
    }
    let mae = |line_start: &str| -> f64 {
        out.lines()
            .find(|l| l.trim_start().starts_with(line_start))
            .and_then(|l| l.split_whitespace().nth(2))
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    let best = out.lines().find(|l| l.contains("<- best")).unwrap();
    let best_mae: f64 = best.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert!(
        best_mae * 3.0 < mae("kind_median"),
        "the model beats the baseline by a wide margin:\n{out}"
    );

    // Same history, same seed: the same model again, not better, so not promoted.
    let (ok, out) = env.cli(&["model", "train"]);
    assert!(ok && out.contains("(active model, same holdout)"), "{out}");
    assert!(out.contains("stored as version 2; not activated"), "{out}");
    let (_, list) = env.cli(&["model", "list"]);
    let active: Vec<&str> = list.lines().filter(|l| l.trim_start().starts_with('*')).collect();
    assert_eq!(active.len(), 1, "{list}");
    assert!(active[0].split_whitespace().nth(1) == Some("1"), "{list}");

    // Roll forward and back.
    assert!(env.cli(&["model", "activate", "2"]).0);
    let (_, list) = env.cli(&["model", "list"]);
    assert!(list.lines().any(|l| l.trim_start().starts_with("*       2")), "{list}");
    let (ok, _) = env.cli(&["model", "activate", "99"]);
    assert!(!ok, "an unknown version is an error");
    assert!(env.cli(&["model", "activate", "1"]).0);
}

async fn predicted(env: &TestEnv, id: mlsched::job::JobId) -> (i64, String) {
    let row: (Option<i64>, String) = sqlx::query_as("SELECT predicted_ms, lane FROM jobs WHERE id = $1")
        .bind(id.0)
        .fetch_one(&env.pool)
        .await
        .unwrap();
    (row.0.expect("every routed job has a prediction"), row.1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predictions_choose_lanes_from_cold_start_to_a_hot_swapped_model() {
    let mut env = TestEnv::start().await;
    // Cold start without history: the configured default (100 ms) → fast lane.
    env.start_predictor();
    let big = serde_json::json!({"features": {"size": "large", "memory_mb": 4096}});
    let small = serde_json::json!({"features": {"size": "small", "memory_mb": 256}});
    let id = env.submit_with("train", serde_json::json!({}), big.clone()).await;
    env.wait_for_status(id, "queued").await;
    assert_eq!(predicted(&env, id).await, (100, "fast".into()));

    // History but no model: per-kind medians (refreshed within a second).
    seed_history(&env, 1000).await;
    let median: f64 = sqlx::query_scalar(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY actual_ms) FROM jobs WHERE kind = 'train' AND status = 'succeeded'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    let id = eventually("a median-based prediction", DEADLINE, || async {
        let id = env.submit_with("train", serde_json::json!({}), big.clone()).await;
        env.wait_for_status(id, "queued").await;
        (predicted(&env, id).await.0 != 100).then_some(id)
    })
    .await;
    assert_eq!(predicted(&env, id).await, (median.round() as i64, "slow".into()));

    // A trained model: predictions follow the features, and lanes follow predictions.
    assert!(env.cli(&["model", "train"]).0);
    let truth_big = 4000.0 * 16.0 * 5.0;
    let id = eventually("model-based predictions", DEADLINE, || async {
        let id = env.submit_with("train", serde_json::json!({}), big.clone()).await;
        env.wait_for_status(id, "queued").await;
        let (ms, _) = predicted(&env, id).await;
        ((ms as f64 - truth_big).abs() / truth_big < 0.3).then_some(id)
    })
    .await;
    assert_eq!(predicted(&env, id).await.1, "slow");
    let id = env.submit_with("infer", serde_json::json!({}), small.clone()).await;
    env.wait_for_status(id, "queued").await;
    let (ms, lane) = predicted(&env, id).await;
    assert!(
        (40..=120).contains(&ms) && lane == "fast",
        "infer small: {ms} ms on {lane}"
    );

    // Two predictor replicas; the world changes (infer got 100x slower), a new model is
    // promoted, and both pick it up without a restart.
    env.start_predictor();
    seed_history_scaled(&env, 3000, 100.0).await;
    let (ok, out) = env.cli(&["model", "train", "--limit", "3000"]);
    assert!(ok && out.contains("stored as version 2 and activated"), "{out}");
    eventually("both replicas to use the new model", DEADLINE, || async {
        let mut ids = Vec::new();
        for _ in 0..20 {
            ids.push(env.submit_with("infer", serde_json::json!({}), small.clone()).await);
        }
        for id in &ids {
            env.wait_for_status(*id, "queued").await;
        }
        let mut all_new = true;
        for id in ids {
            let (ms, lane) = predicted(&env, id).await;
            all_new &= ms > 3000 && lane == "slow";
        }
        all_new.then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predictors_retrain_by_themselves_once_enough_jobs_finished() {
    let mut env = TestEnv::start().await;
    let mut settings = env.settings.clone();
    settings.predictor.retrain_interval_s = 1;
    settings.predictor.retrain_min_jobs = 500;
    // Two replicas: the advisory lock lets one of them train at a time.
    env.start_predictor_with(settings.clone());
    env.start_predictor_with(settings);
    seed_history(&env, 400).await;
    let models = |env: &TestEnv| {
        let pool = env.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM models")
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    // 400 finished jobs are under retrain_min_jobs; 600 are not. A model trained at 400
    // would show up below as version 1 with 400 samples.
    seed_history(&env, 200).await;
    let active: i64 = eventually("an automatically trained, active model", DEADLINE, || async {
        sqlx::query_scalar("SELECT version FROM models WHERE active")
            .fetch_optional(&env.pool)
            .await
            .ok()?
    })
    .await;
    assert_eq!(active, 1);
    let samples: i32 = sqlx::query_scalar("SELECT samples FROM models WHERE version = 1")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(samples, 600);
    assert_eq!(models(&env).await, 1, "one replica trained, not both");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_predict_service_answers_over_request_reply_and_shows_in_discovery() {
    let mut env = TestEnv::start().await;
    env.start_predictor();
    let features = r#"{"size":"small","memory_mb":256}"#;
    let (ok, out) = eventually("the service to answer", DEADLINE, || async {
        let r = env.cli(&["predict", "--kind", "infer", "--features", features]);
        r.0.then_some(r)
    })
    .await;
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["predicted_ms"], 100.0, "cold start: the configured default");
    assert_eq!(v["model_version"], serde_json::Value::Null);

    seed_history(&env, 1000).await;
    assert!(env.cli(&["model", "train"]).0);
    let v: serde_json::Value = eventually("the model to answer", DEADLINE, || async {
        let (_, out) = env.cli(&["predict", "--kind", "infer", "--features", features]);
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        (v["model_version"] == 1).then_some(v)
    })
    .await;
    let ms = v["predicted_ms"].as_f64().unwrap();
    assert!((40.0..=120.0).contains(&ms), "infer small is about 75 ms: {v}");
    assert!(v["upper_ms"].as_f64().unwrap() >= ms);

    // Garbage is refused with a reason, and never crashes the service.
    let (ok, _) = env.cli(&["predict", "--kind", "Not A Kind"]);
    assert!(!ok);
    let reply = env.client.request("mlsched.predict", "not json".into()).await.unwrap();
    let err = reply
        .headers
        .as_ref()
        .and_then(|h| h.get("Nats-Service-Error"))
        .unwrap()
        .to_string();
    assert!(err.contains("not JSON"), "{err}");
    let (ok, _) = env.cli(&["predict", "--kind", "infer", "--features", features]);
    assert!(ok, "still answering");

    // Service discovery: the NATS services API reports it with its stats.
    let stats = env
        .client
        .request("$SRV.STATS.mlsched-predict", "".into())
        .await
        .unwrap();
    let stats: serde_json::Value = serde_json::from_slice(&stats.payload).unwrap();
    assert_eq!(stats["name"], "mlsched-predict");
    assert!(stats["endpoints"][0]["num_requests"].as_u64().unwrap() >= 4, "{stats}");
    assert!(stats["endpoints"][0]["num_errors"].as_u64().unwrap() >= 1, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_without_a_timeout_gets_one_from_its_prediction() {
    let mut env = TestEnv::start().await;
    // History: sleep jobs take about 10 ms, so the median-based upper bound is 20 ms.
    sqlx::query(
        "INSERT INTO jobs (id, kind, lane, status, attempts, max_attempts, payload, actual_ms, submitted_at, finished_at)
         SELECT gen_random_uuid(), 'sleep', 'slow', 'succeeded', 1, 5, '{}'::jsonb, 10, now(), now()
         FROM generate_series(1, 50)",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    env.start_predictor();
    let mut settings = env.settings.clone();
    settings.executor.predicted_timeout_factor = 10;
    settings.executor.min_predicted_timeout_ms = 300;
    let _executor = env.executor_with(settings);

    // Predicted 10 ms, runs 3 s: killed at max(10 × 20 ms, 300 ms) and dead after one try.
    let hung = env
        .submit_with(
            "sleep",
            serde_json::json!({"ms": 3000}),
            serde_json::json!({"max_attempts": 1}),
        )
        .await;
    let row = env.wait_for_status(hung, "dead").await;
    assert!(
        row.error.as_deref().unwrap().contains("timed out after 300 ms"),
        "{row:?}"
    );
    assert_eq!(predicted(&env, hung).await.0, 10);

    // The envelope's own timeout wins over the prediction.
    let patient = env
        .submit_with(
            "sleep",
            serde_json::json!({"ms": 600}),
            serde_json::json!({"timeout_ms": 5000}),
        )
        .await;
    assert_eq!(env.wait_for_status(patient, "succeeded").await.attempts, 1);
}
