//! `mlsched status` (one job's record and history) and `mlsched queues` (backlog per
//! stream and consumer, drain estimates per lane, prediction accuracy per kind).

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
    match (row.actual_ms, row.predicted_ms) {
        (Some(ms), Some(p)) => println!("ran for       {ms} ms (prediction off by {} ms)", (ms - p).abs()),
        (Some(ms), None) => println!("ran for       {ms} ms"),
        _ => {}
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
    // Predicted work per lane needs Postgres; without it the stream view stands alone.
    let pool = store::pool(&settings.database)?;
    match tokio::time::timeout(std::time::Duration::from_secs(3), drain_estimates(&pool)).await {
        Ok(Ok(rows)) if !rows.is_empty() => {
            println!(
                "\n{:<10} {:>8} {:>16} {:>18} {:>14}",
                "LANE", "QUEUED", "PREDICTED WORK", "WORK DONE (5 min)", "EST. DRAIN"
            );
            for r in rows {
                let drain = if r.done_rate > 0.0 {
                    format!("{:.0} s", r.predicted_s / r.done_rate)
                } else if r.predicted_s > 0.0 {
                    "no progress".into()
                } else {
                    "-".into()
                };
                println!(
                    "{:<10} {:>8} {:>14.1} s {:>16.1} s {:>14}",
                    r.lane,
                    r.queued,
                    r.predicted_s,
                    r.done_rate * 300.0,
                    drain
                );
            }
            println!("est. drain = predicted work waiting / run time finished per second over the last 5 minutes");
        }
        Ok(Ok(_)) => {}
        Ok(Err(e)) => println!("\n(drain estimates unavailable: {e})"),
        Err(_) => println!("\n(drain estimates unavailable: Postgres did not answer)"),
    }
    if let Ok(Ok(rows)) = tokio::time::timeout(std::time::Duration::from_secs(3), accuracy(&pool)).await {
        if !rows.is_empty() {
            println!(
                "\n{:<16} {:>9} {:>14} {:>14} {:>16} {:>16}",
                "KIND", "FINISHED", "PREDICTED p50", "ACTUAL p50", "|ERROR| 5 min", "|ERROR| 1 min"
            );
            for r in rows {
                let last = r.err_1m.map(|e| format!("{e:.0} ms")).unwrap_or_else(|| "-".into());
                println!(
                    "{:<16} {:>9} {:>11.0} ms {:>11.0} ms {:>13.0} ms {:>16}",
                    r.kind, r.finished, r.predicted_p50, r.actual_p50, r.err_5m, last
                );
            }
            println!("predicted vs actual run time of jobs that succeeded in the last 5 minutes (|ERROR| = mean |actual - predicted|)");
        }
    }
    Ok(())
}

struct Accuracy {
    kind: String,
    finished: i64,
    predicted_p50: f64,
    actual_p50: f64,
    err_5m: f64,
    err_1m: Option<f64>,
}

/// How close the predictions of recently finished jobs were, per kind.
async fn accuracy(pool: &sqlx::PgPool) -> Result<Vec<Accuracy>, sqlx::Error> {
    use sqlx::Row;
    let rows = sqlx::query(
        "SELECT kind, count(*) AS finished,
                percentile_cont(0.5) WITHIN GROUP (ORDER BY predicted_ms) AS predicted_p50,
                percentile_cont(0.5) WITHIN GROUP (ORDER BY actual_ms) AS actual_p50,
                avg(abs(actual_ms - predicted_ms))::float8 AS err_5m,
                (avg(abs(actual_ms - predicted_ms)) FILTER (WHERE finished_at > now() - interval '1 minute'))::float8 AS err_1m
         FROM jobs
         WHERE status = 'succeeded' AND finished_at > now() - interval '5 minutes'
           AND predicted_ms IS NOT NULL AND actual_ms IS NOT NULL
         GROUP BY kind ORDER BY kind",
    )
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(Accuracy {
                kind: r.try_get("kind")?,
                finished: r.try_get("finished")?,
                predicted_p50: r.try_get("predicted_p50")?,
                actual_p50: r.try_get("actual_p50")?,
                err_5m: r.try_get("err_5m")?,
                err_1m: r.try_get("err_1m")?,
            })
        })
        .collect()
}

struct Drain {
    lane: String,
    queued: i64,
    predicted_s: f64,
    /// Seconds of run time finished per second, over the last 5 minutes.
    done_rate: f64,
}

async fn drain_estimates(pool: &sqlx::PgPool) -> Result<Vec<Drain>, sqlx::Error> {
    use sqlx::Row;
    let rows = sqlx::query(
        "SELECT lane,
                count(*) FILTER (WHERE status = 'queued') AS queued,
                COALESCE(sum(predicted_ms) FILTER (WHERE status = 'queued'), 0)::float8 / 1000 AS predicted_s,
                COALESCE(sum(actual_ms) FILTER (WHERE status = 'succeeded'
                    AND finished_at > now() - interval '5 minutes'), 0)::float8 / 1000 / 300 AS done_rate
         FROM jobs WHERE status = 'queued' OR finished_at > now() - interval '5 minutes'
         GROUP BY lane ORDER BY lane",
    )
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(Drain {
                lane: r.try_get("lane")?,
                queued: r.try_get("queued")?,
                predicted_s: r.try_get("predicted_s")?,
                done_rate: r.try_get("done_rate")?,
            })
        })
        .collect()
}
