//! Property tests: random sequences of joins, leaves, crashes, reports,
//! progress and ticks, with every invariant checked after every event, on
//! trees (a forest of one stripe) and forests of 2 to 4 stripes.
//!
//! The driver heartbeats every live, non-crashed member at each tick, with
//! ticks shorter than the timeout, so a tick may only kill crashed members.

#![allow(missing_docs)]

use std::collections::BTreeSet;
use std::time::Duration;

use proptest::prelude::*;
use virtman_topology::{Forest, NodeId, Progress, SavedMember, Settings, TopologyError};

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

/// Settings, origins, stripes: half the cases a tree, the others 2 to 4 stripes.
fn settings() -> impl Strategy<Value = (Settings, u64, u32)> {
    (2u32..7, 1u32..4, 1u64..4, 0u32..8, 0u32..6).prop_map(
        |(fanout, parents, origins, wide, st)| {
            let s = Settings {
                fanout,
                // Mostly the default relay head, sometimes wider origins.
                origin_fanout: if wide < 4 { 1 } else { 1 + wide % fanout },
                parents,
                heartbeat_timeout: Duration::from_secs(4),
                report_threshold: 2,
                suspect_after: Duration::from_secs(2),
            };
            (s, origins, st.saturating_sub(2) + 1)
        },
    )
}

fn pick<T: Copy>(set: &BTreeSet<T>, i: usize) -> Option<T> {
    if set.is_empty() {
        None
    } else {
        set.iter().nth(i % set.len()).copied()
    }
}

/// Every parent of `id` in any stripe, once each.
fn all_parents(s: &Forest, id: NodeId) -> Vec<NodeId> {
    let mut all: Vec<NodeId> = s.parents(id).unwrap_or_default().concat();
    all.sort_unstable();
    all.dedup();
    all
}

/// Runs `ops` and checks the invariants after every event. Returns the final
/// forest for further checks.
fn run(
    settings: Settings,
    origins: u64,
    stripes: u32,
    ops: &[Op],
) -> Result<Forest, TestCaseError> {
    let origin_ids: Vec<NodeId> = (0..origins).map(NodeId).collect();
    let mut s = Forest::new(settings, stripes, &origin_ids).expect("valid settings");
    let mut next = 1_000u64;
    let mut now = Duration::ZERO;
    let mut crashed: BTreeSet<NodeId> = BTreeSet::new();
    let mut dead: BTreeSet<NodeId> = BTreeSet::new();
    let mut died_at: std::collections::BTreeMap<NodeId, Duration> = Default::default();
    // Dead nodes are remembered for 16 timeouts, then become unknown.
    let remembered = settings.heartbeat_timeout * 16;
    let members = |s: &Forest| -> BTreeSet<NodeId> {
        s.stripes()[0]
            .nodes()
            .filter(|n| !n.origin)
            .map(|n| n.id)
            .collect()
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
                let parents = pick(&live, reporter).map(|r| (r, all_parents(&s, r)));
                if let Some((r, parents)) = parents
                    && !parents.is_empty()
                {
                    let p = parents[parent % parents.len()];
                    let out = s.report_unreachable(r, p, now).expect("report");
                    for d in &out.dead {
                        dead.insert(*d);
                        died_at.insert(*d, now);
                        crashed.remove(d);
                    }
                    // In each stripe: moved off the parent, unless it is an
                    // origin, or it is the primary and no slot was free within
                    // the depth bound (as shallow, for a node with a subtree).
                    for stripe in s.stripes() {
                        if let Some(after) = stripe.node(r) {
                            let origin = stripe.node(p).is_some_and(|n| n.origin);
                            let kept_primary = after.parents.first() == Some(&p);
                            prop_assert!(!after.parents.contains(&p) || origin || kept_primary);
                        }
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
                        prop_assert!(all_parents(&s, id).is_empty());
                    }
                }
            }
            Op::Tick { advance_ms } => {
                now += Duration::from_millis(u64::from(advance_ms));
                for &id in &live {
                    if !crashed.contains(&id) {
                        let frac = s.stripes()[0].node(id).map_or(0.0, |n| n.progress);
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
                for n in s.stripes().iter().flat_map(|st| st.nodes()) {
                    for p in &n.parents {
                        prop_assert!(!dead.contains(p), "{p} is dead but parent of {}", n.id);
                    }
                }
                // A crashed member silent for longer than the timeout is gone.
                for &c in &crashed {
                    if let Some(n) = s.stripes()[0].node(c) {
                        prop_assert!(now <= n.last_seen + settings.heartbeat_timeout);
                    }
                }
            }
        }
        if let Err(e) = s.check_invariants() {
            return Err(TestCaseError::fail(format!(
                "after {op:?} ({stripes} stripes): {e}"
            )));
        }
    }
    Ok(s)
}

