//! Unit tests of the session: placement, repair and events on small trees.

use super::*;

const T0: Duration = Duration::ZERO;

fn settings(fanout: u32, parents: u32) -> Settings {
    Settings {
        fanout,
        parents,
        ..Settings::default()
    }
}

fn session(fanout: u32, parents: u32, members: u64) -> Session {
    let mut s = Session::new(settings(fanout, parents), &[NodeId(0)]).expect("session");
    for i in 1..=members {
        s.join(NodeId(i), None, T0).expect("join");
    }
    s.check_invariants().expect("invariants");
    s
}

#[test]
fn joins_fill_the_tree_level_by_level() {
    let count = |s: &Session, depth: u32| s.nodes().filter(|n| n.depth == depth).count();
    // By default the origin feeds one relay head: 1 + 2 + 4 + 8 members.
    let s = session(2, 1, 15);
    assert_eq!(s.node(NodeId(0)).map(|n| n.children), Some(1));
    assert_eq!([1, 2, 3, 4].map(|d| count(&s, d)), [1, 2, 4, 8]);
    assert_eq!(s.max_depth(), 4);
    // An origin that takes k children: 2 + 4 + 8, one level less.
    let wide = Settings {
        origin_fanout: 2,
        ..settings(2, 1)
    };
    let mut s = Session::new(wide, &[NodeId(0)]).expect("session");
    for i in 1..=14 {
        s.join(NodeId(i), None, T0).expect("join");
    }
    s.check_invariants().expect("invariants");
    assert_eq!([1, 2, 3].map(|d| count(&s, d)), [2, 4, 8]);
    assert_eq!(s.max_depth(), 3);
}

#[test]
fn a_dead_nodes_children_keep_their_depth_and_only_they_change() {
    let mut s = session(2, 1, 14);
    let victim = NodeId(1);
    let info = s.node(victim).expect("victim");
    assert_eq!(info.depth, 1);
    let orphans: Vec<NodeId> = s
        .nodes()
        .filter(|n| n.parents == [victim])
        .map(|n| n.id)
        .collect();
    assert_eq!(orphans.len(), 2);
    let before: Vec<(NodeId, u32)> = orphans
        .iter()
        .map(|&o| (o, s.node(o).map_or(0, |n| n.depth)))
        .collect();
    let other_lists: Vec<(NodeId, Vec<NodeId>)> = s
        .nodes()
        .filter(|n| n.id != victim && !orphans.contains(&n.id))
        .map(|n| (n.id, n.parents))
        .collect();
    // Everyone heartbeats but the victim, which then times out.
    let later = Duration::from_secs(3);
    for i in 2..=14 {
        s.heartbeat(NodeId(i), later, Progress::default())
            .expect("heartbeat");
    }
    let out = s.tick(Duration::from_secs(4) + Duration::from_millis(1));
    assert_eq!(out.dead, vec![victim]);
    s.check_invariants().expect("invariants");
    for (o, depth) in before {
        let n = s.node(o).expect("orphan still here");
        assert_eq!(n.depth, depth, "orphan {o} kept its depth");
        assert_ne!(n.parents, vec![victim]);
    }
    // A leaf took the victim's place: it and the two orphans changed, no one else.
    let moved: Vec<NodeId> = other_lists
        .iter()
        .filter(|(id, old)| s.parents(*id).as_ref() != Some(old))
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(moved.len(), 1, "only the replacement leaf moved: {moved:?}");
    assert_eq!(s.stats().parent_changes, 3);
    assert_eq!(s.node(moved[0]).map(|n| n.depth), Some(1));
}

#[test]
fn death_is_declared_after_the_timeout_not_before() {
    let mut s = session(4, 2, 3);
    let timeout = s.settings().heartbeat_timeout;
    assert!(
        s.tick(timeout).dead.is_empty(),
        "exactly at the timeout: alive"
    );
    let out = s.tick(timeout + Duration::from_millis(1));
    assert_eq!(out.dead.len(), 3);
    assert_eq!(
        s.heartbeat(NodeId(1), timeout, Progress::default()),
        Err(TopologyError::Dead(NodeId(1)))
    );
    s.join(NodeId(1), None, timeout)
        .expect("a dead node may join again");
}

