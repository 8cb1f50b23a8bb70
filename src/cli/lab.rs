//! A complete local stack for `mlsched dev` and `mlsched bench`: a private
//! `nats-server` and Postgres cluster unless `NATS_URL` / `DATABASE_URL` point at
//! running ones, migrated, with the streams applied, and the worker binaries next to
//! this one started and stopped as child processes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _};
use indicatif::ProgressBar;
use sqlx::PgPool;

use crate::config::{Secret, Settings};
use crate::stack::{self, NatsServer, PgCluster};

/// The servers, their clients, and where logs go.
pub(super) struct Lab {
    pub(super) settings: Settings,
    pub(super) client: async_nats::Client,
    pub(super) pool: PgPool,
    pub(super) data: PathBuf,
    nats: Option<NatsServer>,
    pg: Option<PgCluster>,
}

impl Lab {
    /// Wipes `data`, starts what `NATS_URL` / `DATABASE_URL` do not provide, migrates
    /// and applies the streams. `durable: false` runs a private Postgres without fsync.
    /// Prints what it started when `announce` is set.
    pub(super) async fn start(
        data: &Path,
        mut settings: Settings,
        durable: bool,
        announce: bool,
    ) -> anyhow::Result<Lab> {
        if data.exists() {
            std::fs::remove_dir_all(data).with_context(|| format!("wiping {}", data.display()))?;
        }
        std::fs::create_dir_all(data.join("logs"))?;
        let say = |line: String| {
            if announce {
                println!("{line}");
            }
        };
        let nats = if std::env::var_os("NATS_URL").is_none() {
            let server = NatsServer::start(&stack::nats_server_binary()?, &data.join("nats"))?;
            say(format!(
                "nats-server      {}  (monitoring {})",
                server.url(),
                server.monitor_url()
            ));
            settings.nats.url = Secret::new(server.url());
            Some(server)
        } else {
            None
        };
        let pg = if std::env::var_os("DATABASE_URL").is_none() {
            let cluster = PgCluster::start(&data.join("pg"), durable)?;
            let admin = PgPool::connect(&cluster.url("postgres")).await?;
            sqlx::query("CREATE DATABASE mlsched").execute(&admin).await?;
            admin.close().await;
            settings.database.url = Secret::new(cluster.url("mlsched"));
            say(format!("postgres         {}", cluster.url("mlsched")));
            Some(cluster)
        } else {
            None
        };
        let pool = crate::store::pool(&settings.database)?;
        crate::store::migrate(&pool).await.context("migrating")?;
        let client = super::nats(&settings).await?;
        let apply = super::ApplyArgs {
            dir: None,
            overrides: None,
            replicas: None,
        };
        for change in super::apply_streams(&client, &settings, &apply).await? {
            say(format!("streams          {change}"));
        }
        Ok(Lab {
            settings,
            client,
            pool,
            data: data.to_path_buf(),
            nats,
            pg,
        })
    }

    /// The private nats-server's and Postgres' process ids (`None` for servers this
    /// lab did not start).
    pub(super) fn server_pids(&self) -> (Option<u32>, Option<u32>) {
        (
            self.nats.as_ref().and_then(NatsServer::pid),
            self.pg.as_ref().and_then(PgCluster::pid),
        )
    }

    /// `http://host:port` of the private nats-server's monitoring endpoint (`None` when
    /// NATS_URL named the server).
    pub(super) fn monitor_url(&self) -> Option<String> {
        self.nats.as_ref().map(NatsServer::monitor_url)
    }

    /// Starts `bin` (a sibling of this executable) as `name`, with this lab's servers,
    /// its own metrics port, its log in `logs/<name>.log`, and `env` on top.
    pub(super) fn spawn(&self, bin: &str, name: &str, env: &[(&str, String)]) -> anyhow::Result<Proc> {
        let log = std::fs::File::create(self.data.join("logs").join(format!("{name}.log")))?;
        let port = stack::free_port()?;
        let mut cmd = Command::new(sibling(bin)?);
        cmd.env("NATS_URL", self.settings.nats.url.expose())
            .env("DATABASE_URL", self.settings.database.url.expose())
            .env("MLSCHED__METRICS__LISTEN", format!("127.0.0.1:{port}"))
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().with_context(|| format!("starting {bin}"))?;
        Ok(Proc {
            name: name.to_string(),
            child: Some(child),
            port,
        })
    }
}

/// A worker process; stopped with SIGTERM (and waited for) when dropped.
pub(super) struct Proc {
    pub(super) name: String,
    child: Option<Child>,
    /// Its `/metrics`, `/healthz` and `/readyz` port on 127.0.0.1.
    pub(super) port: u16,
}

impl Proc {
    /// The process id.
    pub(super) fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Sends SIGTERM and waits for a graceful exit; reports a failed one.
    pub(super) fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        let status = child.wait()?;
        if !status.success() {
            bail!("{} exited with {status}", self.name);
        }
        Ok(())
    }

    /// Waits until `/readyz` answers 200 (connected and consuming), or fails after
    /// `within` with the reason the process gave, if it exited.
    pub(super) async fn wait_ready(&mut self, within: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + within;
        let url = format!("127.0.0.1:{}", self.port);
        loop {
            if http_status(&url, "/readyz").await == Some(200) {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("{} exited with {status} before it was ready (see its log)", self.name);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("{} was not ready within {within:?} (see its log)", self.name);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("{e}");
        }
    }
}

/// The status code of `GET path` on `addr`, or `None` if nothing answered.
pub(super) async fn http_status(addr: &str, path: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await.ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating this executable")?;
    let path = exe.with_file_name(name);
    if !path.is_file() {
        bail!(
            "{} not found next to {}: build the workers too (cargo build --release --workspace)",
            name,
            exe.display()
        );
    }
    Ok(path)
}

/// Waits until every job of `ids` is finished (succeeded, dead or cancelled) in
/// Postgres, or fails after `within`; `bar` shows how many are.
pub(super) async fn wait_finished(
    pool: &PgPool,
    ids: &[uuid::Uuid],
    within: Duration,
    bar: &ProgressBar,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let done = finished(pool, ids).await?;
        bar.set_position(done as u64);
        if done as usize >= ids.len() {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("only {done} of {} jobs finished within {within:?}", ids.len());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How many of `ids` are finished (succeeded, dead or cancelled) in Postgres.
pub(super) async fn finished(pool: &PgPool, ids: &[uuid::Uuid]) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM jobs WHERE id = ANY($1) AND status IN ('succeeded', 'dead', 'cancelled')",
    )
    .bind(ids)
    .fetch_one(pool)
    .await?)
}

/// Waits until a predictor answers `mlsched.predict` with model `version`.
pub(super) async fn wait_for_model(client: &async_nats::Client, version: i64, within: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let reply = tokio::time::timeout(
            Duration::from_secs(1),
            client.request("mlsched.predict", r#"{"kind":"noop"}"#.into()),
        )
        .await;
        if let Ok(Ok(msg)) = reply {
            let v: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap_or_default();
            if v["model_version"].as_i64() == Some(version) {
                return Ok(());
            }
        }
        if tokio::time::Instant::now() > deadline {
            bail!("no predictor served model {version} within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
