//! Carrying out a chaos plan ([`crate::chaos`]) while the VMs read, and what
//! it did to them.
//!
//! ```text
//!   t0 ─► at each action's time: SIGKILL | SIGSTOP (SIGCONT D later)
//!                               | SIGKILL (started again D later, same dir and address)
//!         a `leader` target: ask the coordinators who leads, note the tree, hit it,
//!         then time until another leads (the failover)
//!   VMs done ─► wait for the pending SIGCONTs and restarts ─► Done (what was hit, new pids)
//!   summarize: wrong bytes, failed VMs on hosts never hit, VMs lost with their
//!              host, the longest and p99 read of VMs on hosts never hit
//! ```

use std::collections::BTreeSet;
use std::time::Instant;

use rustix::process::Signal;

use std::time::Duration;

use super::leader::{Coordinators, TreeFacts};
use super::results::{ChaosReport, ControlReport, VmResult};
use crate::chaos::{Action, What};
use crate::cluster::{Member, restart, signal};

/// The longest a failover is waited for.
const FAILOVER_WAIT: Duration = Duration::from_secs(20);

/// What the chaos did.
#[derive(Debug, Default)]
pub(super) struct Done {
    /// Each action as it happened: seconds from the start, what (`kill host3`).
    pub lines: Vec<(f64, String)>,
    /// Members started again, with their new pids.
    pub restarted: Vec<(String, u32)>,
    /// Hosts killed, stopped or restarted: their own VMs may fail or wait.
    pub hit: BTreeSet<String>,
    /// Of those, the ones killed or restarted: their VMs are lost.
    pub lost: BTreeSet<String>,
    /// The tree just before the first leader was hit.
    pub tree_before: Option<TreeFacts>,
    /// Milliseconds from each leader hit to another coordinator leading
    /// (none if none did within the wait).
    pub failovers_ms: Vec<Option<f64>>,
}

type Later = ((f64, String), Option<(String, u32)>, Option<Option<f64>>);

/// Runs `actions` against `members` from `t0`; returns once every action,
/// continuations and restarts included, is done.
pub(super) async fn run(
    actions: Vec<Action>,
    members: Vec<Member>,
    coordinators: Coordinators,
    t0: Instant,
) -> Done {
    let mut done = Done::default();
    let mut later: tokio::task::JoinSet<Later> = tokio::task::JoinSet::new();
    let at = move |what: String| (t0.elapsed().as_secs_f64(), what);
    for a in actions {
        tokio::time::sleep_until((t0 + a.at).into()).await;
        let target = if a.target == "leader" {
            let Some((name, term)) = coordinators.leader().await else {
                done.lines
                    .push(at("no coordinator leads: leader not hit".into()));
                continue;
            };
            if done.tree_before.is_none() {
                done.tree_before = coordinators.tree().await;
            }
            done.lines.push(at(format!("{name} leads (term {term})")));
            let since = Instant::now();
            let c = coordinators.clone();
            let old = name.clone();
            later.spawn(async move {
                let next = c.next_leader(&old, since, FAILOVER_WAIT).await;
                let line = match &next {
                    Some((n, took)) => {
                        format!("{n} leads, {:.0} ms after", took.as_secs_f64() * 1e3)
                    }
                    None => format!("no other coordinator led within {FAILOVER_WAIT:?}"),
                };
                let ms = next.map(|(_, took)| took.as_secs_f64() * 1e3);
                (at(line), None, Some(ms))
            });
            name
        } else {
            a.target.clone()
        };
        let Some(m) = members.iter().find(|m| m.name == target).cloned() else {
            continue;
        };
        if a.what == What::Lie {
            // Lying since it started; its own VMs read right (they do not
            // read its base export).
            done.lines
                .push((0.0, format!("{} lies to its children", m.name)));
            continue;
        }
        done.hit.insert(m.name.clone());
        match a.what {
            What::Lie => {}
            What::Kill => {
                signal(&m, Signal::KILL);
                done.lost.insert(m.name.clone());
                done.lines.push(at(format!("kill {}", m.name)));
            }
            What::Stop(d) => {
                signal(&m, Signal::STOP);
                done.lines.push(at(format!("stop {}", m.name)));
                later.spawn(async move {
                    tokio::time::sleep(d).await;
                    signal(&m, Signal::CONT);
                    (at(format!("continue {}", m.name)), None, None)
                });
            }
            What::Restart(d) => {
                signal(&m, Signal::KILL);
                done.lost.insert(m.name.clone());
                done.lines.push(at(format!("kill {} (to restart)", m.name)));
                later.spawn(async move {
                    tokio::time::sleep(d).await;
                    let name = m.name.clone();
                    let r = tokio::task::spawn_blocking(move || restart(&m)).await;
                    match r {
                        Ok(Ok(pid)) => (at(format!("restart {name}")), Some((name, pid)), None),
                        Ok(Err(e)) => (at(format!("restart {name} FAILED: {e}")), None, None),
                        Err(e) => (at(format!("restart {name} FAILED: {e}")), None, None),
                    }
                });
            }
        }
    }
    while let Some(r) = later.join_next().await {
        if let Ok((line, restarted, failover)) = r {
            done.lines.push(line);
            done.restarted.extend(restarted);
            done.failovers_ms.extend(failover);
        }
    }
    done
}

/// The report of a storm with chaos: `reads` is each VM's host and its
/// reads' times (milliseconds).
pub(super) fn summarize(
    done: &Done,
    vms: &[VmResult],
    reads: &[(String, Vec<f32>)],
    tree_after: Option<TreeFacts>,
) -> ChaosReport {
    let wrong_bytes = vms.iter().map(|v| v.wrong_bytes).sum();
    let failed = vms.iter().filter(|v| v.error.is_some());
    let lost_with_host = failed
        .clone()
        .filter(|v| done.lost.contains(&v.host))
        .count();
    let failed_on_live_hosts = failed.filter(|v| !done.lost.contains(&v.host)).count();
    // Stalls of VMs whose own host was never hit: a stopped host's VMs wait
    // for it by design.
    let mut times: Vec<f32> = reads
        .iter()
        .filter(|(host, _)| !done.hit.contains(host))
        .flat_map(|(_, t)| t.iter().copied())
        .collect();
    times.sort_by(f32::total_cmp);
    let p99 = match times.len() {
        0 => 0.0,
        n => times[((n - 1) * 99).div_ceil(100).min(n - 1)],
    };
    // Continuations and restarts finish out of order: sort by time.
    let mut lines = done.lines.clone();
    lines.sort_by(|a, b| a.0.total_cmp(&b.0));
    let actions = lines
        .into_iter()
        .map(|(secs, what)| format!("{secs:.2}s {what}"))
        .collect();
    ChaosReport {
        actions,
        wrong_bytes,
        failed_on_live_hosts,
        lost_with_host,
        longest_read_ms: times.last().copied().unwrap_or(0.0),
        p99_read_ms: p99,
        held: wrong_bytes == 0 && failed_on_live_hosts == 0,
        control: done.tree_before.clone().map(|before| ControlReport {
            failovers_ms: done.failovers_ms.clone(),
            before,
            after: tree_after,
        }),
    }
}
