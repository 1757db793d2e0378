//! A cached volume: one image's local copy on this host, filled on demand.
//!
//! ```text
//! GROUP/volumes/NAME/
//!   manifest   the image's manifest (checked file, see virtman_image::manifest)
//!   data       sparse file of the image's size; present chunks at their offsets
//!   presence   checked file "VMPRESNC" v1: image id (32) | chunks u64 | bit words
//! ```
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
//!                                                             │
//!        committer (batched, at most the group's commit interval later):
//!                   fdatasync(data) ─► durable bits ─► write presence
//! ```
//!
//! Two maps are kept: `present` (readable from `data` now) and `durable`
//! (data synced, what the presence file records). Only durable chunks are
//! evicted; eviction clears the bits, writes the presence file and only then
//! punches the hole, all under the volume's gate, so a crash at any point
//! leaves a presence file that claims only chunks whose bytes are on disk.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use tokio::sync::watch;
use virtman_image::Manifest;
use virtman_image::checked::Format;
use virtman_nbd::proto::BlockSizes;
use virtman_nbd::{Capabilities, Export, ExportError, Extent, ReadChunk};

use crate::accounting::{Accounting, Evictable};
use crate::bitmap::{self, AtomicBitmap};
use crate::error::CacheError;
use crate::profile::{BootProfile, PROFILE_FILE, Recorder};
use crate::upstream::{ChunkRequest, Upstream};

/// File name of a volume's manifest.
pub const MANIFEST_FILE: &str = "manifest";
/// File name of a volume's data file.
pub const DATA_FILE: &str = "data";
/// The most CMD_CACHE hints a volume fetches at once (see
/// [`CachedVolume::prefetch_hint`]).
pub const MAX_HINTS: usize = 4;

/// File name of a volume's presence map.
pub const PRESENCE_FILE: &str = "presence";

/// The on-disk format of presence maps.
pub const PRESENCE_FORMAT: Format = Format {
    magic: *b"VMPRESNC",
    version: 1,
    max_body: 32 + 8 + virtman_image::manifest::MAX_CHUNKS / 8,
    what: "presence map",
};

type Flight = Option<Result<Bytes, Arc<CacheError>>>;

/// Counters of one volume.
#[derive(Debug, Default)]
pub struct VolumeStats {
    /// Chunk pieces served from the local data file.
    pub hits: AtomicU64,
    /// Chunk pieces that needed a fetch (or waited on one).
    pub misses: AtomicU64,
    /// Chunks fetched, verified and stored.
    pub fetched_chunks: AtomicU64,
    /// Bytes fetched, verified and stored.
    pub fetched_bytes: AtomicU64,
    /// Fetches that failed (upstream error, bad data, no space).
    pub fetch_errors: AtomicU64,
    /// Chunks evicted.
    pub evicted_chunks: AtomicU64,
    /// Chunks fetched by [`CachedVolume::prefetch`] (boot profile, pin,
    /// CMD_CACHE hints) rather than by a read.
    pub prefetched_chunks: AtomicU64,
    /// Bytes of those chunks.
    pub prefetched_bytes: AtomicU64,
}

/// One image's cached copy. Created and opened by [`crate::CacheGroup`].
pub struct CachedVolume {
    name: String,
    dir: PathBuf,
    manifest: Manifest,
    data: File,
    data_path: PathBuf,
    presence_path: PathBuf,
    /// Chunks whose bytes are in `data` and may be read from it.
    present: AtomicBitmap,
    /// Chunks whose bytes are synced; what the presence file says.
    durable: AtomicBitmap,
    /// Logical time of each chunk's last use, for LRU eviction.
    last_used: Vec<AtomicU64>,
    /// Held shared by local reads and stores, exclusively by eviction.
    gate: RwLock<()>,
    /// Serialises presence file writes (commit and eviction).
    commit_lock: Mutex<()>,
    /// Chunks written but not yet synced.
    pending: Mutex<Vec<u64>>,
    commit_scheduled: AtomicBool,
    inflight: Mutex<HashMap<u64, watch::Receiver<Flight>>>,
    upstream: RwLock<Option<Arc<dyn Upstream>>>,
    uses: AtomicUsize,
    acct: Arc<Accounting>,
    rebuilt: bool,
    stats: VolumeStats,
    /// First touches of chunks by VMs (the boot profile).
    profile: Recorder,
    profile_path: PathBuf,
    /// Reads waiting on a fetch right now (prefetch yields to them).
    demand_waiting: AtomicUsize,
    /// Background hint tasks running (see [`CachedVolume::prefetch_hint`]).
    hints: AtomicUsize,
}