#[test]
fn same_rack_parents_are_preferred_at_equal_depth() {
    let wide = Settings {
        origin_fanout: 4,
        ..settings(4, 2)
    };
    let mut s = Session::new(wide, &[NodeId(0)]).expect("session");
    for (i, rack) in [(1, "a"), (2, "b"), (3, "c"), (4, "d")] {
        s.join(NodeId(i), Some(rack), T0).expect("join");
    }
    // Level 1 is full; each new member picks the depth-1 node of its rack.
    for (i, rack, want) in [(5, "c", 3), (6, "a", 1), (7, "c", 3), (8, "d", 4)] {
        s.join(NodeId(i), Some(rack), T0).expect("join");
        assert_eq!(
            s.parents(NodeId(i)).and_then(|p| p.first().copied()),
            Some(NodeId(want))
        );
    }
    s.check_invariants().expect("invariants");
}

#[test]
fn secondaries_come_from_another_branch_and_the_origin_last() {
    let mut s = Session::new(settings(2, 2), &[NodeId(0), NodeId(100)]).expect("session");
    for i in 1..=12 {
        s.join(NodeId(i), None, T0).expect("join");
    }
    s.check_invariants().expect("invariants");
    for n in s.nodes().filter(|n| !n.origin) {
        assert_eq!(n.parents.len(), 2, "{:?}", n);
        if n.depth >= 2 {
            // A deep node's secondary is a member of another branch, not an origin.
            let sec = s.node(n.parents[1]).expect("secondary");
            assert!(
                !sec.origin,
                "{:?} uses an origin while members were free",
                n
            );
        }
    }
}

#[test]
fn a_complete_member_becomes_a_root_and_its_subtree_moves_up() {
    let mut s = session(2, 2, 14);
    let n1 = s.node(NodeId(1)).expect("node");
    assert_eq!(n1.depth, 1);
    let child = s
        .nodes()
        .find(|n| n.parents.first() == Some(&NodeId(1)))
        .expect("child");
    let full = Progress {
        fraction: 1.0,
        complete: true,
    };
    s.heartbeat(NodeId(1), T0, full).expect("heartbeat");
    s.check_invariants().expect("invariants");
    assert_eq!(s.parents(NodeId(1)), Some(vec![]));
    assert_eq!(s.node(child.id).map(|n| n.depth), Some(child.depth - 1));
    // A new member can attach to the complete node as to an origin.
    assert_eq!(s.stats().promotions, 1);
}

#[test]
fn a_report_moves_the_child_and_two_reports_kill_the_parent() {
    // Head 1, then 2 and 3 under it, then 4 and 5 under 2, 6 under 3.
    let mut s = session(2, 1, 6);
    let parent = NodeId(2);
    let kids: Vec<NodeId> = s
        .nodes()
        .filter(|n| n.parents == [parent])
        .map(|n| n.id)
        .collect();
    assert_eq!(kids.len(), 2);
    s.heartbeat(parent, Duration::from_secs(1), Progress::default())
        .expect("fresh");
    s.report_unreachable(kids[0], parent, Duration::from_secs(1))
        .expect("report");
    assert!(
        s.contains(parent),
        "one report from a fresh parent only moves the child"
    );
    assert!(!s.parents(kids[0]).is_some_and(|p| p.contains(&parent)));
    s.check_invariants().expect("invariants");
    let out = s
        .report_unreachable(kids[1], parent, Duration::from_secs(1))
        .expect("report");
    assert_eq!(out.dead, vec![parent]);
    s.check_invariants().expect("invariants");
}

