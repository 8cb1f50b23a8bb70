//! Faults: workers killed or stopped mid-run, NATS and Postgres restarting, a job that
//! crash-loops. Nothing is lost and nothing succeeds twice.

use std::time::Duration;

use async_nats::jetstream::consumer::pull;
use futures::StreamExt;
use mlsched::streams::Definitions;
use serde_json::json;

use crate::harness::{eventually, terminate, TestEnv, DEADLINE};

async fn one_success_each(env: &TestEnv, n: i64) {
    let per_job: Vec<i64> = sqlx::query_scalar(
        "SELECT count(e.seq) FROM jobs j LEFT JOIN job_events e ON e.job_id = j.id AND e.status = 'succeeded' GROUP BY j.id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(per_job.len() as i64, n, "one row per job");
    assert!(
        per_job.iter().all(|c| *c == 1),
        "every job succeeded exactly once: {per_job:?}"
    );
}

async fn count(env: &TestEnv, status: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM jobs WHERE status = $1")
        .bind(status)
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_an_executor_mid_run_loses_nothing_and_succeeds_nothing_twice() {
    let mut env = TestEnv::start().await;
    env.start_predictor();
    let mut victim = env.spawn_process("executor", &[("MLSCHED__EXECUTOR__CONCURRENCY", "8")]);
    for _ in 0..200 {
        env.submit("sleep", json!({"ms": 100})).await;
    }
    eventually("the executor to be busy", DEADLINE, || async {
        (count(&env, "succeeded").await >= 20 && count(&env, "running").await > 0).then_some(())
    })
    .await;
    victim.kill().unwrap(); // SIGKILL
    victim.wait().unwrap();
    let interrupted = count(&env, "running").await;
    assert!(interrupted > 0, "the kill must interrupt running jobs");

    env.start_executor();
    env.wait_for_finished(200).await;
    assert_eq!(count(&env, "succeeded").await, 200);
    one_success_each(&env, 200).await;
    let rerun: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE attempts > 1")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert!(rerun >= 1, "jobs interrupted by the kill ran again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_jobs_finish_once_and_leaves_the_rest_queued() {
    let mut env = TestEnv::start().await;
    env.start_predictor();
    let mut worker = env.spawn_process("executor", &[("MLSCHED__EXECUTOR__CONCURRENCY", "4")]);
    let mut long = Vec::new();
    for _ in 0..4 {
        long.push(env.submit("sleep", json!({"ms": 3000})).await);
    }
    eventually("4 jobs running", DEADLINE, || async {
        (count(&env, "running").await == 4).then_some(())
    })
    .await;
    let mut waiting = Vec::new();
    for _ in 0..4 {
        waiting.push(env.submit("sleep", json!({"ms": 10})).await);
    }
    for id in &waiting {
        env.wait_for_status(*id, "queued").await;
    }
    eventually("heartbeats of the running jobs", DEADLINE, || async {
        let beating: i64 =
            sqlx::query_scalar("SELECT count(*) FROM jobs WHERE status = 'running' AND last_heartbeat_at > started_at")
                .fetch_one(&env.pool)
                .await
                .ok()?;
        (beating == 4).then_some(())
    })
    .await;
    let status = terminate(&mut worker).await;
    assert!(status.success(), "graceful shutdown exits 0, got {status}");
    for id in &long {
        let row = env.row(*id).await.unwrap();
        assert_eq!(
            (row.status.as_str(), row.attempts),
            ("succeeded", 1),
            "{id} finished during the drain"
        );
    }
    for id in &waiting {
        assert_eq!(
            env.row(*id).await.unwrap().status,
            "queued",
            "no new work after SIGTERM"
        );
    }

    env.start_executor();
    for id in &waiting {
        env.wait_for_status(*id, "succeeded").await;
    }
    for id in &long {
        let runs = env.events(*id).await.iter().filter(|(s, _)| s == "running").count();
        assert_eq!(runs, 1, "{id} was not run again");
    }
    one_success_each(&env, 8).await;
}

/// Starts a predictor and an executor, submits 300 short jobs and returns once 30 ran.
async fn run_300_jobs_until_some_finished(env: &mut TestEnv) {
    env.start_predictor();
    env.start_executor();
    for _ in 0..300 {
        env.submit("sleep", json!({"ms": 5})).await;
    }
    eventually("some progress", DEADLINE, || async {
        (count(env, "succeeded").await >= 30).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_mid_run_loses_nothing() {
    let mut env = TestEnv::start().await;
    run_300_jobs_until_some_finished(&mut env).await;
    env.nats.stop();
    env.nats.resume().unwrap();
    // The test's own client reconnects too; publishing works again.
    let more = eventually("publishing after the restart", DEADLINE, || async {
        let kind = mlsched::job::Kind::new("noop").unwrap();
        let id = mlsched::job::JobId::new_v7();
        let body = serde_json::to_vec(&json!({"id": id, "kind": "noop", "payload": {}})).unwrap();
        let ack = env
            .js
            .publish(mlsched::job::submit_subject(&kind), body.into())
            .await
            .ok()?;
        ack.await.ok().map(|_| id)
    })
    .await;
    for _ in 0..99 {
        env.submit("noop", json!({})).await;
    }
    env.wait_for_status(more, "succeeded").await;
    env.wait_for_finished(400).await;
    assert_eq!(count(&env, "succeeded").await, 400);
    one_success_each(&env, 400).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_holds_acks_and_then_resumes() {
    let mut env = TestEnv::start_with_own_postgres().await;
    run_300_jobs_until_some_finished(&mut env).await;
    env.own_postgres().stop();
    for _ in 0..100 {
        env.submit("noop", json!({})).await;
    }
    // Nothing can be recorded, so nothing is acked: the submissions stay in the stream.
    assert!(env.stream_len("JOBS_SUBMIT").await >= 100);
    env.own_postgres().resume().unwrap();
    env.wait_for_finished(400).await;
    assert_eq!(count(&env, "succeeded").await, 400);
    one_success_each(&env, 400).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_exhausts_max_deliver_without_an_outcome_is_dead_lettered() {
    let mut env = TestEnv::start().await;
    // A short MaxDeliver and AckWait on the slow lane, so a "crashing" worker (this
    // test: it takes the message and never answers) exhausts it quickly.
    let defs = Definitions::builtin()
        .unwrap()
        .with_overrides(&json!({"JOBS_RUN/executor-slow": {"max_deliver": 3, "ack_wait": 500_000_000}}))
        .unwrap();
    mlsched::streams::apply(&env.client, &defs).await.unwrap();
    let id = mlsched::job::JobId::new_v7();
    let body = serde_json::to_vec(&json!({"id": id, "kind": "sleep", "payload": {"ms": 1}})).unwrap();
    env.publish("jobs.run.slow.sleep", body, Some(&id.to_string())).await;

    let consumer = env
        .js
        .get_stream("JOBS_RUN")
        .await
        .unwrap()
        .get_consumer::<pull::Config>("executor-slow")
        .await
        .unwrap();
    let mut deliveries = 0;
    let mut pulls = 0;
    while pulls < 20 {
        pulls += 1;
        let mut batch = consumer
            .batch()
            .max_messages(1)
            .expires(Duration::from_secs(1))
            .messages()
            .await
            .unwrap();
        if let Some(Ok(m)) = batch.next().await {
            deliveries = m.info().unwrap().delivered; // and never ack: a crash
        }
        let info = consumer.clone().info().await.unwrap().clone();
        if deliveries >= 3 && info.num_ack_pending == 0 {
            break;
        }
    }
    assert_eq!(deliveries, 3, "the server stops at MaxDeliver");
    let slow =
        |samples: Vec<mlsched::slo::Backlog>| samples.into_iter().find(|b| b.consumer == "executor-slow").unwrap();
    let b = slow(mlsched::slo::sample_backlog(&env.js).await.unwrap());
    assert_eq!(
        (b.backlog, b.stuck),
        (0, 1),
        "KEDA's lag misses it; the stuck gauge does not"
    );
    assert_eq!(
        env.stream_len("JOBS_RUN").await,
        1,
        "the message is stuck in the work queue"
    );

    env.start_executor(); // its dead-letterer handles the advisory
    let dead = eventually("the dead letter", DEADLINE, || async {
        env.dead_letters().await.into_iter().next()
    })
    .await;
    assert!(dead.error.contains("MaxDeliver"), "{dead:?}");
    assert_eq!(dead.attempts, "3");
    assert_eq!(dead.subject, "jobs.dead.sleep");
    let row = env.wait_for_status(id, "dead").await;
    assert!(row.error.unwrap().contains("no outcome after 3 deliveries"));
    eventually("the work queue to be empty", DEADLINE, || async {
        (env.stream_len("JOBS_RUN").await == 0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_predictor_stops_on_sigterm_without_losing_or_doubling_a_submission() {
    let mut env = TestEnv::start().await;
    let mut predictor = env.spawn_process("predictor", &[]);
    for _ in 0..2000 {
        env.submit("noop", json!({})).await;
    }
    eventually("routing to start", DEADLINE, || async {
        (count(&env, "queued").await > 0).then_some(())
    })
    .await;
    let status = terminate(&mut predictor).await;
    assert!(status.success(), "graceful shutdown exits 0, got {status}");
    // Every submission is either routed (row + run message) or still waiting.
    let routed = count(&env, "queued").await;
    let waiting = env.stream_len("JOBS_SUBMIT").await as i64;
    assert_eq!(env.stream_len("JOBS_RUN").await as i64, routed);
    assert_eq!(
        routed + waiting,
        2000,
        "routed {routed} + waiting {waiting}: acks were flushed before exit"
    );

    env.start_predictor();
    let mut last = String::new();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let waiting = env.stream_len("JOBS_SUBMIT").await;
        let queued = count(&env, "queued").await;
        if waiting == 0 && queued == 2000 {
            break;
        }
        let c = env
            .js
            .get_stream("JOBS_SUBMIT")
            .await
            .unwrap()
            .get_consumer::<pull::Config>("predictor")
            .await;
        let info = match c {
            Ok(mut c) => format!(
                "{:?}",
                c.info()
                    .await
                    .map(|i| (i.num_pending, i.num_ack_pending, i.num_redelivered, i.num_waiting))
            ),
            Err(e) => e.to_string(),
        };
        last = format!("JOBS_SUBMIT {waiting}, queued {queued}, predictor (pending, ack pending, redelivered, waiting) {info}, counts {:?}, dead letters {:?}",
            env.counts().await,
            env.dead_letters().await.iter().map(|d| (d.error.clone(), d.attempts.clone())).collect::<Vec<_>>()
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "not every submission was routed: {last}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(last);
    assert_eq!(env.stream_len("JOBS_RUN").await, 2000, "no submission was routed twice");
    env.start_executor();
    env.wait_for_finished(2000).await;
    one_success_each(&env, 2000).await;
}
