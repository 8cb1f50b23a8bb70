//! The `mlsched` CLI, built as this package's binary so tests can run it.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    mlsched::cli::main().await
}
