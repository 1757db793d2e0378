//! Checked files: every metadata file virtman writes and later trusts.
//!
//! A checked file wraps a body in a header with a magic number, a format
//! version and the body length, and ends with a BLAKE3 checksum over
//! everything before it. It is written atomically (temporary file, `fsync`,
//! `rename`, `fsync` of the directory) and read back only through
//! [`read_checked`], which checks all of it and refuses anything else with an
//! error naming the file.
//!
//! ```text
//!  0        8        12       16               24          24+len       +32
//!  +--------+--------+--------+----------------+-------------+------------+
//!  | magic  | version| zero   | body length    | body        | BLAKE3 of  |
//!  | 8 bytes| u32 LE | u32    | u64 LE         | len bytes   | all before |
//!  +--------+--------+--------+----------------+-------------+------------+
//! ```

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Length of the header before the body.
pub const HEADER_LEN: usize = 24;
/// Length of the trailing checksum.
pub const CHECKSUM_LEN: usize = 32;

/// Why a checked file was refused.
#[derive(Debug, Error)]
pub enum CheckedFileError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// The file is shorter than its header and checksum say.
    #[error("{path}: truncated ({len} bytes)")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
    },
    /// The file does not start with the expected magic number.
    #[error("{path}: not a {what} file (bad magic)")]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// What kind of file was expected.
        what: &'static str,
    },
    /// The file is of a format version this build does not read.
    #[error("{path}: {what} format version {found}, this build reads version {expected}")]
    Version {
        /// The file.
        path: PathBuf,
        /// What kind of file was expected.
        what: &'static str,
        /// The version in the file.
        found: u32,
        /// The version this build reads.
        expected: u32,
    },
    /// The file or its declared body is larger than the limit for its kind.
    #[error("{path}: {len} bytes is larger than the limit of {limit} for a {what} file")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// What kind of file was expected.
        what: &'static str,
        /// Its (declared) length.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// The checksum does not match the contents.
    #[error("{path}: checksum mismatch, the file is damaged")]
    Checksum {
        /// The file.
        path: PathBuf,
    },
    /// The length in the header disagrees with the file's length.
    #[error("{path}: length {declared} in the header but {actual} bytes of body")]
    Length {
        /// The file.
        path: PathBuf,
        /// Declared body length.
        declared: u64,
        /// Body bytes present.
        actual: u64,
    },
    /// The body is well-formed as a checked file but its contents are invalid.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl CheckedFileError {
    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            CheckedFileError::Io { path, .. }
            | CheckedFileError::Truncated { path, .. }
            | CheckedFileError::BadMagic { path, .. }
            | CheckedFileError::Version { path, .. }
            | CheckedFileError::TooLarge { path, .. }
            | CheckedFileError::Checksum { path }
            | CheckedFileError::Length { path, .. }
            | CheckedFileError::Invalid { path, .. } => path,
        }
    }
}

/// What a kind of checked file looks like.
#[derive(Clone, Copy, Debug)]
pub struct Format {
    /// Eight bytes at the start of the file.
    pub magic: [u8; 8],
    /// The version this build writes and reads.
    pub version: u32,
    /// Largest body accepted.
    pub max_body: u64,
    /// A name for error messages ("manifest", "presence map").
    pub what: &'static str,
}

/// Encodes `body` as a checked file image.
pub fn encode(format: &Format, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len() + CHECKSUM_LEN);
    out.extend_from_slice(&format.magic);
    out.extend_from_slice(&format.version.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(body);
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

/// Checks a checked file image and returns its body; `path` names it in errors.
pub fn decode(format: &Format, path: &Path, bytes: &[u8]) -> Result<Vec<u8>, CheckedFileError> {
    let p = || path.to_path_buf();
    let len = bytes.len() as u64;
    if len > format.max_body + (HEADER_LEN + CHECKSUM_LEN) as u64 {
        return Err(CheckedFileError::TooLarge {
            path: p(),
            what: format.what,
            len,
            limit: format.max_body,
        });
    }
    if bytes.len() < 8 || bytes[..8] != format.magic {
        if bytes.len() < 8 && format.magic.starts_with(bytes) {
            return Err(CheckedFileError::Truncated { path: p(), len });
        }
        return Err(CheckedFileError::BadMagic {
            path: p(),
            what: format.what,
        });
    }
    if bytes.len() < HEADER_LEN + CHECKSUM_LEN {
        return Err(CheckedFileError::Truncated { path: p(), len });
    }
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if version != format.version {
        return Err(CheckedFileError::Version {
            path: p(),
            what: format.what,
            found: version,
            expected: format.version,
        });
    }
    let mut l = [0u8; 8];
    l.copy_from_slice(&bytes[16..24]);
    let declared = u64::from_le_bytes(l);
    if declared > format.max_body {
        return Err(CheckedFileError::TooLarge {
            path: p(),
            what: format.what,
            len: declared,
            limit: format.max_body,
        });
    }
    let actual = (bytes.len() - HEADER_LEN - CHECKSUM_LEN) as u64;
    if declared > actual {
        return Err(CheckedFileError::Truncated { path: p(), len });
    }
    if declared != actual {
        return Err(CheckedFileError::Length {
            path: p(),
            declared,
            actual,
        });
    }
    let split = bytes.len() - CHECKSUM_LEN;
    let sum = blake3::hash(&bytes[..split]);
    if sum.as_bytes()[..] != bytes[split..] {
        return Err(CheckedFileError::Checksum { path: p() });
    }
    Ok(bytes[HEADER_LEN..split].to_vec())
}

/// Reads and checks the checked file at `path`, returning its body.
pub fn read_checked(format: &Format, path: &Path) -> Result<Vec<u8>, CheckedFileError> {
    let io_err = |source| CheckedFileError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(io_err)?;
    let len = file.metadata().map_err(io_err)?.len();
    let limit = format.max_body + (HEADER_LEN + CHECKSUM_LEN) as u64;
    if len > limit {
        return Err(CheckedFileError::TooLarge {
            path: path.to_path_buf(),
            what: format.what,
            len,
            limit: format.max_body,
        });
    }
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    // Read at most limit+1 bytes, in case the file grows while we read.
    Read::by_ref(&mut file)
        .take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err)?;
    decode(format, path, &bytes)
}

