//! The read path of a cached volume and the single flight fetch of its
//! missing chunks.
//!
//! A read splits into pieces, one per chunk. Pieces of present chunks are
//! read from `data` in one blocking call; pieces of all-zero chunks (known
//! from the manifest) are zero without I/O; the rest are fetched in parallel,
//! one fetch per chunk however many readers wait (single flight):
//!
//! ```text
//! read ─► present? ──yes──► pread(data)
//!           │no
//!           ▼
//!        in flight? ──yes──► wait for the leader's result
//!           │no
//!           ▼
//!        leader task: upstream.fetch ─► verify (BLAKE3 vs manifest) ─► reserve
//!        capacity (may evict) ─► pwrite ─► present bit ─► queue for commit
//! ```
//!
//! The queued chunks become durable in the committer (see `commit.rs`).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::{Bytes, BytesMut};
use tokio::sync::watch;
use virtman_nbd::ReadChunk;

use super::{CachedVolume, Flight, Piece, lock};
use crate::error::CacheError;
use crate::upstream::{ChunkRequest, FetchClass};

/// The chunks one read waits on, counted in the volume's `demand_chunks`
/// while this lives.
struct WaitingOn<'a> {
    map: &'a std::sync::Mutex<std::collections::HashMap<u64, usize>>,
    chunks: Vec<u64>,
}

impl<'a> WaitingOn<'a> {
    fn new(
        map: &'a std::sync::Mutex<std::collections::HashMap<u64, usize>>,
        chunks: Vec<u64>,
    ) -> Self {
        if !chunks.is_empty() {
            let mut m = lock(map);
            for &c in &chunks {
                *m.entry(c).or_default() += 1;
            }
        }
        WaitingOn { map, chunks }
    }
}

impl Drop for WaitingOn<'_> {
    fn drop(&mut self) {
        if self.chunks.is_empty() {
            return;
        }
        let mut m = lock(self.map);
        for c in &self.chunks {
            if let Some(n) = m.get_mut(c) {
                *n -= 1;
                if *n == 0 {
                    m.remove(c);
                }
            }
        }
    }
}

/// Reads up to this long try the page cache on the calling task first (a
/// chunk's worth: a VM's reads and a child's chunk fetches).
const INLINE_READ_MAX: u64 = 256 * 1024;

impl CachedVolume {
    /// Reads `len` bytes at `offset`, fetching missing chunks.
    pub async fn read(
        self: &Arc<Self>,
        offset: u64,
        len: u32,
    ) -> Result<Vec<ReadChunk>, CacheError> {
        self.check_range(offset, u64::from(len))?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let pieces = self.pieces(offset, len);
        for p in &pieces {
            self.touch(p.chunk);
        }
        // Local pieces first: from the page cache without blocking, on this
        // task (no hand-off to a thread: most reads of a warm host are
        // these), else in one blocking call.
        let inline = u64::from(len) <= INLINE_READ_MAX;
        let mut local = match inline.then(|| self.read_local(&pieces, true)) {
            Some(Ok(Some(local))) => local,
            _ => {
                let vol = Arc::clone(self);
                let ps = pieces.clone();
                tokio::task::spawn_blocking(move || vol.read_local(&ps, false))
                    .await
                    .map_err(|e| CacheError::Task(e.to_string()))??
                    .ok_or_else(|| CacheError::Task("a blocking read gave up".into()))?
            }
        };
        // Missing pieces: fetch their chunks in parallel, counted as waited
        // on meanwhile.
        let _waiting_on = WaitingOn::new(
            &self.demand_chunks,
            pieces
                .iter()
                .zip(&local)
                .filter(|(_, l)| l.is_none())
                .map(|(p, _)| p.chunk)
                .collect(),
        );
        let mut set = tokio::task::JoinSet::new();
        for (k, p) in pieces.iter().enumerate() {
            if local[k].is_none() {
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                let vol = Arc::clone(self);
                let chunk = p.chunk;
                set.spawn(async move { (k, vol.chunk_bytes(chunk, FetchClass::Demand).await) });
            } else {
                self.stats.hits.fetch_add(1, Ordering::Relaxed);
            }
        }
        while let Some(r) = set.join_next().await {
            let (k, res) = r.map_err(|e| CacheError::Task(e.to_string()))?;
            let whole = res?;
            let p = pieces[k];
            let start =
                usize::try_from(p.offset - self.manifest.chunk_offset(p.chunk)).unwrap_or(0);
            let n = usize::try_from(p.len).unwrap_or(0);
            let slice = match whole {
                ReadChunk::Data(b) => ReadChunk::Data(b.slice(start..start + n)),
                ReadChunk::Zero(_) => ReadChunk::Zero(p.len),
            };
            local[k] = Some(slice);
        }
        // Merge adjacent zero runs.
        let mut out: Vec<ReadChunk> = Vec::with_capacity(pieces.len());
        for c in local.into_iter().flatten() {
            match (out.last_mut(), c) {
                (Some(ReadChunk::Zero(a)), ReadChunk::Zero(b)) => *a += b,
                (_, c) => out.push(c),
            }
        }
        Ok(out)
    }

