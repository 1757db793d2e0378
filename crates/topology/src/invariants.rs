//! The rules a [`Session`] must keep after every event, checked from scratch.
//!
//! Property tests call [`Session::check_invariants`] after each event; the
//! simulator may call it too. It recomputes everything the session keeps
//! incrementally (indices, child sets, depths) and compares, so it costs
//! O(N log N) and is not for the hot path.
//!
//! ```text
//!   every member ──primary──► ... ──primary──► root     (no cycle, live path)
//!   depth(parent) < depth(child) for every parent, primary or secondary
//!   children <= k (origins: origin_fanout), depth <= ceil(log_k N) + 1
//!   followers (one stripe of a forest): no children of either kind, and
//!   depth <= ceil(log_k R) + 2 with R relays
//!   depth 1 is the trunk (no branch); each depth-2 node has its own branch
//!   secondaries: outside the node's own branch, never its ancestors
//! ```

use std::collections::{BTreeMap, BTreeSet};

use crate::NodeId;
use crate::session::Session;
use crate::settings::depth_bound;

/// A broken rule, described for a test failure message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("topology invariant violated: {0}")]
pub struct InvariantViolation(pub String);

fn fail<T>(msg: String) -> Result<T, InvariantViolation> {
    Err(InvariantViolation(msg))
}