fn snapshot(s: &Forest) -> Vec<(NodeId, Vec<NodeId>, u32)> {
    s.stripes()
        .iter()
        .flat_map(|st| st.nodes())
        .map(|n| (n.id, n.parents, n.depth))
        .collect()
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
        (settings, origins, stripes) in settings(),
        ops in prop::collection::vec(op(40), 1..400),
    ) {
        let a = run(settings, origins, stripes, &ops)?;
        // Same events, same decisions: nothing depends on hash order or luck.
        let b = run(settings, origins, stripes, &ops)?;
        prop_assert_eq!(snapshot(&a), snapshot(&b));
        prop_assert_eq!(a.stats(), b.stats());
    }

    #[test]
    fn restore_keeps_saved_parents(
        (settings, origins, stripes) in settings(),
        ops in prop::collection::vec(op(40), 1..300),
    ) {
        let s = run(settings, origins, stripes, &ops)?;
        let saved: Vec<SavedMember> = s.stripes()[0]
            .nodes()
            .filter(|n| !n.origin)
            .map(|n| SavedMember {
                id: n.id,
                rack: n.rack.clone(),
                home: s.home(n.id).expect("a member has a home"),
                lent: s.lent(n.id),
                parents: s.parents(n.id).expect("member"),
                complete: n.complete,
                epoch: s.epoch(n.id).expect("member"),
            })
            .collect();
        let origin_ids: Vec<NodeId> = (0..origins).map(NodeId).collect();
        let later = Duration::from_secs(1_000);
        let r = Forest::restore(settings, stripes, &origin_ids, saved.clone(), later)
            .expect("restore");
        if let Err(e) = r.check_invariants() {
            return Err(TestCaseError::fail(e.to_string()));
        }
        for n in &saved {
            let now_parents = r.parents(n.id).expect("restored");
            prop_assert_eq!(r.home(n.id), Some(n.home));
            for (now_list, saved_list) in now_parents.iter().zip(&n.parents) {
                prop_assert!(now_list.starts_with(saved_list), "{:?} -> {:?}", saved_list, now_list);
            }
            prop_assert_eq!(r.lent(n.id), n.lent.clone());
            if now_parents == n.parents {
                prop_assert_eq!(r.epoch(n.id), Some(n.epoch));
            }
            // Nobody is declared dead before one full timeout after restore.
            prop_assert_eq!(r.stripes()[0].node(n.id).map(|i| i.last_seen), Some(later));
        }
        let mut r2 = r.clone();
        let out = r2.tick(later + settings.heartbeat_timeout);
        prop_assert!(out.dead.is_empty());
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x5eed_2026),
        ..ProptestConfig::default()
    })]

    /// After any events, once enough members joined, no host is interior in
    /// two stripes: deaths may leave a stripe short of relays (it borrows
    /// followers), and its next relays take the lent ones' places back.
    #[test]
    fn forests_give_lent_relays_back(
        (settings, origins, stripes) in settings(),
        ops in prop::collection::vec(op(40), 1..300),
    ) {
        let stripes = stripes.max(2);
        let settings = Settings { fanout: settings.fanout.max(stripes + 1), ..settings };
        let mut f = run(settings, origins, stripes, &ops)?;
        let now = Duration::from_secs(100_000);
        let first = 1_000_000u64;
        let more = u64::from(stripes * (stripes + 1)) * 4;
        for id in first..first + more {
            f.join(NodeId(id), None, now).expect("join");
        }
        prop_assert!(f.check_invariants().is_ok());
        prop_assert_eq!(f.interior_in_several(), 0);
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
        (settings, origins, stripes) in settings(),
        ops in prop::collection::vec(op(300), 2_000..2_600),
    ) {
        let s = run(settings, origins, stripes, &ops)?;
        prop_assert!(s.len() > 1_000, "only {} nodes", s.len());
    }
}
