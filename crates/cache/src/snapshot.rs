//! A VM's snapshot: a private, writable copy-on-write view of a cached volume.
//!
//! ```text
//! GROUP/snapshots/NAME/
//!   overlay   sparse file of the image's size; written blocks at their offsets
//!   map       checked file "VMSNAPMP" v1:
//!             +------------+----------+-------------+---------+----------+-------+
//!             | image id 32| size u64 | name len u32| volume  | blocks   | words |
//!             |            |          |             | name    | u64      |       |
//!             +------------+----------+-------------+---------+----------+-------+
//! ```
//!
//! One bit per 4 KiB block says whether the block lives in the overlay.
//! Reads take allocated blocks from the overlay and the rest from the base
//! volume (fetching if needed). Writes, TRIM and WRITE_ZEROES touch only the
//! overlay: a write that covers part of an unallocated block first copies
//! the rest of that block from the base (under a lock, so two such writes do
//! not undo each other); TRIM and WRITE_ZEROES punch holes in the overlay and
//! mark the blocks allocated, so they read as zero.
//!
//! FLUSH (and FUA) take a copy of the allocation bits, `fdatasync` the
//! overlay, then write the map atomically: every write acknowledged before
//! the flush began is durable, and the map on disk never claims a block whose
//! data was not synced. Unflushed writes may be lost in a crash; a block then
//! reads as the base or as an earlier write, never as garbage.
//!
//! A failed sync poisons the snapshot: that flush and every later one fail
//! (after a failed `fdatasync` the kernel may have dropped the dirty pages, so
//! a second sync would succeed without them), and the map on disk stays as
//! the last good flush left it. Reopening the group clears it.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use rustix::io::Errno;
use virtman_image::checked::{self, CheckedFileError, Format};
use virtman_nbd::{Capabilities, Export, ExportError, ReadChunk};

use crate::bitmap::{self, AtomicBitmap};
use crate::disk::{DiskFaults, DiskFile, Role};
use crate::error::CacheError;
use crate::volume::{CachedVolume, EXPORT_BLOCK_SIZES, VolumeUse, flatten};

/// Allocation granularity of snapshots.
pub const BLOCK: u64 = 4096;
/// File name of a snapshot's overlay.
pub const OVERLAY_FILE: &str = "overlay";
/// File name of a snapshot's allocation map.
pub const MAP_FILE: &str = "map";

/// The on-disk format of snapshot allocation maps.
pub const MAP_FORMAT: Format = Format {
    magic: *b"VMSNAPMP",
    version: 1,
    // 16 TiB of 4 KiB blocks.
    max_body: 32 + 8 + 4 + 128 + 8 + (1 << 32) / 8,
    what: "snapshot map",
};

/// A VM's writable view of a cached volume. Create and open it through
/// [`crate::CacheGroup`]; serve it over NBD as an `Arc<Snapshot>` (it
/// implements [`Export`]).
#[derive(Debug)]
pub struct Snapshot {
    name: String,
    dir: PathBuf,
    overlay: Arc<DiskFile>,
    overlay_path: PathBuf,
    map_path: PathBuf,
    base: VolumeUse,
    alloc: AtomicBitmap,
    size: u64,
    /// Bumped by every change of the allocation bits.
    generation: AtomicU64,
    /// Generation recorded in the map on disk.
    saved: AtomicU64,
    /// A sync of the overlay failed: no flush succeeds any more.
    sync_failed: AtomicBool,
    flush_lock: tokio::sync::Mutex<()>,
    rmw_lock: tokio::sync::Mutex<()>,
}

fn map_prefix(base: &CachedVolume) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&base.manifest().id().0);
    p.extend_from_slice(&base.size().to_le_bytes());
    let name = base.name().as_bytes();
    p.extend_from_slice(&u32::try_from(name.len()).unwrap_or(0).to_le_bytes());
    p.extend_from_slice(name);
    p
}

/// The volume name recorded in a map body.
fn map_volume(path: &Path, body: &[u8]) -> Result<String, CheckedFileError> {
    let invalid = |reason: &str| CheckedFileError::Invalid {
        path: path.to_path_buf(),
        reason: reason.to_owned(),
    };
    let n = body
        .get(40..44)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or_else(|| invalid("snapshot map too short"))?;
    let name = body
        .get(44..44 + n.min(128))
        .filter(|_| n <= 128)
        .ok_or_else(|| invalid("bad volume name length"))?;
    String::from_utf8(name.to_vec()).map_err(|_| invalid("volume name is not UTF-8"))
}

