//! Property tests: random sequences of joins, leaves, crashes, reports,
//! progress and ticks, with every invariant checked after every event.
//!
//! The driver heartbeats every live, non-crashed member at each tick, with
//! ticks shorter than the timeout, so a tick may only kill crashed members.

#![allow(missing_docs)]

use std::collections::BTreeSet;
use std::time::Duration;

use proptest::prelude::*;
use virtman_topology::{NodeId, Progress, SavedNode, Session, Settings, TopologyError};

#[derive(Debug, Clone)]
enum Op {
    Join {
        rack: u8,
    },
    Leave(usize),
    Crash(usize),
    Rejoin(usize),
    Report {
        reporter: usize,
        parent: usize,
    },
    Progress {
        node: usize,
        fraction: u8,
        complete: bool,
    },
    Tick {
        advance_ms: u16,
    },
}

fn op(join_weight: u32) -> impl Strategy<Value = Op> {
    prop_oneof![
        join_weight => (0u8..6).prop_map(|rack| Op::Join { rack }),
        8 => any::<usize>().prop_map(Op::Leave),
        6 => any::<usize>().prop_map(Op::Crash),
        3 => any::<usize>().prop_map(Op::Rejoin),
        6 => (any::<usize>(), any::<usize>())
            .prop_map(|(reporter, parent)| Op::Report { reporter, parent }),
        6 => (any::<usize>(), any::<u8>(), prop::bool::weighted(0.1))
            .prop_map(|(node, fraction, complete)| Op::Progress { node, fraction, complete }),
        10 => (1u16..3000).prop_map(|advance_ms| Op::Tick { advance_ms }),
    ]
}

fn settings() -> impl Strategy<Value = (Settings, u64)> {
    (2u32..7, 1u32..4, 1u64..4, 0u32..8).prop_map(|(fanout, parents, origins, wide)| {
        let s = Settings {
            fanout,
            // Mostly the default relay head, sometimes wider origins.
            origin_fanout: if wide < 4 { 1 } else { 1 + wide % fanout },
            parents,
            heartbeat_timeout: Duration::from_secs(4),
            report_threshold: 2,
            suspect_after: Duration::from_secs(2),
        };
        (s, origins)
    })
}

fn pick<T: Copy>(set: &BTreeSet<T>, i: usize) -> Option<T> {
    if set.is_empty() {
        None
    } else {
        set.iter().nth(i % set.len()).copied()
    }
}

/// Runs `ops` and checks the invariants after every event. Returns the final
/// session for further checks.
fn run(settings: Settings, origins: u64, ops: &[Op]) -> Result<Session, TestCaseError> {
    let origin_ids: Vec<NodeId> = (0..origins).map(NodeId).collect();
    let mut s = Session::new(settings, &origin_ids).expect("valid settings");
    let mut next = 1_000u64;
    let mut now = Duration::ZERO;
    let mut crashed: BTreeSet<NodeId> = BTreeSet::new();
    let mut dead: BTreeSet<NodeId> = BTreeSet::new();
    let mut died_at: std::collections::BTreeMap<NodeId, Duration> = Default::default();
    // Dead nodes are remembered for 16 timeouts, then become unknown.
    let remembered = settings.heartbeat_timeout * 16;
    let members = |s: &Session| -> BTreeSet<NodeId> {
        s.nodes().filter(|n| !n.origin).map(|n| n.id).collect()
    };
    for op in ops {
        let live = members(&s);
        match *op {
            Op::Join { rack } => {
                let id = NodeId(next);
                next += 1;
                let rack = format!("rack{rack}");
                s.join(id, Some(&rack), now).expect("fresh join");
                prop_assert_eq!(s.join(id, None, now), Err(TopologyError::AlreadyMember(id)));
            }
            Op::Leave(i) => {
                if let Some(id) = pick(&live, i) {
                    let out = s.leave(id, now).expect("leave");
                    prop_assert!(out.removed.contains(&id));
                    crashed.remove(&id);
                }
            }
            Op::Crash(i) => {
                if let Some(id) = pick(&live, i) {
                    crashed.insert(id);
                }
            }
            Op::Rejoin(i) => {
                if let Some(id) = pick(&dead, i) {
                    let expected = if now - died_at[&id] <= remembered {
                        TopologyError::Dead(id)
                    } else {
                        TopologyError::UnknownNode(id)
                    };
                    prop_assert_eq!(s.heartbeat(id, now, Progress::default()), Err(expected));
                    s.join(id, None, now).expect("rejoin after death");
                    dead.remove(&id);
                    crashed.remove(&id);
                }
            }
            Op::Report { reporter, parent } => {
                if let Some(r) = pick(&live, reporter)
                    && let Some(parents) = s.parents(r)
                    && !parents.is_empty()
                {
                    let p = parents[parent % parents.len()];
                    let out = s.report_unreachable(r, p, now).expect("report");
                    for d in &out.dead {
                        dead.insert(*d);
                        died_at.insert(*d, now);
                        crashed.remove(d);
                    }
                    if let Some(after) = s.node(r) {
                        // Moved off the parent, unless it is an origin, or it
                        // is the primary and no slot was free within the
                        // depth bound (as shallow, for a node with a subtree).
                        let origin = s.node(p).is_some_and(|n| n.origin);
                        let kept_primary = after.parents.first() == Some(&p);
                        prop_assert!(!after.parents.contains(&p) || origin || kept_primary);
                    }
                }
            }
            Op::Progress {
                node,
                fraction,
                complete,
            } => {
                if let Some(id) = pick(&live, node)
                    && !crashed.contains(&id)
                {
                    let p = Progress {
                        fraction: f64::from(fraction) / 255.0,
                        complete,
                    };
                    s.heartbeat(id, now, p).expect("heartbeat");
                    if complete {
                        prop_assert!(s.parents(id).is_some_and(|p| p.is_empty()));
                    }
                }
            }
            Op::Tick { advance_ms } => {
                now += Duration::from_millis(u64::from(advance_ms));
                for &id in &live {
                    if !crashed.contains(&id) {
                        let frac = s.node(id).map_or(0.0, |n| n.progress);
                        let p = Progress {
                            fraction: frac,
                            complete: false,
                        };
                        s.heartbeat(id, now, p).expect("heartbeat of a live member");
                    }
                }
                let out = s.tick(now);
                for d in &out.dead {
                    prop_assert!(crashed.contains(d), "healthy node {d} declared dead");
                    prop_assert!(!s.contains(*d));
                    dead.insert(*d);
                    died_at.insert(*d, now);
                    crashed.remove(d);
                }
                // No dead node is anyone's parent once the tick returns.
                for n in s.nodes() {
                    for p in &n.parents {
                        prop_assert!(!dead.contains(p), "{p} is dead but parent of {}", n.id);
                    }
                }
                // A crashed member silent for longer than the timeout is gone.
                for &c in &crashed {
                    if let Some(n) = s.node(c) {
                        prop_assert!(now <= n.last_seen + settings.heartbeat_timeout);
                    }
                }
            }
        }
        if let Err(e) = s.check_invariants() {
            return Err(TestCaseError::fail(format!("after {op:?}: {e}")));
        }
    }
    Ok(s)
}

