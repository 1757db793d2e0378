//! One image's session: the relay tree, its events and its repair rules.
//!
//! Every member has one *primary* parent, its place in the tree, and up to
//! p - 1 *secondary* parents in other subtrees. The primary edges form a forest
//! rooted at the *roots*: the origins, and members that reported a complete
//! image (those are as good as an origin). Fan-out and depth refer to the
//! primary tree; every parent, primary or secondary, sits strictly shallower
//! than its child, so the parent graph can have no cycle.
//!
//! An origin takes at most `origin_fanout` children (1 by default: one relay
//! head, so a chunk leaves the origin about once); every other node takes k.
//! The roots' children form the *trunk*; each child of a trunk node starts a
//! *branch*, and secondaries come from other branches, or from the trunk or
//! the roots, but never from the node's own ancestors.
//!
//! ```text
//!   depth 0      origin ─────────────── complete node   (roots)
//!                  |                        |
//!   depth 1        H        <- trunk: the relay head (branch 0)
//!               /  |  \
//!   depth 2    A   B   C    <- each depth-2 node starts a branch
//!             / \   \   \
//!   depth 3  a1  a2  b1  c1       a1: primary A, secondary B or C, else a
//!                                 root (never in its own branch A, never
//!                                 an ancestor, never deeper)
//! ```
//!
//! Rules and how they are kept:
//! - **join**: the shallowest node with a free slot (fewest children first),
//!   preferring the joiner's rack within that depth; then secondaries.
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
//! Every event returns an [`Outcome`]: whose parent list changed (and each
//! changed list gets a new epoch), who died, who is gone. A change of an
//! existing member's list counts in [`Stats::parent_changes`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use crate::NodeId;
use crate::index::SlotIndex;
use crate::settings::{Settings, SettingsError};

mod placement;
mod repair;
mod tree;

/// How many parents a node remembers having reported, to avoid choosing them again.
const AVOID_MEMORY: usize = 4;
/// Dead nodes are remembered (so their heartbeats are answered "dead", not
/// "unknown") for this many heartbeat timeouts.
const TOMBSTONE_TIMEOUTS: u32 = 16;

/// Why an event was refused. A refused event changes nothing.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TopologyError {
    /// The settings are not usable.
    #[error("invalid settings: {0}")]
    Settings(#[from] SettingsError),
    /// A session was created without an origin.
    #[error("a session needs at least one origin")]
    NoOrigin,
    /// The node joined before and has not left or died since.
    #[error("node {0} is already in the session")]
    AlreadyMember(NodeId),
    /// The node is not in the session.
    #[error("node {0} is not in the session")]
    UnknownNode(NodeId),
    /// The node was declared dead; it must join again.
    #[error("node {0} was declared dead and must join again")]
    Dead(NodeId),
    /// The event does not apply to origins (they cannot leave or report).
    #[error("node {0} is an origin")]
    Origin(NodeId),
    /// The progress fraction is not a number between 0 and 1.
    #[error("progress must be a fraction between 0 and 1, got {0}")]
    Progress(f64),
}

/// What a heartbeat says about the node's cache of the image.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Progress {
    /// Fraction of the image's chunks the node holds, 0 to 1.
    pub fraction: f64,
    /// The node holds every chunk: it can serve as a root.
    pub complete: bool,
}

/// The decisions one event produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Nodes whose parent list is new or changed (read it with
    /// [`Session::parents`]); each got a new epoch. Includes joined nodes.
    pub changed: Vec<NodeId>,
    /// Nodes this event declared dead.
    pub dead: Vec<NodeId>,
    /// Nodes no longer in the session (dead or left).
    pub removed: Vec<NodeId>,
}

/// Counters since the session was created (or restored).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Joins accepted.
    pub joins: u64,
    /// Graceful leaves.
    pub leaves: u64,
    /// Nodes declared dead (timeout or reports).
    pub deaths: u64,
    /// Reports of an unreachable parent that were acted on.
    pub reports: u64,
    /// Times an existing member's parent list changed.
    pub parent_changes: u64,
    /// Moves made only to keep the depth bound.
    pub rebalance_moves: u64,
    /// Members that became roots by completing the image.
    pub promotions: u64,
}

