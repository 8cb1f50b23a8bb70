//! `mlsched predict`: ask the predictors (the `mlsched.predict` service) how long a job
//! would run.

use anyhow::{bail, Context as _};

use crate::config::Settings;

/// `mlsched predict` options.
#[derive(Debug, clap::Args)]
pub struct PredictArgs {
    /// Job kind.
    #[arg(long)]
    pub kind: String,
    /// Prediction features, as a JSON object.
    #[arg(long)]
    pub features: Option<String>,
    /// Payload, as JSON (its size is a feature).
    #[arg(long, default_value = "{}")]
    pub payload: String,
}

pub(super) async fn run(args: PredictArgs, settings: Settings) -> anyhow::Result<()> {
    let kind = crate::job::Kind::new(args.kind.as_str())?;
    let payload: serde_json::Value = serde_json::from_str(&args.payload).context("--payload is not JSON")?;
    let mut envelope = serde_json::json!({"kind": kind, "payload": payload});
    if let Some(f) = &args.features {
        envelope["features"] = serde_json::from_str(f).context("--features is not JSON")?;
    }
    let client = super::nats(&settings).await?;
    let reply = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        client.request("mlsched.predict", envelope.to_string().into()),
    )
    .await
    .context("no predictor answered within 5 s")?
    .context("no predictor answered (is mlsched-predictor running?)")?;
    if let Some(err) = reply.headers.as_ref().and_then(|h| h.get("Nats-Service-Error")) {
        bail!("prediction refused: {}", err.as_str());
    }
    println!("{}", String::from_utf8_lossy(&reply.payload));
    Ok(())
}
