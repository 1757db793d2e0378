//! The origin role: serving an image from the image store, counting how often
//! each chunk leaves this node.
//!
//! VirtMan's promise is that a chunk leaves the origin about once per storm,
//! not once per host. [`CountingExport`] wraps the origin's file export and
//! counts, per chunk, the reads that touched it, so the promise is checked from
//! metrics rather than assumed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use virtman_nbd::{Capabilities, Export, ExportError, Extent, ReadChunk};

/// An export that counts the reads of each chunk.
pub struct CountingExport {
    inner: Arc<dyn Export>,
    chunk_size: u64,
    sends: Vec<AtomicU32>,
    bytes: AtomicU64,
}

impl std::fmt::Debug for CountingExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CountingExport")
            .field("chunk_size", &self.chunk_size)
            .field("chunks", &self.sends.len())
            .finish()
    }
}

/// A summary of what an origin sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SendCounts {
    /// Bytes sent.
    pub bytes: u64,
    /// Chunks sent at least once.
    pub chunks_sent: u64,
    /// The most times any one chunk was sent.
    pub max_per_chunk: u32,
    /// Chunk sends in total.
    pub total_sends: u64,
}

impl CountingExport {
    /// Wraps `inner`, counting by chunks of `chunk_size` bytes.
    pub fn new(inner: Arc<dyn Export>, chunk_size: u32) -> CountingExport {
        let chunk_size = u64::from(chunk_size.max(1));
        let chunks = inner.size().div_ceil(chunk_size);
        CountingExport {
            inner,
            chunk_size,
            sends: (0..chunks).map(|_| AtomicU32::new(0)).collect(),
            bytes: AtomicU64::new(0),
        }
    }

    /// What was sent so far.
    pub fn counts(&self) -> SendCounts {
        let mut c = SendCounts {
            bytes: self.bytes.load(Ordering::Relaxed),
            ..SendCounts::default()
        };
        for s in &self.sends {
            let n = s.load(Ordering::Relaxed);
            if n > 0 {
                c.chunks_sent += 1;
                c.total_sends += u64::from(n);
                c.max_per_chunk = c.max_per_chunk.max(n);
            }
        }
        c
    }
}

#[async_trait]
impl Export for CountingExport {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadChunk>, ExportError> {
        let out = self.inner.read(offset, len).await?;
        if len > 0 {
            let first = offset / self.chunk_size;
            let last = (offset + u64::from(len) - 1) / self.chunk_size;
            for i in first..=last {
                if let Some(s) = usize::try_from(i).ok().and_then(|i| self.sends.get(i)) {
                    s.fetch_add(1, Ordering::Relaxed);
                }
            }
            self.bytes.fetch_add(u64::from(len), Ordering::Relaxed);
        }
        Ok(out)
    }

    async fn cache(&self, offset: u64, len: u32) -> Result<(), ExportError> {
        self.inner.cache(offset, len).await
    }

    async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<Extent>, ExportError> {
        self.inner.block_status(offset, len).await
    }

    /// An origin holds all of its image: `x-virtman:present` is one held
    /// run (children select it, which tells them apart from other readers).
    fn meta_contexts(&self) -> Vec<String> {
        vec![virtman_cache::X_VIRTMAN_PRESENT.to_owned()]
    }

    async fn context_status(
        &self,
        context: &str,
        offset: u64,
        len: u32,
    ) -> Result<Vec<(u64, u32)>, ExportError> {
        if context != virtman_cache::X_VIRTMAN_PRESENT {
            return Err(ExportError::Invalid(format!(
                "no metadata context {context:?}"
            )));
        }
        let run = u64::from(len.max(1)).min(self.size().saturating_sub(offset));
        Ok(vec![(run, virtman_cache::PRESENT)])
    }

    async fn write(&self, _offset: u64, _data: Bytes, _fua: bool) -> Result<(), ExportError> {
        Err(ExportError::NotPermitted(
            "origin exports are read-only".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtman_nbd::MemExport;

    #[tokio::test]
    async fn counts_each_chunk_a_read_touches() {
        let e = CountingExport::new(
            Arc::new(MemExport::new(vec![1; 4096 * 4]).read_only()),
            4096,
        );
        e.read(0, 4096).await.unwrap();
        e.read(4000, 200).await.unwrap(); // chunks 0 and 1
        e.read(0, 100).await.unwrap();
        let c = e.counts();
        assert_eq!(c.max_per_chunk, 3);
        assert_eq!(c.chunks_sent, 2);
        assert_eq!(c.total_sends, 4);
        assert_eq!(c.bytes, 4396);
    }
}
