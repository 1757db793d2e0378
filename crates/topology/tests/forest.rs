//! The forest's own promises, beyond the rules every stripe keeps
//! (`properties.rs` checks those after every event on forests too).

#![allow(missing_docs)]

use std::time::Duration;

use virtman_topology::{Forest, NodeId, Progress, Settings, stripe_of};

fn settings(fanout: u32, parents: u32) -> Settings {
    Settings {
        fanout,
        parents,
        ..Settings::default()
    }
}

fn grow(f: &mut Forest, from: u64, to: u64, mut after: impl FnMut(&Forest, u64)) {
    for i in from..=to {
        let rack = format!("rack{}", i % 3);
        f.join(NodeId(i), Some(&rack), Duration::ZERO)
            .expect("join");
        f.check_invariants().expect("invariants");
        after(f, i);
    }
}

/// With a fan-out above the stripe count the stripes' own relays have room
/// for every member once there are S(S + 1) of them: no host is interior in
/// two trees. With fan-out S exactly, the relays' slots fall short by up to
/// S - 2 when the members do not divide evenly, and that many are lent.
#[test]
fn once_there_are_enough_members_no_host_is_interior_in_two_stripes() {
    for stripes in 2..=4u32 {
        for parents in [1, 2] {
            let enough = u64::from(stripes * (stripes + 1));
            let mut f = Forest::new(settings(stripes + 1, parents), stripes, &[NodeId(0)]).unwrap();
            grow(&mut f, 1, 300, |f, n| {
                if n >= enough {
                    assert_eq!(f.interior_in_several(), 0, "S={stripes} p={parents} N={n}");
                }
            });
            let mut f = Forest::new(settings(stripes, parents), stripes, &[NodeId(0)]).unwrap();
            grow(&mut f, 1, 300, |f, n| {
                if n >= enough {
                    let lent = f.interior_in_several();
                    assert!(
                        lent <= stripes as usize - 2,
                        "S={stripes} k=S N={n}: {lent}"
                    );
                }
            });
        }
    }
}

/// Every member relays exactly its home stripe, the homes are balanced,
/// and each stripe's origin feeds one head, so each chunk leaves it once.
#[test]
fn each_member_relays_one_stripe_and_the_origin_feeds_one_head_per_stripe() {
    let stripes = 4;
    let mut f = Forest::new(settings(5, 2), stripes, &[NodeId(0)]).unwrap();
    grow(&mut f, 1, 1_000, |_, _| {});
    let mut homes = vec![0usize; stripes as usize];
    for id in (1..=1_000).map(NodeId) {
        let home = f.home(id).expect("member");
        homes[home as usize] += 1;
        for (s, tree) in f.stripes().iter().enumerate() {
            let n = tree.node(id).expect("in every stripe");
            let interior = n.children + n.secondary_children > 0;
            assert!(
                s == home as usize || !interior,
                "{id} is interior in stripe {s}, home {home}"
            );
            assert!(s != home as usize || n.relay);
        }
    }
    assert_eq!(homes, vec![250; 4]);
    for tree in f.stripes() {
        assert_eq!(tree.node(NodeId(0)).expect("origin").children, 1);
        // Relays on top: 250 relays of fan-out 5 (1, 5, 25, 125, 94 by
        // depth) reach depth 5, their followers one more.
        assert!(tree.max_depth() <= 6, "depth {}", tree.max_depth());
        assert_eq!(tree.depth_bound(), 6);
    }
    assert_eq!(stripe_of(9, stripes), 1);
    for bad in [0, virtman_topology::MAX_STRIPES + 1] {
        assert_eq!(
            Forest::new(settings(4, 2), bad, &[NodeId(0)]).unwrap_err(),
            virtman_topology::TopologyError::Stripes(bad)
        );
    }
    assert_eq!(f.stripe_of(12), 0);
}

/// A relay's death repairs every stripe it was in, the dead one is
/// nobody's parent anywhere, and a member declared dead by reports in one
/// stripe is gone from all.
#[test]
fn deaths_are_forest_wide() {
    let mut f = Forest::new(settings(3, 2), 2, &[NodeId(0)]).unwrap();
    grow(&mut f, 1, 40, |_, _| {});
    // The relay with the most children in stripe 0.
    let busiest = f.stripes()[0]
        .nodes()
        .filter(|n| !n.origin)
        .max_by_key(|n| n.children)
        .map(|n| n.id)
        .expect("members");
    let children: Vec<NodeId> = f.stripes()[0]
        .nodes()
        .filter(|n| n.parents.first() == Some(&busiest))
        .map(|n| n.id)
        .collect();
    assert!(children.len() >= 2);
    let now = Duration::from_secs(1);
    let mut out = f.report_unreachable(children[0], busiest, now).unwrap();
    out.dead.extend(
        f.report_unreachable(children[1], busiest, now)
            .unwrap()
            .dead,
    );
    assert_eq!(out.dead, vec![busiest]);
    assert!(!f.contains(busiest));
    for tree in f.stripes() {
        assert!(!tree.contains(busiest));
        assert!(tree.nodes().all(|n| !n.parents.contains(&busiest)));
    }
    f.check_invariants().unwrap();
    // The rest heartbeat and stay; a silent one dies in every stripe at once.
    let later = now + Duration::from_secs(3);
    for id in (1..=40)
        .map(NodeId)
        .filter(|&id| id != busiest && id != NodeId(7))
    {
        f.heartbeat(id, later, Progress::default()).unwrap();
    }
    let out = f.tick(later + Duration::from_secs(2));
    assert_eq!(out.dead, vec![NodeId(7)]);
    f.check_invariants().unwrap();
}
