//! A striped forest: S relay trees over one image's members, one per stripe.
//!
//! A tree makes its interior hosts upload k copies of what they download and
//! its leaves upload nothing, so a storm bound by the network takes about
//! k W / B for a working set W on links of B. A forest (SplitStream, SOSP'03)
//! splits the image's chunks into S stripes (chunk i is in stripe i mod S)
//! and gives each stripe its own tree whose interior hosts, its *relays*, are
//! disjoint from the other stripes' as far as the member count allows: every
//! member is a relay of one stripe, its *home*, and a follower (a leaf) in
//! the others. With fan-out S each relay uploads S copies of 1/S of the data,
//! about what it downloads, and the storm approaches W / B.
//!
//! ```text
//!   stripe 0 (even chunks)           stripe 1 (odd chunks)
//!        origin                           origin        <- one head per stripe:
//!          |                                |              each chunk leaves
//!          A                                B              the origin once
//!        /   \                            /   \
//!       C     B'                         D     A'        A, C: home 0
//!      / \                              / \              B, D: home 1
//!     D'  ..                           C'  ..            X' = follower, a leaf
//! ```
//!
//! Each stripe is a [`Session`] whose non-home members join as followers
//! (`session/relay.rs` keeps its relays on top and lends a follower as a
//! relay only when the stripe's own relays are full), so every rule of a
//! tree (secondaries, failover, reports, deaths, rebalance, racks, complete
//! members as roots, the depth bound) holds per stripe. Homes go to the
//! stripe with the fewest live home members. One stripe is exactly the tree.
//!
//! A fetch of chunk i follows only stripe i mod S's parents (and the origins
//! as a last resort), and each stripe's parents are strictly shallower in
//! that stripe, so no chunk's requests can go round a cycle. The union of the
//! stripes' parent graphs does have cycles (A serves B stripe 0 while B serves
//! A stripe 1); it cannot be acyclic while each chunk leaves the origin once
//! and relays are disjoint: the first host of a topological order would have
//! to get every stripe from the origin, and so would the first of each other
//! stripe's relays.
//!
//! Deaths are forest-wide: a member declared dead by reports in one stripe
//! is removed from all. A member's epoch is the sum of its stripes' epochs,
//! so it changes whenever any of its lists does.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::NodeId;
use crate::invariants::InvariantViolation;
use crate::session::{Outcome, Progress, SavedNode, Session, Stats, TopologyError};
use crate::settings::Settings;

/// The most stripes a forest may have.
pub const MAX_STRIPES: u32 = 64;

/// A member as persisted by a driver, for [`Forest::restore`].
#[derive(Debug, Clone, PartialEq)]
pub struct SavedMember {
    /// The member.
    pub id: NodeId,
    /// Its rack label.
    pub rack: Option<String>,
    /// Its home stripe.
    pub home: u32,
    /// Other stripes that borrowed it as a relay.
    pub lent: Vec<u32>,
    /// Its parent lists when saved, one per stripe, primary first.
    pub parents: Vec<Vec<NodeId>>,
    /// It held the complete image.
    pub complete: bool,
    /// Its epoch when saved.
    pub epoch: u64,
}

/// One image's striped forest. See the module documentation.
#[derive(Debug, Clone)]
pub struct Forest {
    stripes: Vec<Session>,
    homes: BTreeMap<NodeId, u32>,
    home_counts: Vec<usize>,
}

impl Forest {
    /// A forest of `stripes` trees (1 is a plain tree) rooted at `origins`.
    pub fn new(
        settings: Settings,
        stripes: u32,
        origins: &[NodeId],
    ) -> Result<Self, TopologyError> {
        if !(1..=MAX_STRIPES).contains(&stripes) {
            return Err(TopologyError::Stripes(stripes));
        }
        let one = Session::new(settings, origins)?;
        Ok(Self {
            stripes: vec![one; stripes as usize],
            homes: BTreeMap::new(),
            home_counts: vec![0; stripes as usize],
        })
    }

    /// Rebuilds a forest after a restart from saved members (see
    /// [`Session::restore`]; each stripe keeps the saved parents that still
    /// satisfy its rules).
    pub fn restore(
        settings: Settings,
        stripes: u32,
        origins: &[NodeId],
        saved: Vec<SavedMember>,
        now: Duration,
    ) -> Result<Self, TopologyError> {
        let mut f = Self::new(settings, stripes, origins)?;
        let mut sessions = Vec::with_capacity(f.stripes.len());
        for s in 0..stripes {
            let nodes = saved
                .iter()
                .map(|m| SavedNode {
                    id: m.id,
                    rack: m.rack.clone(),
                    parents: m.parents.get(s as usize).cloned().unwrap_or_default(),
                    complete: m.complete,
                    // The sum of the stripes' epochs is the member's.
                    epoch: if s == 0 { m.epoch } else { 0 },
                    relay: m.home % stripes == s,
                    lent: m.lent.contains(&s),
                })
                .collect();
            sessions.push(Session::restore(settings, origins, nodes, now)?);
        }
        f.stripes = sessions;
        for m in saved {
            if f.stripes[0].contains(m.id) && !origins.contains(&m.id) {
                let home = m.home % stripes;
                f.homes.insert(m.id, home);
                f.home_counts[home as usize] += 1;
            }
        }
        Ok(f)
    }

