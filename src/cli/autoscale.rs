//! `mlsched dev --autoscale`: executor processes started and stopped the way KEDA and
//! the HPA scale the executor Deployments, from the same ScaledObjects (keda/) and the
//! same lag, read from the NATS monitoring endpoint as KEDA's scaler reads it.
//!
//! Per lane, every poll: the shipped formula ([`Policy::desired`]) gives the replicas
//! wanted. Scale-up is immediate, paced like the chart's HPA behaviour (at most double,
//! or four more, per step); scale-down takes the highest recommendation of the last
//! stabilization window; an inactive lane whose minimum is zero goes to zero after the
//! cooldown. A process scaled in gets SIGTERM and drains, as a pod does. Only the
//! timings are shortened so a burst is watchable in seconds ([`Timing::local`]).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use super::lab::{Lab, Proc};
use crate::autoscale::{LagReader, Policy};

/// How often and how patiently the local autoscaler acts.
#[derive(Debug, Clone, Copy)]
pub(super) struct Timing {
    /// Between two reads of the lag (KEDA's `pollingInterval`).
    pub(super) poll: Duration,
    /// Scale-down follows the highest recommendation of this window (the HPA's
    /// `stabilizationWindowSeconds`).
    pub(super) stabilization: Duration,
    /// An inactive lane with minimum zero waits this long before going to zero
    /// (KEDA's `cooldownPeriod`).
    pub(super) cooldown: Duration,
}

impl Timing {
    /// Seconds instead of minutes, for a demo on one machine.
    pub(super) fn local() -> Timing {
        Timing {
            poll: Duration::from_secs(1),
            stabilization: Duration::from_secs(10),
            cooldown: Duration::from_secs(10),
        }
    }
}

/// One replica-count change.
#[derive(Debug, Clone)]
pub(super) struct Change {
    pub(super) lane: String,
    pub(super) lag: u64,
    pub(super) from: u32,
    pub(super) to: u32,
}

struct Lane {
    name: String,
    policy: Policy,
    procs: Vec<Proc>,
    /// (when, recommended replicas) within the stabilization window.
    recommendations: VecDeque<(Instant, u32)>,
    last_active: Option<Instant>,
    spawned: u32,
    peak: u32,
}

