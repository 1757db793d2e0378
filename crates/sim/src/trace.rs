//! Boot traces: what one VM reads while it boots, and when.
//!
//! A trace is a list of reads (offset, length, time since the boot started, as
//! recorded on a machine whose disk answered at once). Replaying it, a VM
//! issues read 0 at `at[0]` after it starts, and read i at `at[i] - at[i-1]`
//! after read i-1 completed: the gaps are the guest's think time, and slow
//! reads push the rest of the boot later, as they do in a real guest. Reads
//! are issued one at a time (a boot's reads are mostly synchronous).
//!
//! ```text
//!   text form (`#` starts a comment)        JSON form
//!   virtman-trace 1                          {"image_size": 4294967296,
//!   image-size 4294967296                     "reads": [{"at_us": 0,
//!   # at_us   offset     length                          "offset": 0,
//!   0         0          4096                             "length": 4096}, ...]}
//!   1500      1048576    131072
//! ```
//!
//! There is no recorded-trace crate yet; this format is deliberately small so
//! that the recorder of real boots can write it (or be adapted to it).
//! [`Trace::synthetic`] makes a deterministic one from a working-set size.

use serde::{Deserialize, Serialize};

use crate::rng::Rng;

/// The first line of the text form.
pub const TEXT_MAGIC: &str = "virtman-trace 1";
/// The most reads a trace may hold (a boot does thousands, not millions).
pub const MAX_READS: usize = 4_000_000;
/// The largest single read accepted (64 MiB).
pub const MAX_READ_LEN: u64 = 64 << 20;

/// One read of a boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Read {
    /// Microseconds from the start of the boot to this read, as recorded.
    pub at_us: u64,
    /// First byte read.
    pub offset: u64,
    /// Bytes read (above zero).
    pub length: u64,
}

/// A boot trace over one image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trace {
    /// Size of the image the trace was recorded on, in bytes.
    pub image_size: u64,
    /// The reads, in the order they were issued (`at_us` never decreases).
    pub reads: Vec<Read>,
}

/// Why a trace was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TraceError {
    /// The text form does not start with [`TEXT_MAGIC`].
    #[error("not a virtman trace: the first line must be {TEXT_MAGIC:?}")]
    Magic,
    /// The `image-size` line is missing or not a number.
    #[error("line {line}: expected `image-size BYTES`")]
    ImageSize {
        /// 1-based line number.
        line: usize,
    },
    /// A read line does not have three numbers.
    #[error("line {line}: expected `at_us offset length` (three numbers), got {text:?}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// The line as found (shortened).
        text: String,
    },
    /// The JSON form does not parse (or is cut short).
    #[error("bad JSON trace: {0}")]
    Json(String),
    /// The trace has no reads.
    #[error("the trace has no reads")]
    Empty,
    /// The trace has more reads than [`MAX_READS`].
    #[error("the trace has more than {MAX_READS} reads")]
    TooManyReads,
    /// The image size is zero.
    #[error("the trace's image size is zero")]
    ZeroImage,
    /// A read has length zero or above [`MAX_READ_LEN`].
    #[error("read {index}: length {length} is not between 1 and {MAX_READ_LEN}")]
    Length {
        /// 0-based read index.
        index: usize,
        /// The length found.
        length: u64,
    },
    /// A read ends past the end of the image.
    #[error("read {index}: bytes {offset}..{end} lie past the end of the {image_size}-byte image")]
    PastEnd {
        /// 0-based read index.
        index: usize,
        /// First byte.
        offset: u64,
        /// One past the last byte.
        end: u64,
        /// The image size.
        image_size: u64,
    },
    /// A read's time is earlier than the read before it.
    #[error("read {index}: at_us {at_us} is earlier than the read before it")]
    Time {
        /// 0-based read index.
        index: usize,
        /// Its time.
        at_us: u64,
    },
    /// A synthetic trace was asked for with impossible sizes.
    #[error("synthetic trace: {0}")]
    Synthetic(String),
}

/// The parameters of a synthetic trace.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SyntheticSpec {
    /// Image size in bytes.
    pub image_size: u64,
    /// Bytes of distinct chunks the boot touches (rounded down to chunks).
    pub working_set: u64,
    /// Chunk size the working set is counted in.
    pub chunk_size: u32,
    /// Size of each read (a divisor of the chunk size works best).
    pub read_size: u64,
    /// Total think time of the boot (the guest's CPU time), spread over reads.
    pub think: std::time::Duration,
}

