//! Where a node goes: its primary parent, its secondary parents, and the leaf
//! that takes a removed node's place.
//!
//! - **primary**: the shallowest node with a free slot (fewest children
//!   first), preferring the node's rack within that depth.
//! - **secondaries**: up to p - 1, from other branches, or from the trunk or
//!   the roots, but never from the node's own ancestors, and strictly
//!   shallower than the node; checked again and refilled whenever the node or
//!   one of its secondaries moves.
//! - **replacement**: the deepest leaf (same rack as the removed node when
//!   one is near the front of the index).
//!
//! Every choice scans the ordered slot indices a bounded number of entries
//! per depth, so it costs O(log N) and breaks ties the same way on every run.

use std::collections::BTreeSet;

use super::Session;
use crate::NodeId;

/// How many candidates of one depth a bounded scan looks at before giving up
/// on that depth; keeps a choice O(log N) when exclusions hide candidates.
const SCAN_LIMIT: usize = 48;

impl Session {
    /// Whether `s` may be a secondary parent of `z`: strictly shallower, not
    /// in `z`'s branch (roots and the trunk are in none), not one of its
    /// ancestors (its primary included), not avoided.
    pub(super) fn secondary_ok(&self, z: NodeId, s: NodeId) -> bool {
        let (Some(zn), Some(sn)) = (self.nodes.get(&z), self.nodes.get(&s)) else {
            return false;
        };
        z != s
            && !zn.is_root()
            && zn.primary.is_some()
            && zn.primary != Some(s)
            && !sn.floating
            && sn.depth < zn.depth
            && (sn.is_root() || sn.branch != zn.branch)
            && !zn.avoid.contains(&s)
            && (sn.is_root() || !self.descends_from(z, s))
    }

    /// Drops `z`'s secondaries that broke a rule, then fills up to p - 1.
    pub(super) fn fix_secondaries(&mut self, z: NodeId) {
        let Some(zn) = self.nodes.get(&z) else { return };
        let current = zn.secondaries.clone();
        let root = zn.is_root();
        for s in current {
            if root || !self.secondary_ok(z, s) {
                self.unlink_secondary(z, s);
            }
        }
        if !root {
            self.fill_secondaries(z);
        }
    }

    pub(super) fn fill_secondaries(&mut self, z: NodeId) {
        let want = self.secondaries_wanted();
        while self
            .nodes
            .get(&z)
            .is_some_and(|n| n.secondaries.len() < want)
        {
            match self.pick_secondary(z) {
                Some(s) => self.link_secondary(z, s),
                None => break,
            }
        }
    }

    /// After nodes changed depth or branch: their own secondaries, and those
    /// of nodes using them as secondaries, are checked and refilled.
    pub(super) fn fix_after_move(&mut self, moved: &[NodeId]) {
        for &m in moved {
            self.fix_secondaries(m);
        }
        for &m in moved {
            let users: Vec<NodeId> = self
                .nodes
                .get(&m)
                .map(|n| n.sec_children.iter().copied().collect())
                .unwrap_or_default();
            for u in users {
                if !self.secondary_ok(u, m) {
                    self.fix_secondaries(u);
                }
            }
        }
    }

    /// The best primary parent: `prefer` depth first if given, then the
    /// shallowest depth with room (not deeper than `max_depth`); the rack's
    /// least-loaded node first within a depth. Never `exclude` or a node
    /// below it, never one of `avoid`.
    pub(super) fn pick_primary(
        &self,
        rack: Option<u32>,
        prefer: Option<u32>,
        max_depth: Option<u32>,
        exclude: Option<NodeId>,
        avoid: &[NodeId],
    ) -> Option<NodeId> {
        let ok =
            |c: NodeId| !avoid.contains(&c) && exclude.is_none_or(|x| !self.descends_from(c, x));
        let at_level = |depth: u32, limit: usize| -> Option<NodeId> {
            if let Some(r) = rack
                && let Some(c) = self
                    .primary_slots
                    .at_rack(r, depth)
                    .take(limit)
                    .find(|&c| ok(c))
            {
                return Some(c);
            }
            self.primary_slots.at(depth).take(limit).find(|&c| ok(c))
        };
        for limit in [SCAN_LIMIT, usize::MAX] {
            if let Some(p) = prefer
                && let Some(c) = at_level(p, limit)
            {
                return Some(c);
            }
            for depth in self.primary_slots.depths() {
                if max_depth.is_some_and(|m| depth > m) {
                    break;
                }
                if Some(depth) == prefer {
                    continue;
                }
                if let Some(c) = at_level(depth, limit) {
                    return Some(c);
                }
            }
        }
        None
    }

    /// A free slot at `depth` in `branch` (so that moving `id` there changes
    /// no depth or branch below it), if one is near the front of the index.
    pub(super) fn pick_in_branch(
        &self,
        depth: Option<u32>,
        branch: Option<u64>,
        id: NodeId,
        avoid: &[NodeId],
    ) -> Option<NodeId> {
        let (depth, branch) = (depth?, branch?);
        if depth == 0 {
            return None;
        }
        self.primary_slots.at(depth).take(SCAN_LIMIT).find(|&c| {
            !avoid.contains(&c)
                && self.nodes.get(&c).is_some_and(|n| n.branch == branch)
                && !self.descends_from(c, id)
        })
    }

    /// A secondary parent for `z`: same rack first, deeper levels first
    /// (roots last: the origin is the parent of last resort), and a branch not
    /// yet among `z`'s parents when one exists. Bounded scans: best effort.
    fn pick_secondary(&self, z: NodeId) -> Option<NodeId> {
        let zn = self.nodes.get(&z)?;
        if zn.depth == 0 || zn.is_root() {
            return None;
        }
        let used: BTreeSet<u64> = zn
            .secondaries
            .iter()
            .filter_map(|s| self.nodes.get(s))
            .filter(|n| !n.is_root())
            .map(|n| n.branch)
            .collect();
        let eligible = |c: NodeId| !zn.secondaries.contains(&c) && self.secondary_ok(z, c);
        let mut fallback = None;
        let mut consider = |c: NodeId| -> Option<NodeId> {
            if !eligible(c) {
                return None;
            }
            let fresh = self
                .nodes
                .get(&c)
                .is_some_and(|n| n.is_root() || !used.contains(&n.branch));
            if fresh {
                return Some(c);
            }
            fallback.get_or_insert(c);
            None
        };
        if let Some(r) = zn.rack {
            for depth in (1..zn.depth).rev() {
                for c in self.secondary_slots.at_rack(r, depth).take(SCAN_LIMIT) {
                    if let Some(c) = consider(c) {
                        return Some(c);
                    }
                }
            }
        }
        for depth in (0..zn.depth).rev() {
            for c in self.secondary_slots.at(depth).take(SCAN_LIMIT) {
                if let Some(c) = consider(c) {
                    return Some(c);
                }
            }
        }
        fallback
    }

    /// A relay leaf deeper than `depth` to take a removed node's place: from
    /// the deepest level, same rack first.
    pub(super) fn pick_replacement(&self, depth: u32, rack: Option<u32>) -> Option<NodeId> {
        let (&deepest, set) = self.by_depth.last_key_value()?;
        if deepest <= depth {
            return None;
        }
        let mut first = None;
        for &c in set.iter().take(SCAN_LIMIT) {
            let Some(n) = self.nodes.get(&c) else {
                continue;
            };
            if !n.relay || !n.children.is_empty() {
                continue;
            }
            if rack.is_some() && n.rack == rack {
                return Some(c);
            }
            first.get_or_insert(c);
        }
        first.or_else(|| self.relay_leaf_below(depth))
    }
}
