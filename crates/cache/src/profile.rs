//! Boot profiles: the order in which an image's VMs first touched its chunks on
//! this host, with the time of each first touch. Later hosts prefetch the
//! chunks in this order ahead of their VMs (DESIGN.md section 3, prefetch).
//!
//! ```text
//! GROUP/volumes/NAME/profile   checked file "VMPROFIL" v1
//!   body: image id (32) | entries u64 | entries x (chunk u64, at_us u64)
//!         chunks distinct and inside the image, at_us never decreasing
//! ```
//!
//! The same bytes travel between hosts as the NBD export `profile/IMAGE`, and
//! are checked the same way on arrival (magic, version, checksum, then the
//! image id, chunk range and order against the local manifest).
//!
//! Recording is cheap on the read path: a chunk already seen costs one atomic
//! load; a first touch takes a short mutex to append its entry.

use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use virtman_image::Manifest;
use virtman_image::checked::{self, Format};

use crate::bitmap::AtomicBitmap;
use crate::error::CacheError;

/// File name of a volume's boot profile.
pub const PROFILE_FILE: &str = "profile";

/// Bytes of one entry in the body.
const ENTRY_LEN: u64 = 16;
/// Bytes before the entries.
const BODY_HEADER: usize = 32 + 8;

/// The on-disk (and on-wire) format of boot profiles.
pub const PROFILE_FORMAT: Format = Format {
    magic: *b"VMPROFIL",
    version: 1,
    max_body: BODY_HEADER as u64 + virtman_image::manifest::MAX_CHUNKS * ENTRY_LEN,
    what: "boot profile",
};

/// One chunk's first touch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProfileEntry {
    /// Chunk index.
    pub chunk: u64,
    /// Microseconds from the first recorded touch of the image to this one.
    pub at_us: u64,
}

/// A boot profile of one image: chunks in first-touch order.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct BootProfile {
    /// The entries, in order.
    pub entries: Vec<ProfileEntry>,
}

