//! `mlsched-executor`: the job worker. Configuration: NATS_URL, DATABASE_URL,
//! mlsched.toml and MLSCHED__SECTION__KEY variables (see README.md).

use clap::Parser;
use mlsched::config::Settings;
use mlsched::runtime::Shutdown;

/// Runs jobs from JOBS_RUN, one durable pull consumer (executor-<lane>) per lane.
/// Stops gracefully on SIGTERM or Ctrl-C: no new jobs, in-flight jobs get
/// MLSCHED__SHUTDOWN__GRACE_S seconds to finish, the rest are handed back.
#[derive(Parser)]
#[command(name = "mlsched-executor", version, about, long_about)]
struct Args {
    /// Settings file (default: ./mlsched.toml when present).
    #[arg(long, env = "MLSCHED_CONFIG")]
    config: Option<std::path::PathBuf>,
}

/// Many small, short-lived allocations per job (messages, records, futures) on
/// several threads: mimalloc spends less CPU on them than glibc's allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let settings = Settings::load(args.config.as_deref())?;
    let _traces = mlsched::telemetry::init(&settings.log, "mlsched-executor");
    let shutdown = Shutdown::new();
    tokio::spawn(shutdown.on_signals());
    mlsched_executor::run(settings, shutdown).await
}
