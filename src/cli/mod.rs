//! The `mlsched` command line: argument parsing and dispatch. Each subcommand lives in
//! its own module and only calls the library.

mod autoscale;
mod bench;
mod dev;
mod dlq;
mod inspect;
mod lab;
mod model;
mod ops;
mod predict;
mod submit;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::Settings;

/// mlsched: an event-driven ML task scheduler on NATS JetStream.
///
/// Connection settings come from NATS_URL and DATABASE_URL; everything else from
/// mlsched.toml and MLSCHED__SECTION__KEY environment variables (see README.md).
#[derive(Debug, Parser)]
#[command(name = "mlsched", version, about, long_about)]
pub struct Cli {
    /// Settings file (default: ./mlsched.toml when present).
    #[arg(long, global = true, env = "MLSCHED_CONFIG")]
    pub config: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Measure: throughput and latency beside raw JetStream, prediction latency,
    /// head-of-line blocking with and without prediction lanes (on a stack it starts, or
    /// NATS_URL / DATABASE_URL: use a scratch stack).
    Bench(bench::BenchArgs),
    /// Run a complete local stack (private nats-server and Postgres unless NATS_URL /
    /// DATABASE_URL are set), submit a demo workload and print a summary.
    Dev(dev::DevArgs),
    /// Check the settings (mlsched.toml, MLSCHED__* variables, NATS_URL / DATABASE_URL)
    /// as every worker loads them and print each key's effective value, secrets hidden;
    /// fails naming every bad key.
    Config,
    /// Ask this machine's worker for /readyz on metrics.listen; exits 0 when it answers
    /// 200 (the container image's health check).
    Health(ops::HealthArgs),
    /// Apply the Postgres migrations.
    Migrate,
    /// JetStream streams and consumers.
    Streams {
        /// What to do with them.
        #[command(subcommand)]
        command: StreamsCommand,
    },
    /// Publish jobs to jobs.submit.<kind> (or straight to a lane).
    Submit(submit::SubmitArgs),
    /// Show one job's record and status history.
    Status(inspect::StatusArgs),
    /// Show the backlog of every stream and consumer.
    Queues,
    /// Inspect and act on dead letters (JOBS_DEAD).
    Dlq {
        /// What to do with them.
        #[command(subcommand)]
        command: dlq::DlqCommand,
    },
    /// Ask the predictors how long a job would run (the mlsched.predict service).
    Predict(predict::PredictArgs),
    /// The run-time model registry: list, train now, activate (roll back).
    Model {
        /// What to do.
        #[command(subcommand)]
        command: model::ModelCommand,
    },
}

/// `mlsched streams ...`
#[derive(Debug, Subcommand)]
pub enum StreamsCommand {
    /// Create or update the streams and consumers of streams/ (idempotent).
    Apply(ApplyArgs),
}

/// `mlsched streams apply` options.
#[derive(Debug, clap::Args)]
pub struct ApplyArgs {
    /// Read definitions from this directory instead of the ones built in.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Per-environment overrides: a JSON file like {"*": {"num_replicas": 3}}.
    #[arg(long)]
    pub overrides: Option<PathBuf>,
    /// Replica count of every stream.
    #[arg(long)]
    pub replicas: Option<u32>,
}

/// Parses the command line and runs it.
pub async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut settings = Settings::load(cli.config.as_deref())?;
    // One-shot commands speak through their output; log only problems unless asked.
    if std::env::var_os("MLSCHED__LOG__LEVEL").is_none() && settings.log.level == "info" {
        settings.log.level = "warn".into();
    }
    let _traces = crate::telemetry::init(&settings.log, "mlsched");
    run(cli.command, settings).await
}

async fn run(command: Command, settings: Settings) -> anyhow::Result<()> {
    match command {
        Command::Bench(args) => bench::run(args, settings).await,
        Command::Dev(args) => dev::run(args, settings).await,
        Command::Config => {
            ops::config(&settings);
            Ok(())
        }
        Command::Health(args) => ops::health(args, &settings).await,
        Command::Migrate => {
            let pool = crate::store::pool(&settings.database)?;
            crate::store::migrate(&pool).await.context("migrating the database")?;
            println!("migrations applied");
            Ok(())
        }
        Command::Streams {
            command: StreamsCommand::Apply(args),
        } => {
            let client = nats(&settings).await?;
            for change in apply_streams(&client, &settings, &args).await? {
                println!("{change}");
            }
            client.flush().await?;
            Ok(())
        }
        Command::Submit(args) => submit::run(args, settings).await,
        Command::Status(args) => inspect::status(args, settings).await,
        Command::Queues => inspect::queues(settings).await,
        Command::Dlq { command } => dlq::run(command, settings).await,
        Command::Model { command } => model::run(command, settings).await,
        Command::Predict(args) => predict::run(args, settings).await,
    }
}

/// Applies the stream definitions (with overrides and the configured lanes).
pub async fn apply_streams(
    client: &async_nats::Client,
    settings: &Settings,
    args: &ApplyArgs,
) -> anyhow::Result<Vec<crate::streams::Change>> {
    use crate::streams::Definitions;
    let mut defs = match &args.dir {
        Some(dir) => Definitions::from_dir(dir)?,
        None => Definitions::builtin()?,
    };
    defs = defs.with_lanes(&settings.executor_lanes());
    if let Some(path) = &args.overrides {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        defs = defs.with_overrides(&value)?;
    }
    if let Some(r) = args.replicas {
        defs = defs.with_replicas(r);
    }
    Ok(crate::streams::apply(client, &defs).await?)
}

async fn nats(settings: &Settings) -> anyhow::Result<async_nats::Client> {
    let cancel = CancellationToken::new();
    let connect = crate::client::connect(&settings.nats, "mlsched-cli", &cancel);
    let timeout = std::time::Duration::from_secs(30);
    match tokio::time::timeout(timeout, connect).await {
        Ok(r) => Ok(r?),
        Err(_) => {
            cancel.cancel();
            anyhow::bail!(
                "NATS at {} did not answer within {timeout:?}",
                redact(settings.nats.url.expose())
            )
        }
    }
}

/// A URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(a)) if a > s => format!("{}://***@{}", &url[..s], &url[a + 1..]),
        _ => url.to_string(),
    }
}
