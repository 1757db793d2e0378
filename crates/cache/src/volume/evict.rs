//! Eviction of a cached volume's own chunks, on behalf of the group's
//! capacity accounting (the volume is its [`Evictable`]).
//!
//! Only durable chunks are evicted; eviction clears the bits, writes the
//! presence file and only then punches the hole, all under the volume's
//! gate, so a crash at any point leaves a presence file that claims only
//! chunks whose bytes are on disk. A file system without holes keeps the
//! bytes, which is safe since the chunks are already marked absent.

use std::sync::atomic::Ordering;

use virtman_image::Manifest;

use super::{CachedVolume, lock};
use crate::accounting::Evictable;
use crate::error::CacheError;

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
            if let Err(e) = self.data.punch(self.manifest.chunk_offset(i), len) {
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
