//! `TestEnv`: a private `nats-server` (free port, temporary store, monitoring on, killed
//! on drop) and a fresh Postgres database (migrated, dropped afterwards), plus typed
//! helpers. Workers run in-process through their `run`, or as processes when a test
//! must kill or signal them.
//!
//! Postgres: `MLSCHED_TEST_DATABASE_URL` names a server to create test databases on
//! (the test script starts a private one); without it each `TestEnv` starts its own
//! cluster. `MLSCHED_NATS_SERVER` picks the nats-server binary.

use std::future::Future;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use async_nats::jetstream;
use async_nats::HeaderMap;
use futures::StreamExt;
use mlsched::config::{Secret, Settings};
use mlsched::job::{self, JobId, Kind};
use mlsched::runtime::Shutdown;
use mlsched::stack::{self, NatsServer, PgCluster};
use mlsched::streams::Definitions;
use serde_json::{json, Value};
use sqlx::{PgPool, Row};
use tempfile::TempDir;
use tokio::task::JoinHandle;

/// How long any condition may take before a test fails.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Polls `check` until it returns `Some`, failing the test after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    match poll_until(timeout, check).await {
        Some(v) => v,
        None => panic!("timed out after {timeout:?} waiting for {what}"),
    }
}

/// Sends SIGTERM to `child` (what Kubernetes does to a pod) and returns how it exited.
pub async fn terminate(child: &mut Child) -> std::process::ExitStatus {
    assert!(Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    eventually("the process to exit after SIGTERM", DEADLINE, || {
        let exited = child.try_wait().unwrap();
        async move { exited }
    })
    .await
}

/// Polls `check` every 25 ms until it returns `Some`, or `None` after `timeout`.
async fn poll_until<T, F, Fut>(timeout: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

enum Pg {
    Shared(String),
    Own(PgCluster),
}

/// A worker running in this process.
pub struct InProc {
    shutdown: Shutdown,
    task: JoinHandle<anyhow::Result<()>>,
}

impl InProc {
    /// Graceful stop, as on SIGTERM; returns the worker's result.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.soft.cancel();
        self.task.await?
    }
}

/// A job in Postgres.
#[derive(Debug, Clone)]
pub struct JobState {
    pub status: String,
    pub attempts: i32,
    pub error: Option<String>,
    pub lane: String,
    pub result: Option<Value>,
}

/// A message in `JOBS_DEAD`.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub subject: String,
    pub error: String,
    pub attempts: String,
    pub original_subject: String,
    pub payload: Vec<u8>,
}

pub struct TestEnv {
    pub nats: NatsServer,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub pool: PgPool,
    pub settings: Settings,
    db_name: String,
    pg: Pg,
    workers: Vec<InProc>,
    _dir: TempDir,
}

impl TestEnv {
    /// A fresh environment with the streams applied (short ack waits for tests).
    pub async fn start() -> TestEnv {
        Self::build(false).await
    }

    /// The same, with a Postgres cluster of its own (to stop and restart it).
    pub async fn start_with_own_postgres() -> TestEnv {
        Self::build(true).await
    }

