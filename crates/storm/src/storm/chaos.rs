//! Carrying out a chaos plan ([`crate::chaos`]) while the VMs read, and what
//! it did to them.
//!
//! ```text
//!   t0 ─► at each action's time: SIGKILL | SIGSTOP (SIGCONT D later)
//!                               | SIGKILL (started again D later, same dir and address)
//!   VMs done ─► wait for the pending SIGCONTs and restarts ─► Done (what was hit, new pids)
//!   summarize: wrong bytes, failed VMs on hosts never hit, VMs lost with their
//!              host, the longest and p99 read of VMs on hosts never hit
//! ```

use std::collections::BTreeSet;
use std::time::Instant;

use rustix::process::Signal;

use super::results::{ChaosReport, VmResult};
use crate::chaos::{Action, What};
use crate::cluster::{Member, restart, signal};

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
}

/// Runs `actions` against `members` from `t0`; returns once every action,
/// continuations and restarts included, is done.
pub(super) async fn run(actions: Vec<Action>, members: Vec<Member>, t0: Instant) -> Done {
    let mut done = Done::default();
    let mut later = tokio::task::JoinSet::new();
    let at = move |what: String| (t0.elapsed().as_secs_f64(), what);
    for a in actions {
        tokio::time::sleep_until((t0 + a.at).into()).await;
        let Some(m) = members.iter().find(|m| m.name == a.target).cloned() else {
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
                    (at(format!("continue {}", m.name)), None)
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
                        Ok(Ok(pid)) => (at(format!("restart {name}")), Some((name, pid))),
                        Ok(Err(e)) => (at(format!("restart {name} FAILED: {e}")), None),
                        Err(e) => (at(format!("restart {name} FAILED: {e}")), None),
                    }
                });
            }
        }
    }
    while let Some(r) = later.join_next().await {
        if let Ok((line, restarted)) = r {
            done.lines.push(line);
            done.restarted.extend(restarted);
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
    }
}
