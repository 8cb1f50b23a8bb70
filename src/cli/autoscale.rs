//! `mlsched dev --autoscale`: executor processes started and stopped the way KEDA and
//! the HPA scale the executor Deployments, from the same ScaledObjects (keda/) and the
//! same lag, read from the NATS monitoring endpoint as KEDA's scaler reads it.
//!
//! Per lane, every poll: the shipped formula ([`Policy::desired`]) gives the replicas
//! wanted. A lane at zero that becomes active gets one process (KEDA's activation);
//! from there the HPA's behaviour of the chart applies: up by at most double or four
//! more per step, down to the highest recommendation of the stabilization window and
//! by at most 25% or two processes per period, whichever is less. An inactive lane
//! whose minimum is zero goes to zero after the cooldown. A process scaled in gets
//! SIGTERM and drains, as a pod does. Only the timings are shortened so a burst is
//! watchable in seconds ([`Timing::local`]).

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
    /// One scale-down step per period (the scale-down policies' `periodSeconds`).
    pub(super) scale_down_period: Duration,
}

impl Timing {
    /// Seconds instead of minutes, for a demo on one machine.
    pub(super) fn local() -> Timing {
        Timing {
            poll: Duration::from_secs(1),
            stabilization: Duration::from_secs(10),
            cooldown: Duration::from_secs(10),
            scale_down_period: Duration::from_secs(2),
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
    last_scale_down: Option<Instant>,
    spawned: u32,
    peak: u32,
}

/// What one poll knows about a lane besides its replica count.
#[derive(Debug, Clone, Copy)]
struct Signals {
    /// The lag is above the activation threshold.
    active: bool,
    /// The formula's answer now.
    raw: u32,
    /// The highest answer within the stabilization window.
    stable: u32,
    /// Inactive for the cooldown period.
    cooled: bool,
    /// A scale-down step is allowed (a period has passed since the last).
    down_due: bool,
}

/// Where KEDA and the chart's HPA behaviour take `current` replicas next.
fn next_replicas(p: &Policy, current: u32, s: Signals) -> u32 {
    if current == 0 {
        // Activation: KEDA wakes a lane at zero with one replica; the HPA takes it
        // from there.
        return if s.active { p.min_replicas.max(1) } else { 0 };
    }
    if !s.active && p.min_replicas == 0 {
        // KEDA scales an idle lane to zero itself, after the cooldown.
        return if s.cooled { 0 } else { current };
    }
    if s.raw > current {
        // Scale-up policies: +100% or +4 pods per period, whichever is more.
        return s.raw.min((current * 2).max(current + 4));
    }
    if s.stable < current && s.down_due {
        // Scale-down policies, the smaller change wins: -25% or -2 pods per period.
        let floor = (current * 3 / 4).max(current.saturating_sub(2));
        return s.stable.max(floor).max(p.min_replicas.max(1));
    }
    current
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
                    last_scale_down: None,
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
            let idle_for = lane.last_active.map_or(self.timing.cooldown, |t| now.duration_since(t));
            let down_due = lane
                .last_scale_down
                .is_none_or(|t| now.duration_since(t) >= self.timing.scale_down_period);
            let stable = lane.recommendations.iter().map(|(_, r)| *r).max().unwrap_or(raw);
            let target = next_replicas(
                p,
                current,
                Signals {
                    active: p.active(lag),
                    raw,
                    stable,
                    cooled: idle_for >= self.timing.cooldown,
                    down_due,
                },
            );
            if target < current && target > 0 {
                lane.last_scale_down = Some(now);
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn signals(active: bool, raw: u32) -> Signals {
        Signals {
            active,
            raw,
            stable: raw,
            cooled: false,
            down_due: true,
        }
    }

    #[test]
    fn replicas_move_as_keda_and_the_charts_hpa_behaviour_move_them() {
        let slow = Policy::shipped_for("executor-slow").unwrap();
        let fast = Policy::shipped_for("executor-fast").unwrap();
        assert_eq!(next_replicas(&slow, 0, signals(false, 0)), 0, "idle at zero");
        assert_eq!(next_replicas(&slow, 0, signals(true, 7)), 1, "activation wakes one");
        assert_eq!(next_replicas(&slow, 1, signals(true, 7)), 5, "then +4");
        assert_eq!(next_replicas(&slow, 5, signals(true, 7)), 7, "then up to the formula");
        assert_eq!(next_replicas(&fast, 6, signals(true, 40)), 12, "+100% beats +4");
        let mut down = vec![10];
        while *down.last().unwrap() > 1 {
            down.push(next_replicas(&fast, *down.last().unwrap(), signals(false, 1)));
        }
        assert_eq!(down, [10, 8, 6, 4, 3, 2, 1], "-25% or -2 per period, the smaller");
        let held = Signals {
            stable: 9,
            ..signals(true, 1)
        };
        assert_eq!(next_replicas(&fast, 10, held), 9, "the window's highest answer holds");
        let early = Signals {
            down_due: false,
            ..signals(true, 1)
        };
        assert_eq!(next_replicas(&fast, 10, early), 10, "one step per period");
        assert_eq!(next_replicas(&slow, 7, signals(false, 0)), 7, "not cooled yet");
        let cooled = Signals {
            cooled: true,
            ..signals(false, 0)
        };
        assert_eq!(next_replicas(&slow, 7, cooled), 0, "to zero after the cooldown");
    }
}