/// A read-only view of one node.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeInfo {
    /// The node.
    pub id: NodeId,
    /// Origins are permanent roots registered with the image.
    pub origin: bool,
    /// The member reported a complete image and is now a root.
    pub complete: bool,
    /// Hops from a root along primary parents.
    pub depth: u32,
    /// Primary parent first, then secondaries; empty for roots.
    pub parents: Vec<NodeId>,
    /// Primary (tree) children.
    pub children: usize,
    /// Nodes that use this one as a secondary parent.
    pub secondary_children: usize,
    /// Last reported fraction of chunks held.
    pub progress: f64,
    /// Time of the last heartbeat (or of the join, or of a restore).
    pub last_seen: Duration,
    /// Changes whenever the parent list changes.
    pub epoch: u64,
    /// The rack label given at join.
    pub rack: Option<String>,
}

/// A node as persisted by a driver, for [`Session::restore`].
#[derive(Debug, Clone, PartialEq)]
pub struct SavedNode {
    /// The node.
    pub id: NodeId,
    /// Its rack label.
    pub rack: Option<String>,
    /// Its parent list when saved, primary first.
    pub parents: Vec<NodeId>,
    /// It held the complete image.
    pub complete: bool,
    /// Its parent-list epoch when saved.
    pub epoch: u64,
}

#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub(crate) rack: Option<u32>,
    pub(crate) origin: bool,
    pub(crate) complete: bool,
    /// Detached during a repair: in no index, primary `None`, depth stale.
    pub(crate) floating: bool,
    pub(crate) depth: u32,
    /// Label of the depth-2 subtree (branch) the node is in; 0 for roots
    /// and the trunk (depth 1).
    pub(crate) branch: u64,
    pub(crate) primary: Option<NodeId>,
    pub(crate) secondaries: Vec<NodeId>,
    pub(crate) children: BTreeSet<NodeId>,
    pub(crate) sec_children: BTreeSet<NodeId>,
    pub(crate) progress: f64,
    pub(crate) last_seen: Duration,
    pub(crate) deadline: Duration,
    pub(crate) epoch: u64,
    pub(crate) avoid: Vec<NodeId>,
    pub(crate) reporters: BTreeMap<NodeId, Duration>,
}

impl Node {
    fn new(rack: Option<u32>, origin: bool, now: Duration) -> Self {
        Self {
            rack,
            origin,
            complete: false,
            floating: !origin,
            depth: 0,
            branch: 0,
            primary: None,
            secondaries: Vec::new(),
            children: BTreeSet::new(),
            sec_children: BTreeSet::new(),
            progress: 0.0,
            last_seen: now,
            deadline: now,
            epoch: 0,
            avoid: Vec::new(),
            reporters: BTreeMap::new(),
        }
    }

    pub(crate) fn is_root(&self) -> bool {
        self.origin || self.complete
    }

    pub(crate) fn parent_list(&self) -> Vec<NodeId> {
        self.primary
            .iter()
            .chain(self.secondaries.iter())
            .copied()
            .collect()
    }
}

/// One image's relay tree. See the module documentation for the rules.
#[derive(Debug, Clone)]
pub struct Session {
    pub(crate) settings: Settings,
    pub(crate) nodes: BTreeMap<NodeId, Node>,
    pub(crate) primary_slots: SlotIndex,
    pub(crate) secondary_slots: SlotIndex,
    /// Members (non-roots) by depth: the deepest level is the last key.
    pub(crate) by_depth: BTreeMap<u32, BTreeSet<NodeId>>,
    deadlines: BTreeSet<(Duration, NodeId)>,
    tombstones: BTreeMap<NodeId, Duration>,
    tombstone_order: BTreeSet<(Duration, NodeId)>,
    racks: BTreeMap<String, u32>,
    rack_names: Vec<String>,
    next_branch: u64,
    stats: Stats,
    // Per-event scratch: parent lists before the event, nodes created, dead, removed.
    touched: BTreeMap<NodeId, Vec<NodeId>>,
    created: BTreeSet<NodeId>,
    dead: Vec<NodeId>,
    removed: Vec<NodeId>,
}

