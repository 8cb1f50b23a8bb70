//! `mlsched status` (one job's record and history) and `mlsched queues` (backlog per
//! stream and consumer).

use anyhow::Context as _;
use async_nats::jetstream;
use futures::TryStreamExt;

use crate::config::Settings;
use crate::job::JobId;
use crate::store;

/// `mlsched status` options.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The job id.
    pub id: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub(super) async fn status(args: StatusArgs, settings: Settings) -> anyhow::Result<()> {
    let id: JobId = args.id.parse()?;
    let pool = store::pool(&settings.database)?;
    let Some(row) = store::job(&pool, id).await.context("reading the job")? else {
        anyhow::bail!("no job {id} in the database");
    };
    let events = store::events(&pool, id).await.context("reading the job's events")?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"job": row, "events": events}))?
        );
        return Ok(());
    }
    println!("id            {}", row.id);
    println!("kind / lane   {} / {}", row.kind, row.lane);
    println!(
        "status        {} (attempt {} of {})",
        row.status, row.attempts, row.max_attempts
    );
    println!("submitted     {}", row.submitted_at);
    if let Some(t) = row.started_at {
        println!("started       {t}");
    }
    if let Some(t) = row.finished_at {
        println!("finished      {t}");
    }
    if let Some(ms) = row.predicted_ms {
        println!("predicted     {ms} ms");
    }
    if let Some(ms) = row.actual_ms {
        println!("ran for       {ms} ms");
    }
    if let Some(e) = &row.error {
        println!("error         {e}");
    }
    if let Some(r) = &row.result {
        println!("result        {r}");
    }
    println!("history");
    for e in events {
        let err = e.error.map(|e| format!("  {e}")).unwrap_or_default();
        println!("  {}  {:<9} attempt {}{err}", e.at, e.status, e.attempt);
    }
    Ok(())
}

pub(super) async fn queues(settings: Settings) -> anyhow::Result<()> {
    let client = super::nats(&settings).await?;
    let js = jetstream::new(client);
    println!(
        "{:<16} {:<16} {:>9} {:>9} {:>9} {:>11} {:>8}",
        "STREAM", "CONSUMER", "MESSAGES", "PENDING", "ACK-PEND", "REDELIVERED", "WAITING"
    );
    let mut streams: Vec<_> = js.streams().try_collect().await.context("listing streams")?;
    streams.sort_by(|a, b| a.config.name.cmp(&b.config.name));
    for info in streams {
        let name = info.config.name.clone();
        println!("{:<16} {:<16} {:>9}", name, "-", info.state.messages);
        let stream = js.get_stream(&name).await?;
        let mut consumers: Vec<_> = stream.consumers().try_collect().await.context("listing consumers")?;
        consumers.sort_by(|a, b| a.name.cmp(&b.name));
        for c in consumers {
            println!(
                "{:<16} {:<16} {:>9} {:>9} {:>9} {:>11} {:>8}",
                "", c.name, "", c.num_pending, c.num_ack_pending, c.num_redelivered, c.num_waiting
            );
        }
    }
    println!("\nbacklog = PENDING + ACK-PEND (the lag KEDA scales on)");
    Ok(())
}
