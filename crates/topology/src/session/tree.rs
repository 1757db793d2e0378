//! The tree's primitives, which placement, repair and the events build on.
//!
//! - **lookups**: a node's capacity (k, or the origins' fan-out), whether a
//!   node descends from another, the trunk node above a node, refusals for
//!   unknown, dead and origin nodes, rack labels as numbers.
//! - **indices**: the free-slot indices (primary and secondary) and the
//!   members by depth follow every change of a node; the heartbeat deadlines
//!   follow its heartbeats.
//! - **edges**: float a node off its primary parent, attach it under another
//!   (depth and branch recomputed in its subtree), link and unlink secondaries;
//!   each remembers the parent list the event started with.
//!
//! Nothing here chooses a parent; the choices are in `placement.rs`.

use std::collections::VecDeque;
use std::time::Duration;

use super::{Node, Session, TopologyError};
use crate::NodeId;

impl Session {
    // ----- lookups -----

    /// The most primary children `n` may have: k, or the origins' fan-out;
    /// none for a follower.
    pub(super) fn capacity(&self, n: &Node) -> usize {
        if !n.relay {
            return 0;
        }
        let k = if n.origin {
            self.settings.origin_fanout
        } else {
            self.settings.fanout
        };
        usize::try_from(k).unwrap_or(usize::MAX)
    }

    /// The most secondary children `n` may have: k(p - 1), none for a follower.
    pub(super) fn secondary_capacity(&self, n: &Node) -> usize {
        if n.relay {
            self.settings.secondary_capacity()
        } else {
            0
        }
    }

    pub(super) fn secondaries_wanted(&self) -> usize {
        usize::try_from(self.settings.parents.saturating_sub(1)).unwrap_or(0)
    }

    pub(super) fn lookup(&self, id: NodeId) -> Result<&Node, TopologyError> {
        match self.nodes.get(&id) {
            Some(n) => Ok(n),
            None if self.tombstones.contains_key(&id) => Err(TopologyError::Dead(id)),
            None => Err(TopologyError::UnknownNode(id)),
        }
    }

    pub(super) fn check_member(&self, id: NodeId) -> Result<(), TopologyError> {
        if self.lookup(id)?.origin {
            return Err(TopologyError::Origin(id));
        }
        Ok(())
    }

    pub(super) fn intern(&mut self, rack: &str) -> u32 {
        if let Some(&r) = self.racks.get(rack) {
            return r;
        }
        let r = u32::try_from(self.rack_names.len()).unwrap_or(u32::MAX);
        self.racks.insert(rack.to_owned(), r);
        self.rack_names.push(rack.to_owned());
        r
    }

    /// Whether `c` is `top` or below it, walking primary parents up from `c`.
    pub(super) fn descends_from(&self, c: NodeId, top: NodeId) -> bool {
        let mut cur = Some(c);
        let mut steps = 0usize;
        while let Some(id) = cur {
            if id == top {
                return true;
            }
            steps += 1;
            if steps > self.nodes.len() {
                return true; // a cycle: never attach there
            }
            cur = self.nodes.get(&id).and_then(|n| n.primary);
        }
        false
    }

    /// The depth-1 (trunk) node above `id`, if `id` is deeper than that.
    fn trunk_of(&self, id: NodeId) -> Option<NodeId> {
        let mut cur = self.nodes.get(&id)?.primary;
        let mut steps = 0usize;
        while let Some(c) = cur {
            let n = self.nodes.get(&c)?;
            if n.depth == 1 && !n.is_root() {
                return Some(c);
            }
            steps += 1;
            if steps > self.nodes.len() {
                return None;
            }
            cur = n.primary;
        }
        None
    }

    // ----- indices -----

    pub(super) fn unindex(&mut self, id: NodeId) {
        let Some(n) = self.nodes.get(&id) else { return };
        if n.floating {
            return;
        }
        if n.children.len() < self.capacity(n) {
            self.primary_slots
                .remove(n.depth, n.rack, n.children.len(), id);
        }
        if n.sec_children.len() < self.secondary_capacity(n) {
            self.secondary_slots
                .remove(n.depth, n.rack, n.sec_children.len(), id);
        }
        if n.primary.is_some() {
            let (depth, follower) = (n.depth, !n.relay);
            remove_from(&mut self.by_depth, depth, id);
            if follower {
                remove_from(&mut self.followers, depth, id);
            }
        }
    }

    pub(super) fn reindex(&mut self, id: NodeId) {
        let Some(n) = self.nodes.get(&id) else { return };
        if n.floating {
            return;
        }
        if n.children.len() < self.capacity(n) {
            self.primary_slots
                .insert(n.depth, n.rack, n.children.len(), id);
        }
        if n.sec_children.len() < self.secondary_capacity(n) {
            self.secondary_slots
                .insert(n.depth, n.rack, n.sec_children.len(), id);
        }
        if n.primary.is_some() {
            self.by_depth.entry(n.depth).or_default().insert(id);
            if !n.relay {
                self.followers.entry(n.depth).or_default().insert(id);
            }
        }
    }

    pub(super) fn set_deadline(&mut self, id: NodeId, now: Duration) {
        let timeout = self.settings.heartbeat_timeout;
        let Some(n) = self.nodes.get_mut(&id) else {
            return;
        };
        if n.origin {
            return;
        }
        self.deadlines.remove(&(n.deadline, id));
        n.last_seen = n.last_seen.max(now);
        n.deadline = n.last_seen.saturating_add(timeout);
        self.deadlines.insert((n.deadline, id));
    }