impl std::fmt::Debug for CachedVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedVolume")
            .field("name", &self.name)
            .field("image", &self.manifest.id())
            .field("present", &self.present.count())
            .finish()
    }
}

impl Drop for CachedVolume {
    /// A clean close makes every stored chunk durable and recorded.
    fn drop(&mut self) {
        if let Err(e) = self.commit() {
            tracing::warn!(volume = %self.name, error = %e, "committing chunks on close failed");
        }
        if let Err(e) = self.save_profile() {
            tracing::warn!(volume = %self.name, error = %e, "saving the boot profile on close failed");
        }
    }
}

/// A use of a volume (a snapshot, an export to children): while one exists,
/// the volume's chunks are not evicted and the volume cannot be removed.
#[derive(Debug)]
pub struct VolumeUse {
    vol: Arc<CachedVolume>,
}

impl VolumeUse {
    /// The volume in use.
    pub fn volume(&self) -> &Arc<CachedVolume> {
        &self.vol
    }
}

impl Drop for VolumeUse {
    fn drop(&mut self) {
        self.vol.uses.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One contiguous piece of a read inside one chunk.
#[derive(Clone, Copy, Debug)]
struct Piece {
    chunk: u64,
    offset: u64,
    len: u32,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Punches a hole; a file system without hole support keeps the bytes, which
/// is safe since the chunk is already marked absent.
pub(crate) fn punch(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use rustix::fs::FallocateFlags;
    match rustix::fs::fallocate(
        file,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        offset,
        len,
    ) {
        Ok(()) | Err(rustix::io::Errno::OPNOTSUPP) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

impl CachedVolume {
    /// Creates the files of a new volume in `dir` (which must exist and be
    /// empty): manifest, sparse data file and an empty presence map.
    pub(crate) fn create_files(dir: &Path, manifest: &Manifest) -> Result<(), CacheError> {
        manifest.store(&dir.join(MANIFEST_FILE))?;
        let data_path = dir.join(DATA_FILE);
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&data_path)
            .map_err(|e| CacheError::io("creating volume data", &data_path, e))?;
        f.set_len(manifest.size())
            .map_err(|e| CacheError::io("sizing volume data", &data_path, e))?;
        let empty = AtomicBitmap::new(manifest.chunks());
        bitmap::save(
            &PRESENCE_FORMAT,
            &dir.join(PRESENCE_FILE),
            &manifest.id().0,
            manifest.chunks(),
            &empty.snapshot(),
        )?;
        Ok(())
    }

    /// Opens the volume in `dir`. A refused manifest is an error naming the
    /// file; a refused presence map is logged and the volume rebuilt empty.
    pub(crate) fn open(
        name: &str,
        dir: &Path,
        acct: Arc<Accounting>,
    ) -> Result<Arc<CachedVolume>, CacheError> {
        let manifest = Manifest::load(&dir.join(MANIFEST_FILE))?;
        let data_path = dir.join(DATA_FILE);
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&data_path)
            .map_err(|e| CacheError::io(format!("volume {name:?}: opening data"), &data_path, e))?;
        let len = data
            .metadata()
            .map_err(|e| CacheError::io(format!("volume {name:?}: stat"), &data_path, e))?
            .len();
        let presence_path = dir.join(PRESENCE_FILE);
        let chunks = manifest.chunks();
        let (words, rebuilt) = match bitmap::load(
            &PRESENCE_FORMAT,
            &presence_path,
            &manifest.id().0,
            chunks,
        ) {
            Ok(map) if len == manifest.size() => (map.snapshot(), false),
            Ok(_) => {
                tracing::warn!(
                    volume = name,
                    "data file has the wrong size; rebuilding the volume empty"
                );
                (Vec::new(), true)
            }
            Err(e) => {
                tracing::warn!(volume = name, error = %e, "presence map refused; rebuilding the volume empty");
                (Vec::new(), true)
            }
        };
        let present = AtomicBitmap::new(chunks);
        let durable = AtomicBitmap::new(chunks);
        if rebuilt {
            // Nothing in the data file is trusted: drop it all, then record that.
            data.set_len(0)
                .and_then(|()| data.set_len(manifest.size()))
                .map_err(|e| {
                    CacheError::io(format!("volume {name:?}: resetting data"), &data_path, e)
                })?;
            rustix::fs::fdatasync(&data).map_err(|e| {
                CacheError::io(format!("volume {name:?}: syncing"), &data_path, e.into())
            })?;
            bitmap::save(
                &PRESENCE_FORMAT,
                &presence_path,
                &manifest.id().0,
                chunks,
                &durable.snapshot(),
            )?;
        } else {
            for (i, w) in words.iter().enumerate() {
                for b in 0..64 {
                    if w & (1u64 << b) != 0 {
                        let bit = i as u64 * 64 + b;
                        present.set(bit);
                        durable.set(bit);
                    }
                }
            }
        }
        let bytes: u64 = present
            .ones()
            .map(|i| u64::from(manifest.chunk_len(i)))
            .sum();
        acct.add_used(bytes);
        let n = usize::try_from(chunks).unwrap_or(0);
        let profile_path = dir.join(PROFILE_FILE);
        let loaded = if rebuilt || !profile_path.exists() {
            BootProfile::default()
        } else {
            BootProfile::load(&profile_path, &manifest).unwrap_or_else(|e| {
                tracing::warn!(volume = name, error = %e, "boot profile refused; recording anew");
                BootProfile::default()
            })
        };
        let profile = Recorder::new(chunks, loaded);
        let vol = Arc::new(CachedVolume {
            name: name.to_owned(),
            dir: dir.to_path_buf(),
            manifest,
            data,
            data_path,
            presence_path,
            present,
            durable,
            last_used: (0..n).map(|_| AtomicU64::new(0)).collect(),
            gate: RwLock::new(()),
            commit_lock: Mutex::new(()),
            pending: Mutex::new(Vec::new()),
            commit_scheduled: AtomicBool::new(false),
            inflight: Mutex::new(HashMap::new()),
            upstream: RwLock::new(None),
            uses: AtomicUsize::new(0),
            acct: Arc::clone(&acct),
            rebuilt,
            stats: VolumeStats::default(),
            profile,
            profile_path,
            demand_waiting: AtomicUsize::new(0),
            hints: AtomicUsize::new(0),
        });
        acct.register(Arc::<CachedVolume>::downgrade(&vol));
        Ok(vol)
    }

    /// The volume's name (the image name on this host).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The volume's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The image's manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Image size in bytes.
    pub fn size(&self) -> u64 {
        self.manifest.size()
    }

    /// Whether the presence map was refused at open and the volume rebuilt empty.
    pub fn was_rebuilt(&self) -> bool {
        self.rebuilt
    }

    /// Counters.
    pub fn stats(&self) -> &VolumeStats {
        &self.stats
    }

    /// Records that a VM read `offset..offset+len` from this volume: the
    /// first touch of each chunk (all-zero chunks aside) joins the boot
    /// profile. Out-of-range parts are ignored.
    pub fn record_boot_read(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.size() {
            return;
        }
        let last_byte = offset.saturating_add(len - 1).min(self.size() - 1);
        for i in self.manifest.chunk_of(offset)..=self.manifest.chunk_of(last_byte) {
            if !self.manifest.is_zero_chunk(i) {
                self.profile.touch(i);
            }
        }
    }

    /// The boot profile recorded on this host so far.
    pub fn boot_profile(&self) -> BootProfile {
        self.profile.profile()
    }

    /// Entries in the recorded boot profile (grows as VMs touch new chunks).
    pub fn boot_profile_len(&self) -> u64 {
        self.profile.len()
    }

    /// Writes the boot profile file if it changed since the last save.
    pub fn save_profile(&self) -> Result<(), CacheError> {
        if !self.profile.take_dirty() {
            return Ok(());
        }
        let res = self
            .profile
            .profile()
            .store(&self.profile_path, &self.manifest);
        if res.is_err() {
            self.profile.set_dirty();
        }
        res
    }

    /// Reads waiting on fetches right now; background prefetch waits while
    /// this is above zero, so demand reads go first.
    pub fn demand_waiting(&self) -> usize {
        self.demand_waiting.load(Ordering::Acquire)
    }

    /// Whether chunk `index` is present (readable locally).
    pub fn is_present(&self, index: u64) -> bool {
        self.present.get(index)
    }

    /// Number of present chunks.
    pub fn present_chunks(&self) -> u64 {
        self.present.count()
    }

    /// Bytes of present chunks.
    pub fn present_bytes(&self) -> u64 {
        self.present
            .ones()
            .map(|i| u64::from(self.manifest.chunk_len(i)))
            .sum()
    }

    /// The indices of present chunks.
    pub fn present_list(&self) -> Vec<u64> {
        self.present.ones().collect()
    }

    /// Number of current uses (snapshots, exports).
    pub fn uses(&self) -> usize {
        self.uses.load(Ordering::Acquire)
    }

    /// Attaches (or replaces, or with `None` detaches) the upstream.
    pub fn set_upstream(&self, upstream: Option<Arc<dyn Upstream>>) {
        *self
            .upstream
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = upstream;
    }

    /// Marks the volume as in use until the returned guard is dropped.
    pub fn acquire(self: &Arc<Self>) -> VolumeUse {
        self.uses.fetch_add(1, Ordering::AcqRel);
        VolumeUse {
            vol: Arc::clone(self),
        }
    }

    /// The read-only export of this volume (what children hosts read). It
    /// holds a use of the volume while it exists.
    pub fn export(self: &Arc<Self>) -> VolumeExport {
        VolumeExport {
            use_: self.acquire(),
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), CacheError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(CacheError::PastEnd {
                name: self.name.clone(),
                offset,
                len,
                size: self.size(),
            }),
        }
    }

    fn pieces(&self, offset: u64, len: u32) -> Vec<Piece> {
        let mut out = Vec::new();
        let end = offset + u64::from(len);
        let mut pos = offset;
        while pos < end {
            let chunk = self.manifest.chunk_of(pos);
            let chunk_end =
                self.manifest.chunk_offset(chunk) + u64::from(self.manifest.chunk_len(chunk));
            let n = chunk_end.min(end) - pos;
            out.push(Piece {
                chunk,
                offset: pos,
                len: u32::try_from(n).unwrap_or(u32::MAX),
            });
            pos += n;
        }
        out
    }

    fn touch(&self, chunk: u64) {
        if let Some(s) = usize::try_from(chunk)
            .ok()
            .and_then(|i| self.last_used.get(i))
        {
            s.store(self.acct.tick(), Ordering::Relaxed);
        }
    }

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
        // Missing pieces: fetch their chunks in parallel.
        /// Counts this read as waiting for as long as it waits.
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let _waiting = local.iter().any(Option::is_none).then(|| {
            self.demand_waiting.fetch_add(1, Ordering::AcqRel);
            Waiting(&self.demand_waiting)
        });
        let mut set = tokio::task::JoinSet::new();
        for (k, p) in pieces.iter().enumerate() {
            if local[k].is_none() {
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                let vol = Arc::clone(self);
                let chunk = p.chunk;
                set.spawn(async move { (k, vol.chunk_bytes(chunk).await) });
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
            let mut buf = BytesMut::zeroed(total);
            if nowait {
                let mut slices = [std::io::IoSliceMut::new(&mut buf)];
                let flags = rustix::io::ReadWriteFlags::NOWAIT;
                match rustix::io::preadv2(&self.data, &mut slices, p.offset, flags) {
                    Ok(n) if n == total => {}
                    // Not all in the page cache, or no RWF_NOWAIT here.
                    _ => return Ok(None),
                }
            } else {
                self.data.read_exact_at(&mut buf, p.offset).map_err(|e| {
                    CacheError::io(
                        format!(
                            "volume {:?}: reading {total} bytes at {}",
                            self.name, p.offset
                        ),
                        &self.data_path,
                        e,
                    )
                })?;
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
    async fn chunk_bytes(self: Arc<Self>, index: u64) -> Result<ReadChunk, CacheError> {
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
                        tokio::spawn(async move { vol.lead_fetch(index, tx).await });
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

    async fn lead_fetch(self: Arc<Self>, index: u64, tx: watch::Sender<Flight>) {
        /// Removes the in-flight entry even if the fetch panics.
        struct Done<'a>(&'a CachedVolume, u64);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                lock(&self.0.inflight).remove(&self.1);
            }
        }
        let res = {
            let _done = Done(&self, index);
            let r = self.fetch_verify_store(index).await;
            if r.is_err() {
                self.stats.fetch_errors.fetch_add(1, Ordering::Relaxed);
            }
            r
        };
        let _ = tx.send(Some(res.map_err(Arc::new)));
    }

    async fn fetch_verify_store(self: &Arc<Self>, index: u64) -> Result<Bytes, CacheError> {
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
        tokio::task::spawn_blocking(move || vol.store_chunk(index, &d))
            .await
            .map_err(|e| CacheError::Task(e.to_string()))??;
        self.stats.fetched_chunks.fetch_add(1, Ordering::Relaxed);
        self.stats
            .fetched_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        self.schedule_commit();
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
        self.present.set(index);
        self.touch(index);
        lock(&self.pending).push(index);
        Ok(())
    }

    /// Chunks stored but not yet durable and recorded in the presence file
    /// (committed within the group's commit interval).
    pub fn pending_chunks(&self) -> usize {
        lock(&self.pending).len()
    }

    fn schedule_commit(self: &Arc<Self>) {
        if self.commit_scheduled.swap(true, Ordering::AcqRel) {
            return;
        }
        // Weak: a volume closed meanwhile committed as it dropped.
        let weak = Arc::downgrade(self);
        let interval = self.acct.commit_interval;
        tokio::spawn(async move {
            tokio::time::sleep(interval).await;
            let Some(vol) = weak.upgrade() else {
                return;
            };
            let res = tokio::task::spawn_blocking(move || {
                vol.commit_scheduled.store(false, Ordering::Release);
                if let Err(e) = vol.commit() {
                    tracing::warn!(volume = %vol.name, error = %e, "committing fetched chunks failed; will retry");
                }
            })
            .await;
            if let Err(e) = res {
                tracing::warn!(error = %e, "the commit task failed");
            }
        });
    }

    /// Makes every stored chunk durable and records it in the presence file:
    /// one `fdatasync` and one presence write for everything stored so far.
    pub fn commit(&self) -> Result<(), CacheError> {
        let _c = lock(&self.commit_lock);
        // The batch stays pending until it is recorded, so that
        // `pending_chunks() == 0` means durable; chunks stored meanwhile are
        // pushed after it.
        let batch = lock(&self.pending).clone();
        if batch.is_empty() {
            return Ok(());
        }
        let res = rustix::fs::fdatasync(&self.data)
            .map_err(|e| {
                CacheError::io(
                    format!("volume {:?}: syncing data", self.name),
                    &self.data_path,
                    e.into(),
                )
            })
            .and_then(|()| {
                for &i in &batch {
                    if self.present.get(i) {
                        self.durable.set(i);
                    }
                }
                self.save_presence()
            });
        if res.is_ok() {
            lock(&self.pending).drain(..batch.len());
        }
        res
    }

    /// Makes everything fetched so far durable (blocking thread).
    pub async fn sync(self: &Arc<Self>) -> Result<(), CacheError> {
        let vol = Arc::clone(self);
        tokio::task::spawn_blocking(move || vol.commit())
            .await
            .map_err(|e| CacheError::Task(e.to_string()))?
    }

    fn save_presence(&self) -> Result<(), CacheError> {
        bitmap::save(
            &PRESENCE_FORMAT,
            &self.presence_path,
            &self.manifest.id().0,
            self.manifest.chunks(),
            &self.durable.snapshot(),
        )
        .map_err(CacheError::from)
    }
}

impl Evictable for CachedVolume {
    fn name(&self) -> &str {
        CachedVolume::name(self)
    }

    fn manifest(&self) -> &Manifest {
        CachedVolume::manifest(self)
    }

    fn uses(&self) -> usize {
        CachedVolume::uses(self)
    }

    fn pending_chunks(&self) -> usize {
        CachedVolume::pending_chunks(self)
    }

    fn commit(&self) -> Result<(), CacheError> {
        CachedVolume::commit(self)
    }

    /// Eviction candidates: (last use, chunk) of durable chunks, none if the
    /// volume is in use.
    fn evict_candidates(&self) -> Vec<(u64, u64)> {
        if self.uses() > 0 {
            return Vec::new();
        }
        self.durable
            .ones()
            .filter(|&i| self.present.get(i))
            .map(|i| {
                let t = usize::try_from(i)
                    .ok()
                    .and_then(|k| self.last_used.get(k))
                    .map_or(0, |a| a.load(Ordering::Relaxed));
                (t, i)
            })
            .collect()
    }

    /// Evicts `chunks` (those still durable and present): clears their bits,
    /// writes the presence file, then punches the holes. Returns bytes freed.
    fn evict(&self, chunks: &[u64]) -> u64 {
        let _g = self
            .gate
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.uses() > 0 {
            return 0;
        }
        let _c = lock(&self.commit_lock);
        let victims: Vec<u64> = chunks
            .iter()
            .copied()
            .filter(|&i| self.durable.get(i) && self.present.get(i))
            .collect();
        for &i in &victims {
            self.present.clear(i);
            self.durable.clear(i);
        }
        if let Err(e) = self.save_presence() {
            tracing::warn!(volume = %self.name, error = %e, "eviction: writing the presence map failed");
            for &i in &victims {
                self.present.set(i);
                self.durable.set(i);
            }
            return 0;
        }
        let mut freed = 0;
        for &i in &victims {
            let len = u64::from(self.manifest.chunk_len(i));
            if let Err(e) = punch(&self.data, self.manifest.chunk_offset(i), len) {
                tracing::warn!(volume = %self.name, chunk = i, error = %e, "punching an evicted chunk failed");
            }
            freed += len;
        }
        self.stats
            .evicted_chunks
            .fetch_add(victims.len() as u64, Ordering::Relaxed);
        self.acct.sub_used(freed);
        freed
    }
}

impl CachedVolume {
    /// Fetches every missing chunk of `offset..offset+len` (a prefetch).
    pub async fn prefetch(self: &Arc<Self>, offset: u64, len: u64) -> Result<(), CacheError> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let first = self.manifest.chunk_of(offset);
        let last = self.manifest.chunk_of(offset + len - 1);
        let mut set = tokio::task::JoinSet::new();
        for i in first..=last {
            if !self.present.get(i) && !self.manifest.is_zero_chunk(i) {
                let vol = Arc::clone(self);
                set.spawn(async move {
                    Arc::clone(&vol).chunk_bytes(i).await?;
                    vol.stats.prefetched_chunks.fetch_add(1, Ordering::Relaxed);
                    vol.stats
                        .prefetched_bytes
                        .fetch_add(u64::from(vol.manifest.chunk_len(i)), Ordering::Relaxed);
                    Ok::<(), CacheError>(())
                });
            }
        }
        let mut first_err = None;
        while let Some(r) = set.join_next().await {
            let r = r
                .map_err(|e| CacheError::Task(e.to_string()))
                .and_then(|r| r);
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// A hint that `offset..offset+len` will be read soon (NBD CMD_CACHE from
    /// a VM): checks the range and returns at once; a background task fetches
    /// the range's missing chunks one at a time, waiting while demand reads
    /// wait, through [`CachedVolume::prefetch`] (so single flight, and
    /// counted as prefetched). At most [`MAX_HINTS`] hints run at once; more
    /// are dropped (a hint may be ignored).
    pub fn prefetch_hint(self: &Arc<Self>, offset: u64, len: u64) -> Result<(), CacheError> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if self
            .hints
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_HINTS).then_some(n + 1)
            })
            .is_err()
        {
            tracing::debug!(volume = %self.name, offset, len, "too many hints running; dropped");
            return Ok(());
        }
        let vol = Arc::clone(self);
        tokio::spawn(async move {
            let m = &vol.manifest;
            for i in m.chunk_of(offset)..=m.chunk_of(offset + len - 1) {
                if vol.present.get(i) || m.is_zero_chunk(i) {
                    continue;
                }
                while vol.demand_waiting() > 0 {
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
                let (at, n) = (m.chunk_offset(i), u64::from(m.chunk_len(i)));
                if let Err(e) = vol.prefetch(at, n).await {
                    tracing::debug!(volume = %vol.name, chunk = i, error = %e, "hinted prefetch failed");
                    break;
                }
            }
            vol.hints.fetch_sub(1, Ordering::AcqRel);
        });
        Ok(())
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

    /// Allocation status for `base:allocation`: all-zero chunks are holes
    /// that read as zero, everything else is data.
    pub fn extents(&self, offset: u64, len: u32) -> Vec<Extent> {
        let mut out: Vec<Extent> = Vec::new();
        for p in self.pieces(
            offset,
            len.max(1)
                .min(u32::try_from(self.size().saturating_sub(offset)).unwrap_or(u32::MAX)),
        ) {
            let zero = self.manifest.is_zero_chunk(p.chunk);
            match out.last_mut() {
                Some(e) if e.zero == zero => e.length += u64::from(p.len),
                _ => {
                    if out.len() >= 1024 {
                        break;
                    }
                    out.push(Extent {
                        length: u64::from(p.len),
                        hole: zero,
                        zero,
                    });
                }
            }
        }
        out
    }

    /// Runs of (length, flags) from `offset` for the `x-virtman:present`
    /// context: [`PRESENT`] where a read needs no parent (the chunk is held,
    /// or all zero), 0 where it would fetch. Covers at least one byte of the
    /// image and at most `len` bytes, in at most 1024 runs.
    pub fn present_runs(&self, offset: u64, len: u32) -> Vec<(u64, u32)> {
        let mut out: Vec<(u64, u32)> = Vec::new();
        for p in self.pieces(
            offset,
            len.max(1)
                .min(u32::try_from(self.size().saturating_sub(offset)).unwrap_or(u32::MAX)),
        ) {
            let held = self.is_present(p.chunk) || self.manifest.is_zero_chunk(p.chunk);
            let flags = if held { PRESENT } else { 0 };
            match out.last_mut() {
                Some((length, f)) if *f == flags => *length += u64::from(p.len),
                _ => {
                    if out.len() >= 1024 {
                        break;
                    }
                    out.push((u64::from(p.len), flags));
                }
            }
        }
        out
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

/// The NBD metadata context of a cached volume's export that tells which
/// chunks this host holds: flag [`PRESENT`] on the runs it holds, 0 on the
/// runs a read would fetch from a parent (`nbdinfo --map=x-virtman:present`).
pub const X_VIRTMAN_PRESENT: &str = "x-virtman:present";
/// The flag of held runs in [`X_VIRTMAN_PRESENT`].
pub const PRESENT: u32 = 1;

/// The read-only NBD export of a cached volume. Holds a use of the volume.
#[derive(Debug)]
pub struct VolumeExport {
    use_: VolumeUse,
}

impl VolumeExport {
    /// The exported volume.
    pub fn volume(&self) -> &Arc<CachedVolume> {
        self.use_.volume()
    }
}

/// Reads up to this long try the page cache on the calling task first (a
/// chunk's worth: a VM's reads and a child's chunk fetches).
const INLINE_READ_MAX: u64 = 256 * 1024;

/// Block sizes of cache exports: any alignment, 4 KiB preferred.
pub(crate) const EXPORT_BLOCK_SIZES: BlockSizes = BlockSizes {
    minimum: 1,
    preferred: 4096,
    maximum: 32 << 20,
};

#[async_trait]
impl Export for VolumeExport {
    fn size(&self) -> u64 {
        self.volume().size()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: true,
            flush: false,
            trim: false,
            write_zeroes: false,
            cache: true,
            multi_conn: true,
            block_sizes: EXPORT_BLOCK_SIZES,
            description: Some(format!(
                "virtman cached volume {} (image {})",
                self.volume().name(),
                self.volume().manifest().id().short()
            )),
        }
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadChunk>, ExportError> {
        Ok(self.volume().read(offset, len).await?)
    }

    async fn cache(&self, offset: u64, len: u32) -> Result<(), ExportError> {
        Ok(self.volume().prefetch(offset, u64::from(len)).await?)
    }

    async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<Extent>, ExportError> {
        Ok(self.volume().extents(offset, len))
    }

    fn meta_contexts(&self) -> Vec<String> {
        vec![X_VIRTMAN_PRESENT.to_owned()]
    }

    async fn context_status(
        &self,
        context: &str,
        offset: u64,
        len: u32,
    ) -> Result<Vec<(u64, u32)>, ExportError> {
        if context != X_VIRTMAN_PRESENT {
            return Err(ExportError::Invalid(format!(
                "no metadata context {context:?}"
            )));
        }
        Ok(self.volume().present_runs(offset, len))
    }
}