impl Trace {
    /// Checks the trace: non-empty, sizes, order, every read inside the image.
    pub fn validate(&self) -> Result<(), TraceError> {
        if self.image_size == 0 {
            return Err(TraceError::ZeroImage);
        }
        if self.reads.is_empty() {
            return Err(TraceError::Empty);
        }
        if self.reads.len() > MAX_READS {
            return Err(TraceError::TooManyReads);
        }
        let mut last = 0u64;
        for (index, r) in self.reads.iter().enumerate() {
            if r.length == 0 || r.length > MAX_READ_LEN {
                return Err(TraceError::Length {
                    index,
                    length: r.length,
                });
            }
            let end = r.offset.saturating_add(r.length);
            if end > self.image_size {
                return Err(TraceError::PastEnd {
                    index,
                    offset: r.offset,
                    end,
                    image_size: self.image_size,
                });
            }
            if r.at_us < last {
                return Err(TraceError::Time {
                    index,
                    at_us: r.at_us,
                });
            }
            last = r.at_us;
        }
        Ok(())
    }

    /// Parses either form (JSON when the first non-blank character is `{`)
    /// and validates the result.
    pub fn parse(text: &str) -> Result<Self, TraceError> {
        let t = if text.trim_start().starts_with('{') {
            serde_json::from_str::<Trace>(text).map_err(|e| TraceError::Json(e.to_string()))?
        } else {
            Self::parse_text(text)?
        };
        t.validate()?;
        Ok(t)
    }

    fn parse_text(text: &str) -> Result<Self, TraceError> {
        let mut lines = text
            .lines()
            .enumerate()
            .map(|(i, l)| (i + 1, l.split('#').next().unwrap_or("").trim()))
            .filter(|(_, l)| !l.is_empty());
        match lines.next() {
            Some((_, l)) if l == TEXT_MAGIC => {}
            _ => return Err(TraceError::Magic),
        }
        let image_size = match lines.next() {
            Some((line, l)) => l
                .strip_prefix("image-size")
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or(TraceError::ImageSize { line })?,
            None => return Err(TraceError::ImageSize { line: 2 }),
        };
        let mut reads = Vec::new();
        for (line, l) in lines {
            let nums: Vec<Option<u64>> = l.split_whitespace().map(|w| w.parse().ok()).collect();
            match nums.as_slice() {
                [Some(at_us), Some(offset), Some(length)] => {
                    if reads.len() >= MAX_READS {
                        return Err(TraceError::TooManyReads);
                    }
                    reads.push(Read {
                        at_us: *at_us,
                        offset: *offset,
                        length: *length,
                    });
                }
                _ => {
                    return Err(TraceError::Line {
                        line,
                        text: l.chars().take(60).collect(),
                    });
                }
            }
        }
        Ok(Trace { image_size, reads })
    }

    /// The text form (see the module documentation); [`Trace::parse`] reads it back.
    pub fn to_text(&self) -> String {
        use std::fmt::Write;
        let mut s = format!(
            "{TEXT_MAGIC}\nimage-size {}\n# at_us offset length\n",
            self.image_size
        );
        for r in &self.reads {
            let _ = writeln!(s, "{} {} {}", r.at_us, r.offset, r.length);
        }
        s
    }

    /// A deterministic synthetic boot: `working_set / chunk_size` distinct
    /// chunks spread over the image in runs (a boot reads files, which lie in
    /// extents), visited run by run in a shuffled order, each chunk read in
    /// `read_size` pieces, with the think time spread over the reads
    /// (uniform jitter around the mean gap).
    pub fn synthetic(spec: &SyntheticSpec, seed: u64) -> Result<Self, TraceError> {
        let chunk = u64::from(spec.chunk_size);
        if chunk == 0 || spec.read_size == 0 || spec.read_size > MAX_READ_LEN {
            return Err(TraceError::Synthetic(
                "chunk and read sizes must be above zero (reads at most 64 MiB)".into(),
            ));
        }
        let chunks_in_image = spec.image_size.div_ceil(chunk);
        let wanted = (spec.working_set / chunk).max(1);
        if spec.image_size == 0 || wanted > chunks_in_image {
            return Err(TraceError::Synthetic(format!(
                "a working set of {} bytes does not fit in a {}-byte image",
                spec.working_set, spec.image_size
            )));
        }
        let mut rng = Rng::new(seed, 0x0074_7261_6365);
        // Runs of 1..=16 consecutive chunks at random places; overlaps merge.
        let mut chosen = std::collections::BTreeSet::new();
        while (chosen.len() as u64) < wanted {
            let run = 1 + rng.below(16);
            let start = rng.below(chunks_in_image);
            for c in start..(start + run).min(chunks_in_image) {
                if (chosen.len() as u64) < wanted {
                    chosen.insert(c);
                }
            }
        }
        // Group consecutive chunks into runs; visit the runs in a shuffled order.
        let mut runs: Vec<Vec<u64>> = Vec::new();
        for c in chosen {
            match runs.last_mut() {
                Some(r) if r.last().is_some_and(|&l| l + 1 == c) => r.push(c),
                _ => runs.push(vec![c]),
            }
        }
        rng.shuffle(&mut runs);
        let mut pieces = Vec::new();
        for c in runs.into_iter().flatten() {
            let start = c * chunk;
            let end = (start + chunk).min(spec.image_size);
            let mut off = start;
            while off < end {
                let len = spec.read_size.min(end - off);
                pieces.push((off, len));
                off += len;
            }
        }
        let n = pieces.len() as u64;
        let think_us = u64::try_from(spec.think.as_micros()).unwrap_or(u64::MAX);
        let mean = think_us / n.max(1);
        let mut at = 0u64;
        let mut reads = Vec::with_capacity(pieces.len());
        for (i, (offset, length)) in pieces.into_iter().enumerate() {
            if i > 0 {
                // Uniform in [0, 2 * mean]: the mean stays the mean.
                at += rng.below(2 * mean + 1);
            }
            reads.push(Read {
                at_us: at,
                offset,
                length,
            });
        }
        let t = Trace {
            image_size: spec.image_size,
            reads,
        };
        t.validate()?;
        Ok(t)
    }

