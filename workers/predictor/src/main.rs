//! `mlsched-predictor`: the routing stage. Configuration: NATS_URL, DATABASE_URL,
//! mlsched.toml and MLSCHED__SECTION__KEY variables (see README.md).

use clap::Parser;
use mlsched::config::Settings;
use mlsched::runtime::Shutdown;

/// Routes submissions from JOBS_SUBMIT (consumer `predictor`): validates, records
/// them queued in Postgres and publishes them to jobs.run.<lane>.<kind>. Invalid
/// bodies go to jobs.dead.<kind>. Stops gracefully on SIGTERM or Ctrl-C.
#[derive(Parser)]
#[command(name = "mlsched-predictor", version, about, long_about)]
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
    let _traces = mlsched::telemetry::init(&settings.log, "mlsched-predictor");
    let shutdown = Shutdown::new();
    tokio::spawn(shutdown.on_signals());
    mlsched_predictor::run(settings, shutdown).await
}
