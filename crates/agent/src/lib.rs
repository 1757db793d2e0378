//! The virtman agent: the daemon on every host.
//!
//! - [`agent`]: the daemon: cache group, base and VM exports, the
//!   coordinator loop, VMs;
//! - [`access`]: with TLS, the base exports serve only the members of each
//!   image's session (asked of the coordinator), never a banned node;
//! - [`caps`]: the host's upload and download caps (demand first);
//! - [`control`]: the control API on a local unix socket, and its client;
//! - [`metrics`]: Prometheus metrics read from live counters;
//! - [`prefetch`]: boot profiles fetched from parents and replayed ahead of
//!   the VMs, pins (the whole image in the background), behind demand reads;
//! - [`loop_guard`]: a child's view of a member image that answers "not
//!   here" at once when the child is also this host's parent (no fetch
//!   waits on itself);
//! - [`known`]: what the coordinator last said about each member image
//!   (parents, epoch, origins), saved so a restart can serve without it;
//! - [`origin`]: serving an image whole and counting what leaves;
//! - [`upstream`]: fetching chunks from parents in the relay tree, spread by
//!   load, with failover and reports of bad parents;
//! - `small_export`: reading a small export (`manifest/IMAGE`,
//!   `profile/IMAGE`) whole from a node, for both `agent` and `prefetch`.

// Tests may cast freely; library code must use checked conversions.
#![cfg_attr(test, allow(clippy::cast_possible_truncation))]

pub mod access;
pub mod agent;
pub mod caps;
pub mod control;
pub mod known;
pub mod loop_guard;
pub mod metrics;
pub mod origin;
pub mod prefetch;
mod small_export;
pub mod sockets;
pub mod upstream;

pub use agent::{Agent, AgentConfig, AgentError, Status, VmInfo};
