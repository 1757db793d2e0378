//! The read-only NBD export of a cached volume (what children hosts read):
//! reads, CMD_CACHE, `base:allocation` block status, and the
//! [`X_VIRTMAN_PRESENT`] metadata context telling which chunks this host
//! holds.

use std::sync::Arc;

use async_trait::async_trait;
use virtman_nbd::proto::BlockSizes;
use virtman_nbd::{Capabilities, Export, ExportError, Extent, ReadChunk};

use super::{CachedVolume, VolumeUse};

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

impl CachedVolume {
    /// The read-only export of this volume (what children hosts read). It
    /// holds a use of the volume while it exists.
    pub fn export(self: &Arc<Self>) -> VolumeExport {
        VolumeExport {
            use_: self.acquire(),
        }
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
