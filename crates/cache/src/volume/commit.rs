//! The committer of a cached volume: batched durable commits and the
//! presence file.
//!
//! ```text
//! store ─► present bit ─► queue for commit
//!                             │
//! committer (batched, at most the group's commit interval later):
//!            fdatasync(data) ─► durable bits ─► write presence
//! ```
//!
//! Two maps are kept: `present` (readable from `data` now) and `durable`
//! (data synced, what the presence file records).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{CachedVolume, PRESENCE_FORMAT, lock};
use crate::bitmap;
use crate::disk::Role;
use crate::error::CacheError;

impl CachedVolume {
    /// Chunks stored but not yet durable and recorded in the presence file
    /// (committed within the group's commit interval).
    pub fn pending_chunks(&self) -> usize {
        lock(&self.pending).len()
    }

    pub(super) fn schedule_commit(self: &Arc<Self>) {
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
        if let Err(e) = self.data.sync_data() {
            // After a failed fdatasync the kernel may have dropped the
            // batch's dirty pages and will not report it again: a later sync
            // would succeed without them. So the batch is never marked
            // durable: it is dropped, and fetched again when read.
            self.stats.disk_errors.fetch_add(1, Ordering::Relaxed);
            self.forget(batch.iter().copied().filter(|&i| !self.durable.get(i)));
            lock(&self.pending).drain(..batch.len());
            return Err(CacheError::io(
                format!(
                    "volume {:?}: syncing data ({} chunks dropped, to be fetched again)",
                    self.name,
                    batch.len()
                ),
                &self.data_path,
                e,
            ));
        }
        {
            // Under the queue's lock, which stores and `forget` take too: a
            // chunk dropped after a failed read and stored again since the
            // batch was taken has bytes this sync may not cover, so it
            // waits for the sync of its own place in the queue.
            let queue = lock(&self.pending);
            let again: std::collections::HashSet<u64> =
                queue[batch.len()..].iter().copied().collect();
            for &i in &batch {
                if self.present.get(i) && !again.contains(&i) {
                    self.durable.set(i);
                }
            }
        }
        self.save_presence()?;
        lock(&self.pending).drain(..batch.len());
        Ok(())
    }

    /// Makes everything fetched so far durable (blocking thread).
    pub async fn sync(self: &Arc<Self>) -> Result<(), CacheError> {
        let vol = Arc::clone(self);
        tokio::task::spawn_blocking(move || vol.commit())
            .await
            .map_err(|e| CacheError::Task(e.to_string()))?
    }

    pub(super) fn save_presence(&self) -> Result<(), CacheError> {
        let words = self.durable.snapshot();
        self.data
            .faults()
            .record(Role::Volume, &self.presence_path, || {
                bitmap::save(
                    &PRESENCE_FORMAT,
                    &self.presence_path,
                    &self.manifest.id().0,
                    self.manifest.chunks(),
                    &words,
                )
            })
            .map_err(CacheError::from)
    }
}
