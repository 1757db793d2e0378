//! A cached volume: one image's local copy on this host, filled on demand.
//!
//! ```text
//! GROUP/volumes/NAME/
//!   manifest   the image's manifest (checked file, see virtman_image::manifest)
//!   data       sparse file of the image's size; present chunks at their offsets
//!   presence   checked file "VMPRESNC" v1: image id (32) | chunks u64 | bit words
//! ```
//!
//! ```text
//! read ─► present? ──yes──► pread(data)
//!           │no
//!           ▼
//!        single flight fetch ─► verify ─► reserve ─► pwrite ─► present bit
//!                                                                  │
//!        committer (batched): fdatasync(data) ─► durable bits ─► presence
//! ```
//!
//! This module holds [`CachedVolume`]'s state, its creation and opening, and
//! [`VolumeUse`]. The rest, by concern:
//!
//! - `read.rs`: the read path and the single flight fetch of missing chunks.
//! - `prefetch.rs`: prefetching ranges and CMD_CACHE hints.
//! - `commit.rs`: the committer, batched durable commits and the presence file.
//! - `evict.rs`: eviction of the volume's own chunks (for the group's accounting).
//! - `boot_profile.rs`: recording VMs' first touches into the boot profile.
//! - `export.rs`: [`VolumeExport`], the read-only NBD export, and its
//!   [`X_VIRTMAN_PRESENT`] metadata context.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use tokio::sync::watch;
use virtman_image::Manifest;
use virtman_image::checked::Format;

use crate::accounting::Accounting;
use crate::bitmap::{self, AtomicBitmap};
use crate::disk::{DiskFaults, DiskFile, Role};
use crate::error::CacheError;
use crate::profile::{BootProfile, PROFILE_FILE, Recorder};
use crate::upstream::Upstream;

mod boot_profile;
mod commit;
mod evict;
mod export;
mod prefetch;
mod read;

pub(crate) use export::EXPORT_BLOCK_SIZES;
pub use export::{PRESENT, VolumeExport, X_VIRTMAN_PRESENT};
pub use prefetch::{Expecting, MAX_HINTS};
pub use read::flatten;

/// File name of a volume's manifest.
pub const MANIFEST_FILE: &str = "manifest";
/// File name of a volume's data file.
pub const DATA_FILE: &str = "data";

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
    /// Failed reads, writes and syncs of the data file (see
    /// [`crate::disk`]: the chunks are fetched again or served from memory).
    pub disk_errors: AtomicU64,
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
    data: DiskFile,
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
    /// The chunks reads wait on right now (prefetch yields to them), with
    /// how many reads wait on each.
    demand_chunks: Mutex<HashMap<u64, usize>>,
    /// Chunks a replay running now will fetch, and how many replays run.
    expected: AtomicBitmap,
    expecting: Mutex<usize>,
    /// All-zero chunks (from the manifest): held without being stored.
    zero_chunks: u64,
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
        faults: &DiskFaults,
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
        let zero_chunks = (0..chunks).filter(|&i| manifest.is_zero_chunk(i)).count() as u64;
        let vol = Arc::new(CachedVolume {
            name: name.to_owned(),
            dir: dir.to_path_buf(),
            manifest,
            data: DiskFile::new(data, Role::Volume, faults.clone()),
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
            demand_chunks: Mutex::new(HashMap::new()),
            expected: AtomicBitmap::new(chunks),
            expecting: Mutex::new(0),
            hints: AtomicUsize::new(0),
            zero_chunks,
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

    /// Chunks that reads wait on right now; background prefetch waits while
    /// this is above zero, so demand reads go first.
    pub fn demand_waiting(&self) -> usize {
        lock(&self.demand_chunks).len()
    }

    /// Whether chunk `index` is present (readable locally).
    pub fn is_present(&self, index: u64) -> bool {
        self.present.get(index)
    }

    /// Number of present chunks.
    pub fn present_chunks(&self) -> u64 {
        self.present.count()
    }

    /// Chunks a read serves without fetching: those stored and the all-zero
    /// ones (never stored). The one figure of "how much a host holds":
    /// status, heartbeats (a host holding all is complete, a root), the
    /// `x-virtman:present` context and the metrics count it.
    pub fn held_chunks(&self) -> u64 {
        self.present.count() + self.zero_chunks
    }

    /// Whether every chunk is held.
    pub fn is_complete(&self) -> bool {
        self.held_chunks() >= self.manifest.chunks()
    }

    /// The fraction of chunks held, 0 to 1.
    pub fn held_fraction(&self) -> f64 {
        // Chunk counts are far below 2^53.
        #[allow(clippy::cast_precision_loss)]
        let f = self.held_chunks() as f64 / self.manifest.chunks().max(1) as f64;
        f.min(1.0)
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

    /// Chunk fetches running now (each ends stored or failed, its capacity
    /// reservation settled).
    pub fn fetches_in_flight(&self) -> usize {
        lock(&self.inflight).len()
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
}