    /// Reads into one buffer (tests, tools).
    pub async fn read_bytes(self: &Arc<Self>, offset: u64, len: u32) -> Result<Bytes, CacheError> {
        let chunks = self.read(offset, len).await?;
        Ok(flatten(chunks))
    }

    /// Reads the pieces that are local (present or all-zero); `None` for the
    /// others. Contiguous present pieces are read with one `pread`. With
    /// `nowait`, only from the page cache (`RWF_NOWAIT`): `Ok(None)` if any
    /// of it would wait for the disk.
    fn read_local(
        &self,
        pieces: &[Piece],
        nowait: bool,
    ) -> Result<Option<Vec<Option<ReadChunk>>>, CacheError> {
        // Without waiting: not while an eviction holds the gate either.
        let _g = if nowait {
            match self.gate.try_read() {
                Ok(g) => g,
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => return Ok(None),
            }
        } else {
            self.gate
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        let mut out: Vec<Option<ReadChunk>> = vec![None; pieces.len()];
        let mut k = 0;
        while k < pieces.len() {
            let p = pieces[k];
            if self.manifest.is_zero_chunk(p.chunk) {
                out[k] = Some(ReadChunk::Zero(p.len));
                k += 1;
                continue;
            }
            if !self.present.get(p.chunk) {
                k += 1;
                continue;
            }
            let mut j = k + 1;
            while j < pieces.len()
                && self.present.get(pieces[j].chunk)
                && !self.manifest.is_zero_chunk(pieces[j].chunk)
            {
                j += 1;
            }
            let total: usize = pieces[k..j].iter().map(|p| p.len as usize).sum();
            // Filled whole, or dropped unsent: a reused buffer is safe.
            let mut buf = virtman_nbd::buffers::IoBuf::take(total);
            if nowait {
                if !self.data.read_cached(&mut buf, p.offset) {
                    return Ok(None);
                }
            } else if let Err(e) = self.data.read_exact_at(&mut buf, p.offset) {
                // The disk failed these chunks: drop them, and let the
                // caller fetch them again like any missing chunk.
                self.stats.disk_errors.fetch_add(1, Ordering::Relaxed);
                let err = CacheError::io(
                    format!(
                        "volume {:?}: reading {total} bytes at {}",
                        self.name, p.offset
                    ),
                    &self.data_path,
                    e,
                );
                tracing::warn!(error = %err, "dropping the chunks a local read failed on; fetching them again");
                self.forget(pieces[k..j].iter().map(|q| q.chunk));
                k = j;
                continue;
            }
            let buf = buf.freeze();
            let mut at = 0usize;
            for (q, slot) in pieces[k..j].iter().zip(out[k..j].iter_mut()) {
                let n = q.len as usize;
                *slot = Some(ReadChunk::Data(buf.slice(at..at + n)));
                at += n;
            }
            k = j;
        }
        Ok(Some(out))
    }

    /// The whole of chunk `index`: local if present, else fetched once for all
    /// waiting readers.
    pub(super) async fn chunk_bytes(
        self: Arc<Self>,
        index: u64,
        class: FetchClass,
    ) -> Result<ReadChunk, CacheError> {
        // A reader that joined a fetch someone else started, which then found
        // the group full, tries once more itself: the fetch may have started
        // under other conditions (volumes in use then, released since).
        let mut retried = false;
        loop {
            if self.manifest.is_zero_chunk(index) {
                return Ok(ReadChunk::Zero(self.manifest.chunk_len(index)));
            }
            if self.present.get(index) {
                let vol = Arc::clone(&self);
                let local = tokio::task::spawn_blocking(move || {
                    vol.read_local(
                        &[Piece {
                            chunk: index,
                            offset: vol.manifest.chunk_offset(index),
                            len: vol.manifest.chunk_len(index),
                        }],
                        false,
                    )
                })
                .await
                .map_err(|e| CacheError::Task(e.to_string()))??
                .unwrap_or_default();
                if let Some(Some(c)) = local.into_iter().next() {
                    return Ok(c);
                }
                // Evicted in between: fetch it.
            }
            let mut joined = false;
            let mut rx = {
                let mut map = lock(&self.inflight);
                if self.present.get(index) {
                    continue;
                }
                match map.get(&index) {
                    Some(rx) => {
                        joined = true;
                        rx.clone()
                    }
                    None => {
                        let (tx, rx) = watch::channel(None);
                        map.insert(index, rx.clone());
                        let vol = Arc::clone(&self);
                        tokio::spawn(async move { vol.lead_fetch(index, class, tx).await });
                        rx
                    }
                }
            };
            let res = match rx.wait_for(Option::is_some).await {
                Ok(v) => v.clone(),
                Err(_) => Some(Err(Arc::new(CacheError::Task(format!(
                    "volume {:?}: fetch of chunk {index} ended without a result",
                    self.name
                ))))),
            };
            return match res {
                Some(Ok(b)) => Ok(ReadChunk::Data(b)),
                Some(Err(e)) if joined && !retried && matches!(*e, CacheError::NoSpace { .. }) => {
                    retried = true;
                    continue;
                }
                Some(Err(e)) => Err(CacheError::Shared(e)),
                None => continue,
            };
        }
    }

    async fn lead_fetch(self: Arc<Self>, index: u64, class: FetchClass, tx: watch::Sender<Flight>) {
        /// Removes the in-flight entry even if the fetch panics.
        struct Done<'a>(&'a CachedVolume, u64);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                lock(&self.0.inflight).remove(&self.1);
            }
        }
        let res = {
            let _done = Done(&self, index);
            let r = self.fetch_verify_store(index, class).await;
            if r.is_err() {
                self.stats.fetch_errors.fetch_add(1, Ordering::Relaxed);
            }
            r
        };
        let _ = tx.send(Some(res.map_err(Arc::new)));
    }

    async fn fetch_verify_store(
        self: &Arc<Self>,
        index: u64,
        class: FetchClass,
    ) -> Result<Bytes, CacheError> {
        let upstream = self
            .upstream
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let Some(upstream) = upstream else {
            return Err(CacheError::NoUpstream {
                volume: self.name.clone(),
                chunk: index,
            });
        };
        let req = ChunkRequest {
            image: self.manifest.id(),
            index,
            offset: self.manifest.chunk_offset(index),
            len: self.manifest.chunk_len(index),
            class,
        };
        let data = upstream
            .fetch(req)
            .await
            .map_err(|e| CacheError::Upstream {
                volume: self.name.clone(),
                chunk: index,
                offset: req.offset,
                len: req.len,
                source_name: e.source_name,
                message: e.message,
            })?;
        // Checked here unless the upstream checked it against this very
        // manifest already (one hash per chunk per hop, not two).
        let checked = upstream.verifies() == Some(self.manifest.id());
        if !checked && !self.manifest.verify_chunk(index, &data) {
            let err = CacheError::BadChunk {
                volume: self.name.clone(),
                chunk: index,
                offset: req.offset,
                len: req.len,
                got: data.len(),
                source_name: upstream.name(),
            };
            tracing::warn!(error = %err, "refused a chunk");
            return Err(err);
        }
        let vol = Arc::clone(self);
        let d = data.clone();
        let stored = tokio::task::spawn_blocking(move || vol.store_chunk(index, &d))
            .await
            .map_err(|e| CacheError::Task(e.to_string()))?;
        self.stats.fetched_chunks.fetch_add(1, Ordering::Relaxed);
        self.stats
            .fetched_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        match stored {
            Ok(()) => self.schedule_commit(),
            // The disk failed the write: the verified bytes still serve the
            // readers waiting now; the chunk stays absent.
            Err(e @ CacheError::Io { .. }) => {
                self.stats.disk_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "storing a fetched chunk failed; serving it from memory");
            }
            Err(e) => return Err(e),
        }
        Ok(data)
    }

    /// Writes a verified chunk and marks it present (not yet durable).
    fn store_chunk(&self, index: u64, data: &[u8]) -> Result<(), CacheError> {
        let len = data.len() as u64;
        self.acct.reserve(len, &self.name, index)?;
        let _g = self
            .gate
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.present.get(index) {
            self.acct.sub_used(len);
            return Ok(());
        }
        let offset = self.manifest.chunk_offset(index);
        if let Err(e) = self.data.write_all_at(data, offset) {
            self.acct.sub_used(len);
            return Err(CacheError::io(
                format!(
                    "volume {:?}: writing chunk {index} ({len} bytes at {offset})",
                    self.name
                ),
                &self.data_path,
                e,
            ));
        }
        {
            // Present and queued together, as a commit marking its batch
            // durable sees them ([`CachedVolume::commit`]).
            let mut queue = lock(&self.pending);
            self.present.set(index);
            queue.push(index);
        }
        self.touch(index);
        Ok(())
    }

    /// Drops `chunks` whose local bytes cannot be trusted (a failed read or
    /// sync): absent from now on, their bytes released, so the next read
    /// fetches them again. The presence file catches up at the next commit
    /// (until then a restart may claim them again, and the first read then
    /// fails and drops them again).
    pub(super) fn forget(&self, chunks: impl Iterator<Item = u64>) {
        let mut freed = 0;
        // Not while a commit marks its batch durable (see `store_chunk`).
        let _queue = lock(&self.pending);
        for i in chunks {
            if self.present.clear(i) {
                self.durable.clear(i);
                freed += u64::from(self.manifest.chunk_len(i));
            }
        }
        self.acct.sub_used(freed);
    }

    /// Re-reads every present chunk and returns those that do not match the
    /// manifest (there should never be any).
    pub fn verify_present(&self) -> Result<Vec<u64>, CacheError> {
        let _g = self
            .gate
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut bad = Vec::new();
        let mut buf = vec![0u8; usize::try_from(self.manifest.chunk_size()).unwrap_or(0)];
        for i in self.present.ones() {
            let n = usize::try_from(self.manifest.chunk_len(i)).unwrap_or(0);
            self.data
                .read_exact_at(&mut buf[..n], self.manifest.chunk_offset(i))
                .map_err(|e| {
                    CacheError::io(
                        format!("volume {:?}: verifying chunk {i}", self.name),
                        &self.data_path,
                        e,
                    )
                })?;
            if !self.manifest.verify_chunk(i, &buf[..n]) {
                bad.push(i);
            }
        }
        Ok(bad)
    }
}

/// Concatenates read chunks into one buffer.
pub fn flatten(chunks: Vec<ReadChunk>) -> Bytes {
    if let [ReadChunk::Data(b)] = chunks.as_slice() {
        return b.clone();
    }
    let total: usize = chunks.iter().map(|c| c.len() as usize).sum();
    let mut out = BytesMut::with_capacity(total);
    for c in chunks {
        match c {
            ReadChunk::Data(b) => out.extend_from_slice(&b),
            ReadChunk::Zero(n) => out.resize(out.len() + n as usize, 0),
        }
    }
    out.freeze()
}
