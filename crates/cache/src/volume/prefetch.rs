//! Prefetching a cached volume: fetching whole ranges ahead of reads (boot
//! profile, pin) and the background fetches of CMD_CACHE hints, which yield
//! to demand reads.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::CachedVolume;
use crate::error::CacheError;
use crate::upstream::FetchClass;

/// The most CMD_CACHE hints a volume fetches at once (see
/// [`CachedVolume::prefetch_hint`]).
pub const MAX_HINTS: usize = 4;

/// A replay's expectation (see [`CachedVolume::expect`]); the chunks stop
/// being expected when the last one running is dropped.
#[must_use = "the chunks are expected only while this lives"]
pub struct Expecting(Arc<CachedVolume>);

impl Drop for Expecting {
    fn drop(&mut self) {
        let mut n = super::lock(&self.0.expecting);
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.0.expected.clear_all();
        }
    }
}

impl CachedVolume {
    /// Fetches every missing chunk of `offset..offset+len` (a prefetch).
    pub async fn prefetch(self: &Arc<Self>, offset: u64, len: u64) -> Result<(), CacheError> {
        self.prefetch_as(offset, len, FetchClass::Prefetch).await
    }

    /// [`CachedVolume::prefetch`], fetching as `class` (prefetch or preheat).
    pub async fn prefetch_as(
        self: &Arc<Self>,
        offset: u64,
        len: u64,
        class: FetchClass,
    ) -> Result<(), CacheError> {
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
                    Arc::clone(&vol).chunk_bytes(i, class).await?;
                    if !vol.present.get(i) {
                        // Served from memory: the disk failed the write.
                        return Err(CacheError::io(
                            format!("volume {:?}: prefetching chunk {i}", vol.name),
                            &vol.data_path,
                            std::io::Error::other("the cache's disk did not keep it"),
                        ));
                    }
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

    /// Marks `chunks` as expected: a replay (the boot profile) will fetch
    /// them, in order, while the returned guard lives. Reads waiting on
    /// expected chunks are what the replay is for, so those chunks do not
    /// count in [`CachedVolume::demand_unexpected`] and do not pause it: in a
    /// storm the VMs and the children read the profile's chunks, and a
    /// replay paused for them would keep one chunk in flight. Chunks stay
    /// expected until every replay running has ended.
    pub fn expect(self: &Arc<Self>, chunks: impl IntoIterator<Item = u64>) -> Expecting {
        let mut n = super::lock(&self.expecting);
        *n += 1;
        for i in chunks {
            if i < self.manifest.chunks() {
                self.expected.set(i);
            }
        }
        Expecting(Arc::clone(self))
    }

    /// Chunks that reads wait on and no replay expects: what a background
    /// prefetch yields to (every chunk waited on when no replay runs).
    pub fn demand_unexpected(&self) -> usize {
        super::lock(&self.demand_chunks)
            .keys()
            .filter(|&&c| !self.expected.get(c))
            .count()
    }

    /// Whether a fetch of chunk `index` is in flight now (for a read, a
    /// child or a prefetch).
    pub fn is_fetching(&self, index: u64) -> bool {
        super::lock(&self.inflight).contains_key(&index)
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
}
