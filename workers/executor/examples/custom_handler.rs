//! An executor with a job kind of your own, next to the built-in ones.
//!
//! Run it like `mlsched-executor` (NATS_URL, DATABASE_URL, MLSCHED__* variables), then
//! publish `{"kind": "resize", "payload": {"url": "...", "width": 320}}` to
//! `jobs.submit.resize`.

use mlsched::config::Settings;
use mlsched::runtime::Shutdown;
use mlsched_executor::{kinds, HandlerError, HandlerResult, JobInput};
use serde::Deserialize;

#[derive(Deserialize)]
struct Resize {
    url: String,
    width: u32,
}

async fn resize(job: JobInput) -> HandlerResult {
    // A payload of the wrong shape is a permanent error: the job goes dead at once.
    let args: Resize = job.payload()?;
    if args.width == 0 {
        return Err(HandlerError::fatal("width must be positive"));
    }
    if !args.url.starts_with("https://") {
        // Retried with backoff until the job's attempts are used up.
        return Err(HandlerError::retry(format!("cannot fetch {} yet", args.url)));
    }
    Ok(serde_json::json!({"resized": args.url, "width": args.width}))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::load(None)?;
    let _traces = mlsched::telemetry::init(&settings.log, "mlsched-executor");
    let mut registry = kinds::builtin();
    registry.register("resize", resize)?;
    let shutdown = Shutdown::new();
    tokio::spawn(shutdown.on_signals());
    mlsched_executor::run_with(settings, registry, shutdown).await
}