impl Session {
    /// A session whose roots are `origins` (at least one).
    pub fn new(settings: Settings, origins: &[NodeId]) -> Result<Self, TopologyError> {
        settings.validate()?;
        if origins.is_empty() {
            return Err(TopologyError::NoOrigin);
        }
        let mut s = Self {
            settings,
            nodes: BTreeMap::new(),
            primary_slots: SlotIndex::default(),
            secondary_slots: SlotIndex::default(),
            by_depth: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            tombstones: BTreeMap::new(),
            tombstone_order: BTreeSet::new(),
            racks: BTreeMap::new(),
            rack_names: Vec::new(),
            next_branch: 1,
            stats: Stats::default(),
            touched: BTreeMap::new(),
            created: BTreeSet::new(),
            dead: Vec::new(),
            removed: Vec::new(),
        };
        for &o in origins {
            if s.nodes.contains_key(&o) {
                return Err(TopologyError::AlreadyMember(o));
            }
            s.nodes.insert(o, Node::new(None, true, Duration::ZERO));
            s.reindex(o);
        }
        Ok(s)
    }

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
        let cap = s.settings.secondary_capacity();
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
                    .is_some_and(|n| n.sec_children.len() < cap);
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

    // ----- events -----

    /// A member joins at `now`, optionally with a rack label.
    pub fn join(
        &mut self,
        id: NodeId,
        rack: Option<&str>,
        now: Duration,
    ) -> Result<Outcome, TopologyError> {
        if self.nodes.contains_key(&id) {
            return Err(TopologyError::AlreadyMember(id));
        }
        let rack = rack.map(|r| self.intern(r));
        let Some(parent) = self.pick_primary(rack, None, None, None, &[]) else {
            // Unreachable: a finite tree always has a node with a free slot.
            return Err(TopologyError::UnknownNode(id));
        };
        if let Some(died) = self.tombstones.remove(&id) {
            self.tombstone_order.remove(&(died, id));
        }
        self.nodes.insert(id, Node::new(rack, false, now));
        self.created.insert(id);
        self.set_deadline(id, now);
        let moved = self.attach(id, parent, None);
        self.fix_after_move(&moved);
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
            let bound = self.settings.depth_bound(self.nodes.len());
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

    // ----- queries -----

    /// The settings the session runs with.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Counters since creation or restore.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Live nodes, origins included.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Always false in practice: a session keeps its origins.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Live members (not origins).
    pub fn members(&self) -> usize {
        self.nodes.values().filter(|n| !n.origin).count()
    }

    /// Whether `id` is a live node of the session.
    pub fn contains(&self, id: NodeId) -> bool {
        self.nodes.contains_key(&id)
    }

    /// Whether `id` was declared dead (and has not joined again).
    pub fn is_dead(&self, id: NodeId) -> bool {
        self.tombstones.contains_key(&id)
    }

    /// The node's parents, primary first; `None` if it is not in the session.
    pub fn parents(&self, id: NodeId) -> Option<Vec<NodeId>> {
        self.nodes.get(&id).map(Node::parent_list)
    }

    /// The node's parent-list epoch.
    pub fn epoch(&self, id: NodeId) -> Option<u64> {
        self.nodes.get(&id).map(|n| n.epoch)
    }

    /// The deepest member's depth (0 when there are only roots).
    pub fn max_depth(&self) -> u32 {
        self.by_depth.keys().next_back().copied().unwrap_or(0)
    }

    /// The depth bound for the current number of live nodes.
    pub fn depth_bound(&self) -> u32 {
        self.settings.depth_bound(self.nodes.len())
    }

    /// One node's view.
    pub fn node(&self, id: NodeId) -> Option<NodeInfo> {
        self.nodes.get(&id).map(|n| self.info(id, n))
    }

    /// Every live node's view, by id.
    pub fn nodes(&self) -> impl Iterator<Item = NodeInfo> + '_ {
        self.nodes.iter().map(|(&id, n)| self.info(id, n))
    }

    fn info(&self, id: NodeId, n: &Node) -> NodeInfo {
        NodeInfo {
            id,
            origin: n.origin,
            complete: n.complete,
            depth: n.depth,
            parents: n.parent_list(),
            children: n.children.len(),
            secondary_children: n.sec_children.len(),
            progress: if n.origin { 1.0 } else { n.progress },
            last_seen: n.last_seen,
            epoch: n.epoch,
            rack: n
                .rack
                .and_then(|r| self.rack_names.get(usize::try_from(r).ok()?))
                .cloned(),
        }
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

#[cfg(test)]
mod tests;
