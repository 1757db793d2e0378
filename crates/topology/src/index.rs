//! Ordered indices of nodes with free parent slots, so that choosing a parent
//! costs O(log N) instead of a scan of the session.
//!
//! ```text
//!   any:  depth ─► {(load, node)}          load = children already served
//!   rack: (rack, depth) ─► {(load, node)}
//! ```
//!
//! Sets are ordered by load, then node id, so the least loaded candidate comes
//! first and ties break the same way on every run (no hash order anywhere).

use std::collections::{BTreeMap, BTreeSet};

use crate::NodeId;

/// One entry: how many children the node already has, and the node.
pub(crate) type Slot = (usize, NodeId);

/// Nodes that can take one more child of some kind, by depth and by rack.
#[derive(Debug, Default, Clone)]
pub(crate) struct SlotIndex {
    any: BTreeMap<u32, BTreeSet<Slot>>,
    rack: BTreeMap<(u32, u32), BTreeSet<Slot>>,
}

impl SlotIndex {
    /// Adds `node` at `depth` with `load` children.
    pub(crate) fn insert(&mut self, depth: u32, rack: Option<u32>, load: usize, node: NodeId) {
        self.any.entry(depth).or_default().insert((load, node));
        if let Some(r) = rack {
            self.rack
                .entry((r, depth))
                .or_default()
                .insert((load, node));
        }
    }

    /// Removes the entry that [`SlotIndex::insert`] added with the same arguments.
    pub(crate) fn remove(&mut self, depth: u32, rack: Option<u32>, load: usize, node: NodeId) {
        if let Some(set) = self.any.get_mut(&depth) {
            set.remove(&(load, node));
            if set.is_empty() {
                self.any.remove(&depth);
            }
        }
        if let Some(r) = rack
            && let Some(set) = self.rack.get_mut(&(r, depth))
        {
            set.remove(&(load, node));
            if set.is_empty() {
                self.rack.remove(&(r, depth));
            }
        }
    }

    /// Candidates at `depth`, least loaded first.
    pub(crate) fn at(&self, depth: u32) -> impl Iterator<Item = NodeId> + '_ {
        self.any
            .get(&depth)
            .into_iter()
            .flat_map(|s| s.iter().map(|&(_, n)| n))
    }

    /// Candidates at `depth` in `rack`, least loaded first.
    pub(crate) fn at_rack(&self, rack: u32, depth: u32) -> impl Iterator<Item = NodeId> + '_ {
        self.rack
            .get(&(rack, depth))
            .into_iter()
            .flat_map(|s| s.iter().map(|&(_, n)| n))
    }

    /// Depths that have at least one candidate, shallowest first.
    pub(crate) fn depths(&self) -> impl DoubleEndedIterator<Item = u32> + '_ {
        self.any.keys().copied()
    }

    /// Every entry, for the invariant check.
    pub(crate) fn entries(&self) -> BTreeSet<(u32, Slot)> {
        self.any
            .iter()
            .flat_map(|(&d, s)| s.iter().map(move |&e| (d, e)))
            .collect()
    }

    /// Every rack entry, for the invariant check.
    pub(crate) fn rack_entries(&self) -> BTreeSet<((u32, u32), Slot)> {
        self.rack
            .iter()
            .flat_map(|(&k, s)| s.iter().map(move |&e| (k, e)))
            .collect()
    }
}
