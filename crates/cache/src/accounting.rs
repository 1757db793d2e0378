//! Capacity accounting and eviction: one capacity shared by every volume of
//! a cache group.
//!
//! Usage is the bytes of present chunks of all volumes. Storing a fetched
//! chunk first reserves its bytes; when that would pass the capacity, the
//! least recently used durable chunks of volumes nobody uses (no snapshot, no
//! export) are evicted until usage drops to the low watermark. If nothing can
//! be evicted the fetch fails with [`CacheError::NoSpace`] (ENOSPC on NBD).
//!
//! The accounting knows volumes only as [`Evictable`] (implemented by
//! [`crate::CachedVolume`]), so it sits below both the group and the volumes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use virtman_image::Manifest;

use crate::error::CacheError;

/// What the accounting needs of a volume to make room: its chunks' sizes,
/// whether it is in use, committing its pending chunks, and evicting.
pub(crate) trait Evictable: Send + Sync {
    /// The volume's name.
    fn name(&self) -> &str;
    /// The image's manifest.
    fn manifest(&self) -> &Manifest;
    /// Number of current uses (snapshots, exports).
    fn uses(&self) -> usize;
    /// Chunks stored but not yet durable.
    fn pending_chunks(&self) -> usize;
    /// Makes every stored chunk durable.
    fn commit(&self) -> Result<(), CacheError>;
    /// Eviction candidates: (last use, chunk) of durable chunks, none if the
    /// volume is in use.
    fn evict_candidates(&self) -> Vec<(u64, u64)>;
    /// Evicts `chunks`; returns bytes freed.
    fn evict(&self, chunks: &[u64]) -> u64;
}

/// Weak handle of a volume, as the accounting holds it.
pub(crate) type WeakVolume = Weak<dyn Evictable>;

