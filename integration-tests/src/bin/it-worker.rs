//! `it-worker executor|predictor`: the workers as separate processes, for tests that
//! kill them (`kill -9`) or signal them (SIGTERM). Same code as the real binaries.

use mlsched::config::Settings;
use mlsched::runtime::Shutdown;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let role = std::env::args().nth(1).unwrap_or_default();
    let settings = Settings::load(None)?;
    let service = format!("mlsched-{role}");
    let _traces = mlsched::telemetry::init(&settings.log, &service);
    let shutdown = Shutdown::new();
    tokio::spawn(shutdown.on_signals());
    match role.as_str() {
        "executor" => mlsched_executor::run(settings, shutdown).await,
        "predictor" => mlsched_predictor::run(settings, shutdown).await,
        other => anyhow::bail!("usage: it-worker executor|predictor (got {other:?})"),
    }
}
