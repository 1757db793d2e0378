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
//! Every event returns an [`Outcome`]: whose parent list changed (and each
//! changed list gets a new epoch), who died, who is gone. A change of an
//! existing member's list counts in [`Stats::parent_changes`].
//!
//! The rules, in brief: a joiner takes the shallowest free slot; a removed
//! member's place goes to the deepest leaf, which adopts its children; after
//! every event the tree is rebalanced to depth `ceil(log_k N) + 1`; a member
//! that completes the image becomes a root; a report moves the child off the
//! parent and enough reports kill it; a tick declares the silent dead. Each
//! rule is spelled out in the header of the file that keeps it.
//!
//! The parts, one file each:
//! - `events.rs`: join, leave, heartbeat, report, tick, and the rule each
//!   one keeps;
//! - `placement.rs`: where a node goes (primary, secondaries, replacement);
//! - `repair.rs`: a node's removal (replace it with a leaf, reattach a
//!   root's orphans) and the rebalance to the depth bound;
//! - `tree.rs`: the primitives the others build on (lookups, index upkeep,
//!   edges);
//! - `restore.rs`: [`Session::restore`], rebuilding after a restart;
//! - this module: the public types, [`Session`] itself and its queries.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::NodeId;
use crate::index::SlotIndex;
use crate::settings::{Settings, SettingsError};

mod events;
mod placement;
mod relay;
mod repair;
mod restore;
mod tree;

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
    /// A forest's stripe count is 0 or above [`crate::forest::MAX_STRIPES`].
    #[error("stripes must be between 1 and {max}, got {0}", max = crate::forest::MAX_STRIPES)]
    Stripes(u32),
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
    /// The node may have children (always, in a tree; in one stripe of a
    /// forest, only the stripe's own relays and borrowed ones).
    pub relay: bool,
    /// A relay of another stripe lent to this one because its own relays had
    /// no free slot (see `relay.rs`).
    pub borrowed: bool,
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
    /// It may have children (see [`NodeInfo::relay`]).
    pub relay: bool,
    /// It is a follower lent as a relay (see [`NodeInfo::borrowed`]).
    pub lent: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub(crate) rack: Option<u32>,
    /// May take children (primary or secondary); a follower (not a relay)
    /// is always a leaf.
    pub(crate) relay: bool,
    /// A follower made a relay because no relay had a free slot.
    pub(crate) borrowed: bool,
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
            relay: true,
            borrowed: false,
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
    /// Followers (members that are not relays) by depth, shallowest first.
    pub(crate) followers: BTreeMap<u32, BTreeSet<NodeId>>,
    /// Live nodes that are not relays (followers and roots that were).
    pub(crate) non_relays: usize,
    /// Followers lent to this stripe as relays (see `relay.rs`).
    pub(crate) lent: BTreeSet<NodeId>,
    /// Members lent to another stripe of the forest: not lent to this one
    /// too (one host must not relay three stripes); set by the forest.
    pub(crate) lent_elsewhere: BTreeSet<NodeId>,
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
            followers: BTreeMap::new(),
            non_relays: 0,
            lent: BTreeSet::new(),
            lent_elsewhere: BTreeSet::new(),
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

    /// The depth bound for the current number of live nodes: in a tree
    /// `ceil(log_k N) + 1`; with followers (one stripe of a forest), the
    /// relays' tree `ceil(log_k R) + 1` (R relays, roots included) and one
    /// level of followers below it.
    pub fn depth_bound(&self) -> u32 {
        if self.non_relays == 0 {
            self.settings.depth_bound(self.nodes.len())
        } else {
            self.settings
                .depth_bound(self.nodes.len() - self.non_relays)
                .saturating_add(1)
        }
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
            relay: n.relay,
            borrowed: n.borrowed,
        }
    }
}

#[cfg(test)]
mod tests;
