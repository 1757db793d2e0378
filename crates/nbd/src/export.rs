//! The export trait: what the NBD server serves.
//!
//! Anything that implements [`Export`] can be served: a plain file
//! ([`crate::file::FileExport`]) now, a host's cached volume and a VM's snapshot
//! later. The server checks every request against the size, flags and block
//! sizes first (see [`crate::proto::transmission::validate`]), so an export only
//! ever sees requests inside its bounds, aligned, with flags it advertised.
//!
//! Reads return a list of [`ReadChunk`]s so an export can say "these bytes are
//! zero" without materialising them; the server turns those into
//! `NBD_REPLY_TYPE_OFFSET_HOLE` chunks.

use async_trait::async_trait;
use bytes::Bytes;
use thiserror::Error;

use crate::proto::{BlockSizes, Errno};

/// What an export supports; the server derives transmission flags from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Refuse every write (`NBD_FLAG_READ_ONLY`, writes fail with `EPERM`).
    pub read_only: bool,
    /// `NBD_CMD_FLUSH` and `NBD_CMD_FLAG_FUA` make writes durable.
    pub flush: bool,
    /// `NBD_CMD_TRIM` is implemented.
    pub trim: bool,
    /// `NBD_CMD_WRITE_ZEROES` is implemented.
    pub write_zeroes: bool,
    /// `NBD_CMD_CACHE` does something useful (a prefetch hint).
    pub cache: bool,
    /// Every connection sees the same data and flushes are global, so a client may
    /// use several connections (`NBD_FLAG_CAN_MULTI_CONN`).
    pub multi_conn: bool,
    /// Size constraints.
    pub block_sizes: BlockSizes,
    /// A human-readable description (`NBD_INFO_DESCRIPTION`, `nbdinfo --list`).
    pub description: Option<String>,
}

impl Capabilities {
    /// The capabilities of a read-only export with default block sizes.
    pub fn read_only() -> Capabilities {
        Capabilities {
            read_only: true,
            flush: false,
            trim: false,
            write_zeroes: false,
            cache: false,
            multi_conn: true,
            block_sizes: BlockSizes::DEFAULT,
            description: None,
        }
    }
}

/// A piece of a read: real bytes, or a run of zeroes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadChunk {
    /// Bytes read from the export.
    Data(Bytes),
    /// This many bytes that read as zero.
    Zero(u32),
}

impl ReadChunk {
    /// The number of export bytes this chunk covers.
    pub fn len(&self) -> u32 {
        match self {
            ReadChunk::Data(b) => u32::try_from(b.len()).unwrap_or(u32::MAX),
            ReadChunk::Zero(n) => *n,
        }
    }

    /// Whether the chunk covers no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The allocation status of a run of the export (`base:allocation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes (non-zero).
    pub length: u64,
    /// Not allocated in the backing store.
    pub hole: bool,
    /// Reads as zeroes.
    pub zero: bool,
}

/// Why an export operation failed; [`ExportError::errno`] is what the client sees.
#[derive(Debug, Error)]
pub enum ExportError {
    /// The backing store failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The backing store is full.
    #[error("no space left: {0}")]
    NoSpace(String),
    /// The operation is not allowed on this export.
    #[error("not permitted: {0}")]
    NotPermitted(String),
    /// The request was invalid for this export.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The export does not implement the operation.
    #[error("not supported: {0}")]
    NotSupported(&'static str),
    /// The export is shutting down.
    #[error("export is shutting down")]
    Shutdown,
    /// A reply with this error value, for exports whose clients give it a
    /// meaning of their own.
    #[error("{message}")]
    Reply {
        /// The NBD error value sent.
        errno: Errno,
        /// What the client is told.
        message: String,
    },
}

impl ExportError {
    /// The NBD error value for this failure.
    pub fn errno(&self) -> Errno {
        match self {
            ExportError::Io(e) => match e.raw_os_error() {
                Some(c)
                    if c == libc_errno::ENOSPC
                        || c == libc_errno::EDQUOT
                        || c == libc_errno::EFBIG =>
                {
                    Errno::NoSpc
                }
                Some(c) if c == libc_errno::EPERM || c == libc_errno::EROFS => Errno::Perm,
                _ if e.kind() == std::io::ErrorKind::StorageFull => Errno::NoSpc,
                _ => Errno::Io,
            },
            ExportError::NoSpace(_) => Errno::NoSpc,
            ExportError::NotPermitted(_) => Errno::Perm,
            ExportError::Invalid(_) | ExportError::NotSupported(_) => Errno::Inval,
            ExportError::Shutdown => Errno::Shutdown,
            ExportError::Reply { errno, .. } => *errno,
        }
    }
}

/// Linux errno values the mapping above needs (stable across architectures).
mod libc_errno {
    pub const EPERM: i32 = 1;
    pub const EFBIG: i32 = 27;
    pub const ENOSPC: i32 = 28;
    pub const EROFS: i32 = 30;
    pub const EDQUOT: i32 = 122;
}

/// A block device the NBD server can serve.
///
/// Offsets and lengths given to these methods are always inside the export,
/// aligned to its minimum block size, and within its maximum payload for reads
/// and writes; writes never reach a read-only export.
#[async_trait]
pub trait Export: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;

    /// What the export supports.
    fn capabilities(&self) -> Capabilities;

    /// Reads `len` bytes at `offset`. The chunks returned must cover exactly
    /// `len` bytes, in order.
    async fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadChunk>, ExportError>;

    /// Writes `data` at `offset`; with `fua`, the data is durable on return.
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ExportError> {
        let _ = (offset, data, fua);
        Err(ExportError::NotSupported("write"))
    }

    /// Makes every completed write durable.
    async fn flush(&self) -> Result<(), ExportError> {
        Ok(())
    }

    /// Discards a range (a hint: the contents become unspecified).
    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), ExportError> {
        let _ = (offset, len, fua);
        Err(ExportError::NotSupported("trim"))
    }

    /// Makes a range read as zeroes; `may_trim` allows punching a hole.
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
        may_trim: bool,
    ) -> Result<(), ExportError> {
        let _ = (offset, len, fua, may_trim);
        Err(ExportError::NotSupported("write zeroes"))
    }

    /// A hint that the range will be read soon.
    async fn cache(&self, offset: u64, len: u32) -> Result<(), ExportError> {
        let _ = (offset, len);
        Ok(())
    }

    /// Metadata contexts besides `base:allocation` that this export answers
    /// block status for (full names, `namespace:name`), e.g. a cache's
    /// `x-virtman:present`. None by default.
    fn meta_contexts(&self) -> Vec<String> {
        Vec::new()
    }

    /// Block status in `context` (one of [`Export::meta_contexts`]) from
    /// `offset`: runs of (length, flags), covering at least one byte and at
    /// most a little more than `len` bytes. Flags mean what the context says.
    async fn context_status(
        &self,
        context: &str,
        offset: u64,
        len: u32,
    ) -> Result<Vec<(u64, u32)>, ExportError> {
        let _ = (offset, len);
        Err(ExportError::Invalid(format!(
            "no metadata context {context:?}"
        )))
    }

    /// Allocation status from `offset`, covering at least one byte and at most a
    /// little more than `len` bytes. The default reports everything allocated.
    async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<Extent>, ExportError> {
        let _ = offset;
        Ok(vec![Extent {
            length: u64::from(len.max(1)),
            hole: false,
            zero: false,
        }])
    }
}