impl Session {
    /// Checks every structural rule; see the module documentation.
    pub fn check_invariants(&self) -> Result<(), InvariantViolation> {
        let s = &self.settings;
        let k = usize::try_from(s.fanout).unwrap_or(usize::MAX);
        let origin_k = usize::try_from(s.origin_fanout).unwrap_or(usize::MAX);
        let want = usize::try_from(s.parents.saturating_sub(1)).unwrap_or(0);
        let non_relays = self.nodes.values().filter(|n| !n.relay).count();
        if non_relays != self.non_relays {
            return fail(format!(
                "{non_relays} non-relays counted as {}",
                self.non_relays
            ));
        }
        let bound = if non_relays == 0 {
            depth_bound(s.fanout, self.nodes.len())
        } else {
            depth_bound(s.fanout, self.nodes.len() - non_relays) + 1
        };
        let lent: BTreeSet<NodeId> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.borrowed)
            .map(|(&id, _)| id)
            .collect();
        if lent != self.lent || self.nodes.values().any(|n| n.borrowed && !n.relay) {
            return fail("lent relays are stale".into());
        }
        let mut followers: BTreeMap<u32, BTreeSet<_>> = BTreeMap::new();
        let mut primary_slots = BTreeSet::new();
        let mut primary_rack = BTreeSet::new();
        let mut secondary_slots = BTreeSet::new();
        let mut secondary_rack = BTreeSet::new();
        let mut by_depth: BTreeMap<u32, BTreeSet<_>> = BTreeMap::new();
        let mut labels = BTreeSet::new();
        if !self.nodes.values().any(|n| n.origin) {
            return fail("no origin left".into());
        }
        for (&id, n) in &self.nodes {
            if n.floating {
                return fail(format!("{id} is left floating"));
            }
            if n.is_root() {
                if n.primary.is_some() || !n.secondaries.is_empty() {
                    return fail(format!("root {id} has parents"));
                }
                if n.depth != 0 || n.branch != 0 {
                    return fail(format!(
                        "root {id} at depth {} branch {}",
                        n.depth, n.branch
                    ));
                }
            } else {
                let Some(p) = n.primary else {
                    return fail(format!("member {id} has no primary parent"));
                };
                let Some(pn) = self.nodes.get(&p) else {
                    return fail(format!("{id}'s primary {p} is not live"));
                };
                if !pn.children.contains(&id) {
                    return fail(format!("{p} does not list child {id}"));
                }
                if n.depth != pn.depth + 1 {
                    return fail(format!(
                        "{id} depth {} under {p} depth {}",
                        n.depth, pn.depth
                    ));
                }
                if n.depth == 1 {
                    if n.branch != 0 {
                        return fail(format!("trunk node {id} has branch {}", n.branch));
                    }
                } else if n.depth == 2 {
                    if n.branch == 0 || !labels.insert(n.branch) {
                        return fail(format!("{id} has a bad or shared branch label"));
                    }
                } else if n.branch != pn.branch {
                    return fail(format!("{id} branch differs from its parent's"));
                }
                if n.depth > bound {
                    return fail(format!("{id} at depth {} > bound {bound}", n.depth));
                }
                if n.secondaries.len() > want {
                    return fail(format!("{id} has {} secondaries", n.secondaries.len()));
                }
                let mut seen = BTreeSet::new();
                for &sec in &n.secondaries {
                    let Some(sn) = self.nodes.get(&sec) else {
                        return fail(format!("{id}'s secondary {sec} is not live"));
                    };
                    if !seen.insert(sec) || sec == p || sec == id {
                        return fail(format!("{id} lists {sec} twice (primary {p})"));
                    }
                    if sn.depth >= n.depth {
                        return fail(format!("{id}'s secondary {sec} is not shallower"));
                    }
                    if !sn.is_root() && sn.branch == n.branch {
                        return fail(format!("{id}'s secondary {sec} is in its own branch"));
                    }
                    if !sn.is_root() && self.is_ancestor(sec, id) {
                        return fail(format!("{id}'s secondary {sec} is its ancestor"));
                    }
                    if !sn.sec_children.contains(&id) {
                        return fail(format!("{sec} does not list secondary child {id}"));
                    }
                }
                // A live path of primaries up to a root, without a cycle.
                let mut cur = n.primary;
                let mut steps = 0usize;
                while let Some(c) = cur {
                    steps += 1;
                    if steps > self.nodes.len() {
                        return fail(format!("cycle above {id}"));
                    }
                    let Some(cn) = self.nodes.get(&c) else {
                        return fail(format!("dead ancestor {c} above {id}"));
                    };
                    cur = cn.primary;
                    if cur.is_none() && !cn.is_root() {
                        return fail(format!("{id}'s path ends at non-root {c}"));
                    }
                }
                by_depth.entry(n.depth).or_default().insert(id);
                if !n.relay {
                    followers.entry(n.depth).or_default().insert(id);
                }
            }
            let (most, cap) = match (n.relay, n.origin) {
                (false, _) => (0, 0),
                (true, true) => (origin_k, s.secondary_capacity()),
                (true, false) => (k, s.secondary_capacity()),
            };
            if n.children.len() > most {
                return fail(format!("{id} has {} children > {most}", n.children.len()));
            }
            for c in &n.children {
                if self.nodes.get(c).and_then(|cn| cn.primary) != Some(id) {
                    return fail(format!("{id} lists child {c} that is not its child"));
                }
            }
            if n.sec_children.len() > cap {
                return fail(format!(
                    "{id} has {} secondary children",
                    n.sec_children.len()
                ));
            }
            for u in &n.sec_children {
                if !self
                    .nodes
                    .get(u)
                    .is_some_and(|un| un.secondaries.contains(&id))
                {
                    return fail(format!("{id} lists secondary child {u} wrongly"));
                }
            }
            if n.children.len() < most {
                primary_slots.insert((n.depth, (n.children.len(), id)));
                if let Some(r) = n.rack {
                    primary_rack.insert(((r, n.depth), (n.children.len(), id)));
                }
            }
            if n.sec_children.len() < cap {
                secondary_slots.insert((n.depth, (n.sec_children.len(), id)));
                if let Some(r) = n.rack {
                    secondary_rack.insert(((r, n.depth), (n.sec_children.len(), id)));
                }
            }
        }
        if primary_slots != self.primary_slots.entries()
            || primary_rack != self.primary_slots.rack_entries()
        {
            return fail("primary slot index is stale".into());
        }
        if secondary_slots != self.secondary_slots.entries()
            || secondary_rack != self.secondary_slots.rack_entries()
        {
            return fail("secondary slot index is stale".into());
        }
        if by_depth != self.by_depth {
            return fail("depth index is stale".into());
        }
        if followers != self.followers {
            return fail("follower index is stale".into());
        }
        Ok(())
    }
}

impl Session {
    /// Whether `a` is on `id`'s path of primaries up to its root.
    fn is_ancestor(&self, a: NodeId, id: NodeId) -> bool {
        let mut cur = self.nodes.get(&id).and_then(|n| n.primary);
        let mut steps = 0usize;
        while let Some(c) = cur {
            if c == a {
                return true;
            }
            steps += 1;
            if steps > self.nodes.len() {
                return false; // a cycle, reported on its own
            }
            cur = self.nodes.get(&c).and_then(|n| n.primary);
        }
        false
    }
}
