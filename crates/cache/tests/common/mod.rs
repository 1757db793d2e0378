//! Helpers shared by the cache group's integration tests.
#![allow(dead_code, clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use virtman_cache::{ChunkRequest, FileUpstream, Upstream, UpstreamError};
use virtman_image::Manifest;

/// Deterministic pseudo-random image bytes: every third chunk-sized region of
/// `zero_every` is all zero, so zero-chunk handling is exercised.
pub fn image_bytes(seed: u64, len: usize, chunk: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.finalize_xof().fill(&mut out);
    for (i, c) in out.chunks_mut(chunk).enumerate() {
        if i % 5 == 3 {
            c.fill(0);
        }
    }
    out
}

/// Writes an image file and returns its path and manifest.
pub fn image_file(dir: &Path, name: &str, data: &[u8], chunk: u32) -> (PathBuf, Manifest) {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    (p, Manifest::of_bytes(data, chunk).unwrap())
}

/// An upstream serving bytes from memory, counting fetches, optionally slow.
pub struct MemUpstream {
    pub data: Arc<Vec<u8>>,
    pub fetches: AtomicU64,
    pub delay: Duration,
    /// Fetches in progress now, and the most seen at once.
    pub in_flight: AtomicU64,
    pub max_in_flight: AtomicU64,
}

impl MemUpstream {
    pub fn new(data: Vec<u8>) -> Arc<MemUpstream> {
        Arc::new(MemUpstream {
            data: Arc::new(data),
            fetches: AtomicU64::new(0),
            delay: Duration::ZERO,
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
        })
    }
    pub fn slow(data: Vec<u8>, delay: Duration) -> Arc<MemUpstream> {
        Arc::new(MemUpstream {
            data: Arc::new(data),
            fetches: AtomicU64::new(0),
            delay,
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
        })
    }
}

#[async_trait]
impl Upstream for MemUpstream {
    fn name(&self) -> String {
        "memory".into()
    }
    async fn fetch(&self, req: ChunkRequest) -> Result<Bytes, UpstreamError> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        let s = req.offset as usize;
        Ok(Bytes::copy_from_slice(&self.data[s..s + req.len as usize]))
    }
}

/// How a lying upstream lies.
#[derive(Clone, Copy, Debug)]
pub enum Lie {
    FlipByte,
    Short,
    Long,
    Error,
    Truth,
    OtherChunk,
}

/// An upstream that lies according to a pseudo-random schedule.
pub struct LyingUpstream {
    pub data: Arc<Vec<u8>>,
    pub counter: AtomicU64,
    pub schedule: Vec<Lie>,
    /// What it claims to have verified (see `Upstream::verifies`).
    pub claims: Option<virtman_image::ImageId>,
}

#[async_trait]
impl Upstream for LyingUpstream {
    fn name(&self) -> String {
        "liar:9".into()
    }
    fn verifies(&self) -> Option<virtman_image::ImageId> {
        self.claims
    }
    async fn fetch(&self, req: ChunkRequest) -> Result<Bytes, UpstreamError> {
        let n = self.counter.fetch_add(1, Ordering::SeqCst) as usize;
        let lie = self.schedule[n % self.schedule.len()];
        let s = req.offset as usize;
        let mut v = self.data[s..s + req.len as usize].to_vec();
        match lie {
            Lie::FlipByte => {
                let at = (n * 7919) % v.len();
                v[at] ^= 1 << (n % 8);
            }
            Lie::Short => {
                v.truncate(v.len() - 1 - (n % (v.len() - 1).max(1)));
            }
            Lie::Long => v.push(0),
            Lie::Error => {
                return Err(UpstreamError {
                    source_name: self.name(),
                    message: "connection reset".into(),
                });
            }
            Lie::OtherChunk => {
                let other = (s + req.len as usize) % self.data.len();
                let end = (other + v.len()).min(self.data.len());
                v = self.data[other..end].to_vec();
            }
            Lie::Truth => {}
        }
        Ok(Bytes::from(v))
    }
}

pub fn file_upstream(p: &Path) -> Arc<dyn Upstream> {
    Arc::new(FileUpstream::open(p).unwrap())
}
