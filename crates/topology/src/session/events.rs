//! The events a session takes, and the rule each one keeps.
//!
//! - **join**: the shallowest node with a free slot (fewest children first),
//!   preferring the joiner's rack within that depth; then secondaries.
//! - **leave / death** of a member: it is removed and its children are
//!   re-attached (the rules are in `repair.rs`).
//! - **complete**: a member that holds the whole image becomes a root: it
//!   drops its parents and its subtree moves up.
//! - **report**: a child that cannot reach a parent is moved off it at once
//!   (same depth first; a child with a subtree is never pushed deeper for a
//!   report, it keeps the parent if no slot is as shallow); after `report_threshold` distinct reporters, or at
//!   the first report when the parent's heartbeats are older than
//!   `suspect_after`, the parent is declared dead.
//! - **tick(now)**: members whose last heartbeat is older than the timeout
//!   are dead; they are removed as above and cannot be anyone's parent after
//!   the tick returns. They must join again.
//!
//! Every event ends with [`Session::finish`], which returns the [`Outcome`].

use std::time::Duration;

use super::{Node, Outcome, Progress, Session, TopologyError};
use crate::NodeId;

/// How many parents a node remembers having reported, to avoid choosing them again.
const AVOID_MEMORY: usize = 4;
/// Dead nodes are remembered (so their heartbeats are answered "dead", not
/// "unknown") for this many heartbeat timeouts.
const TOMBSTONE_TIMEOUTS: u32 = 16;

impl Session {
    /// A member joins at `now`, optionally with a rack label.
    pub fn join(
        &mut self,
        id: NodeId,
        rack: Option<&str>,
        now: Duration,
    ) -> Result<Outcome, TopologyError> {
        self.join_as(id, rack, true, now)
    }

    /// A member joins as a relay (it may have children) or as a follower
    /// (always a leaf: one stripe of a forest; see `relay.rs`).
    pub(crate) fn join_as(
        &mut self,
        id: NodeId,
        rack: Option<&str>,
        relay: bool,
        now: Duration,
    ) -> Result<Outcome, TopologyError> {
        if self.nodes.contains_key(&id) {
            return Err(TopologyError::AlreadyMember(id));
        }
        let rack = rack.map(|r| self.intern(r));
        if let Some(died) = self.tombstones.remove(&id) {
            self.tombstone_order.remove(&(died, id));
        }
        let mut node = Node::new(rack, false, now);
        node.relay = relay;
        if !relay {
            self.non_relays += 1;
        }
        self.nodes.insert(id, node);
        self.created.insert(id);
        self.set_deadline(id, now);
        self.place_joiner(id);
        self.stats.joins += 1;
        self.rebalance();
        Ok(self.finish())
    }

    /// A member leaves gracefully; its children are re-attached.
    pub fn leave(&mut self, id: NodeId, now: Duration) -> Result<Outcome, TopologyError> {
        self.check_member(id)?;
        self.remove_node(id, now, false);
        self.stats.leaves += 1;
        self.rebalance();
        Ok(self.finish())
    }

    /// A member's heartbeat at `now`, with its progress. A member that reports
    /// a complete image becomes a root.
    pub fn heartbeat(
        &mut self,
        id: NodeId,
        now: Duration,
        progress: Progress,
    ) -> Result<Outcome, TopologyError> {
        if !progress.fraction.is_finite() || !(0.0..=1.0).contains(&progress.fraction) {
            return Err(TopologyError::Progress(progress.fraction));
        }
        let node = self.lookup(id)?;
        if node.origin {
            return Ok(self.finish());
        }
        let promote = progress.complete && !node.complete;
        let short = !node.is_root() && node.secondaries.len() < self.secondaries_wanted();
        self.set_deadline(id, now);
        if let Some(n) = self.nodes.get_mut(&id) {
            n.progress = if progress.complete {
                1.0
            } else {
                progress.fraction
            };
        }
        if promote {
            self.float(id);
            if let Some(n) = self.nodes.get_mut(&id) {
                n.complete = true;
                n.floating = false;
            }
            let moved = self.place(id, None);
            self.fix_after_move(&moved);
            self.stats.promotions += 1;
        } else if short {
            self.fill_secondaries(id);
        }
        Ok(self.finish())
    }