/// Capacity accounting and eviction, shared by the group and its volumes.
#[derive(Debug)]
pub(crate) struct Accounting {
    capacity: u64,
    low: u64,
    pub(crate) commit_interval: std::time::Duration,
    used: AtomicU64,
    clock: AtomicU64,
    volumes: Mutex<Vec<WeakVolume>>,
    evict_lock: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Accounting {
    /// Accounting of `capacity` bytes that eviction drains to `low`.
    pub(crate) fn new(capacity: u64, low: u64, commit_interval: std::time::Duration) -> Accounting {
        Accounting {
            capacity,
            low,
            commit_interval,
            used: AtomicU64::new(0),
            clock: AtomicU64::new(0),
            volumes: Mutex::new(Vec::new()),
            evict_lock: Mutex::new(()),
        }
    }

    /// Bytes of present chunks.
    pub(crate) fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// The capacity.
    pub(crate) fn capacity(&self) -> u64 {
        self.capacity
    }

    pub(crate) fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub(crate) fn add_used(&self, bytes: u64) {
        self.used.fetch_add(bytes, Ordering::AcqRel);
    }

    pub(crate) fn sub_used(&self, bytes: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                Some(u.saturating_sub(bytes))
            });
    }

    pub(crate) fn register(&self, v: WeakVolume) {
        let mut vols = lock(&self.volumes);
        vols.retain(|w| w.strong_count() > 0);
        vols.push(v);
    }

    fn try_add(&self, bytes: u64) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(bytes).filter(|&n| n <= self.capacity)
            })
            .is_ok()
    }

    /// Reserves `bytes` of capacity, evicting if needed (blocking).
    pub(crate) fn reserve(&self, bytes: u64, volume: &str, chunk: u64) -> Result<(), CacheError> {
        if self.try_add(bytes) {
            return Ok(());
        }
        let _e = lock(&self.evict_lock);
        let mut committed = false;
        loop {
            if self.try_add(bytes) {
                return Ok(());
            }
            let target = self.low.min(self.capacity.saturating_sub(bytes));
            if self.evict_to(target) == 0 {
                // Others may have released bytes meanwhile: a success here
                // is the reservation (not to be added again at the top).
                if self.try_add(bytes) {
                    return Ok(());
                }
                // Chunks stored but not yet durable cannot be evicted (their
                // presence is not on disk yet): make them durable, once, and
                // try again before refusing.
                if !committed && self.commit_unused() {
                    committed = true;
                    continue;
                }
                return Err(CacheError::NoSpace {
                    volume: volume.to_owned(),
                    chunk,
                    used: self.used.load(Ordering::Acquire),
                    capacity: self.capacity,
                });
            }
        }
    }

    /// Commits the pending chunks of every volume nobody uses, so eviction
    /// can take them. Returns whether any were committed.
    fn commit_unused(&self) -> bool {
        let vols: Vec<Arc<dyn Evictable>> = lock(&self.volumes)
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .collect();
        let mut any = false;
        for v in vols
            .iter()
            .filter(|v| v.uses() == 0 && v.pending_chunks() > 0)
        {
            match v.commit() {
                Ok(()) => any = true,
                Err(e) => {
                    tracing::warn!(volume = v.name(), error = %e, "commit before eviction failed")
                }
            }
        }
        any
    }

    /// Evicts least recently used chunks of unused volumes until usage is at
    /// most `target`. Returns bytes freed.
    fn evict_to(&self, target: u64) -> u64 {
        let vols: Vec<Arc<dyn Evictable>> = lock(&self.volumes)
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .collect();
        let mut cands: Vec<(u64, usize, u64)> = Vec::new();
        for (k, v) in vols.iter().enumerate() {
            cands.extend(v.evict_candidates().into_iter().map(|(t, i)| (t, k, i)));
        }
        cands.sort_unstable();
        let used = self.used.load(Ordering::Acquire);
        let mut need = used.saturating_sub(target);
        let mut per_vol: Vec<Vec<u64>> = vec![Vec::new(); vols.len()];
        for (_, k, i) in cands {
            if need == 0 {
                break;
            }
            let len = u64::from(vols[k].manifest().chunk_len(i));
            per_vol[k].push(i);
            need = need.saturating_sub(len);
        }
        let mut freed = 0;
        for (k, list) in per_vol.iter().enumerate() {
            if !list.is_empty() {
                freed += vols[k].evict(list);
            }
        }
        if freed > 0 {
            tracing::debug!(freed, target, "evicted chunks");
        }
        freed
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A volume with nothing to evict which, the first time eviction looks
    /// at it, releases `release` bytes of the accounting: as when another
    /// thread's store gives back its reservation (a failed write, a chunk
    /// already present) or a failed sync drops chunks while a reservation
    /// waits for eviction.
    struct Releases {
        acct: Arc<Accounting>,
        manifest: Manifest,
        release: Mutex<u64>,
    }

    impl Evictable for Releases {
        fn name(&self) -> &str {
            "releases"
        }
        fn manifest(&self) -> &Manifest {
            &self.manifest
        }
        fn uses(&self) -> usize {
            0
        }
        fn pending_chunks(&self) -> usize {
            0
        }
        fn commit(&self) -> Result<(), CacheError> {
            Ok(())
        }
        fn evict_candidates(&self) -> Vec<(u64, u64)> {
            let n = std::mem::take(&mut *lock(&self.release));
            self.acct.sub_used(n);
            Vec::new()
        }
        fn evict(&self, _: &[u64]) -> u64 {
            0
        }
    }

    #[test]
    fn space_freed_by_others_during_eviction_is_reserved_once() {
        const C: u64 = 16384;
        let acct = Arc::new(Accounting::new(
            4 * C,
            4 * C,
            std::time::Duration::from_secs(5),
        ));
        acct.add_used(4 * C);
        let v: Arc<dyn Evictable> = Arc::new(Releases {
            acct: Arc::clone(&acct),
            manifest: Manifest::of_bytes(&[1u8; 65536], 16384).unwrap(),
            release: Mutex::new(2 * C),
        });
        acct.register(Arc::downgrade(&v));
        // Full: eviction frees nothing itself, but 2 C are released meanwhile.
        acct.reserve(C, "x", 0).unwrap();
        assert_eq!(acct.used(), 3 * C, "the reservation counted once");
    }
}
