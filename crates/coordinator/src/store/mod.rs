//! Durable state: images, session members, bans and preheat orders, written
//! in one batch per group of commands before any of them is answered.
//!
//! Two backends keep the same records: [`redb`] (one file, one coordinator:
//! the default) and [`etcd`] (several coordinators, one leader, every write
//! fenced by the leader's key). Both load everything at start ([`Loaded`])
//! and apply a [`Batch`] per commit through [`Backend`].
//!
//! Liveness (last heartbeats) is not stored: after a restart or a change of
//! leader every member counts as seen at that moment, so nobody is declared
//! dead before one full heartbeat timeout. Records are checked when read: a
//! record that does not parse is an error naming its key, not a panic.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::api::PreheatOrder;

pub mod etcd;
pub mod redb;

pub use self::redb::RedbStore;

/// The store format this build reads and writes.
pub const FORMAT: u64 = 1;

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// redb failed (I/O, corruption it detected, a second open).
    #[error("redb: {0}")]
    Redb(#[from] ::redb::Error),
    /// etcd failed or could not be reached.
    #[error("etcd: {0}")]
    Etcd(String),
    /// The write was refused because this coordinator no longer holds the
    /// leader key it was elected with (a newer leader may be writing).
    #[error("not the leader any more: the leader key of term {term} is gone or another's")]
    Fenced {
        /// The term (the leader key's create revision) this writer held.
        term: i64,
    },
    /// The etcd prefix holds keys this program did not write.
    #[error(
        "etcd prefix {prefix:?} holds keys virtman did not write (e.g. {key:?}); use another --etcd-prefix"
    )]
    Foreign {
        /// The prefix.
        prefix: String,
        /// One such key.
        key: String,
    },
    /// A record could not be decoded.
    #[error("record {key} does not decode: {source}")]
    Corrupt {
        /// The record's key.
        key: String,
        /// The decoding error.
        source: serde_json::Error,
    },
    /// The file was written by an unknown format version.
    #[error("store format {0} is not supported (expected {FORMAT})")]
    Format(u64),
}

/// A registered image as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageRecord {
    /// Image name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Manifest digest.
    pub manifest_digest: String,
    /// Origin addresses.
    pub origins: Vec<String>,
    /// Fan-out override.
    #[serde(default)]
    pub fanout: Option<u32>,
    /// Parents-per-node override.
    #[serde(default)]
    pub parents: Option<u32>,
    /// Stripes, resolved at registration (absent in records from before
    /// stripes: one tree).
    #[serde(default)]
    pub stripes: Option<u32>,
}

/// One member of one session as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberRecord {
    /// The node's address for this image.
    pub addr: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its parents by name, tree parent first.
    pub parents: Vec<String>,
    /// It held the complete image.
    pub complete: bool,
    /// Its parent-list epoch.
    pub epoch: u64,
    /// Its home stripe (0 for one tree).
    #[serde(default)]
    pub home: u32,
    /// Stripes that borrowed it as a relay.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lent: Vec<u32>,
    /// With stripes, each stripe's parents by name (`parents` is then the
    /// home stripe's); empty for one tree.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stripe_parents: Vec<Vec<String>>,
}

impl MemberRecord {
    /// Each stripe's parent names (one list for a tree, or a record from
    /// before stripes).
    pub fn lists(&self) -> Vec<Vec<String>> {
        if self.stripe_parents.is_empty() {
            vec![self.parents.clone()]
        } else {
            self.stripe_parents.clone()
        }
    }
}

/// Writes to apply in one transaction.
#[derive(Debug, Default)]
pub struct Batch {
    /// Images to insert or replace.
    pub images: Vec<ImageRecord>,
    /// Members to insert or replace: (image, node, record).
    pub members: BTreeMap<(String, String), MemberRecord>,
    /// Members to delete: (image, node).
    pub removed: Vec<(String, String)>,
    /// Nodes banned (`true`) or unbanned (`false`).
    pub bans: BTreeMap<String, bool>,
    /// Preheat orders set (`Some`) or cancelled (`None`), by image.
    pub preheats: BTreeMap<String, Option<PreheatOrder>>,
}

impl Batch {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
            && self.members.is_empty()
            && self.removed.is_empty()
            && self.bans.is_empty()
            && self.preheats.is_empty()
    }
}

/// Everything read back at start.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Images, by name.
    pub images: Vec<ImageRecord>,
    /// Members: (image, node, record), ordered by image then node.
    pub members: Vec<(String, String, MemberRecord)>,
    /// Banned nodes.
    pub bans: Vec<String>,
    /// Preheat orders, by image.
    pub preheats: Vec<PreheatOrder>,
}

/// Where a coordinator keeps its state: applies one batch per commit.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// Applies `batch` durably; an error means it may not have been applied
    /// (the caller must not answer the writes it holds as done).
    async fn commit(&self, batch: &Batch) -> Result<(), StoreError>;
}

/// A store of either kind.
pub type Store = Box<dyn Backend>;

pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Plain structs of strings, numbers and string maps always serialize.
    serde_json::to_vec(value).unwrap_or_default()
}