    /// Bytes read by the whole trace (with repeats).
    pub fn bytes(&self) -> u64 {
        self.reads.iter().map(|r| r.length).sum()
    }

    /// The distinct chunks the trace touches, in bytes (each chunk counted at
    /// its real size: the image's last chunk may be short).
    pub fn chunk_bytes(&self, chunk_size: u32) -> u64 {
        let chunk = u64::from(chunk_size.max(1));
        let mut seen = std::collections::BTreeSet::new();
        for r in &self.reads {
            let first = r.offset / chunk;
            let last = (r.offset + r.length - 1) / chunk;
            seen.extend(first..=last);
        }
        seen.iter()
            .map(|c| (c * chunk + chunk).min(self.image_size) - c * chunk)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn spec() -> SyntheticSpec {
        SyntheticSpec {
            image_size: 64 << 20,
            working_set: 4 << 20,
            chunk_size: 256 << 10,
            read_size: 64 << 10,
            think: Duration::from_secs(2),
        }
    }

    #[test]
    fn synthetic_is_deterministic_and_covers_the_working_set() {
        let a = Trace::synthetic(&spec(), 1).unwrap();
        let b = Trace::synthetic(&spec(), 1).unwrap();
        let c = Trace::synthetic(&spec(), 2).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.chunk_bytes(256 << 10), 4 << 20);
        assert_eq!(a.bytes(), 4 << 20);
        assert_eq!(a.reads.len(), 64);
    }

    #[test]
    fn text_and_json_round_trip() {
        let a = Trace::synthetic(&spec(), 3).unwrap();
        assert_eq!(Trace::parse(&a.to_text()).unwrap(), a);
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(Trace::parse(&json).unwrap(), a);
    }

    #[test]
    fn bad_traces_get_clear_errors() {
        assert_eq!(Trace::parse("hello\n"), Err(TraceError::Magic));
        assert_eq!(
            Trace::parse("virtman-trace 1\nimage-size x\n"),
            Err(TraceError::ImageSize { line: 2 })
        );
        assert_eq!(
            Trace::parse("virtman-trace 1\nimage-size 100\n"),
            Err(TraceError::Empty)
        );
        // A truncated last line.
        assert_eq!(
            Trace::parse("virtman-trace 1\nimage-size 100\n0 0 10\n5 10"),
            Err(TraceError::Line {
                line: 4,
                text: "5 10".into()
            })
        );
        assert_eq!(
            Trace::parse("virtman-trace 1\nimage-size 100\n0 90 20\n"),
            Err(TraceError::PastEnd {
                index: 0,
                offset: 90,
                end: 110,
                image_size: 100
            })
        );
        assert_eq!(
            Trace::parse("virtman-trace 1\nimage-size 100\n5 0 10\n4 0 10\n"),
            Err(TraceError::Time { index: 1, at_us: 4 })
        );
        assert_eq!(
            Trace::parse("virtman-trace 1\nimage-size 100\n0 0 0\n"),
            Err(TraceError::Length {
                index: 0,
                length: 0
            })
        );
        assert!(matches!(
            Trace::parse("{\"image_size\": 100, \"reads\": [{\"at_us\": 0"),
            Err(TraceError::Json(_))
        ));
        let too_big = SyntheticSpec {
            working_set: 128 << 20,
            ..spec()
        };
        assert!(matches!(
            Trace::synthetic(&too_big, 1),
            Err(TraceError::Synthetic(_))
        ));
    }
}