impl BootProfile {
    /// The chunk indices in boot order.
    pub fn chunks(&self) -> impl Iterator<Item = u64> + '_ {
        self.entries.iter().map(|e| e.chunk)
    }

    /// Whether the profile has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The checked-file image of this profile for `manifest`'s image.
    pub fn encode(&self, manifest: &Manifest) -> Vec<u8> {
        let mut body = Vec::with_capacity(BODY_HEADER + self.entries.len() * 16);
        body.extend_from_slice(&manifest.id().0);
        body.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        for e in &self.entries {
            body.extend_from_slice(&e.chunk.to_le_bytes());
            body.extend_from_slice(&e.at_us.to_le_bytes());
        }
        checked::encode(&PROFILE_FORMAT, &body)
    }

    /// Checks a profile's bytes (from a file or a peer; `path` names the
    /// source in errors) against `manifest`.
    pub fn decode(path: &Path, bytes: &[u8], manifest: &Manifest) -> Result<Self, CacheError> {
        let body = checked::decode(&PROFILE_FORMAT, path, bytes)?;
        Self::decode_body(path, &body, manifest)
    }

    fn decode_body(path: &Path, body: &[u8], manifest: &Manifest) -> Result<Self, CacheError> {
        let bad = |reason: String| CacheError::BadProfile {
            path: path.to_path_buf(),
            reason,
        };
        if body.len() < BODY_HEADER {
            return Err(bad(format!("body of {} bytes is too short", body.len())));
        }
        if body[..32] != manifest.id().0 {
            return Err(bad("it is the profile of another image".into()));
        }
        let word = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&body[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let n = word(32);
        let expected = n
            .checked_mul(ENTRY_LEN)
            .and_then(|b| b.checked_add(BODY_HEADER as u64));
        if expected != Some(body.len() as u64) {
            return Err(bad(format!(
                "{n} entries do not fit a body of {} bytes",
                body.len()
            )));
        }
        if n > manifest.chunks() {
            return Err(bad(format!(
                "{n} entries for an image of {} chunks",
                manifest.chunks()
            )));
        }
        let seen = AtomicBitmap::new(manifest.chunks());
        let mut entries = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
        let mut last = 0u64;
        for k in 0..usize::try_from(n).unwrap_or(0) {
            let at = BODY_HEADER + k * 16;
            let e = ProfileEntry {
                chunk: word(at),
                at_us: word(at + 8),
            };
            if e.chunk >= manifest.chunks() {
                return Err(bad(format!(
                    "entry {k}: chunk {} is past the image's {} chunks",
                    e.chunk,
                    manifest.chunks()
                )));
            }
            if !seen.set(e.chunk) {
                return Err(bad(format!("entry {k}: chunk {} appears twice", e.chunk)));
            }
            if e.at_us < last {
                return Err(bad(format!(
                    "entry {k}: time {} is earlier than the entry before",
                    e.at_us
                )));
            }
            last = e.at_us;
            entries.push(e);
        }
        Ok(BootProfile { entries })
    }

    /// The profile a boot with these reads would record: each chunk the
    /// reads `(offset, length, at_us)` touch, in order of first touch, with
    /// the time of that touch. Reads are taken in the order given; parts
    /// past the end of `manifest`'s image are ignored.
    pub fn from_reads(
        reads: impl IntoIterator<Item = (u64, u64, u64)>,
        manifest: &Manifest,
    ) -> BootProfile {
        let size = u64::from(manifest.chunk_size());
        let seen = AtomicBitmap::new(manifest.chunks());
        let mut entries = Vec::new();
        let mut last = 0u64;
        for (offset, length, at_us) in reads {
            let end = offset.saturating_add(length).min(manifest.size());
            if length == 0 || offset >= end {
                continue;
            }
            last = last.max(at_us);
            for chunk in offset / size..=(end - 1) / size {
                if seen.set(chunk) {
                    entries.push(ProfileEntry { chunk, at_us: last });
                }
            }
        }
        BootProfile { entries }
    }

    /// Reads and checks a profile file.
    pub fn load(path: &Path, manifest: &Manifest) -> Result<Self, CacheError> {
        let body = checked::read_checked(&PROFILE_FORMAT, path)?;
        Self::decode_body(path, &body, manifest)
    }

    /// Writes a profile file atomically and durably.
    pub fn store(&self, path: &Path, manifest: &Manifest) -> Result<(), CacheError> {
        let bytes = self.encode(manifest);
        // `encode` made the whole file; write its body through the one writer.
        let body = &bytes[checked::HEADER_LEN..bytes.len() - checked::CHECKSUM_LEN];
        checked::write_checked(&PROFILE_FORMAT, path, body)?;
        Ok(())
    }
}

/// Records first touches of a volume's chunks.
#[derive(Debug)]
pub(crate) struct Recorder {
    seen: AtomicBitmap,
    entries: Mutex<Vec<ProfileEntry>>,
    /// When time 0 of the profile was (set by the first touch, or from a
    /// loaded profile so that times continue after a restart).
    start: Mutex<Option<Instant>>,
    /// Entries recorded; changes whenever the profile does.
    len: AtomicU64,
    /// Entries not yet saved.
    dirty: AtomicBool,
}

impl Recorder {
    /// A recorder that continues `loaded`.
    pub(crate) fn new(chunks: u64, loaded: BootProfile) -> Recorder {
        let seen = AtomicBitmap::new(chunks);
        for e in &loaded.entries {
            seen.set(e.chunk);
        }
        let start = loaded.entries.last().map(|e| {
            let now = Instant::now();
            now.checked_sub(std::time::Duration::from_micros(e.at_us))
                .unwrap_or(now)
        });
        Recorder {
            seen,
            len: AtomicU64::new(loaded.entries.len() as u64),
            entries: Mutex::new(loaded.entries),
            start: Mutex::new(start),
            dirty: AtomicBool::new(false),
        }
    }

    /// Records a touch of `chunk` (first touches only).
    pub(crate) fn touch(&self, chunk: u64) {
        if self.seen.get(chunk) {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if !self.seen.set(chunk) {
            return;
        }
        let now = Instant::now();
        let start = *self
            .start
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(now);
        let at_us = u64::try_from(now.duration_since(start).as_micros()).unwrap_or(u64::MAX);
        let at_us = at_us.max(entries.last().map_or(0, |e| e.at_us));
        entries.push(ProfileEntry { chunk, at_us });
        self.len.store(entries.len() as u64, Ordering::Release);
        self.dirty.store(true, Ordering::Release);
    }

    /// The number of entries (a version: it only grows).
    pub(crate) fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }

    /// A copy of the profile.
    pub(crate) fn profile(&self) -> BootProfile {
        BootProfile {
            entries: self
                .entries
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }

    /// Takes the dirty flag: whether there is something to save.
    pub(crate) fn take_dirty(&self) -> bool {
        self.dirty.swap(false, Ordering::AcqRel)
    }

    /// Sets the dirty flag again after a failed save.
    pub(crate) fn set_dirty(&self) {
        self.dirty.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]
    use super::*;

    fn manifest(chunks: usize) -> Manifest {
        let data: Vec<u8> = (0..chunks * 4096).map(|i| (i % 251) as u8 + 1).collect();
        Manifest::of_bytes(&data, 4096).unwrap()
    }

    #[test]
    fn round_trip_and_refusals() {
        let m = manifest(8);
        let r = Recorder::new(8, BootProfile::default());
        for c in [5, 2, 5, 7, 2, 0] {
            r.touch(c);
        }
        let p = r.profile();
        assert_eq!(p.chunks().collect::<Vec<_>>(), vec![5, 2, 7, 0]);
        let bytes = p.encode(&m);
        let path = Path::new("peer");
        assert_eq!(BootProfile::decode(path, &bytes, &m).unwrap(), p);

        // Another image's manifest.
        let other = manifest(9);
        assert!(matches!(
            BootProfile::decode(path, &bytes, &other),
            Err(CacheError::BadProfile { .. })
        ));
        // Truncated: refused by the checked format.
        assert!(matches!(
            BootProfile::decode(path, &bytes[..bytes.len() - 1], &m),
            Err(CacheError::Metadata(_))
        ));
        // A duplicate and an out-of-range chunk.
        let dup = BootProfile {
            entries: vec![
                ProfileEntry { chunk: 1, at_us: 0 },
                ProfileEntry { chunk: 1, at_us: 1 },
            ],
        };
        let err = BootProfile::decode(path, &dup.encode(&m), &m).unwrap_err();
        assert!(err.to_string().contains("appears twice"), "{err}");
        let far = BootProfile {
            entries: vec![ProfileEntry { chunk: 8, at_us: 0 }],
        };
        let err = BootProfile::decode(path, &far.encode(&m), &m).unwrap_err();
        assert!(err.to_string().contains("past the image"), "{err}");
    }

    #[test]
    fn reads_give_chunks_in_first_touch_order() {
        let m = manifest(4); // four chunks of 4 KiB
        let reads = [
            (2 * 4096 + 10, 100, 5), // chunk 2
            (4096 - 1, 2, 7),        // chunks 0 and 1
            (2 * 4096, 4096, 9),     // chunk 2 again: not a new entry
            (3 * 4096, 1 << 20, 8),  // chunk 3 and past the end; time never goes back
            (10 << 20, 4096, 12),    // past the end: nothing
        ];
        let p = BootProfile::from_reads(reads, &m);
        let got: Vec<(u64, u64)> = p.entries.iter().map(|e| (e.chunk, e.at_us)).collect();
        assert_eq!(got, vec![(2, 5), (0, 7), (1, 7), (3, 9)]);
        // What it builds is a valid profile of the image.
        let back = BootProfile::decode(Path::new("p"), &p.encode(&m), &m).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn a_loaded_profile_continues() {
        let m = manifest(4);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(PROFILE_FILE);
        let r = Recorder::new(4, BootProfile::default());
        r.touch(3);
        r.touch(1);
        r.profile().store(&path, &m).unwrap();
        let loaded = BootProfile::load(&path, &m).unwrap();
        let r2 = Recorder::new(4, loaded);
        r2.touch(1);
        r2.touch(0);
        assert_eq!(r2.profile().chunks().collect::<Vec<_>>(), vec![3, 1, 0]);
        assert_eq!(r2.len(), 3);
    }
}