/// Executor processes per lane, scaled on lag.
pub(super) struct Autoscaler {
    lanes: Vec<Lane>,
    reader: LagReader,
    timing: Timing,
    draining: Vec<JoinHandle<anyhow::Result<()>>>,
    env: Vec<(&'static str, String)>,
}

impl Autoscaler {
    /// An autoscaler of the executor lanes in keda/, reading `monitor_url`
    /// (`http://host:port` of the NATS monitoring endpoint) for account `$G`. `env` is
    /// given to every executor it starts.
    pub(super) fn new(monitor_url: &str, timing: Timing, env: Vec<(&'static str, String)>) -> anyhow::Result<Self> {
        let lanes = Policy::shipped()
            .into_iter()
            .filter_map(|policy| {
                let name = policy.consumer.strip_prefix("executor-")?.to_string();
                Some(Lane {
                    name,
                    policy,
                    procs: Vec::new(),
                    recommendations: VecDeque::new(),
                    last_active: None,
                    spawned: 0,
                    peak: 0,
                })
            })
            .collect();
        Ok(Autoscaler {
            lanes,
            reader: LagReader::new(monitor_url, "$G")?,
            timing,
            draining: Vec::new(),
            env,
        })
    }

    /// The lanes' policies.
    pub(super) fn policies(&self) -> impl Iterator<Item = (&str, &Policy)> {
        self.lanes.iter().map(|l| (l.name.as_str(), &l.policy))
    }

    /// Running executors of `lane`.
    pub(super) fn replicas(&self, lane: &str) -> u32 {
        self.lanes
            .iter()
            .find(|l| l.name == lane)
            .map_or(0, |l| l.procs.len() as u32)
    }

    /// The most executors `lane` had at once.
    pub(super) fn peak(&self, lane: &str) -> u32 {
        self.lanes.iter().find(|l| l.name == lane).map_or(0, |l| l.peak)
    }

    /// Brings every lane to its minimum at once (the state after `helm install`).
    pub(super) fn start(&mut self, lab: &Lab) -> anyhow::Result<()> {
        for i in 0..self.lanes.len() {
            let min = self.lanes[i].policy.min_replicas;
            self.resize(lab, i, min)?;
        }
        Ok(())
    }

    /// One poll: reads every lane's lag and resizes; returns the changes made.
    pub(super) async fn step(&mut self, lab: &Lab) -> anyhow::Result<Vec<Change>> {
        let now = Instant::now();
        let mut changes = Vec::new();
        for i in 0..self.lanes.len() {
            // A failed read changes nothing this poll (KEDA, after three, holds the
            // fallback replica count).
            let lag = match self.reader.lag(&self.lanes[i].policy).await {
                Ok(lag) => lag,
                Err(e) => {
                    eprintln!("autoscaler: {e:#}");
                    continue;
                }
            };
            let lane = &mut self.lanes[i];
            let current = lane.procs.len() as u32;
            let p = &lane.policy;
            if p.active(lag) {
                lane.last_active = Some(now);
            }
            let raw = p.desired(lag, current);
            lane.recommendations.push_back((now, raw));
            while lane
                .recommendations
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > self.timing.stabilization)
            {
                lane.recommendations.pop_front();
            }
            let target = if current == 0 {
                // Activation: KEDA scales from zero on its own, without the HPA.
                raw
            } else if !p.active(lag) && p.min_replicas == 0 {
                let idle_for = lane.last_active.map_or(self.timing.cooldown, |t| now.duration_since(t));
                if idle_for >= self.timing.cooldown {
                    0
                } else {
                    current
                }
            } else if raw > current {
                // The chart's scale-up policies: +100% or +4 pods, whichever is more.
                raw.min((current * 2).max(current + 4))
            } else {
                let stable = lane.recommendations.iter().map(|(_, r)| *r).max().unwrap_or(raw);
                stable.min(current).max(p.min_replicas.max(1))
            };
            if target != current {
                changes.push(Change {
                    lane: lane.name.clone(),
                    lag,
                    from: current,
                    to: target,
                });
                self.resize(lab, i, target)?;
            }
        }
        self.draining.retain(|h| !h.is_finished());
        Ok(changes)
    }

    /// Starts or stops (SIGTERM, drained in the background) executors of lane `i`.
    fn resize(&mut self, lab: &Lab, i: usize, to: u32) -> anyhow::Result<()> {
        let lane = &mut self.lanes[i];
        while (lane.procs.len() as u32) < to {
            lane.spawned += 1;
            let mut env = self.env.clone();
            env.push(("MLSCHED__EXECUTOR__LANES", lane.name.clone()));
            // Each process carries one lag threshold in flight, as the chart's pods do.
            env.push(("MLSCHED__EXECUTOR__CONCURRENCY", lane.policy.lag_threshold.to_string()));
            let name = format!("executor-{}-{}", lane.name, lane.spawned);
            lane.procs.push(lab.spawn("mlsched-executor", &name, &env)?);
        }
        while lane.procs.len() as u32 > to {
            if let Some(mut proc) = lane.procs.pop() {
                self.draining.push(tokio::task::spawn_blocking(move || proc.stop()));
            }
        }
        lane.peak = lane.peak.max(lane.procs.len() as u32);
        Ok(())
    }

    /// Stops every executor and waits for each to drain; reports a failed exit.
    pub(super) async fn stop(mut self) -> anyhow::Result<()> {
        for lane in &mut self.lanes {
            for mut proc in lane.procs.drain(..) {
                self.draining.push(tokio::task::spawn_blocking(move || proc.stop()));
            }
        }
        for h in self.draining.drain(..) {
            h.await??;
        }
        Ok(())
    }
}
