//! Where a cached volume gets the chunks it lacks.
//!
//! The [`Upstream`] trait is small on purpose: fetch one chunk. The agent
//! plugs in its parents (several NBD clients with failover); tests and the
//! origin plug in a file ([`FileUpstream`]). Whatever an upstream returns is
//! checked against the manifest by the volume before it is stored or
//! returned, so an upstream never needs to be trusted.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use virtman_image::ImageId;

/// One chunk wanted from an upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkRequest {
    /// The image.
    pub image: ImageId,
    /// Chunk index.
    pub index: u64,
    /// Byte offset of the chunk in the image.
    pub offset: u64,
    /// Chunk length (the last chunk may be short).
    pub len: u32,
    /// Why it is fetched (an upstream under a cap serves demand first).
    pub class: FetchClass,
}

/// Why a chunk is fetched.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FetchClass {
    /// A read waits for it (a VM's, a child's, a reader joining a fetch).
    #[default]
    Demand,
    /// Prefetch: a boot profile, a pin, a VM's CMD_CACHE hint.
    Prefetch,
    /// A preheat the coordinator ordered (a profile or a pin before any VM).
    Preheat,
}

/// Why an upstream could not deliver a chunk.
#[derive(Debug, thiserror::Error)]
#[error("{source_name}: {message}")]
pub struct UpstreamError {
    /// Which source failed (a parent's address, a file path).
    pub source_name: String,
    /// What went wrong.
    pub message: String,
}

/// A source of an image's chunks.
#[async_trait]
pub trait Upstream: Send + Sync + 'static {
    /// A name for this source in errors and logs.
    fn name(&self) -> String;

    /// Fetches one chunk. The result is verified by the caller, unless the
    /// upstream says (with [`Upstream::verifies`]) that it already checked it.
    async fn fetch(&self, req: ChunkRequest) -> Result<Bytes, UpstreamError>;

    /// The image whose manifest this upstream checks every chunk against
    /// before returning it, if it does (the agent's parents do, to fail over
    /// at once on a wrong chunk). A volume of that image then skips its own
    /// check instead of hashing every chunk twice. `None` by default.
    fn verifies(&self) -> Option<ImageId> {
        None
    }
}

/// An image file as an upstream (the origin, tests).
#[derive(Debug, Clone)]
pub struct FileUpstream {
    file: Arc<File>,
    path: PathBuf,
}

impl FileUpstream {
    /// Opens `path` for reading.
    pub fn open(path: &Path) -> io::Result<FileUpstream> {
        Ok(FileUpstream {
            file: Arc::new(File::open(path)?),
            path: path.to_path_buf(),
        })
    }
}

#[async_trait]
impl Upstream for FileUpstream {
    fn name(&self) -> String {
        format!("file {}", self.path.display())
    }

    async fn fetch(&self, req: ChunkRequest) -> Result<Bytes, UpstreamError> {
        let file = Arc::clone(&self.file);
        let res = tokio::task::spawn_blocking(move || -> io::Result<Bytes> {
            let n = usize::try_from(req.len).map_err(io::Error::other)?;
            let mut buf = BytesMut::zeroed(n);
            // A short file gives a short chunk; the volume refuses it.
            let mut got = 0;
            while got < n {
                match file.read_at(&mut buf[got..], req.offset + got as u64) {
                    Ok(0) => break,
                    Ok(k) => got += k,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            buf.truncate(got);
            Ok(buf.freeze())
        })
        .await;
        match res {
            Ok(Ok(b)) => Ok(b),
            Ok(Err(e)) => Err(UpstreamError {
                source_name: self.name(),
                message: format!(
                    "reading chunk {} ({} bytes at {}): {e}",
                    req.index, req.len, req.offset
                ),
            }),
            Err(e) => Err(UpstreamError {
                source_name: self.name(),
                message: e.to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn file_upstream_reads_and_reports_short_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, b"0123456789").unwrap();
        let up = FileUpstream::open(&p).unwrap();
        let req = |offset, len| ChunkRequest {
            image: virtman_image::ImageId([0; 32]),
            index: 0,
            offset,
            len,
            class: FetchClass::Demand,
        };
        assert_eq!(&up.fetch(req(2, 4)).await.unwrap()[..], b"2345");
        // Past the end: short, for the volume to refuse.
        assert_eq!(&up.fetch(req(8, 4)).await.unwrap()[..], b"89");
        assert!(up.name().contains(&p.display().to_string()));
    }
}
