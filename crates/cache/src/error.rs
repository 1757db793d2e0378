//! Errors of the cache group, with the context a log line needs (volume,
//! chunk, offset, length, file, upstream source), and their NBD errno.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use thiserror::Error;
use virtman_image::CheckedFileError;
use virtman_nbd::ExportError;

/// Why a cache group operation failed.
#[derive(Debug, Error)]
pub enum CacheError {
    /// A file operation failed.
    #[error("{context}: {path}: {source}")]
    Io {
        /// What was being done ("volume deb: writing chunk 3").
        context: String,
        /// The file.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// A metadata file was refused (truncated, other version, bad checksum...).
    #[error(transparent)]
    Metadata(#[from] CheckedFileError),
    /// The upstream failed to deliver a chunk.
    #[error(
        "volume {volume:?}: fetching chunk {chunk} ({len} bytes at {offset}) from {source_name}: {message}"
    )]
    Upstream {
        /// The volume.
        volume: String,
        /// Chunk index.
        chunk: u64,
        /// Chunk offset.
        offset: u64,
        /// Chunk length.
        len: u32,
        /// The upstream.
        source_name: String,
        /// What it said.
        message: String,
    },
    /// The upstream delivered data that does not match the manifest.
    #[error(
        "volume {volume:?}: chunk {chunk} ({len} bytes at {offset}) from {source_name} does not match the manifest ({got} bytes received); not stored"
    )]
    BadChunk {
        /// The volume.
        volume: String,
        /// Chunk index.
        chunk: u64,
        /// Chunk offset.
        offset: u64,
        /// Expected length.
        len: u32,
        /// Bytes received.
        got: usize,
        /// The upstream.
        source_name: String,
    },
    /// The volume has no upstream to fetch a missing chunk from.
    #[error("volume {volume:?}: chunk {chunk} is not cached and no upstream is attached")]
    NoUpstream {
        /// The volume.
        volume: String,
        /// Chunk index.
        chunk: u64,
    },
    /// The cache group is full and nothing can be evicted.
    #[error(
        "volume {volume:?}: no space for chunk {chunk}: cache group holds {used} of {capacity} bytes and nothing can be evicted"
    )]
    NoSpace {
        /// The volume.
        volume: String,
        /// Chunk index.
        chunk: u64,
        /// Bytes in use.
        used: u64,
        /// The capacity.
        capacity: u64,
    },
    /// A request reaches past the end.
    #[error("{name:?}: {len} bytes at {offset} reach past the end ({size} bytes)")]
    PastEnd {
        /// Volume or snapshot.
        name: String,
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Size.
        size: u64,
    },
    /// The object is in use and cannot be removed.
    #[error("{what} {name:?} is in use ({users})")]
    InUse {
        /// "volume" or "snapshot".
        what: &'static str,
        /// Its name.
        name: String,
        /// Who uses it.
        users: String,
    },
    /// No such object.
    #[error("no {what} {name:?}")]
    NotFound {
        /// "volume" or "snapshot".
        what: &'static str,
        /// Its name.
        name: String,
    },
    /// An object of that name exists with other contents.
    #[error("{what} {name:?} exists already{detail}")]
    Exists {
        /// "volume" or "snapshot".
        what: &'static str,
        /// Its name.
        name: String,
        /// More detail.
        detail: String,
    },
    /// The name is not acceptable.
    #[error("invalid {what} name {name:?}: use 1-128 of A-Z a-z 0-9 . _ -, not starting with '.'")]
    Name {
        /// "volume" or "snapshot".
        what: &'static str,
        /// The name.
        name: String,
    },
    /// Another process holds the cache group.
    #[error("cache group {path} is in use by another process (lock held)")]
    Locked {
        /// The lock file.
        path: PathBuf,
    },
    /// A configuration value is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A fetch shared by several readers failed.
    #[error(transparent)]
    Shared(Arc<CacheError>),
    /// A background task failed.
    #[error("{0}")]
    Task(String),
    /// A boot profile (file or peer's export) does not fit the image.
    #[error("boot profile {path}: {reason}")]
    BadProfile {
        /// The file or peer it came from.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl CacheError {
    pub(crate) fn io(
        context: impl Into<String>,
        path: impl Into<PathBuf>,
        source: io::Error,
    ) -> CacheError {
        CacheError::Io {
            context: context.into(),
            path: path.into(),
            source,
        }
    }

    /// The innermost error (through shared fetch failures).
    pub fn root(&self) -> &CacheError {
        match self {
            CacheError::Shared(e) => e.root(),
            e => e,
        }
    }

    /// Whether this is the "cache full" failure, or the disk's.
    pub fn is_no_space(&self) -> bool {
        matches!(self.root(), CacheError::NoSpace { .. }) || self.io_source().is_some_and(is_enospc)
    }

    /// The system call's error, if a file operation failed (a data file's or
    /// a metadata file's).
    fn io_source(&self) -> Option<&io::Error> {
        match self.root() {
            CacheError::Io { source, .. }
            | CacheError::Metadata(CheckedFileError::Io { source, .. }) => Some(source),
            _ => None,
        }
    }
}

fn is_enospc(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::StorageFull
        || e.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error())
}

impl From<CacheError> for ExportError {
    fn from(e: CacheError) -> ExportError {
        let msg = e.to_string();
        if e.is_no_space() {
            return ExportError::NoSpace(msg);
        }
        match (e.root(), e.io_source()) {
            (CacheError::PastEnd { .. }, _) => ExportError::Invalid(msg),
            (_, Some(source)) => ExportError::Io(io::Error::new(source.kind(), msg)),
            _ => ExportError::Io(io::Error::other(msg)),
        }
    }
}

#[cfg(test)]
mod tests {
    use virtman_nbd::proto::Errno;

    use super::*;

    #[test]
    fn errno_mapping_keeps_context() {
        let full = CacheError::NoSpace {
            volume: "deb".into(),
            chunk: 3,
            used: 10,
            capacity: 10,
        };
        assert!(full.is_no_space());
        let shared = CacheError::Shared(Arc::new(full));
        assert!(shared.is_no_space());
        let e = ExportError::from(shared);
        assert_eq!(e.errno(), Errno::NoSpc);
        assert!(e.to_string().contains("deb") && e.to_string().contains("chunk 3"));
        let disk = CacheError::io(
            "volume x: writing",
            "/g/data",
            io::Error::from_raw_os_error(rustix::io::Errno::NOSPC.raw_os_error()),
        );
        assert!(disk.is_no_space());
        assert_eq!(ExportError::from(disk).errno(), Errno::NoSpc);
        let past = CacheError::PastEnd {
            name: "x".into(),
            offset: 5,
            len: 10,
            size: 8,
        };
        assert_eq!(ExportError::from(past).errno(), Errno::Inval);
        let bad = CacheError::BadChunk {
            volume: "deb".into(),
            chunk: 1,
            offset: 65536,
            len: 65536,
            got: 10,
            source_name: "parent 10.0.0.2:10809".into(),
        };
        let e = ExportError::from(bad);
        assert_eq!(e.errno(), Errno::Io);
        assert!(e.to_string().contains("10.0.0.2"), "{e}");
    }
}