    // ----- queries -----

    /// How many stripes (1: a tree).
    pub fn stripe_count(&self) -> u32 {
        u32::try_from(self.stripes.len()).unwrap_or(u32::MAX)
    }

    /// The stripe of chunk `chunk`: `chunk mod S`.
    pub fn stripe_of(&self, chunk: u64) -> u32 {
        stripe_of(chunk, self.stripe_count())
    }

    /// Stripe `s`'s tree.
    pub fn stripe(&self, s: u32) -> Option<&Session> {
        self.stripes.get(s as usize)
    }

    /// Every stripe's tree, stripe 0 first.
    pub fn stripes(&self) -> &[Session] {
        &self.stripes
    }

    /// The settings every stripe runs with.
    pub fn settings(&self) -> &Settings {
        self.stripes[0].settings()
    }

    /// The member's home stripe (the one it relays).
    pub fn home(&self, id: NodeId) -> Option<u32> {
        self.homes.get(&id).copied()
    }

    /// The stripes other than its home that borrowed the member as a relay.
    pub fn lent(&self, id: NodeId) -> Vec<u32> {
        (0..self.stripe_count())
            .filter(|&s| {
                self.stripes[s as usize]
                    .node(id)
                    .is_some_and(|n| n.borrowed)
            })
            .collect()
    }

    /// Live nodes, origins included.
    pub fn len(&self) -> usize {
        self.stripes[0].len()
    }

    /// Always false in practice: a forest keeps its origins.
    pub fn is_empty(&self) -> bool {
        self.stripes[0].is_empty()
    }

    /// Live members (not origins).
    pub fn members(&self) -> usize {
        self.homes.len()
    }

    /// Whether `id` is a live node.
    pub fn contains(&self, id: NodeId) -> bool {
        self.stripes[0].contains(id)
    }

    /// Whether `id` was declared dead (and has not joined again).
    pub fn is_dead(&self, id: NodeId) -> bool {
        self.stripes[0].is_dead(id)
    }

    /// The node's parents in each stripe, primary first.
    pub fn parents(&self, id: NodeId) -> Option<Vec<Vec<NodeId>>> {
        self.stripes.iter().map(|s| s.parents(id)).collect()
    }

    /// The node's epoch: the sum of its stripes' epochs.
    pub fn epoch(&self, id: NodeId) -> Option<u64> {
        self.stripes
            .iter()
            .try_fold(0u64, |sum, s| Some(sum.wrapping_add(s.epoch(id)?)))
    }

    /// The deepest member in any stripe.
    pub fn max_depth(&self) -> u32 {
        self.stripes
            .iter()
            .map(Session::max_depth)
            .max()
            .unwrap_or(0)
    }

    /// The largest of the stripes' depth bounds.
    pub fn depth_bound(&self) -> u32 {
        self.stripes
            .iter()
            .map(Session::depth_bound)
            .max()
            .unwrap_or(0)
    }

    /// Counters: joins, leaves, deaths and promotions as in any one stripe;
    /// reports acted on, parent changes and rebalance moves summed over the
    /// stripes (a member whose lists change in two stripes counts twice).
    pub fn stats(&self) -> Stats {
        let mut total = self.stripes[0].stats();
        for s in &self.stripes[1..] {
            let st = s.stats();
            total.reports += st.reports;
            total.parent_changes += st.parent_changes;
            total.rebalance_moves += st.rebalance_moves;
        }
        total
    }

    /// Members that have children in more than one stripe: lent relays in
    /// use (0 once each stripe's own relays have room for every member).
    pub fn interior_in_several(&self) -> usize {
        self.homes
            .keys()
            .filter(|&&id| {
                self.stripes
                    .iter()
                    .filter(|s| {
                        s.node(id)
                            .is_some_and(|n| n.children + n.secondary_children > 0)
                    })
                    .count()
                    > 1
            })
            .count()
    }

    // ----- events -----

    /// A member joins at `now`: its home is the stripe with the fewest live
    /// home members; it relays there and follows in the others.
    pub fn join(
        &mut self,
        id: NodeId,
        rack: Option<&str>,
        now: Duration,
    ) -> Result<Outcome, TopologyError> {
        if self.contains(id) {
            return Err(TopologyError::AlreadyMember(id));
        }
        let home = (0..self.home_counts.len())
            .min_by_key(|&s| (self.home_counts[s], s))
            .unwrap_or(0);
        let out = self.each(now, |s, stripe| stripe.join_as(id, rack, s == home, now))?;
        self.homes.insert(id, u32::try_from(home).unwrap_or(0));
        self.home_counts[home] += 1;
        Ok(out)
    }

    /// A member leaves gracefully, from every stripe.
    pub fn leave(&mut self, id: NodeId, now: Duration) -> Result<Outcome, TopologyError> {
        self.each(now, |_, s| s.leave(id, now))
    }

