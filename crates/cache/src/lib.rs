//! virtman's cache group: one local cache per host for every image and VM.
//!
//! ```text
//! NBD (VM, unix) ─► Snapshot ──► overlay file (written 4 KiB blocks)
//!                        └─────► CachedVolume ─┬─ present: pread(data)
//! NBD (children, TCP) ─► VolumeExport ─┘        └─ absent: Upstream::fetch ─► verify ─► store
//!                                                                  (single flight, parallel)
//! CacheGroup: the directory holding every volume and snapshot, one capacity,
//! LRU eviction of chunks of unused volumes, a lock against a second process.
//! ```
//!
//! - [`bitmap`]: atomic presence/allocation maps and their persisted form.
//! - [`upstream`]: the [`Upstream`] trait and [`FileUpstream`].
//! - [`volume`]: [`CachedVolume`] and its read-only [`VolumeExport`].
//! - [`disk`]: the seam of the group's file I/O, and the faults tests arm on it.
//! - [`group`]: [`CacheGroup`], its directory and its volumes and snapshots.
//! - `accounting`: the group's one capacity and LRU eviction (crate-private).
//! - [`snapshot`]: [`Snapshot`], the copy-on-write view a VM boots from.
//! - [`profile`]: [`BootProfile`], the recorded first-touch order of chunks.
//! - [`error`]: [`CacheError`] and its mapping to NBD errors.

mod accounting;
pub mod bitmap;
pub mod disk;
pub mod error;
pub mod group;
pub mod profile;
pub mod snapshot;
pub mod upstream;
pub mod volume;

pub use disk::{DiskFaults, Fault};
pub use error::CacheError;
pub use group::{
    CacheGroup, DEFAULT_COMMIT_INTERVAL_MS, GroupConfig, MAX_COMMIT_INTERVAL_MS, Usage,
};
pub use profile::{BootProfile, ProfileEntry};
pub use snapshot::Snapshot;
pub use upstream::{ChunkRequest, FetchClass, FileUpstream, Upstream, UpstreamError};
pub use volume::{CachedVolume, PRESENT, VolumeExport, VolumeUse, X_VIRTMAN_PRESENT, flatten};
