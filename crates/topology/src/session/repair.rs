//! Repair: what happens to the tree when a node goes, and how the depth bound
//! is kept.
//!
//! - **leave / death** of a member X with children: the deepest leaf L (same
//!   rack as X when one is near the front) takes X's place under X's parent
//!   and adopts X's children, so the orphans keep their depth, branch and
//!   siblings and only their primary changes (the origin's relay head is
//!   replaced the same way). A root's orphans go to another
//!   root's free slot, else to the shallowest free slot.
//! - **rebalance**: after every event, while the deepest member is deeper
//!   than `ceil(log_k N) + 1`, it moves to the shallowest free slot. A free
//!   slot at least two levels up always exists when the bound is broken (a
//!   counting argument on the levels above), so this ends.

use std::time::Duration;

use super::Session;
use crate::NodeId;

impl Session {
    pub(super) fn remove_node(&mut self, x: NodeId, now: Duration, died: bool) {
        let Some(xn) = self.nodes.get(&x) else { return };
        let grand = xn.primary;
        let depth = xn.depth;
        let label = xn.branch;
        let rack = xn.rack;
        let deadline = xn.deadline;
        let follower = !xn.relay;
        let users: Vec<NodeId> = xn.sec_children.iter().copied().collect();
        let secondaries = xn.secondaries.clone();
        let orphans: Vec<NodeId> = xn.children.iter().copied().collect();
        for &u in &users {
            self.unlink_secondary(u, x);
        }
        for &s in &secondaries {
            self.unlink_secondary(x, s);
        }
        self.float(x);
        for &c in &orphans {
            self.touch(c);
            self.unindex(c);
            if let Some(cn) = self.nodes.get_mut(&c) {
                cn.primary = None;
                cn.floating = true;
            }
        }
        self.deadlines.remove(&(deadline, x));
        self.nodes.remove(&x);
        self.lent.remove(&x);
        if follower {
            self.non_relays -= 1;
        }
        self.touched.remove(&x);
        self.created.remove(&x);
        self.removed.push(x);
        if died {
            self.dead.push(x);
            self.stats.deaths += 1;
            self.tombstones.insert(x, now);
            self.tombstone_order.insert((now, x));
        }
        if !orphans.is_empty() {
            match grand {
                Some(g) => self.replace_with_leaf(g, depth, label, rack, &orphans),
                None => self.reattach_orphans(&orphans),
            }
        }
        for u in users {
            self.fix_secondaries(u);
        }
    }

    /// A leaf takes the removed node's place under `g` and adopts `orphans`.
    fn replace_with_leaf(
        &mut self,
        g: NodeId,
        depth: u32,
        label: u64,
        rack: Option<u32>,
        orphans: &[NodeId],
    ) {
        let leaf = self.pick_replacement(depth, rack).or_else(|| {
            orphans.iter().copied().find(|c| {
                self.nodes
                    .get(c)
                    .is_some_and(|n| n.relay && n.children.is_empty())
            })
        });
        let Some(leaf) = leaf else {
            self.reattach_orphans(orphans);
            return;
        };
        if !orphans.contains(&leaf) {
            self.float(leaf);
        }
        let mut moved = self.attach(leaf, g, (depth == 2).then_some(label));
        for &c in orphans {
            if c != leaf {
                moved.extend(self.attach(c, leaf, None));
            }
        }
        // The leaf may now use secondaries of its old depth: check it even
        // when its position label happened not to change.
        if !moved.contains(&leaf) {
            moved.push(leaf);
        }
        self.fix_after_move(&moved);
    }

    /// Orphans of a root: another root's free slot, else the shallowest one.
    fn reattach_orphans(&mut self, orphans: &[NodeId]) {
        let mut moved = Vec::new();
        for &c in orphans {
            let rack = self.nodes.get(&c).and_then(|n| n.rack);
            let target = self
                .pick_primary(rack, None, Some(0), Some(c), &[])
                .or_else(|| self.pick_primary(rack, None, None, Some(c), &[]))
                .or_else(|| self.borrow(None, Some(c)))
                .or_else(|| self.any_origin());
            if let Some(t) = target {
                moved.extend(self.attach(c, t, None));
            }
        }
        self.fix_after_move(&moved);
    }

    pub(super) fn any_origin(&self) -> Option<NodeId> {
        self.nodes.iter().find(|(_, n)| n.origin).map(|(&id, _)| id)
    }

    /// Moves the deepest leaves up while the depth bound is broken.
    pub(super) fn rebalance(&mut self) {
        // Each move lifts a member at least one level or swaps a relay above
        // a follower; the cap only guards against a rule that would undo
        // another.
        let mut budget = self.nodes.len().saturating_mul(2).saturating_add(8);
        while budget > 0 {
            budget -= 1;
            let bound = self.depth_bound();
            let Some((&deepest, set)) = self.by_depth.last_key_value() else {
                break;
            };
            if deepest <= bound {
                break;
            }
            let Some(&leaf) = set.first() else { break };
            let (rack, avoid) = match self.nodes.get(&leaf) {
                Some(n) => (n.rack, n.avoid.clone()),
                None => break,
            };
            // The depth bound is a rule, the parents a node reported are a
            // preference: when only an avoided parent has a slot high enough,
            // the leaf goes there (it still has its secondaries, and reports
            // again if that parent is really down).
            let max = Some(deepest.saturating_sub(2));
            let target = self
                .pick_primary(rack, None, max, Some(leaf), &avoid)
                .or_else(|| self.pick_primary(rack, None, max, Some(leaf), &[]));
            match target {
                Some(target) => {
                    self.float(leaf);
                    let mut moved = self.attach(leaf, target, None);
                    if !moved.contains(&leaf) {
                        moved.push(leaf);
                    }
                    self.fix_after_move(&moved);
                }
                // With followers, the slots that high may all be theirs.
                None if self.lift(leaf, deepest) => {}
                None => break,
            }
            self.stats.rebalance_moves += 1;
        }
    }
}
