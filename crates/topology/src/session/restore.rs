//! Rebuilding a session after a restart from saved members.
//!
//! Saved parents are kept where they still satisfy the rules; the rest are
//! chosen afresh (and get a new epoch). Primaries are restored from the roots
//! down, so a saved parent that is gone, full or part of a cycle is replaced;
//! then saved secondaries, shallow members first; then short lists are filled.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use super::{Node, SavedNode, Session, Stats, TopologyError};
use crate::NodeId;
use crate::settings::Settings;

impl Session {
    /// Rebuilds a session after a restart from saved members. Saved parents
    /// are kept where they still satisfy the rules; the rest are chosen
    /// afresh (and get a new epoch). Every member counts as seen at `now`,
    /// so nobody is declared dead before one full heartbeat timeout.
    pub fn restore(
        settings: Settings,
        origins: &[NodeId],
        saved: Vec<SavedNode>,
        now: Duration,
    ) -> Result<Self, TopologyError> {
        let mut s = Self::new(settings, origins)?;
        let mut by_id: BTreeMap<NodeId, SavedNode> = BTreeMap::new();
        for n in saved {
            if !s.nodes.contains_key(&n.id) {
                by_id.insert(n.id, n);
            }
        }
        let mut children_of: BTreeMap<NodeId, Vec<NodeId>> = BTreeMap::new();
        let mut unplaced: BTreeSet<NodeId> = BTreeSet::new();
        for (&id, n) in &by_id {
            let rack = n.rack.as_deref().map(|r| s.intern(r));
            let mut node = Node::new(rack, false, now);
            node.epoch = n.epoch;
            node.relay = n.relay || n.lent;
            node.borrowed = n.lent && !n.relay;
            if node.borrowed {
                s.lent.insert(id);
            }
            if !node.relay {
                s.non_relays += 1;
            }
            s.nodes.insert(id, node);
            s.set_deadline(id, now);
            if n.complete {
                if let Some(node) = s.nodes.get_mut(&id) {
                    node.complete = true;
                    node.floating = false;
                }
                s.place(id, None);
                continue;
            }
            unplaced.insert(id);
            if let Some(&p) = n.parents.first() {
                children_of.entry(p).or_default().push(id);
            }
        }
        let mut queue: VecDeque<NodeId> = s
            .nodes
            .iter()
            .filter(|(_, n)| n.is_root())
            .map(|(&id, _)| id)
            .collect();
        loop {
            while let Some(p) = queue.pop_front() {
                for c in children_of.remove(&p).unwrap_or_default() {
                    let free = s
                        .nodes
                        .get(&p)
                        .is_some_and(|n| n.children.len() < s.capacity(n));
                    if free && unplaced.remove(&c) {
                        s.attach(c, p, None);
                        queue.push_back(c);
                    }
                }
            }
            // Saved parent gone, full, or a cycle: choose afresh.
            let Some(next) = unplaced.pop_first() else {
                break;
            };
            let rack = s.nodes.get(&next).and_then(|n| n.rack);
            let target = s
                .pick_primary(rack, None, None, Some(next), &[])
                .or_else(|| s.borrow(None, Some(next)))
                .or_else(|| origins.first().copied());
            if let Some(t) = target {
                s.attach(next, t, None);
                queue.push_back(next);
            }
        }
        // Secondaries, shallow members first so that depths are final.
        let mut order: Vec<(u32, NodeId)> = s
            .nodes
            .iter()
            .filter(|(_, n)| !n.is_root())
            .map(|(&id, n)| (n.depth, id))
            .collect();
        order.sort_unstable();
        let want = s.secondaries_wanted();
        for &(_, id) in &order {
            let saved_secs = by_id
                .get(&id)
                .map(|n| n.parents.iter().skip(1).copied().collect::<Vec<_>>())
                .unwrap_or_default();
            for sec in saved_secs {
                let len = s.nodes.get(&id).map_or(0, |n| n.secondaries.len());
                let has_room = s
                    .nodes
                    .get(&sec)
                    .is_some_and(|n| n.sec_children.len() < s.secondary_capacity(n));
                let dup = s
                    .nodes
                    .get(&id)
                    .is_some_and(|n| n.secondaries.contains(&sec));
                if len < want && has_room && !dup && s.secondary_ok(id, sec) {
                    s.link_secondary(id, sec);
                }
            }
        }
        // Only then fill short lists, so that no fill takes a slot a saved
        // link needed.
        for &(_, id) in &order {
            s.fill_secondaries(id);
        }
        s.rebalance();
        // Keep saved epochs where the list survived; bump the others.
        s.touched.clear();
        s.created.clear();
        for (id, saved) in &by_id {
            if let Some(n) = s.nodes.get_mut(id)
                && n.parent_list() != saved.parents
            {
                n.epoch += 1;
            }
        }
        s.stats = Stats::default();
        Ok(s)
    }
}
