//! virtman images: what an image is and where imported images live.
//!
//! - [`checked`]: the one way metadata files are written and read back
//!   (magic, version, length limit, BLAKE3 checksum, atomic replace).
//! - [`manifest`]: size, chunk size and a BLAKE3 digest per chunk; the digest
//!   of the manifest is the image's identity.
//! - [`store`]: the image store directory; import of raw and qcow2 files,
//!   listing and verification.

pub mod checked;
pub mod manifest;
pub mod store;

pub use checked::CheckedFileError;
pub use manifest::{DEFAULT_CHUNK_SIZE, Digest, ImageId, Manifest, ManifestError};
pub use store::{ImageError, ImageStore, StoredImage, VerifyReport, valid_name};