fn blocks_of(size: u64) -> u64 {
    size.div_ceil(BLOCK)
}

impl Snapshot {
    pub(crate) fn create_files(dir: &Path, base: &CachedVolume) -> Result<(), CacheError> {
        let overlay_path = dir.join(OVERLAY_FILE);
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&overlay_path)
            .map_err(|e| CacheError::io("creating snapshot overlay", &overlay_path, e))?;
        f.set_len(base.size())
            .map_err(|e| CacheError::io("sizing snapshot overlay", &overlay_path, e))?;
        let blocks = blocks_of(base.size());
        bitmap::save(
            &MAP_FORMAT,
            &dir.join(MAP_FILE),
            &map_prefix(base),
            blocks,
            &AtomicBitmap::new(blocks).snapshot(),
        )?;
        Ok(())
    }

    pub(crate) fn open(
        name: &str,
        dir: &Path,
        volumes: &BTreeMap<String, Arc<CachedVolume>>,
        faults: &DiskFaults,
    ) -> Result<Snapshot, CacheError> {
        let map_path = dir.join(MAP_FILE);
        let body = checked::read_checked(&MAP_FORMAT, &map_path)?;
        let vname = map_volume(&map_path, &body)?;
        let base = volumes
            .get(&vname)
            .ok_or_else(|| CheckedFileError::Invalid {
                path: map_path.clone(),
                reason: format!("base volume {vname:?} does not exist"),
            })?;
        let alloc =
            bitmap::decode_body(&map_path, &body, &map_prefix(base), blocks_of(base.size()))?;
        let overlay_path = dir.join(OVERLAY_FILE);
        let overlay = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&overlay_path)
            .map_err(|e| {
                CacheError::io(
                    format!("snapshot {name:?}: opening overlay"),
                    &overlay_path,
                    e,
                )
            })?;
        let len = overlay
            .metadata()
            .map_err(|e| CacheError::io(format!("snapshot {name:?}: stat"), &overlay_path, e))?
            .len();
        if len != base.size() {
            return Err(CheckedFileError::Invalid {
                path: overlay_path,
                reason: format!("overlay is {len} bytes, the image {}", base.size()),
            }
            .into());
        }
        Ok(Snapshot {
            name: name.to_owned(),
            dir: dir.to_path_buf(),
            overlay: Arc::new(DiskFile::new(overlay, Role::Snapshot, faults.clone())),
            overlay_path,
            map_path,
            base: base.acquire(),
            alloc,
            size: base.size(),
            generation: AtomicU64::new(0),
            saved: AtomicU64::new(0),
            sync_failed: AtomicBool::new(false),
            flush_lock: tokio::sync::Mutex::new(()),
            rmw_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// The snapshot's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The snapshot's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The base volume.
    pub fn base(&self) -> &Arc<CachedVolume> {
        self.base.volume()
    }

    /// Size in bytes (the image's).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of 4 KiB blocks held in the overlay.
    pub fn allocated_blocks(&self) -> u64 {
        self.alloc.count()
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), CacheError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(CacheError::PastEnd {
                name: self.name.clone(),
                offset,
                len,
                size: self.size,
            }),
        }
    }

    fn io_err(&self, what: String, e: io::Error) -> CacheError {
        CacheError::io(
            format!("snapshot {:?}: {what}", self.name),
            &self.overlay_path,
            e,
        )
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&DiskFile) -> io::Result<T> + Send + 'static,
        what: impl FnOnce() -> String,
    ) -> Result<T, CacheError> {
        let file = Arc::clone(&self.overlay);
        match tokio::task::spawn_blocking(move || f(&file)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.io_err(what(), e)),
            Err(e) => Err(CacheError::Task(e.to_string())),
        }
    }

    /// Reads `len` bytes at `offset`: written blocks from the overlay, the
    /// rest from the base volume.
    pub async fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadChunk>, CacheError> {
        self.check_range(offset, u64::from(len))?;
        let end = offset + u64::from(len);
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let allocated = self.alloc.get(pos / BLOCK);
            let mut run_end = ((pos / BLOCK) + 1) * BLOCK;
            while run_end < end && self.alloc.get(run_end / BLOCK) == allocated {
                run_end += BLOCK;
            }
            let run_end = run_end.min(end);
            let n = u32::try_from(run_end - pos).unwrap_or(u32::MAX);
            if allocated {
                let at = pos;
                let data = self
                    .blocking(
                        move |f| {
                            // Read whole or not sent: a reused buffer is safe.
                            let mut buf = virtman_nbd::buffers::IoBuf::take(n as usize);
                            f.read_exact_at(&mut buf, at)?;
                            Ok(buf.freeze())
                        },
                        || format!("reading {n} bytes at {at}"),
                    )
                    .await?;
                out.push(ReadChunk::Data(data));
            } else {
                self.base().record_boot_read(pos, u64::from(n));
                out.extend(self.base().read(pos, n).await?);
            }
            pos = run_end;
        }
        Ok(out)
    }

    /// Reads into one buffer.
    pub async fn read_bytes(&self, offset: u64, len: u32) -> Result<Bytes, CacheError> {
        Ok(flatten(self.read(offset, len).await?))
    }

    /// The block range `[first, last]` a byte range touches and whether each
    /// end block is only partly covered.
    fn edges(&self, offset: u64, len: u64) -> (u64, u64, bool, bool) {
        let end = offset + len;
        let first = offset / BLOCK;
        let last = (end - 1) / BLOCK;
        let block_end = |b: u64| ((b + 1) * BLOCK).min(self.size);
        let head_partial =
            !offset.is_multiple_of(BLOCK) || (first == last && end < block_end(first));
        let tail_partial = end < block_end(last);
        (first, last, head_partial, tail_partial)
    }

    /// Writes `data` at `offset`; with `fua`, durable on return.
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), CacheError> {
        let len = data.len() as u64;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let (first, last, head_p, tail_p) = self.edges(offset, len);
        let needs_rmw =
            |s: &Snapshot| (head_p && !s.alloc.get(first)) || (tail_p && !s.alloc.get(last));
        if !needs_rmw(self) {
            self.write_raw(offset, data).await?;
        } else {
            let _g = self.rmw_lock.lock().await;
            if !needs_rmw(self) {
                self.write_raw(offset, data).await?;
            } else {
                // Widen to whole blocks, filling the edges with current contents.
                let start = first * BLOCK;
                let stop = ((last + 1) * BLOCK).min(self.size);
                let mut buf = BytesMut::zeroed(usize::try_from(stop - start).unwrap_or(0));
                if head_p {
                    let n = u32::try_from((start + BLOCK).min(self.size) - start).unwrap_or(0);
                    let b = self.read_bytes(start, n).await?;
                    buf[..b.len()].copy_from_slice(&b);
                }
                if tail_p {
                    let ls = last * BLOCK;
                    let n = u32::try_from(stop - ls).unwrap_or(0);
                    let b = self.read_bytes(ls, n).await?;
                    let at = usize::try_from(ls - start).unwrap_or(0);
                    buf[at..at + b.len()].copy_from_slice(&b);
                }
                let at = usize::try_from(offset - start).unwrap_or(0);
                buf[at..at + data.len()].copy_from_slice(&data);
                self.write_raw(start, buf.freeze()).await?;
            }
        }
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    /// Writes into the overlay and marks the touched blocks allocated.
    async fn write_raw(&self, offset: u64, data: Bytes) -> Result<(), CacheError> {
        let len = data.len() as u64;
        self.blocking(
            move |f| f.write_all_at(&data, offset),
            || format!("writing {len} bytes at {offset}"),
        )
        .await?;
        self.alloc
            .set_range(offset / BLOCK, (offset + len).div_ceil(BLOCK));
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Makes `offset..offset+len` read as zero (TRIM and WRITE_ZEROES):
    /// whole blocks become holes in the overlay, partial blocks are written.
    pub async fn zero(&self, offset: u64, len: u64, fua: bool) -> Result<(), CacheError> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let full_start = offset.div_ceil(BLOCK) * BLOCK;
        let full_end = if end == self.size {
            end
        } else {
            end / BLOCK * BLOCK
        };
        if full_start < full_end {
            let n = full_end - full_start;
            self.blocking(
                move |f| zero_range(f, full_start, n),
                || format!("zeroing {n} bytes at {full_start}"),
            )
            .await?;
            self.alloc
                .set_range(full_start / BLOCK, full_end.div_ceil(BLOCK));
            self.generation.fetch_add(1, Ordering::AcqRel);
            if offset < full_start {
                self.write_zeroes_bytes(offset, full_start - offset).await?;
            }
            if full_end < end {
                self.write_zeroes_bytes(full_end, end - full_end).await?;
            }
        } else {
            self.write_zeroes_bytes(offset, len).await?;
        }
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    async fn write_zeroes_bytes(&self, offset: u64, len: u64) -> Result<(), CacheError> {
        let n = usize::try_from(len).map_err(|e| CacheError::Task(e.to_string()))?;
        self.write(offset, Bytes::from(vec![0u8; n]), false).await
    }

    /// Makes every acknowledged write durable: syncs the overlay, then writes
    /// the allocation map as it was when the flush began.
    pub async fn flush(&self) -> Result<(), CacheError> {
        let _f = self.flush_lock.lock().await;
        if self.sync_failed.load(Ordering::Acquire) {
            return Err(self.io_err(
                "an earlier sync of the overlay failed: writes since the last good flush may be lost"
                    .into(),
                Errno::IO.into(),
            ));
        }
        let generation = self.generation.load(Ordering::Acquire);
        let words = self.alloc.snapshot();
        if let Err(e) = self
            .blocking(DiskFile::sync_data, || "syncing".into())
            .await
        {
            self.sync_failed.store(true, Ordering::Release);
            tracing::warn!(snapshot = %self.name, error = %e, "the overlay's sync failed: no later flush will succeed");
            return Err(e);
        }
        if generation != self.saved.load(Ordering::Acquire) {
            let overlay = Arc::clone(&self.overlay);
            let path = self.map_path.clone();
            let prefix = map_prefix(self.base());
            let blocks = self.alloc.len();
            tokio::task::spawn_blocking(move || {
                overlay.faults().record(Role::Snapshot, &path, || {
                    bitmap::save(&MAP_FORMAT, &path, &prefix, blocks, &words)
                })
            })
            .await
            .map_err(|e| CacheError::Task(e.to_string()))??;
            self.saved.store(generation, Ordering::Release);
        }
        Ok(())
    }
}

impl Drop for Snapshot {
    /// A clean close keeps every write: sync the overlay and save the map if
    /// it changed since the last flush (not after a failed sync: the map then
    /// stays at the last good flush).
    fn drop(&mut self) {
        if self.generation.load(Ordering::Acquire) == self.saved.load(Ordering::Acquire)
            || self.sync_failed.load(Ordering::Acquire)
        {
            return;
        }
        let res = self
            .overlay
            .sync_data()
            .map_err(|e| self.io_err("syncing on close".into(), e))
            .and_then(|()| {
                self.overlay
                    .faults()
                    .record(Role::Snapshot, &self.map_path, || {
                        bitmap::save(
                            &MAP_FORMAT,
                            &self.map_path,
                            &map_prefix(self.base()),
                            self.alloc.len(),
                            &self.alloc.snapshot(),
                        )
                    })
                    .map_err(CacheError::from)
            });
        if let Err(e) = res {
            tracing::warn!(snapshot = %self.name, error = %e, "saving the snapshot map on close failed");
        }
    }
}

/// Zeroes a block-aligned range of the overlay: a hole if the file system can
/// punch one, else real zeroes.
fn zero_range(f: &DiskFile, offset: u64, len: u64) -> io::Result<()> {
    if f.punch(offset, len)? {
        return Ok(());
    }
    let zeroes = vec![0u8; 1 << 20];
    let mut pos = offset;
    while pos < offset + len {
        let n = usize::try_from((offset + len - pos).min(1 << 20)).map_err(io::Error::other)?;
        f.write_all_at(&zeroes[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}

#[async_trait]
impl Export for Snapshot {
    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: false,
            flush: true,
            trim: true,
            write_zeroes: true,
            cache: true,
            multi_conn: true,
            block_sizes: EXPORT_BLOCK_SIZES,
            description: Some(format!(
                "virtman snapshot {} of {}",
                self.name,
                self.base().name()
            )),
        }
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadChunk>, ExportError> {
        Ok(Snapshot::read(self, offset, len).await?)
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ExportError> {
        Ok(Snapshot::write(self, offset, data, fua).await?)
    }

    async fn flush(&self) -> Result<(), ExportError> {
        Ok(Snapshot::flush(self).await?)
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), ExportError> {
        Ok(self.zero(offset, u64::from(len), fua).await?)
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
        _may_trim: bool,
    ) -> Result<(), ExportError> {
        Ok(self.zero(offset, u64::from(len), fua).await?)
    }

    /// A VM's hint: fetched in the background behind demand reads (see
    /// [`CachedVolume::prefetch_hint`]); the reply does not wait for it.
    async fn cache(&self, offset: u64, len: u32) -> Result<(), ExportError> {
        Ok(self.base().prefetch_hint(offset, u64::from(len))?)
    }
}
