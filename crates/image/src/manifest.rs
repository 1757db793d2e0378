//! The manifest: what an image is, chunk by chunk.
//!
//! A manifest gives the image's size, its chunk size and the BLAKE3 digest of
//! every chunk (the last chunk may be short). The image's identity
//! ([`ImageId`]) is the BLAKE3 digest of the encoded manifest body, so two
//! images with the same bytes and chunk size have the same identity wherever
//! they were imported. It is stored as a checked file ([`crate::checked`]):
//!
//! ```text
//!  checked file header ("VMMANIFS", version 1)
//!  +-----------+-------------+------------+---------------------------+
//!  | size u64  | chunk u32   | zero u32   | count x 32-byte BLAKE3    |
//!  +-----------+-------------+------------+---------------------------+
//!  checksum (BLAKE3 of header and body)
//! ```
//!
//! `count` is not stored: it follows from size and chunk size, and the body
//! length must agree with it.

use std::fmt;
use std::path::Path;

use crate::checked::{self, CheckedFileError, Format};

/// Smallest chunk size accepted (tests use small chunks; images use 64 KiB+).
pub const MIN_CHUNK_SIZE: u32 = 4096;
/// Largest chunk size accepted.
pub const MAX_CHUNK_SIZE: u32 = 16 << 20;
/// The default chunk size for imports (see ARCHITECTURE.md for the measurement).
pub const DEFAULT_CHUNK_SIZE: u32 = 256 << 10;
/// Most chunks in one manifest (4 Mi digests = 128 MiB of manifest).
pub const MAX_CHUNKS: u64 = 4 << 20;

const BODY_HEADER: usize = 16;

/// The on-disk format of manifests.
pub const FORMAT: Format = Format {
    magic: *b"VMMANIFS",
    version: 1,
    max_body: BODY_HEADER as u64 + MAX_CHUNKS * 32,
    what: "manifest",
};

/// A BLAKE3 digest of one chunk.
pub type Digest = [u8; 32];

/// An image's identity: the digest of its manifest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ImageId(pub [u8; 32]);

impl ImageId {
    /// Lowercase hexadecimal.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// The first 12 hex digits, for display.
    pub fn short(&self) -> String {
        hex(&self.0[..6])
    }
}

impl fmt::Display for ImageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ImageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ImageId({})", self.short())
    }
}

/// Lowercase hexadecimal of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Why a manifest could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The chunk size is not a power of two in the accepted range.
    #[error("chunk size {0} is not a power of two between 4 KiB and 16 MiB")]
    ChunkSize(u64),
    /// The image has too many chunks for one manifest.
    #[error("an image of {size} bytes has {chunks} chunks of {chunk_size}, more than {MAX_CHUNKS}")]
    TooManyChunks {
        /// Image size.
        size: u64,
        /// Chunk size.
        chunk_size: u32,
        /// Chunks it would have.
        chunks: u64,
    },
    /// The number of digests does not match size and chunk size.
    #[error("{digests} digests for {chunks} chunks")]
    DigestCount {
        /// Digests given.
        digests: u64,
        /// Chunks expected.
        chunks: u64,
    },
}

/// An image's manifest.
#[derive(Clone, PartialEq, Eq)]
pub struct Manifest {
    size: u64,
    chunk_size: u32,
    digests: Vec<Digest>,
    id: ImageId,
    zero_digest: Digest,
    zero_tail_digest: Digest,
}

impl fmt::Debug for Manifest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Manifest")
            .field("id", &self.id)
            .field("size", &self.size)
            .field("chunk_size", &self.chunk_size)
            .field("chunks", &self.digests.len())
            .finish()
    }
}

/// Checks a chunk size.
pub fn check_chunk_size(chunk_size: u64) -> Result<u32, ManifestError> {
    match u32::try_from(chunk_size) {
        Ok(c) if c.is_power_of_two() && (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&c) => Ok(c),
        _ => Err(ManifestError::ChunkSize(chunk_size)),
    }
}

/// Number of chunks of an image.
pub fn chunk_count(size: u64, chunk_size: u32) -> u64 {
    size.div_ceil(u64::from(chunk_size.max(1)))
}

