//! The run-time model registry through the CLI, on history in a real Postgres.

use crate::harness::TestEnv;

/// Finished jobs whose run time depends on their features in a known way.
async fn seed_history(env: &TestEnv, n: usize) {
    let mut rng = fastrand::Rng::with_seed(3);
    for chunk in (0..n).collect::<Vec<_>>().chunks(200) {
        let mut ids = Vec::new();
        let mut kinds = Vec::new();
        let mut features = Vec::new();
        let mut actual = Vec::new();
        for _ in chunk {
            let (kind, base) = [("train", 4000.0), ("etl", 800.0), ("infer", 60.0)][rng.usize(..3)];
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