    async fn build(own_pg: bool) -> TestEnv {
        let dir = tempfile::Builder::new().prefix("mlsched-it-").tempdir().unwrap();
        let nats = NatsServer::start(&stack::nats_server_binary().unwrap(), &dir.path().join("nats")).unwrap();
        let pg = match std::env::var("MLSCHED_TEST_DATABASE_URL") {
            Ok(url) if !own_pg => Pg::Shared(url),
            _ => {
                let pg_dir = dir.path().join("pg");
                Pg::Own(PgCluster::start(&pg_dir, false).unwrap())
            }
        };
        let admin_url = match &pg {
            Pg::Shared(u) => u.clone(),
            Pg::Own(c) => c.url("postgres"),
        };
        let db_name = format!("test_{}", uuid::Uuid::new_v4().simple());
        let admin = PgPool::connect(&admin_url).await.unwrap();
        sqlx::query(&format!("CREATE DATABASE {db_name}"))
            .execute(&admin)
            .await
            .unwrap();
        admin.close().await;
        let db_url = with_database(&admin_url, &db_name);

        let mut settings = Settings::default();
        settings.nats.url = Secret::new(nats.url());
        settings.database.url = Secret::new(db_url);
        settings.retry.base_ms = 50;
        settings.retry.max_ms = 400;
        settings.executor.heartbeat_ms = 300;
        settings.executor.concurrency = 32;
        settings.shutdown.grace_s = 15;
        settings.store.linger_ms = 1;
        settings.metrics.listen = "127.0.0.1:0".into();
        settings.metrics.sample_interval_ms = 200;
        settings.predictor.model_refresh_s = 1;
        settings.predictor.retrain_interval_s = 0;

        let pool = mlsched::store::pool(&settings.database).unwrap();
        mlsched::store::migrate(&pool).await.unwrap();
        let client = async_nats::connect(nats.url()).await.unwrap();
        let defs = Definitions::builtin()
            .unwrap()
            .with_overrides(&json!({
                "JOBS_SUBMIT/predictor": {"ack_wait": 2_000_000_000i64},
                "JOBS_RUN/executor-fast": {"ack_wait": 2_000_000_000i64},
                "JOBS_RUN/executor-slow": {"ack_wait": 2_000_000_000i64},
            }))
            .unwrap();
        mlsched::streams::apply(&client, &defs).await.unwrap();
        TestEnv {
            js: jetstream::new(client.clone()),
            nats,
            client,
            pool,
            settings,
            db_name,
            pg,
            workers: Vec::new(),
            _dir: dir,
        }
    }

    /// The cluster this environment owns (see [`TestEnv::start_with_own_postgres`]).
    pub fn own_postgres(&mut self) -> &mut PgCluster {
        match &mut self.pg {
            Pg::Own(c) => c,
            Pg::Shared(_) => panic!("this TestEnv shares its Postgres server"),
        }
    }

    /// Starts an in-process predictor; it is stopped when the env drops.
    pub fn start_predictor(&mut self) {
        self.start_predictor_with(self.settings.clone());
    }

    /// Starts an in-process predictor with the given settings.
    pub fn start_predictor_with(&mut self, settings: Settings) {
        let shutdown = Shutdown::new();
        let task = tokio::spawn(mlsched_predictor::run(settings, shutdown.clone()));
        self.workers.push(InProc { shutdown, task });
    }

    /// Starts an in-process executor with the given settings.
    pub fn executor_with(&self, settings: Settings) -> InProc {
        let shutdown = Shutdown::new();
        let task = tokio::spawn(mlsched_executor::run(settings, shutdown.clone()));
        InProc { shutdown, task }
    }

    /// Starts an in-process executor kept until the env drops.
    pub fn start_executor(&mut self) {
        let w = self.executor_with(self.settings.clone());
        self.workers.push(w);
    }

    /// Environment for a worker process with this env's settings.
    pub fn process_env(&self) -> Vec<(String, String)> {
        let s = &self.settings;
        vec![
            ("NATS_URL".into(), s.nats.url.expose().into()),
            ("DATABASE_URL".into(), s.database.url.expose().into()),
            ("MLSCHED__RETRY__BASE_MS".into(), s.retry.base_ms.to_string()),
            ("MLSCHED__RETRY__MAX_MS".into(), s.retry.max_ms.to_string()),
            (
                "MLSCHED__EXECUTOR__HEARTBEAT_MS".into(),
                s.executor.heartbeat_ms.to_string(),
            ),
            (
                "MLSCHED__EXECUTOR__CONCURRENCY".into(),
                s.executor.concurrency.to_string(),
            ),
            ("MLSCHED__SHUTDOWN__GRACE_S".into(), s.shutdown.grace_s.to_string()),
            ("MLSCHED__LOG__LEVEL".into(), "info".into()),
            ("MLSCHED__METRICS__LISTEN".into(), s.metrics.listen.clone()),
            (
                "MLSCHED__METRICS__SAMPLE_INTERVAL_MS".into(),
                s.metrics.sample_interval_ms.to_string(),
            ),
            (
                "MLSCHED__PREDICTOR__MODEL_REFRESH_S".into(),
                s.predictor.model_refresh_s.to_string(),
            ),
            (
                "MLSCHED__PREDICTOR__RETRAIN_INTERVAL_S".into(),
                s.predictor.retrain_interval_s.to_string(),
            ),
        ]
    }

