//! A fixed-size bitmap of atomic words, and its persisted form.
//!
//! Used for a cached volume's presence map (one bit per chunk) and a
//! snapshot's allocation map (one bit per 4 KiB block). Bits past the end read
//! as absent and are never set. Persisted maps are checked files
//! ([`virtman_image::checked`]) whose body starts with a caller-defined
//! prefix (which image, which size) followed by the words:
//!
//! ```text
//! +------------------+-----------+--------------------------------+
//! | prefix (caller)  | bits u64  | ceil(bits/64) x u64 LE words   |
//! +------------------+-----------+--------------------------------+
//! ```

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use virtman_image::checked::{self, CheckedFileError, Format};

/// A bitmap whose bits can be set and cleared concurrently.
#[derive(Debug)]
pub struct AtomicBitmap {
    words: Vec<AtomicU64>,
    bits: u64,
}

impl AtomicBitmap {
    /// A bitmap of `bits` bits, all clear.
    pub fn new(bits: u64) -> AtomicBitmap {
        let n = usize::try_from(bits.div_ceil(64)).unwrap_or(0);
        AtomicBitmap {
            words: (0..n).map(|_| AtomicU64::new(0)).collect(),
            bits,
        }
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.bits
    }

    /// Whether the map has no bits.
    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }

    fn locate(&self, bit: u64) -> Option<(&AtomicU64, u64)> {
        if bit >= self.bits {
            return None;
        }
        let w = usize::try_from(bit / 64).ok()?;
        self.words.get(w).map(|a| (a, 1u64 << (bit % 64)))
    }

    /// Whether `bit` is set (false past the end).
    pub fn get(&self, bit: u64) -> bool {
        self.locate(bit)
            .is_some_and(|(w, m)| w.load(Ordering::Acquire) & m != 0)
    }

    /// Sets `bit`; returns whether it was clear before. No-op past the end.
    pub fn set(&self, bit: u64) -> bool {
        self.locate(bit)
            .is_some_and(|(w, m)| w.fetch_or(m, Ordering::AcqRel) & m == 0)
    }

    /// Clears `bit`; returns whether it was set before.
    pub fn clear(&self, bit: u64) -> bool {
        self.locate(bit)
            .is_some_and(|(w, m)| w.fetch_and(!m, Ordering::AcqRel) & m != 0)
    }

    /// Sets every bit in `start..end`.
    pub fn set_range(&self, start: u64, end: u64) {
        for b in start..end.min(self.bits) {
            self.set(b);
        }
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    /// A copy of the words as they are now.
    pub fn snapshot(&self) -> Vec<u64> {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Acquire))
            .collect()
    }

    /// Clears every bit.
    pub fn clear_all(&self) {
        for w in &self.words {
            w.store(0, Ordering::Release);
        }
    }

    /// Iterates over the set bits, in order.
    pub fn ones(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, w)| {
            let mut v = w.load(Ordering::Acquire);
            let base = i as u64 * 64;
            std::iter::from_fn(move || {
                if v == 0 {
                    return None;
                }
                let t = u64::from(v.trailing_zeros());
                v &= v - 1;
                Some(base + t)
            })
        })
    }

    fn from_words(bits: u64, words: Vec<u64>) -> AtomicBitmap {
        AtomicBitmap {
            words: words.into_iter().map(AtomicU64::new).collect(),
            bits,
        }
    }
}

/// Encodes a persisted map body: `prefix`, the bit count and `words`.
pub fn encode_body(prefix: &[u8], bits: u64, words: &[u64]) -> Vec<u8> {
    let mut body = Vec::with_capacity(prefix.len() + 8 + words.len() * 8);
    body.extend_from_slice(prefix);
    body.extend_from_slice(&bits.to_le_bytes());
    for w in words {
        body.extend_from_slice(&w.to_le_bytes());
    }
    body
}

/// Writes a persisted map to `path`, atomically and durably.
pub fn save(
    format: &Format,
    path: &Path,
    prefix: &[u8],
    bits: u64,
    words: &[u64],
) -> Result<(), CheckedFileError> {
    checked::write_checked(format, path, &encode_body(prefix, bits, words))
}

/// Reads a persisted map from `path`, checking that it starts with `prefix`
/// and holds exactly `bits` bits with nothing set past the end.
pub fn load(
    format: &Format,
    path: &Path,
    prefix: &[u8],
    bits: u64,
) -> Result<AtomicBitmap, CheckedFileError> {
    let body = checked::read_checked(format, path)?;
    decode_body(path, &body, prefix, bits)
}

/// Checks and decodes a persisted map body (see [`load`]).
pub fn decode_body(
    path: &Path,
    body: &[u8],
    prefix: &[u8],
    bits: u64,
) -> Result<AtomicBitmap, CheckedFileError> {
    let invalid = |reason: String| CheckedFileError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    if body.len() < prefix.len() + 8 || body[..prefix.len()] != *prefix {
        return Err(invalid("belongs to another image or snapshot".into()));
    }
    let rest = &body[prefix.len()..];
    let mut b = [0u8; 8];
    b.copy_from_slice(&rest[..8]);
    let stored = u64::from_le_bytes(b);
    if stored != bits {
        return Err(invalid(format!("{stored} bits, expected {bits}")));
    }
    let words = &rest[8..];
    let want = usize::try_from(bits.div_ceil(64)).unwrap_or(usize::MAX);
    if words.len() != want.saturating_mul(8) {
        return Err(invalid(format!(
            "{} bytes of bits for {bits} bits",
            words.len()
        )));
    }
    let words: Vec<u64> = words
        .chunks_exact(8)
        .map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            u64::from_le_bytes(a)
        })
        .collect();
    if !bits.is_multiple_of(64)
        && let Some(last) = words.last()
        && last >> (bits % 64) != 0
    {
        return Err(invalid("bits set past the end".into()));
    }
    Ok(AtomicBitmap::from_words(bits, words))
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    const F: Format = Format {
        magic: *b"VMBTTEST",
        version: 1,
        max_body: 1 << 20,
        what: "test map",
    };

    #[test]
    fn set_clear_count_ones() {
        let b = AtomicBitmap::new(130);
        assert!(b.set(0) && b.set(64) && b.set(129));
        assert!(!b.set(129));
        assert!(!b.set(130), "past the end is ignored");
        assert!(!b.get(130) && !b.get(u64::MAX));
        assert_eq!(b.count(), 3);
        assert_eq!(b.ones().collect::<Vec<_>>(), vec![0, 64, 129]);
        assert!(b.clear(64) && !b.clear(64));
        assert_eq!(b.count(), 2);
        b.set_range(10, 200);
        assert_eq!(b.count(), 121);
    }

    #[test]
    fn persist_round_trip_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("map");
        let b = AtomicBitmap::new(100);
        b.set(3);
        b.set(99);
        save(&F, &p, b"pre", 100, &b.snapshot()).unwrap();
        let l = load(&F, &p, b"pre", 100).unwrap();
        assert_eq!(l.ones().collect::<Vec<_>>(), vec![3, 99]);
        assert!(load(&F, &p, b"PRE", 100).is_err());
        assert!(load(&F, &p, b"pre", 101).is_err());
        // A bit past the end is refused.
        save(&F, &p, b"pre", 100, &[0, 1 << 40]).unwrap();
        let err = load(&F, &p, b"pre", 100).unwrap_err();
        assert!(err.to_string().contains("past the end"), "{err}");
    }
}