fn snapshot(s: &Session) -> Vec<(NodeId, Vec<NodeId>, u32)> {
    s.nodes().map(|n| (n.id, n.parents, n.depth)).collect()
}

proptest! {
    // A fixed seed, so that CI runs the same 64 cases every time. Soak runs
    // (RngSeed::Random, thousands of cases, release build) found the cases in
    // properties.proptest-regressions, which run first every time.
    #![proptest_config(ProptestConfig {
        cases: 64,
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x5eed_2026),
        ..ProptestConfig::default()
    })]

    #[test]
    fn invariants_hold_over_random_events(
        (settings, origins) in settings(),
        ops in prop::collection::vec(op(40), 1..400),
    ) {
        let a = run(settings, origins, &ops)?;
        // Same events, same decisions: nothing depends on hash order or luck.
        let b = run(settings, origins, &ops)?;
        prop_assert_eq!(snapshot(&a), snapshot(&b));
        prop_assert_eq!(a.stats(), b.stats());
    }

    #[test]
    fn restore_keeps_saved_parents(
        (settings, origins) in settings(),
        ops in prop::collection::vec(op(40), 1..300),
    ) {
        let s = run(settings, origins, &ops)?;
        let saved: Vec<SavedNode> = s
            .nodes()
            .filter(|n| !n.origin)
            .map(|n| SavedNode {
                id: n.id,
                rack: n.rack.clone(),
                parents: n.parents.clone(),
                complete: n.complete,
                epoch: n.epoch,
            })
            .collect();
        let origin_ids: Vec<NodeId> = (0..origins).map(NodeId).collect();
        let later = Duration::from_secs(1_000);
        let r = Session::restore(settings, &origin_ids, saved.clone(), later)
            .expect("restore");
        if let Err(e) = r.check_invariants() {
            return Err(TestCaseError::fail(e.to_string()));
        }
        for n in &saved {
            let now_parents = r.parents(n.id).expect("restored");
            prop_assert!(now_parents.starts_with(&n.parents), "{:?} -> {:?}", n.parents, now_parents);
            if now_parents == n.parents {
                prop_assert_eq!(r.epoch(n.id), Some(n.epoch));
            }
            // Nobody is declared dead before one full timeout after restore.
            prop_assert_eq!(r.node(n.id).map(|i| i.last_seen), Some(later));
        }
        let mut r2 = r.clone();
        let out = r2.tick(later + settings.heartbeat_timeout);
        prop_assert!(out.dead.is_empty());
    }
}

proptest! {
    // Fixed seed too: see the note on the first block.
    #![proptest_config(ProptestConfig {
        cases: 4,
        max_shrink_iters: 64,
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x5eed_2026),
        ..ProptestConfig::default()
    })]

    /// Up to 2,000 nodes: joins dominate so the session grows large, with
    /// churn, crashes, reports and ticks all along.
    #[test]
    fn invariants_hold_at_two_thousand_nodes(
        (settings, origins) in settings(),
        ops in prop::collection::vec(op(300), 2_000..2_600),
    ) {
        let s = run(settings, origins, &ops)?;
        prop_assert!(s.len() > 1_000, "only {} nodes", s.len());
    }
}