impl Manifest {
    /// Builds a manifest from the digests of every chunk, in order.
    pub fn new(
        size: u64,
        chunk_size: u32,
        digests: Vec<Digest>,
    ) -> Result<Manifest, ManifestError> {
        let chunk_size = check_chunk_size(u64::from(chunk_size))?;
        let chunks = chunk_count(size, chunk_size);
        if chunks > MAX_CHUNKS {
            return Err(ManifestError::TooManyChunks {
                size,
                chunk_size,
                chunks,
            });
        }
        if digests.len() as u64 != chunks {
            return Err(ManifestError::DigestCount {
                digests: digests.len() as u64,
                chunks,
            });
        }
        let mut m = Manifest {
            size,
            chunk_size,
            digests,
            id: ImageId([0; 32]),
            zero_digest: [0; 32],
            zero_tail_digest: [0; 32],
        };
        m.id = ImageId(*blake3::hash(&m.body()).as_bytes());
        let zeroes = vec![0u8; usize::try_from(chunk_size).unwrap_or(0)];
        m.zero_digest = digest(&zeroes);
        let tail = m.chunk_len(chunks.saturating_sub(1));
        m.zero_tail_digest = digest(zeroes.get(..tail as usize).unwrap_or(&[]));
        Ok(m)
    }

    /// Builds a manifest of an in-memory image (tests, small tools).
    pub fn of_bytes(data: &[u8], chunk_size: u32) -> Result<Manifest, ManifestError> {
        let cs = usize::try_from(check_chunk_size(u64::from(chunk_size))?).unwrap_or(usize::MAX);
        let digests = data.chunks(cs).map(digest).collect();
        Manifest::new(data.len() as u64, chunk_size, digests)
    }

    /// The image's identity.
    pub fn id(&self) -> ImageId {
        self.id
    }

    /// Image size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Chunk size in bytes.
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// Number of chunks.
    pub fn chunks(&self) -> u64 {
        self.digests.len() as u64
    }

    /// The digest of chunk `index`, if it exists.
    pub fn digest(&self, index: u64) -> Option<&Digest> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.digests.get(i))
    }

    /// The byte offset of chunk `index`.
    pub fn chunk_offset(&self, index: u64) -> u64 {
        index.saturating_mul(u64::from(self.chunk_size))
    }

    /// The length of chunk `index` (the last one may be short; 0 past the end).
    pub fn chunk_len(&self, index: u64) -> u32 {
        let start = self.chunk_offset(index);
        let len = self
            .size
            .saturating_sub(start)
            .min(u64::from(self.chunk_size));
        u32::try_from(len).unwrap_or(0)
    }

    /// The chunk holding byte `offset`.
    pub fn chunk_of(&self, offset: u64) -> u64 {
        offset / u64::from(self.chunk_size)
    }

    /// Whether `data` is exactly chunk `index` of this image.
    pub fn verify_chunk(&self, index: u64, data: &[u8]) -> bool {
        match self.digest(index) {
            Some(d) => data.len() as u64 == u64::from(self.chunk_len(index)) && digest(data) == *d,
            None => false,
        }
    }

    /// Whether chunk `index` is all zeroes (known from its digest, no I/O).
    pub fn is_zero_chunk(&self, index: u64) -> bool {
        let last = index + 1 == self.chunks();
        match self.digest(index) {
            Some(d) if last => *d == self.zero_tail_digest,
            Some(d) => *d == self.zero_digest,
            None => false,
        }
    }

    fn body(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(BODY_HEADER + self.digests.len() * 32);
        body.extend_from_slice(&self.size.to_le_bytes());
        body.extend_from_slice(&self.chunk_size.to_le_bytes());
        body.extend_from_slice(&0u32.to_le_bytes());
        for d in &self.digests {
            body.extend_from_slice(d);
        }
        body
    }

    /// The manifest as a checked file image.
    pub fn encode(&self) -> Vec<u8> {
        checked::encode(&FORMAT, &self.body())
    }

    /// Parses and checks a manifest file image; `path` names it in errors.
    pub fn decode(path: &Path, bytes: &[u8]) -> Result<Manifest, CheckedFileError> {
        let body = checked::decode(&FORMAT, path, bytes)?;
        Manifest::from_body(path, &body)
    }

    fn from_body(path: &Path, body: &[u8]) -> Result<Manifest, CheckedFileError> {
        let invalid = |reason: String| CheckedFileError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        if body.len() < BODY_HEADER || !(body.len() - BODY_HEADER).is_multiple_of(32) {
            return Err(invalid(format!("manifest body of {} bytes", body.len())));
        }
        let mut s = [0u8; 8];
        s.copy_from_slice(&body[..8]);
        let size = u64::from_le_bytes(s);
        let mut c = [0u8; 4];
        c.copy_from_slice(&body[8..12]);
        let chunk_size = u32::from_le_bytes(c);
        let digests = body[BODY_HEADER..]
            .chunks_exact(32)
            .map(|d| {
                let mut a = [0u8; 32];
                a.copy_from_slice(d);
                a
            })
            .collect();
        Manifest::new(size, chunk_size, digests).map_err(|e| invalid(e.to_string()))
    }

    /// Reads and checks the manifest file at `path`.
    pub fn load(path: &Path) -> Result<Manifest, CheckedFileError> {
        let body = checked::read_checked(&FORMAT, path)?;
        Manifest::from_body(path, &body)
    }

    /// Writes the manifest to `path`, atomically and durably.
    pub fn store(&self, path: &Path) -> Result<(), CheckedFileError> {
        checked::write_checked(&FORMAT, path, &self.body())
    }
}