/// Writes `body` as a checked file at `path`, atomically and durably.
pub fn write_checked(format: &Format, path: &Path, body: &[u8]) -> Result<(), CheckedFileError> {
    if body.len() as u64 > format.max_body {
        return Err(CheckedFileError::TooLarge {
            path: path.to_path_buf(),
            what: format.what,
            len: body.len() as u64,
            limit: format.max_body,
        });
    }
    write_atomic(path, &encode(format, body)).map_err(|source| CheckedFileError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Replaces `path` with `bytes` atomically: a temporary file beside it is
/// written and synced, renamed over `path`, and the directory is synced.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        rustix::fs::fdatasync(&f)?;
    }
    std::fs::rename(&tmp, path)?;
    sync_dir(dir)
}

/// Makes a directory's entries (created, renamed, removed files) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    let d = File::open(dir)?;
    rustix::fs::fsync(&d)?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    const F: Format = Format {
        magic: *b"VMTEST01",
        version: 3,
        max_body: 1000,
        what: "test",
    };

    #[test]
    fn round_trip_and_atomic_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        write_checked(&F, &path, b"hello").unwrap();
        assert_eq!(read_checked(&F, &path).unwrap(), b"hello");
        write_checked(&F, &path, b"again").unwrap();
        assert_eq!(read_checked(&F, &path).unwrap(), b"again");
    }

    #[test]
    fn every_truncation_is_refused() {
        let img = encode(&F, b"some body bytes");
        let p = Path::new("/x/f");
        for n in 0..img.len() {
            let err = decode(&F, p, &img[..n]).unwrap_err();
            assert_eq!(err.path(), p);
            assert!(
                matches!(
                    err,
                    CheckedFileError::Truncated { .. } | CheckedFileError::Checksum { .. }
                ),
                "{n}: {err}"
            );
        }
    }

    #[test]
    fn bad_version_magic_checksum_size() {
        let p = Path::new("/x/f");
        let mut img = encode(&F, b"body");
        img[8] = 4;
        assert!(matches!(
            decode(&F, p, &img),
            Err(CheckedFileError::Version { found: 4, .. })
        ));
        let mut img = encode(&F, b"body");
        img[0] = b'X';
        assert!(matches!(
            decode(&F, p, &img),
            Err(CheckedFileError::BadMagic { .. })
        ));
        let mut img = encode(&F, b"body");
        img[HEADER_LEN] ^= 1;
        assert!(matches!(
            decode(&F, p, &img),
            Err(CheckedFileError::Checksum { .. })
        ));
        let big = vec![0u8; 1001];
        assert!(matches!(
            write_checked(&F, Path::new("/nonexistent/f"), &big),
            Err(CheckedFileError::TooLarge { .. })
        ));
        let err = decode(&F, p, &encode(&F, b"body")[..30]).unwrap_err();
        assert!(err.to_string().contains("/x/f"), "{err}");
    }

    proptest::proptest! {
        #[test]
        fn random_corruption_never_accepted(body in proptest::collection::vec(0u8..=255, 0..200),
                                            pos in 0usize..1000, bit in 0u8..8) {
            let mut img = encode(&F, &body);
            let pos = pos % img.len();
            img[pos] ^= 1 << bit;
            proptest::prop_assert!(decode(&F, Path::new("f"), &img).is_err());
        }
    }
}
