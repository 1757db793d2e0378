//! No host waits on a fetch that waits on it: a chunk this host does not hold,
//! asked for by one of this host's own parents for the image, is answered at
//! once with "not here" instead of being fetched from that very parent.
//!
//! ```text
//!   A's parents: [B, ...]     B's parents: [A, ...]   (two epochs of the tree, for a moment)
//!   A misses c ─► asks B ─► B misses c ─► would ask A ─► waits on A's fetch ─► waits on B ...
//!   with the guard: B's export, seen by A (B's parent), answers "not here"
//!   (NBD_ENOTSUP, with NOT_HERE) for c at once ─► A asks its next source
//!   (an origin) at once, without counting it a fault
//! ```
//!
//! The base server gives each child connection its own view of the export
//! ([`virtman_nbd::ExportAccess::view`]), which knows the child's name from
//! its certificate: so this needs TLS. Without it, hedged fetches still break
//! such a loop, a hedge delay later.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use virtman_cache::CachedVolume;
use virtman_nbd::proto::Errno;
use virtman_nbd::{Capabilities, Export, ExportError, Extent, ReadChunk};

use crate::upstream::Parents;

/// The error a parent gets for a chunk its child does not hold: the
/// fetching side takes it as "ask elsewhere", not as a fault.
pub const NOT_HERE: &str = "not held here, and the asker is this host's parent: ask elsewhere";

/// One image's volume and the parents it fetches from.
#[derive(Clone)]
pub struct Guarded {
    /// The cached volume.
    pub volume: Arc<CachedVolume>,
    /// Its parents.
    pub parents: Arc<Parents>,
}

/// The base export as one child (`peer`) sees it.
pub struct PeerView {
    inner: Arc<dyn Export>,
    peer: String,
    guarded: Guarded,
}

impl PeerView {
    /// `inner` as `peer` sees it.
    pub fn new(inner: Arc<dyn Export>, peer: String, guarded: Guarded) -> PeerView {
        PeerView {
            inner,
            peer,
            guarded,
        }
    }

    /// Whether some chunk of the range is not here and `peer` is a parent
    /// this host would fetch it from (with stripes: a parent in the chunk's
    /// stripe; a parent in another stripe is this host's child in this one).
    fn would_loop(&self, offset: u64, len: u32) -> bool {
        if len == 0 {
            return false;
        }
        let parents = &self.guarded.parents;
        let v = &self.guarded.volume;
        let chunk = u64::from(v.manifest().chunk_size().max(1));
        let (first, last) = (offset / chunk, (offset + u64::from(len) - 1) / chunk);
        (first..=last).any(|i| !v.is_present(i) && parents.fetches_from(&self.peer, i))
    }
}

#[async_trait]
impl Export for PeerView {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadChunk>, ExportError> {
        if self.would_loop(offset, len) {
            return Err(ExportError::Reply {
                errno: Errno::NotSup,
                message: NOT_HERE.into(),
            });
        }
        self.inner.read(offset, len).await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ExportError> {
        self.inner.write(offset, data, fua).await
    }

    async fn flush(&self) -> Result<(), ExportError> {
        self.inner.flush().await
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), ExportError> {
        self.inner.trim(offset, len, fua).await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
        may_trim: bool,
    ) -> Result<(), ExportError> {
        self.inner.write_zeroes(offset, len, fua, may_trim).await
    }

    async fn cache(&self, offset: u64, len: u32) -> Result<(), ExportError> {
        // A hint: from a parent, for chunks not here, nothing to do.
        if self.would_loop(offset, len) {
            return Ok(());
        }
        self.inner.cache(offset, len).await
    }

    fn meta_contexts(&self) -> Vec<String> {
        self.inner.meta_contexts()
    }

    async fn context_status(
        &self,
        context: &str,
        offset: u64,
        len: u32,
    ) -> Result<Vec<(u64, u32)>, ExportError> {
        self.inner.context_status(context, offset, len).await
    }

    async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<Extent>, ExportError> {
        self.inner.block_status(offset, len).await
    }
}

/// A base export that corrupts what it sends (one byte in every third
/// chunk): the test-only `virtman agent --test-lie` switch, so chaos storms
/// can check that children catch a liar. Never use it otherwise.
pub struct Lying {
    inner: Arc<dyn Export>,
    chunk: u64,
}

impl Lying {
    /// `inner`, lying about chunks of `chunk` bytes.
    pub fn new(inner: Arc<dyn Export>, chunk: u32) -> Lying {
        Lying {
            inner,
            chunk: u64::from(chunk.max(1)),
        }
    }
}

#[async_trait]
impl Export for Lying {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadChunk>, ExportError> {
        let mut out = self.inner.read(offset, len).await?;
        let mut at = offset;
        for piece in &mut out {
            if let ReadChunk::Data(d) = piece {
                let index = at / self.chunk;
                if index.is_multiple_of(3) && !d.is_empty() {
                    let mut bad = d.to_vec();
                    bad[0] ^= 0x5a;
                    *d = Bytes::from(bad);
                }
            }
            at += u64::from(piece.len());
        }
        Ok(out)
    }
}
