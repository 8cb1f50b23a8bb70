//! `mlsched model list|train|activate`: the run-time model registry.

use anyhow::Context as _;

use crate::config::Settings;
use crate::predict::registry;

/// `mlsched model` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum ModelCommand {
    /// List every model with its holdout metrics; `*` marks the active one.
    List,
    /// Train now from finished jobs, print every candidate's holdout metrics and the
    /// baseline's, store the best, and activate it if it beats the baseline, and the
    /// active model by at least 1%, on the same holdout.
    Train {
        /// Newest finished jobs to learn from.
        #[arg(long, default_value_t = 50_000)]
        limit: i64,
        /// Seed of the train/holdout split and the forest.
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
    /// Make VERSION the active model (roll back or forward).
    Activate {
        /// The model version (see `model list`).
        version: i64,
    },
}

pub(super) async fn run(command: ModelCommand, settings: Settings) -> anyhow::Result<()> {
    let pool = crate::store::pool(&settings.database)?;
    match command {
        ModelCommand::List => {
            let rows = registry::list(&pool).await.context("reading the model registry")?;
            println!(
                "{:>3} {:>7} {:<14} {:>8} {:>12} {:>7} {:>12}  TRAINED",
                "", "VERSION", "ALGORITHM", "SAMPLES", "MAE ms", "R²", "BASELINE ms"
            );
            for r in &rows {
                println!(
                    "{:>3} {:>7} {:<14} {:>8} {:>12.1} {:>7.3} {:>12.1}  {}",
                    if r.active { "*" } else { "" },
                    r.version,
                    r.algorithm,
                    r.samples,
                    r.holdout_mae_ms,
                    r.holdout_r2,
                    r.baseline_mae_ms,
                    r.trained_at.format("%Y-%m-%d %H:%M:%S")
                );
            }
            if rows.is_empty() {
                println!("no models yet: `mlsched model train` once jobs have finished");
            }
        }
        ModelCommand::Train { limit, seed } => {
            let out = registry::train_and_promote(&pool, limit, seed).await?;
            print_outcome(&out);
        }
        ModelCommand::Activate { version } => {
            registry::activate(&pool, version).await?;
            println!("model version {version} is active");
        }
    }
    Ok(())
}

/// Prints a training run: every candidate's and the baseline's holdout metrics, and
/// whether the new model was activated.
pub(super) fn print_outcome(out: &registry::Outcome) {
    let (train, holdout) = out.trained.sizes;
    println!(
        "trained on {} finished jobs ({train} train, {holdout} holdout)",
        train + holdout
    );
    for s in &out.trained.scores {
        let note = if s.algorithm == "kind_median" {
            "  (baseline)"
        } else if s.algorithm == out.trained.best.algorithm {
            "  <- best"
        } else {
            ""
        };
        println!(
            "  {:<14} MAE {:>12.1} ms   R² {:>6.3}{note}",
            s.algorithm, s.mae_ms, s.r2
        );
    }
    if let Some((v, mae)) = out.previous {
        println!(
            "  {:<14} MAE {:>12.1} ms   (active model, same holdout)",
            format!("v{v}"),
            mae
        );
    }
    if out.promoted {
        println!("stored as version {} and activated", out.version);
    } else {
        println!(
            "stored as version {}; not activated (it must beat the baseline, and the active model by 1%)",
            out.version
        );
    }
}
