//! Relays and followers: one stripe's tree of a forest.
//!
//! In a tree every member may have children. In one stripe of a forest
//! (`forest.rs`) only the stripe's own *relays* may; the other members are
//! *followers*: always leaves, never anyone's primary or secondary parent, so
//! a host forwards its own stripe and only receives the others. A tree of R
//! relays with fan-out k has depth `ceil(log_k R) + 1`, and its followers hang
//! one level below it: that is the stripe's depth bound.
//!
//! Keeping the relays near the top is what keeps that bound:
//!
//! - **a relay joins**: it takes back a *borrowed* relay's place (below), or
//!   else the place of the shallowest follower if that is no deeper than the
//!   free slot it would get, adopting the node it displaced as a child;
//! - **a follower joins** at the deepest free slot of the stripe's own
//!   relays (the upper ones are left to relays that join later), else of a
//!   lent one; when no relay has one,
//!   the shallowest follower is *borrowed*: made a relay of this stripe too
//!   (interior in two stripes, as few as the member count allows), until a
//!   relay of the stripe joins and takes its place and its children;
//! - **repair**: a removed relay's place goes to a relay leaf (a follower
//!   cannot adopt children); orphans with nowhere to go borrow a follower;
//! - **rebalance**: when the deepest member has no free slot two levels up,
//!   a relay swaps places with a shallower follower, and a follower borrows
//!   one.

use super::Session;
use crate::NodeId;

impl Session {
    /// Finds the new floating member `id` its place (see the module header).
    pub(super) fn place_joiner(&mut self, id: NodeId) {
        let Some(n) = self.nodes.get(&id) else { return };
        let (rack, relay) = (n.rack, n.relay);
        // A lent relay uploads two stripes: it takes only what the stripe's
        // own relays have no room for.
        let lent: Vec<NodeId> = self.lent.iter().copied().collect();
        let slot = if relay {
            self.pick_primary(rack, None, None, None, &lent)
                .or_else(|| self.pick_primary(rack, None, None, None, &[]))
        } else {
            // Followers fill the relays' tree from the bottom, leaving the
            // upper slots to relays that join later (which then need not
            // displace anyone, whose list would change mid-storm).
            self.pick_deepest(rack, &lent)
                .or_else(|| self.pick_deepest(rack, &[]))
        };
        if relay {
            if let Some(b) = self.returnable_lent() {
                self.take_over(id, b);
                return;
            }
            let slot_depth = slot.and_then(|p| self.nodes.get(&p)).map(|n| n.depth);
            if let Some((depth, f)) = self.shallowest_follower(None, None, false)
                && slot_depth.is_none_or(|d| depth <= d)
            {
                self.take_over(id, f);
                return;
            }
        }
        let target = slot
            .or_else(|| self.borrow(None, None))
            .or_else(|| self.any_origin());
        if let Some(t) = target {
            let moved = self.attach(id, t, None);
            self.fix_after_move(&moved);
        }
    }

    /// The deepest node with a free slot (the rack's least loaded first),
    /// not one of `avoid`; origins last.
    fn pick_deepest(&self, rack: Option<u32>, avoid: &[NodeId]) -> Option<NodeId> {
        for depth in self.primary_slots.depths().rev() {
            if let Some(r) = rack
                && let Some(c) = self
                    .primary_slots
                    .at_rack(r, depth)
                    .find(|c| !avoid.contains(c))
            {
                return Some(c);
            }
            if let Some(c) = self.primary_slots.at(depth).find(|c| !avoid.contains(c)) {
                return Some(c);
            }
        }
        None
    }

    /// The shallowest follower at most `max_depth` deep and not below
    /// `exclude` (and, `to_lend`, not lent to another stripe), with its depth.
    pub(super) fn shallowest_follower(
        &self,
        max_depth: Option<u32>,
        exclude: Option<NodeId>,
        to_lend: bool,
    ) -> Option<(u32, NodeId)> {
        for (&depth, set) in &self.followers {
            if max_depth.is_some_and(|m| depth > m) {
                break;
            }
            if let Some(&f) = set.iter().find(|&&f| {
                exclude.is_none_or(|x| !self.descends_from(f, x))
                    && !(to_lend && self.lent_elsewhere.contains(&f))
            }) {
                return Some((depth, f));
            }
        }
        None
    }

