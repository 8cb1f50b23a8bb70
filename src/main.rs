//! The `mlsched` command line; everything it does lives in `mlsched::cli`.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    mlsched::cli::main().await
}