    /// A member's heartbeat, in every stripe.
    pub fn heartbeat(
        &mut self,
        id: NodeId,
        now: Duration,
        progress: Progress,
    ) -> Result<Outcome, TopologyError> {
        self.each(now, |_, s| s.heartbeat(id, now, progress))
    }

    /// `reporter` could not reach `parent`: acted on in every stripe where
    /// `parent` is one of its parents; a death in one is a death in all.
    pub fn report_unreachable(
        &mut self,
        reporter: NodeId,
        parent: NodeId,
        now: Duration,
    ) -> Result<Outcome, TopologyError> {
        self.each(now, |_, s| s.report_unreachable(reporter, parent, now))
    }

    /// Advances time to `now` in every stripe: the silent are dead.
    pub fn tick(&mut self, now: Duration) -> Outcome {
        // A tick refuses nothing.
        self.each(now, |_, s| Ok(s.tick(now))).unwrap_or_default()
    }

    /// Runs one event in every stripe. Every stripe holds the same members,
    /// so a refusal comes from the first stripe, before anything changed.
    fn each(
        &mut self,
        now: Duration,
        mut event: impl FnMut(usize, &mut Session) -> Result<Outcome, TopologyError>,
    ) -> Result<Outcome, TopologyError> {
        let mut outcomes = Vec::with_capacity(self.stripes.len());
        for s in 0..self.stripes.len() {
            self.tell_lent(s);
            outcomes.push(event(s, &mut self.stripes[s])?);
        }
        Ok(self.merge(outcomes, now))
    }

    /// Tells stripe `s` which members the other stripes borrowed, so that
    /// it borrows others when it can.
    fn tell_lent(&mut self, s: usize) {
        let elsewhere = self
            .stripes
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != s)
            .flat_map(|(_, st)| st.lent.iter().copied())
            .collect();
        self.stripes[s].lent_elsewhere = elsewhere;
    }

    /// Joins the stripes' outcomes; a member removed in one stripe (dead by
    /// reports there) is removed from the others too.
    fn merge(&mut self, mut outcomes: Vec<Outcome>, now: Duration) -> Outcome {
        let dead: BTreeSet<NodeId> = outcomes
            .iter()
            .flat_map(|o| o.dead.iter().copied())
            .collect();
        for &d in &dead {
            for s in 0..self.stripes.len() {
                if self.stripes[s].contains(d) {
                    self.tell_lent(s);
                    outcomes.push(self.stripes[s].declare_dead(d, now));
                }
            }
        }
        let mut changed = BTreeSet::new();
        let mut dead_all = Vec::new();
        let mut removed = Vec::new();
        for o in outcomes {
            changed.extend(o.changed);
            for d in o.dead {
                if !dead_all.contains(&d) {
                    dead_all.push(d);
                }
            }
            for r in o.removed {
                if !removed.contains(&r) {
                    removed.push(r);
                }
            }
        }
        for r in &removed {
            if let Some(home) = self.homes.remove(r) {
                self.home_counts[home as usize] -= 1;
            }
        }
        changed.retain(|id| self.contains(*id));
        Outcome {
            changed: changed.into_iter().collect(),
            dead: dead_all,
            removed,
        }
    }

    /// Checks every stripe's rules, and that the stripes agree: the same
    /// members, each a relay (not lent) in its home stripe only, apart from
    /// lent ones.
    pub fn check_invariants(&self) -> Result<(), InvariantViolation> {
        let fail = |m: String| Err(InvariantViolation(m));
        let mut counts = vec![0usize; self.stripes.len()];
        for (i, s) in self.stripes.iter().enumerate() {
            s.check_invariants()
                .map_err(|e| InvariantViolation(format!("stripe {i}: {}", e.0)))?;
            let members: BTreeSet<NodeId> = s.nodes().filter(|n| !n.origin).map(|n| n.id).collect();
            if members.len() != self.homes.len()
                || !members.iter().all(|m| self.homes.contains_key(m))
            {
                return fail(format!("stripe {i} holds other members than the forest"));
            }
        }
        for (&id, &home) in &self.homes {
            counts[home as usize] += 1;
            for (i, s) in self.stripes.iter().enumerate() {
                let Some(n) = s.node(id) else {
                    return fail(format!("{id} missing from stripe {i}"));
                };
                let own = i == home as usize;
                if own && (!n.relay || n.borrowed) {
                    return fail(format!("{id} is not a relay of its home stripe {i}"));
                }
                if !own && n.relay && !n.borrowed && !n.complete {
                    return fail(format!(
                        "{id} relays stripe {i}, not its home {home}, unlent"
                    ));
                }
            }
        }
        if counts != self.home_counts {
            return fail(format!(
                "home counts {:?} kept as {:?}",
                counts, self.home_counts
            ));
        }
        Ok(())
    }
}

/// The stripe of chunk `chunk` among `stripes`: `chunk mod stripes` (one
/// stripe when `stripes` is 0).
pub fn stripe_of(chunk: u64, stripes: u32) -> u32 {
    u32::try_from(chunk % u64::from(stripes.max(1))).unwrap_or(0)
}
