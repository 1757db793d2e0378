//! An in-memory export: a byte vector behind a lock. For tests, examples and
//! scratch disks; it is also the reference a test compares a real export with.

use std::sync::RwLock;

use async_trait::async_trait;
use bytes::Bytes;

use crate::export::{Capabilities, Export, ExportError, ReadChunk};
use crate::proto::BlockSizes;

/// A disk held in memory.
#[derive(Debug)]
pub struct MemExport {
    data: RwLock<Vec<u8>>,
    caps: Capabilities,
}

impl MemExport {
    /// A writable export holding `data`.
    pub fn new(data: Vec<u8>) -> MemExport {
        MemExport {
            data: RwLock::new(data),
            caps: Capabilities {
                read_only: false,
                flush: true,
                trim: true,
                write_zeroes: true,
                cache: false,
                multi_conn: true,
                block_sizes: BlockSizes::DEFAULT,
                description: None,
            },
        }
    }

    /// Makes the export read-only.
    pub fn read_only(mut self) -> MemExport {
        self.caps.read_only = true;
        self
    }

    /// Sets the block size constraints.
    pub fn with_block_sizes(mut self, sizes: BlockSizes) -> MemExport {
        self.caps.block_sizes = sizes;
        self
    }

    /// A copy of the current contents.
    pub fn contents(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn range(offset: u64, len: u32) -> Result<std::ops::Range<usize>, ExportError> {
        let start = usize::try_from(offset).map_err(|e| ExportError::Invalid(e.to_string()))?;
        let len = usize::try_from(len).map_err(|e| ExportError::Invalid(e.to_string()))?;
        Ok(start..start + len)
    }

    fn fill(&self, offset: u64, len: u32, byte: u8) -> Result<(), ExportError> {
        let r = Self::range(offset, len)?;
        let mut d = self.data.write().unwrap_or_else(|p| p.into_inner());
        d.get_mut(r)
            .ok_or_else(|| ExportError::Invalid("range outside the export".into()))?
            .fill(byte);
        Ok(())
    }
}

#[async_trait]
impl Export for MemExport {
    fn size(&self) -> u64 {
        let len = self.data.read().unwrap_or_else(|p| p.into_inner()).len();
        u64::try_from(len).unwrap_or(u64::MAX)
    }

    fn capabilities(&self) -> Capabilities {
        self.caps.clone()
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadChunk>, ExportError> {
        let r = Self::range(offset, len)?;
        let d = self.data.read().unwrap_or_else(|p| p.into_inner());
        let slice = d
            .get(r)
            .ok_or_else(|| ExportError::Invalid("range outside the export".into()))?;
        Ok(vec![ReadChunk::Data(Bytes::copy_from_slice(slice))])
    }

    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<(), ExportError> {
        let len = u32::try_from(data.len()).map_err(|e| ExportError::Invalid(e.to_string()))?;
        let r = Self::range(offset, len)?;
        let mut d = self.data.write().unwrap_or_else(|p| p.into_inner());
        d.get_mut(r)
            .ok_or_else(|| ExportError::Invalid("range outside the export".into()))?
            .copy_from_slice(&data);
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u32, _fua: bool) -> Result<(), ExportError> {
        self.fill(offset, len, 0)
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        _fua: bool,
        _may_trim: bool,
    ) -> Result<(), ExportError> {
        self.fill(offset, len, 0)
    }
}
