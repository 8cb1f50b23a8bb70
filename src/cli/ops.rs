//! `mlsched config` and `mlsched health`: what a deployment checks before and while it
//! runs. `config` loads the settings exactly as every worker does and prints each key's
//! effective value, so a bad key fails here, named, before a pod ever starts; `health`
//! asks this machine's worker for `/readyz`, the container image's health check.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context as _};

use super::lab::http_status;
use crate::config::Settings;

/// `mlsched health` options.
#[derive(Debug, clap::Args)]
pub struct HealthArgs {
    /// Path to ask for: /readyz (connected and consuming) or /healthz (alive).
    #[arg(long, default_value = "/readyz")]
    pub path: String,
    /// Address of the worker's operations endpoint (default: metrics.listen, with an
    /// unspecified host read as loopback).
    #[arg(long)]
    pub addr: Option<SocketAddr>,
    /// How long to wait for the answer, ms.
    #[arg(long, default_value_t = 3000)]
    pub timeout_ms: u64,
}

/// Prints `section.key = value` for every setting (secrets as `***`).
pub(super) fn config(settings: &Settings) {
    for (key, value) in settings.entries() {
        println!("{key} = {value}");
    }
}

/// Succeeds when the endpoint answers 200.
pub(super) async fn health(args: HealthArgs, settings: &Settings) -> anyhow::Result<()> {
    let addr = match args.addr {
        Some(a) => a,
        None => {
            let listen = &settings.metrics.listen;
            if listen.is_empty() {
                bail!("metrics.listen is empty: this process serves no health endpoint");
            }
            let mut a: SocketAddr = listen
                .parse()
                .with_context(|| format!("metrics.listen {listen:?} is not an address"))?;
            if a.ip().is_unspecified() {
                a.set_ip(match a {
                    SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
                    SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
                });
            }
            a
        }
    };
    let url = format!("http://{addr}{}", args.path);
    let timeout = Duration::from_millis(args.timeout_ms);
    match tokio::time::timeout(timeout, http_status(&addr.to_string(), &args.path)).await {
        Ok(Some(200)) => {
            println!("{url}: ok");
            Ok(())
        }
        Ok(Some(code)) => bail!("{url} answered {code}"),
        Ok(None) | Err(_) => bail!(
            "{url} did not answer (nothing listening, or no answer within {} ms)",
            args.timeout_ms
        ),
    }
}