/// The BLAKE3 digest of `data`.
pub fn digest(data: &[u8]) -> Digest {
    *blake3::hash(data).as_bytes()
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    fn sample() -> (Vec<u8>, Manifest) {
        let mut data: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        data[8192..12288].fill(0);
        let m = Manifest::of_bytes(&data, 4096).unwrap();
        (data, m)
    }

    #[test]
    fn chunks_and_verify() {
        let (data, m) = sample();
        assert_eq!(m.chunks(), 5);
        assert_eq!(m.chunk_len(4), 20_000 - 16384);
        assert_eq!(m.chunk_len(5), 0);
        assert!(m.verify_chunk(1, &data[4096..8192]));
        assert!(!m.verify_chunk(1, &data[4096..8191]));
        assert!(!m.verify_chunk(0, &data[4096..8192]));
        assert!(!m.verify_chunk(9, &data[..4096]));
        assert!(m.is_zero_chunk(2));
        assert!(!m.is_zero_chunk(1));
        let z = Manifest::of_bytes(&[0u8; 5000], 4096).unwrap();
        assert!(z.is_zero_chunk(0) && z.is_zero_chunk(1));
    }

    #[test]
    fn identity_depends_on_content_and_chunk_size() {
        let (data, m) = sample();
        assert_eq!(m.id(), Manifest::of_bytes(&data, 4096).unwrap().id());
        assert_ne!(m.id(), Manifest::of_bytes(&data, 8192).unwrap().id());
        let mut other = data.clone();
        other[0] ^= 1;
        assert_ne!(m.id(), Manifest::of_bytes(&other, 4096).unwrap().id());
    }

    #[test]
    fn file_round_trip_and_refusals() {
        let (_, m) = sample();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("manifest");
        m.store(&path).unwrap();
        assert_eq!(Manifest::load(&path).unwrap(), m);
        let img = std::fs::read(&path).unwrap();
        std::fs::write(&path, &img[..img.len() - 5]).unwrap();
        let err = Manifest::load(&path).unwrap_err();
        assert!(err.to_string().contains("manifest"), "{err}");
        assert!(err.to_string().contains(&path.display().to_string()));
        let mut bad = img.clone();
        bad[8] = 2;
        std::fs::write(&path, &bad).unwrap();
        assert!(matches!(
            Manifest::load(&path),
            Err(CheckedFileError::Version { found: 2, .. })
        ));
        let mut bad = img.clone();
        let n = bad.len();
        bad[n - 40] ^= 0x10;
        std::fs::write(&path, &bad).unwrap();
        assert!(matches!(
            Manifest::load(&path),
            Err(CheckedFileError::Checksum { .. })
        ));
    }

    #[test]
    fn inconsistent_body_refused() {
        // A valid checked file whose digest count disagrees with its size.
        let mut body = Vec::new();
        body.extend_from_slice(&10_000u64.to_le_bytes());
        body.extend_from_slice(&4096u32.to_le_bytes());
        body.extend_from_slice(&0u32.to_le_bytes());
        body.extend_from_slice(&[0u8; 64]);
        let img = checked::encode(&FORMAT, &body);
        let err = Manifest::decode(Path::new("m"), &img).unwrap_err();
        assert!(matches!(err, CheckedFileError::Invalid { .. }), "{err}");
        assert!(matches!(
            check_chunk_size(3000),
            Err(ManifestError::ChunkSize(3000))
        ));
        assert!(check_chunk_size(1 << 30).is_err());
    }
}