    // ----- edges -----

    /// Remembers `id`'s parent list as it was before this event.
    pub(super) fn touch(&mut self, id: NodeId) {
        if !self.touched.contains_key(&id)
            && let Some(n) = self.nodes.get(&id)
        {
            self.touched.insert(id, n.parent_list());
        }
    }

    /// Detaches `id` from its primary parent and from every index.
    pub(super) fn float(&mut self, id: NodeId) {
        self.touch(id);
        self.unindex(id);
        let Some(n) = self.nodes.get_mut(&id) else {
            return;
        };
        n.floating = true;
        if let Some(p) = n.primary.take() {
            self.unindex(p);
            if let Some(pn) = self.nodes.get_mut(&p) {
                pn.children.remove(&id);
            }
            self.reindex(p);
        }
    }

    /// Attaches floating `id` under `parent` and recomputes positions in its
    /// subtree. Returns the nodes whose depth or branch changed.
    pub(super) fn attach(&mut self, id: NodeId, parent: NodeId, label: Option<u64>) -> Vec<NodeId> {
        self.touch(id);
        self.unindex(parent);
        if let Some(pn) = self.nodes.get_mut(&parent) {
            pn.children.insert(id);
        }
        self.reindex(parent);
        let mut was_secondary = false;
        if let Some(n) = self.nodes.get_mut(&id) {
            n.primary = Some(parent);
            n.floating = false;
            was_secondary = n.secondaries.contains(&parent);
        }
        let mut moved = self.place(id, label);
        // Below a new trunk node, the subtree may not keep it as a secondary
        // (in a new branch every node is in `moved` and checked anyway).
        if let Some(t) = self.trunk_of(id) {
            let users: Vec<NodeId> = self
                .nodes
                .get(&t)
                .map(|n| n.sec_children.iter().copied().collect())
                .unwrap_or_default();
            for u in users {
                if self.descends_from(u, id) && !moved.contains(&u) {
                    moved.push(u);
                }
            }
        }
        if was_secondary {
            // The new primary was a secondary: drop it there; the caller's
            // fix_after_move refills the list.
            self.unlink_secondary(id, parent);
            if !moved.contains(&id) {
                moved.push(id);
            }
        }
        moved
    }

    /// Recomputes depth and branch of `top` (already linked, not indexed or
    /// indexed) and of its subtree where they changed; indexes them.
    pub(super) fn place(&mut self, top: NodeId, label: Option<u64>) -> Vec<NodeId> {
        let mut moved = Vec::new();
        let mut queue = VecDeque::from([(top, label)]);
        while let Some((id, lbl)) = queue.pop_front() {
            let Some(n) = self.nodes.get(&id) else {
                continue;
            };
            let (old_depth, old_branch) = (n.depth, n.branch);
            let (depth, branch) = if n.is_root() {
                (0, 0)
            } else {
                let parent = n.primary.and_then(|p| self.nodes.get(&p));
                match parent {
                    None => (old_depth, old_branch),
                    Some(pn) if pn.depth == 0 => (1, 0),
                    Some(pn) if pn.depth == 1 => {
                        let b = match lbl {
                            Some(b) => b,
                            None if old_depth == 2 && old_branch != 0 => old_branch,
                            None => {
                                self.next_branch += 1;
                                self.next_branch
                            }
                        };
                        (2, b)
                    }
                    Some(pn) => (pn.depth + 1, pn.branch),
                }
            };
            let changed = (depth, branch) != (old_depth, old_branch);
            if id != top && !changed {
                continue;
            }
            self.unindex(id);
            if let Some(n) = self.nodes.get_mut(&id) {
                n.depth = depth;
                n.branch = branch;
            }
            self.reindex(id);
            if changed {
                moved.push(id);
                if let Some(n) = self.nodes.get(&id) {
                    queue.extend(n.children.iter().map(|&c| (c, None)));
                }
            }
        }
        moved
    }

    pub(super) fn link_secondary(&mut self, z: NodeId, s: NodeId) {
        self.touch(z);
        self.unindex(s);
        if let Some(sn) = self.nodes.get_mut(&s) {
            sn.sec_children.insert(z);
        }
        self.reindex(s);
        if let Some(zn) = self.nodes.get_mut(&z) {
            zn.secondaries.push(s);
        }
    }

    pub(super) fn unlink_secondary(&mut self, z: NodeId, s: NodeId) {
        self.touch(z);
        self.unindex(s);
        if let Some(sn) = self.nodes.get_mut(&s) {
            sn.sec_children.remove(&z);
        }
        self.reindex(s);
        if let Some(zn) = self.nodes.get_mut(&z) {
            zn.secondaries.retain(|&x| x != s);
        }
    }
}

/// Removes `id` from the set at `depth`, dropping the set when it empties.
fn remove_from(
    map: &mut std::collections::BTreeMap<u32, std::collections::BTreeSet<NodeId>>,
    depth: u32,
    id: NodeId,
) {
    if let Some(set) = map.get_mut(&depth) {
        set.remove(&id);
        if set.is_empty() {
            map.remove(&depth);
        }
    }
}
