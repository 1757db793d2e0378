//! `virtman-topology`: the relay trees of the coordinator, as a pure state machine.
//!
//! A [`Session`] holds the nodes attached to one image and decides whom each
//! node fetches from. It does no I/O and never reads a clock: every event
//! carries `now` (a [`Duration`](std::time::Duration) since an epoch the caller
//! picks), so the coordinator service drives it on wall-clock time and the
//! simulator drives it on virtual time, with the same decisions for the same
//! events. Every collection is ordered (`BTreeMap`/`BTreeSet`), so nothing
//! depends on hash order.
//!
//! ```text
//!            events                         decisions
//!   join ──────────┐                  ┌──► parent lists (Session::parents),
//!   leave ─────────┤                  │    with an epoch that changes with them
//!   heartbeat ─────┼──► Session ──────┼──► Outcome { changed, dead, removed }
//!   report ────────┤   (one image)    └──► Stats { parent_changes, deaths, .. }
//!   tick(now) ─────┘
//! ```
//!
//! Modules: [`settings`] (fan-out, parents, timeouts), [`session`] (the state
//! machine and its repair rules), [`forest`] (S sessions, one per stripe of
//! the image's chunks, whose interior hosts are disjoint), `index` (ordered free-slot indices), and
//! [`invariants`] (the checker the property tests and the simulator call).

pub mod forest;
pub mod invariants;
pub mod session;
pub mod settings;

mod index;

pub use forest::{Forest, MAX_STRIPES, SavedMember, stripe_of};
pub use invariants::InvariantViolation;
pub use session::{NodeInfo, Outcome, Progress, SavedNode, Session, Stats, TopologyError};
pub use settings::{Settings, SettingsError};

/// A node's identity within the coordinator: chosen by the caller, stable for
/// the node's life in a session. Origins and members share one id space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub u64);

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "#{}", self.0)
    }
}
