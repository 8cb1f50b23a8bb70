//! Scaling as KEDA does it, against a live server: the lag read from `/jsz` the way the
//! nats-jetstream scaler reads it, turned into replicas with the thresholds shipped in
//! keda/; and the scale-in side: an executor stopped with SIGTERM under load drains
//! without losing a job or running one twice.

use std::time::{Duration, Instant};

use crate::harness::{eventually, terminate, TestEnv, DEADLINE};
use mlsched::autoscale::{LagReader, Policy};

/// Lag of `policy`'s consumer once it equals `want`.
async fn lag_reaches(reader: &LagReader, policy: &Policy, want: u64) {
    eventually(&format!("lag {want} on {}", policy.consumer), DEADLINE, || async {
        (reader.lag(policy).await.ok()? == want).then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_scales_each_deployment_out_by_the_shipped_formula_and_back_to_its_minimum() {
    let mut env = TestEnv::start().await;
    let reader = LagReader::new(&env.nats.monitor_url(), "$G").unwrap();
    let fast = Policy::shipped_for("executor-fast").unwrap();
    let slow = Policy::shipped_for("executor-slow").unwrap();
    let predictor = Policy::shipped_for("predictor").unwrap();
    assert_eq!((fast.stream.as_str(), slow.stream.as_str()), ("JOBS_RUN", "JOBS_RUN"));
    assert_eq!(predictor.stream, "JOBS_SUBMIT");
    assert_eq!(slow.min_replicas, 0, "the slow lane scales to zero");

    // Idle: every Deployment at its minimum, the slow lane at zero.
    for p in [&fast, &slow, &predictor] {
        lag_reaches(&reader, p, 0).await;
        assert_eq!(p.desired(0, p.min_replicas), p.min_replicas, "{}", p.consumer);
    }

    // A burst with no worker running: nothing drains, so the lag is the burst.
    let (n_fast, n_slow, n_submit) = (
        3 * fast.lag_threshold + 1,
        2 * slow.lag_threshold + 3,
        2 * predictor.lag_threshold + 1,
    );
    env.publish_n("jobs.run.fast.noop", br#"{"kind":"noop","payload":{}}"#, n_fast)
        .await;
    env.publish_n(
        "jobs.run.slow.sleep",
        br#"{"kind":"sleep","payload":{"ms":50}}"#,
        n_slow,
    )
    .await;
    env.publish_n("jobs.submit.noop", br#"{"kind":"noop","payload":{}}"#, n_submit)
        .await;
    lag_reaches(&reader, &fast, n_fast).await;
    lag_reaches(&reader, &slow, n_slow).await;
    lag_reaches(&reader, &predictor, n_submit).await;
    let out = |p: &Policy, lag: u64| p.desired(lag, p.min_replicas);
    assert_eq!(out(&fast, n_fast), 4.min(fast.max_replicas), "fast: ceil(3t+1 / t)");
    assert_eq!(
        out(&slow, n_slow),
        3.min(slow.max_replicas),
        "slow: from zero to ceil(2t+3 / t)"
    );
    assert_eq!(
        out(&predictor, n_submit),
        3.min(predictor.max_replicas),
        "predictor: ceil(2t+1 / t)"
    );
    assert_eq!(
        predictor.desired(predictor.lag_threshold + 1, 1),
        1,
        "within the HPA's 10% tolerance nothing changes"
    );
    assert!(slow.active(n_slow), "the burst activates the slow lane");
    assert_eq!(
        fast.desired(1_000_000, 1),
        fast.max_replicas,
        "a huge backlog stops at max"
    );

    // Workers drain it: back to the minimum, zero for the slow lane.
    env.start_predictor();
    env.start_executor();
    let total = (n_fast + n_slow + n_submit) as i64;
    env.wait_for_finished(total).await;
    for p in [&fast, &slow, &predictor] {
        lag_reaches(&reader, p, 0).await;
        assert_eq!(p.desired(0, 3), p.min_replicas, "{} scales back in", p.consumer);
    }
    assert!(!slow.active(0));
    assert_eq!(
        env.counts().await.get("succeeded"),
        Some(&total),
        "every job of the burst ran"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_in_under_load_drains_the_stopped_executor_and_loses_or_repeats_nothing() {
    let env = TestEnv::start().await;
    let grace = env.settings.shutdown.grace_s;
    let conc = [("MLSCHED__EXECUTOR__CONCURRENCY", "16")];
    let mut stays = env.spawn_process("executor", &conc);
    let mut leaves = env.spawn_process("executor", &conc);
    let n = 400;
    env.publish_n(
        "jobs.run.fast.sleep",
        br#"{"kind":"sleep","payload":{"ms":150}}"#,
        n as u64,
    )
    .await;
    let succeeded = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM jobs WHERE status = 'succeeded'")
            .fetch_one(&env.pool)
            .await
            .unwrap()
    };
    eventually("both executors busy mid-burst", DEADLINE, || async {
        let running: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE status = 'running'")
            .fetch_one(&env.pool)
            .await
            .ok()?;
        (running > 16 && succeeded().await >= 32).then_some(())
    })
    .await;
    assert!(succeeded().await < n, "SIGTERM arrives mid-burst");

    // What KEDA's scale-in does to a pod.
    let sent = Instant::now();
    let status = terminate(&mut leaves).await;
    assert!(status.success(), "a drained executor exits 0, got {status}");
    assert!(
        sent.elapsed() < Duration::from_secs(grace + 5),
        "it drained within the grace period ({grace} s): {:?}",
        sent.elapsed()
    );

    env.wait_for_finished(n).await;
    let per_job: Vec<(i64, i64, i32)> = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE e.status = 'running'), count(*) FILTER (WHERE e.status = 'succeeded'), max(j.attempts)
         FROM jobs j JOIN job_events e ON e.job_id = j.id GROUP BY j.id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(per_job.len() as i64, n, "one record per job, none lost");
    let repeated: Vec<_> = per_job.iter().filter(|r| **r != (1, 1, 1)).collect();
    assert!(
        repeated.is_empty(),
        "every job started once, succeeded once: {repeated:?}"
    );
    assert_eq!(succeeded().await, n);
    stays.kill().unwrap();
    stays.wait().unwrap();
}