    /// Makes the shallowest follower (within `max_depth`, not below
    /// `exclude`) a relay of this stripe, lent by its own; returns it.
    pub(super) fn borrow(
        &mut self,
        max_depth: Option<u32>,
        exclude: Option<NodeId>,
    ) -> Option<NodeId> {
        let (_, f) = self
            .shallowest_follower(max_depth, exclude, true)
            .or_else(|| self.shallowest_follower(max_depth, exclude, false))?;
        self.unindex(f);
        if let Some(n) = self.nodes.get_mut(&f) {
            n.relay = true;
            n.borrowed = true;
        }
        self.non_relays -= 1;
        self.lent.insert(f);
        self.reindex(f);
        Some(f)
    }

    /// A lent relay a joining relay may replace: the shallowest one that
    /// fits under its replacement (fewer than k children) or has a free slot
    /// elsewhere to go to.
    fn returnable_lent(&self) -> Option<NodeId> {
        let k = usize::try_from(self.settings.fanout).unwrap_or(usize::MAX);
        let (_, _, b) = self
            .lent
            .iter()
            .filter_map(|&b| self.nodes.get(&b).map(|n| (n, b)))
            .filter(|(n, _)| !n.is_root())
            .map(|(n, b)| (n.depth, n.children.len(), b))
            .min()?;
        let fits = self.nodes.get(&b).is_some_and(|n| n.children.len() < k);
        // Its subtree goes to its replacement, so a slot below it will do.
        (fits || self.pick_primary(None, None, None, None, &[b]).is_some()).then_some(b)
    }

    /// Floating relay `x` takes member `y`'s place (a member, not a root): `y`'s parent becomes
    /// `x`'s, `y`'s children become `x`'s, and `y` (a follower again if it
    /// was lent) becomes `x`'s child, or goes to a free slot if `x` is full.
    pub(super) fn take_over(&mut self, x: NodeId, y: NodeId) {
        let Some(yn) = self.nodes.get(&y) else { return };
        let Some(g) = yn.primary else { return };
        let label = (yn.depth == 2).then_some(yn.branch);
        let orphans: Vec<NodeId> = yn.children.iter().copied().collect();
        let lent = yn.borrowed;
        let users: Vec<NodeId> = if lent {
            yn.sec_children.iter().copied().collect()
        } else {
            Vec::new()
        };
        for &u in &users {
            self.unlink_secondary(u, y);
        }
        self.float(y);
        for &c in &orphans {
            self.float(c);
        }
        if let Some(n) = self.nodes.get_mut(&y) {
            // `x` takes y's branch label; y gets its place's.
            n.branch = 0;
        }
        if lent {
            if let Some(n) = self.nodes.get_mut(&y) {
                n.relay = false;
                n.borrowed = false;
            }
            self.non_relays += 1;
            self.lent.remove(&y);
        }
        let mut moved = self.attach(x, g, label);
        for &c in &orphans {
            moved.extend(self.attach(c, x, None));
        }
        let rack = self.nodes.get(&y).and_then(|n| n.rack);
        let room = self
            .nodes
            .get(&x)
            .is_some_and(|n| n.children.len() < self.capacity(n));
        let target = if room {
            Some(x)
        } else {
            self.pick_primary(rack, None, None, None, &[])
                .or_else(|| self.borrow(None, None))
        };
        if let Some(t) = target {
            moved.extend(self.attach(y, t, None));
        }
        moved.extend([x, y]);
        self.fix_after_move(&moved);
        for u in users {
            self.fix_secondaries(u);
        }
    }

    /// The depth bound is broken by `leaf` at `deepest` and no free slot is
    /// two levels up: a relay swaps with a follower that high, a follower
    /// borrows one. Returns whether anything moved.
    pub(super) fn lift(&mut self, leaf: NodeId, deepest: u32) -> bool {
        let Some(n) = self.nodes.get(&leaf) else {
            return false;
        };
        let high = Some(deepest.saturating_sub(2));
        if n.relay {
            let Some((_, f)) = self.shallowest_follower(high, Some(leaf), false) else {
                return false;
            };
            self.float(leaf);
            self.take_over(leaf, f);
            true
        } else {
            let Some(f) = self.borrow(high, Some(leaf)) else {
                return false;
            };
            self.float(leaf);
            let mut moved = self.attach(leaf, f, None);
            moved.push(leaf);
            self.fix_after_move(&moved);
            true
        }
    }

    /// A relay without children deeper than `depth`, deepest first: what
    /// replaces a removed relay when the deepest level holds only followers.
    pub(super) fn relay_leaf_below(&self, depth: u32) -> Option<NodeId> {
        for d in self.primary_slots.depths().rev() {
            if d <= depth {
                break;
            }
            if let Some(c) = self.primary_slots.at(d).next()
                && self
                    .nodes
                    .get(&c)
                    .is_some_and(|n| n.children.is_empty() && !n.is_root())
            {
                return Some(c);
            }
        }
        None
    }
}
