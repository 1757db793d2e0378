//! The virtman agent: the daemon on every host.
//!
//! - [`upstream`]: fetching chunks from parents in the relay tree, spread by
//!   load, with failover and reports of bad parents.

// Tests may cast freely; library code must use checked conversions.
#![cfg_attr(test, allow(clippy::cast_possible_truncation))]

pub mod upstream;
