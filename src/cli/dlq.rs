//! `mlsched dlq list|retry|purge`: dead letters in `JOBS_DEAD`.
//!
//! `retry` resubmits a dead job through the predictor as a new job (a fresh id and a
//! `retry_of` field naming the dead one), so the dead job's record stays as it was:
//! status only moves forward. A body that is not a valid envelope cannot be retried
//! as is; `retry` says why and leaves it in place.

use anyhow::Context as _;
use async_nats::jetstream::{self, stream::Stream};
use serde_json::value::RawValue;

use crate::client::Producer;
use crate::config::Settings;
use crate::job::{self, envelope::IdSource, Job, JobId};

/// `mlsched dlq` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum DlqCommand {
    /// List dead letters, oldest first, with their reasons.
    List {
        /// Only this kind.
        #[arg(long)]
        kind: Option<String>,
        /// Show at most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Resubmit dead jobs as new jobs and remove them from the dead letters.
    Retry {
        /// Stream sequences of the dead letters to retry (see `dlq list`).
        seqs: Vec<u64>,
        /// Retry every dead letter (of --kind, if given).
        #[arg(long)]
        all: bool,
        /// Only this kind (with --all).
        #[arg(long)]
        kind: Option<String>,
    },
    /// Delete dead letters for good.
    Purge {
        /// Only this kind.
        #[arg(long)]
        kind: Option<String>,
    },
}

struct Dead {
    seq: u64,
    subject: String,
    error: String,
    attempts: String,
    original: String,
    payload: bytes::Bytes,
    time: String,
}

impl From<jetstream::message::StreamMessage> for Dead {
    fn from(msg: jetstream::message::StreamMessage) -> Dead {
        let header = |name: &str| {
            msg.headers
                .get(name)
                .map(|v| v.as_str().to_string())
                .unwrap_or_default()
        };
        Dead {
            seq: msg.sequence,
            subject: msg.subject.to_string(),
            error: header(job::ERROR_HEADER),
            attempts: header(job::ATTEMPTS_HEADER),
            original: header(job::SUBJECT_HEADER),
            time: msg.time.to_rfc3339(),
            payload: msg.payload,
        }
    }
}

async fn scan(stream: &Stream, kind: Option<&str>, limit: usize) -> anyhow::Result<Vec<Dead>> {
    let filter = match kind {
        Some(k) => job::dead_subject(job::Kind::new(k)?.as_str()),
        None => "jobs.dead.*".to_string(),
    };
    let mut out = Vec::new();
    let mut seq = 1;
    while out.len() < limit {
        let msg = match stream
            .raw_message_builder()
            .sequence(seq)
            .next_by_subject(filter.clone())
            .send()
            .await
        {
            Ok(m) => m,
            Err(e) if matches!(e.kind(), jetstream::stream::RawMessageErrorKind::NoMessageFound) => break,
            Err(e) => return Err(e).context("reading JOBS_DEAD"),
        };
        seq = msg.sequence + 1;
        out.push(Dead::from(msg));
    }
    Ok(out)
}

pub(super) async fn run(command: DlqCommand, settings: Settings) -> anyhow::Result<()> {
    let client = super::nats(&settings).await?;
    let js = jetstream::new(client.clone());
    let stream = js
        .get_stream(job::DEAD_STREAM)
        .await
        .context("JOBS_DEAD (run `mlsched streams apply`)")?;
    match command {
        DlqCommand::List { kind, limit } => {
            let dead = scan(&stream, kind.as_deref(), limit).await?;
            for d in &dead {
                println!(
                    "#{:<8} {}  {}  attempts={}  from {}",
                    d.seq, d.time, d.subject, d.attempts, d.original
                );
                println!("          {}", d.error);
            }
            println!("{} dead letter(s) shown", dead.len());
        }
        DlqCommand::Retry { seqs, all, kind } => {
            let dead = if all {
                scan(&stream, kind.as_deref(), usize::MAX).await?
            } else {
                if seqs.is_empty() {
                    anyhow::bail!("name the sequences to retry, or pass --all");
                }
                let mut v = Vec::new();
                for s in seqs {
                    let msg = stream
                        .get_raw_message(s)
                        .await
                        .with_context(|| format!("no dead letter #{s}"))?;
                    v.push(Dead::from(msg));
                }
                v
            };
            let producer = Producer::new(client.clone());
            let (mut retried, mut skipped) = (0, 0);
            for d in dead {
                let kind_token = job::kind_token(&d.subject).to_string();
                let old = match Job::parse(&kind_token, &d.payload, IdSource::Derived(JobId::new_v7())) {
                    Ok(j) => j,
                    Err(e) => {
                        println!("#{}: not retried: {e}; fix the body and submit it again", d.seq);
                        skipped += 1;
                        continue;
                    }
                };
                let mut job = old.clone();
                job.id = JobId::new_v7();
                job.extra.retain(|(k, _)| k != "retry_of");
                let old_id = RawValue::from_string(format!("\"{}\"", old.id))?;
                job.extra.push(("retry_of".into(), old_id));
                let ack = producer
                    .send(job::submit_subject(&job.kind), job.id, job.to_json().into())
                    .await?;
                ack.await.context("resubmission not acknowledged")?;
                stream.delete_message(d.seq).await.context("removing the dead letter")?;
                println!("#{}: resubmitted {} as {}", d.seq, old.id, job.id);
                retried += 1;
            }
            println!("{retried} retried, {skipped} skipped");
        }
        DlqCommand::Purge { kind } => {
            let resp = match kind {
                Some(k) => {
                    stream
                        .purge()
                        .filter(job::dead_subject(job::Kind::new(k)?.as_str()))
                        .await?
                }
                None => stream.purge().await?,
            };
            println!("purged {} dead letter(s)", resp.purged);
        }
    }
    client.flush().await?;
    Ok(())
}