    /// `reporter` could not reach `parent`, one of its parents.
    pub fn report_unreachable(
        &mut self,
        reporter: NodeId,
        parent: NodeId,
        now: Duration,
    ) -> Result<Outcome, TopologyError> {
        self.check_member(reporter)?;
        let Some(rn) = self.nodes.get(&reporter) else {
            return Err(TopologyError::UnknownNode(reporter));
        };
        let is_primary = rn.primary == Some(parent);
        if !is_primary && !rn.secondaries.contains(&parent) {
            // Stale: the parent is gone or no longer this node's parent.
            return Ok(self.finish());
        }
        self.stats.reports += 1;
        let window = self.settings.heartbeat_timeout;
        let threshold = usize::try_from(self.settings.report_threshold).unwrap_or(usize::MAX);
        let suspect_after = self.settings.suspect_after;
        if let Some(pn) = self.nodes.get_mut(&parent)
            && !pn.origin
        {
            pn.reporters.insert(reporter, now);
            pn.reporters
                .retain(|_, &mut t| now.saturating_sub(t) <= window);
            let stale = now.saturating_sub(pn.last_seen) >= suspect_after;
            if stale || pn.reporters.len() >= threshold {
                self.remove_node(parent, now, true);
                self.rebalance();
                return Ok(self.finish());
            }
        }
        if let Some(rn) = self.nodes.get_mut(&reporter)
            && !rn.avoid.contains(&parent)
        {
            if rn.avoid.len() >= AVOID_MEMORY {
                rn.avoid.remove(0);
            }
            rn.avoid.push(parent);
        }
        if is_primary {
            let rack = self.nodes.get(&reporter).and_then(|n| n.rack);
            let level = self.nodes.get(&parent).map(|n| n.depth);
            let avoid = self
                .nodes
                .get(&reporter)
                .map(|n| n.avoid.clone())
                .unwrap_or_default();
            let branch = self.nodes.get(&reporter).map(|n| n.branch);
            let leaf = self
                .nodes
                .get(&reporter)
                .is_some_and(|n| n.children.is_empty());
            // Never push a subtree deeper for one report: no slot as shallow
            // as the old parent means the child keeps it (it still has its
            // secondaries and the origin) until more reports or the timeout.
            // A leaf may go deeper, but not past the depth bound: rebalancing
            // would only bring it back, perhaps under the parent it reported.
            let bound = self.depth_bound();
            let max = if leaf {
                Some(bound.saturating_sub(1))
            } else {
                level
            };
            let target = self
                .pick_in_branch(level, branch, reporter, &avoid)
                .or_else(|| self.pick_primary(rack, level, max, Some(reporter), &avoid))
                .or_else(|| self.pick_primary(rack, level, max, Some(reporter), &[parent]));
            if let Some(t) = target {
                self.float(reporter);
                let moved = self.attach(reporter, t, None);
                self.fix_after_move(&moved);
            }
            self.fix_secondaries(reporter);
        } else {
            self.unlink_secondary(reporter, parent);
            self.fill_secondaries(reporter);
        }
        self.rebalance();
        Ok(self.finish())
    }

    /// Advances time to `now`: members silent for longer than the heartbeat
    /// timeout are declared dead and their children re-attached.
    pub fn tick(&mut self, now: Duration) -> Outcome {
        let timeout = self.settings.heartbeat_timeout;
        while let Some(&(deadline, id)) = self.deadlines.first() {
            // Dead strictly after the timeout: last_seen + timeout < now.
            if deadline >= now {
                break;
            }
            self.remove_node(id, now, true);
        }
        let keep = timeout.saturating_mul(TOMBSTONE_TIMEOUTS);
        while let Some(&(t, id)) = self.tombstone_order.first() {
            if now.saturating_sub(t) <= keep {
                break;
            }
            self.tombstone_order.remove(&(t, id));
            self.tombstones.remove(&id);
        }
        self.rebalance();
        self.finish()
    }

    /// Removes `id` as dead (it died in another stripe of a forest).
    pub(crate) fn declare_dead(&mut self, id: NodeId, now: Duration) -> Outcome {
        if self.nodes.get(&id).is_some_and(|n| !n.origin) {
            self.remove_node(id, now, true);
            self.rebalance();
        }
        self.finish()
    }

    /// Ends an event: bumps epochs of changed lists and counts the changes.
    fn finish(&mut self) -> Outcome {
        let touched = std::mem::take(&mut self.touched);
        let created = std::mem::take(&mut self.created);
        let mut changed = Vec::new();
        for (id, old) in touched {
            let Some(n) = self.nodes.get_mut(&id) else {
                continue;
            };
            let new = n.parent_list();
            let is_new = created.contains(&id);
            if is_new || new != old {
                n.epoch += 1;
                changed.push(id);
                if !is_new && !n.is_root() {
                    self.stats.parent_changes += 1;
                }
            }
        }
        Outcome {
            changed,
            dead: std::mem::take(&mut self.dead),
            removed: std::mem::take(&mut self.removed),
        }
    }
}