#[test]
fn a_report_never_leaves_a_node_below_the_depth_bound() {
    // Found by a random property run: a leaf that had reported both the
    // origin and its next parent was pushed under a depth-2 node, and
    // rebalancing could not lift it because the only free slots high
    // enough were the parents it had reported.
    let wide = Settings {
        origin_fanout: 4,
        ..settings(4, 1)
    };
    let mut s = Session::new(wide, &[NodeId(0)]).expect("session");
    let t = Duration::from_millis(10);
    for i in [1, 2] {
        s.join(NodeId(i), None, T0).expect("join");
    }
    s.leave(NodeId(2), T0).expect("leave");
    s.join(NodeId(3), None, T0).expect("join");
    // 1 reports the origin: it moves under 3.
    s.report_unreachable(NodeId(1), NodeId(0), t)
        .expect("report");
    s.join(NodeId(4), None, t).expect("join");
    s.report_unreachable(NodeId(4), NodeId(0), t)
        .expect("report");
    s.check_invariants().expect("invariants");
    // Now 1 reports 3: the only free slots within the bound are the ones
    // it reported, so it goes back to one of them rather than deeper.
    s.report_unreachable(NodeId(1), NodeId(3), t)
        .expect("report");
    s.check_invariants().expect("invariants");
    assert!(s.node(NodeId(1)).expect("node").depth <= s.depth_bound());
}

#[test]
fn a_report_on_a_silent_parent_kills_it_at_once() {
    let mut s = session(2, 1, 6);
    let parent = NodeId(1);
    let kid = s.nodes().find(|n| n.parents == [parent]).expect("child").id;
    let out = s
        .report_unreachable(kid, parent, Duration::from_secs(3))
        .expect("report");
    assert_eq!(out.dead, vec![parent]);
}

#[test]
fn bad_events_are_refused_without_change() {
    let mut s = session(4, 2, 3);
    let before: Vec<NodeInfo> = s.nodes().collect();
    assert_eq!(
        s.join(NodeId(1), None, T0),
        Err(TopologyError::AlreadyMember(NodeId(1)))
    );
    assert_eq!(
        s.leave(NodeId(77), T0),
        Err(TopologyError::UnknownNode(NodeId(77)))
    );
    assert_eq!(
        s.leave(NodeId(0), T0),
        Err(TopologyError::Origin(NodeId(0)))
    );
    let nan = Progress {
        fraction: f64::NAN,
        complete: false,
    };
    assert!(matches!(
        s.heartbeat(NodeId(1), T0, nan),
        Err(TopologyError::Progress(_))
    ));
    let big = Progress {
        fraction: 1.5,
        complete: false,
    };
    assert_eq!(
        s.heartbeat(NodeId(1), T0, big),
        Err(TopologyError::Progress(1.5))
    );
    assert_eq!(s.nodes().collect::<Vec<_>>(), before);
    assert_eq!(
        Session::new(settings(0, 2), &[NodeId(0)]).err(),
        Some(TopologyError::Settings(SettingsError::Fanout(0)))
    );
    assert_eq!(
        Session::new(settings(2, 2), &[]).err(),
        Some(TopologyError::NoOrigin)
    );
}

#[test]
fn restore_repairs_broken_saved_state() {
    let saved = |id: u64, parents: &[u64]| SavedNode {
        id: NodeId(id),
        rack: None,
        parents: parents.iter().map(|&p| NodeId(p)).collect(),
        complete: false,
        epoch: 7,
        relay: true,
        lent: false,
    };
    // A cycle (1 <-> 2), a missing parent (3 under 99), a child of it (4),
    // a self-parent (5), and a secondary deeper than its child (6).
    let nodes = vec![
        saved(1, &[2]),
        saved(2, &[1]),
        saved(3, &[99]),
        saved(4, &[3]),
        saved(5, &[5]),
        saved(6, &[0, 4]),
    ];
    let s = Session::restore(settings(2, 2), &[NodeId(0)], nodes, T0).expect("restore");
    s.check_invariants().expect("invariants");
    assert_eq!(s.members(), 6);
    assert_eq!(
        s.node(NodeId(6)).map(|n| n.parents.first().copied()),
        Some(Some(NodeId(0)))
    );
    // A list that had to change gets a new epoch; others keep theirs.
    assert!(s.nodes().filter(|n| !n.origin).all(|n| n.epoch >= 7));
}

#[test]
fn leaves_rebalance_to_the_depth_bound() {
    let mut s = session(2, 2, 62);
    for i in (1..=62).step_by(2) {
        s.leave(NodeId(i), T0).expect("leave");
        s.check_invariants().expect("invariants");
        assert!(s.max_depth() <= s.depth_bound());
    }
}
