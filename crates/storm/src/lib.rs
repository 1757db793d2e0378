//! Local clusters and boot storms: virtman's main job, measured.
//!
//! - [`cluster`]: a coordinator, an origin and M agents as separate `virtman`
//!   processes on loopback, started and stopped as one (`virtman cluster`);
//! - [`control`]: the cluster's coordinators, one on redb or several on a
//!   local etcd;
//! - [`storm`]: N VMs replaying a boot trace at once, in `virtman`,
//!   `cache-only` and `direct` modes (`virtman storm`);
//! - [`chaos`]: hosts and the coordinator killed, stopped or restarted during
//!   a storm (`virtman storm --chaos`), parsed and planned with a seed;
//! - [`report`]: the comparison table, CSV and JSON;
//! - [`guest`]: the qemu command line of every real guest virtman boots.

// Tests may cast freely; library code must use checked conversions.
#![cfg_attr(test, allow(clippy::cast_possible_truncation))]

pub mod chaos;
pub mod cluster;
pub mod control;
pub mod guest;
pub mod report;
pub mod storm;

pub use cluster::{Cluster, ClusterConfig, ClusterError, ClusterState};
pub use storm::{StormConfig, StormError, StormMode, StormReport};