    /// Starts `it-worker <role>` as a separate process, its logs into `log`.
    pub fn spawn_process_logging(&self, role: &str, extra_env: &[(&str, &str)], log: &std::path::Path) -> Child {
        Command::new(env!("CARGO_BIN_EXE_it-worker"))
            .arg(role)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(self.process_env())
            .envs(extra_env.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap()
    }

    /// Starts `it-worker <role>` as a separate process.
    pub fn spawn_process(&self, role: &str, extra_env: &[(&str, &str)]) -> Child {
        Command::new(env!("CARGO_BIN_EXE_it-worker"))
            .arg(role)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(self.process_env())
            .envs(extra_env.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap()
    }

    /// Runs the `mlsched` CLI against this env; returns (success, stdout).
    pub fn cli(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_it-mlsched"))
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(self.process_env())
            .env("MLSCHED__LOG__LEVEL", "warn")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        if !out.status.success() {
            eprintln!("mlsched {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        (out.status.success(), stdout)
    }

    /// Publishes `body` to `subject` `n` times.
    pub async fn publish_n(&self, subject: &str, body: &[u8], n: u64) {
        for _ in 0..n {
            self.publish(subject, body.to_vec(), None).await;
        }
    }

    /// Publishes a valid envelope of `kind` to `jobs.submit.<kind>`.
    pub async fn submit(&self, kind: &str, payload: Value) -> JobId {
        self.submit_with(kind, payload, json!({})).await
    }

    /// Publishes an envelope of `kind` with `extra` fields (e.g. `max_attempts`).
    pub async fn submit_with(&self, kind: &str, payload: Value, extra: Value) -> JobId {
        let id = JobId::new_v7();
        let mut env = json!({"id": id, "kind": kind, "payload": payload});
        if let (Some(e), Some(m)) = (env.as_object_mut(), extra.as_object()) {
            e.extend(m.clone());
        }
        let kind = Kind::new(kind).unwrap();
        self.publish(
            &job::submit_subject(&kind),
            serde_json::to_vec(&env).unwrap(),
            Some(&id.to_string()),
        )
        .await;
        id
    }

    /// Publishes raw bytes to `subject`, with a `Nats-Msg-Id` when given.
    pub async fn publish(&self, subject: &str, body: Vec<u8>, msg_id: Option<&str>) {
        let mut headers = HeaderMap::new();
        if let Some(id) = msg_id {
            headers.insert(job::MSG_ID_HEADER, id);
        }
        self.js
            .publish_with_headers(subject.to_string(), headers, body.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// The job's row, if any.
    pub async fn row(&self, id: JobId) -> Option<JobState> {
        let r = sqlx::query("SELECT status, attempts, error, lane, result FROM jobs WHERE id = $1")
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await
            .ok()??;
        Some(JobState {
            status: r.get("status"),
            attempts: r.get("attempts"),
            error: r.get("error"),
            lane: r.get("lane"),
            result: r.get("result"),
        })
    }

    /// Like [`eventually`], but a timeout also reports the state of the stack.
    pub async fn eventually<T, F, Fut>(&self, what: &str, timeout: Duration, check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        match poll_until(timeout, check).await {
            Some(v) => v,
            None => panic!(
                "timed out after {timeout:?} waiting for {what}\n{}",
                self.diagnose().await
            ),
        }
    }

    /// Rows per status, stream sizes, consumer states and dead letters.
    pub async fn diagnose(&self) -> String {
        let mut out = format!("rows: {:?}\n", self.counts().await);
        for name in ["JOBS_SUBMIT", "JOBS_RUN", "JOBS_DEAD", "JOBS_ADVISORIES"] {
            let Ok(mut stream) = self.js.get_stream(name).await else {
                continue;
            };
            let Ok(info) = stream.info().await else {
                continue;
            };
            out.push_str(&format!("{name}: {} messages\n", info.state.messages));
            let names: Vec<String> = stream.consumer_names().filter_map(|n| async { n.ok() }).collect().await;
            for c in names {
                if let Ok(ci) = stream.consumer_info(&c).await {
                    out.push_str(&format!(
                        "  {c}: pending {} ack-pending {} redelivered {} waiting {}\n",
                        ci.num_pending, ci.num_ack_pending, ci.num_redelivered, ci.num_waiting
                    ));
                }
            }
        }
        for d in self.dead_letters().await {
            out.push_str(&format!(
                "dead letter {} attempts {}: {}\n",
                d.subject, d.attempts, d.error
            ));
        }
        out
    }

    /// Waits until the job's status is `status`.
    pub async fn wait_for_status(&self, id: JobId, status: &str) -> JobState {
        self.eventually(&format!("job {id} to be {status}"), DEADLINE, || async {
            self.row(id).await.filter(|r| r.status == status)
        })
        .await
    }

    /// Waits until `n` jobs are finished (succeeded, dead or cancelled).
    pub async fn wait_for_finished(&self, n: i64) {
        self.eventually(&format!("{n} finished jobs"), DEADLINE * 2, || async {
            let done: i64 =
                sqlx::query_scalar("SELECT count(*) FROM jobs WHERE status IN ('succeeded','dead','cancelled')")
                    .fetch_one(&self.pool)
                    .await
                    .ok()?;
            (done >= n).then_some(())
        })
        .await
    }

    /// The job's history as (status, attempt).
    pub async fn events(&self, id: JobId) -> Vec<(String, i32)> {
        sqlx::query("SELECT status, attempt FROM job_events WHERE job_id = $1 ORDER BY seq")
            .bind(id.0)
            .fetch_all(&self.pool)
            .await
            .unwrap()
            .into_iter()
            .map(|r| (r.get("status"), r.get("attempt")))
            .collect()
    }

    /// Number of rows per status.
    pub async fn counts(&self) -> std::collections::BTreeMap<String, i64> {
        sqlx::query("SELECT status, count(*) AS n FROM jobs GROUP BY status")
            .fetch_all(&self.pool)
            .await
            .unwrap()
            .into_iter()
            .map(|r| (r.get("status"), r.get("n")))
            .collect()
    }

    /// Every message in `JOBS_DEAD`.
    pub async fn dead_letters(&self) -> Vec<DeadLetter> {
        let mut stream = self.js.get_stream(job::DEAD_STREAM).await.unwrap();
        let state = stream.info().await.unwrap().state.clone();
        let mut out = Vec::new();
        if state.messages == 0 {
            return out;
        }
        for seq in state.first_sequence..=state.last_sequence {
            let Ok(m) = stream.get_raw_message(seq).await else {
                continue;
            };
            let h = |n: &str| m.headers.get(n).map(|v| v.as_str().to_string()).unwrap_or_default();
            out.push(DeadLetter {
                subject: m.subject.to_string(),
                error: h(job::ERROR_HEADER),
                attempts: h(job::ATTEMPTS_HEADER),
                original_subject: h(job::SUBJECT_HEADER),
                payload: m.payload.to_vec(),
            });
        }
        out
    }

    /// Messages currently stored in `stream`.
    pub async fn stream_len(&self, stream: &str) -> u64 {
        self.js
            .get_stream(stream)
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .state
            .messages
    }

    /// Stops every in-process worker gracefully.
    pub async fn stop_workers(&mut self) {
        for w in self.workers.drain(..) {
            w.stop().await.unwrap();
        }
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        for w in &self.workers {
            w.shutdown.hard.cancel();
            w.task.abort();
        }
        if let Pg::Shared(admin_url) = &self.pg {
            let admin_url = admin_url.clone();
            let db = self.db_name.clone();
            let pool = self.pool.clone();
            // Drop runs inside the test's runtime: use a thread with its own.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .ok()?;
                rt.block_on(async move {
                    pool.close().await;
                    let admin = PgPool::connect(&admin_url).await.ok()?;
                    sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
                        .execute(&admin)
                        .await
                        .ok()?;
                    Some(())
                })
            })
            .join();
        }
    }
}

fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let path_start = base[scheme_end..]
        .find('/')
        .map(|i| i + scheme_end)
        .unwrap_or(base.len());
    format!("{}/{db}{query}", &base[..path_start])
}
