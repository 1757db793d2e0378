//! What the agent last knew from the coordinator about each member image,
//! kept on disk so that a restart while the coordinator is down still has an
//! upstream for its restored volumes.
//!
//! ```text
//!  join / heartbeat / report ─► Parents (live) ─► control loop: changed? ─► DATA_DIR/upstream/IMAGE
//!  restart ─► DATA_DIR/upstream/IMAGE ─► Parents (last parents, then origins) ─► reads of absent chunks
//!             (missing or damaged: logged, the volume waits for the coordinator as before)
//! ```
//!
//! One checked file per image (see [`virtman_image::checked`]): the image's
//! name and manifest digest (so a file is never applied to another image or
//! version), the origins' addresses, and the last parent list with its epoch,
//! as JSON in the checked body. It is written atomically whenever what the
//! coordinator said changes, and removed when the image is evicted.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use virtman_image::checked::{self, CheckedFileError, Format};

use crate::upstream::Source;

/// The checked-file format of a saved upstream.
pub const KNOWN_FORMAT: Format = Format {
    magic: *b"VMUPSTR1",
    version: 1,
    max_body: 1 << 20,
    what: "saved upstream",
};

/// The directory under the agent's data directory holding the files.
pub const KNOWN_DIR: &str = "upstream";

/// The file of `image` under the agent's data directory.
pub fn known_path(data_dir: &Path, image: &str) -> PathBuf {
    data_dir.join(KNOWN_DIR).join(image)
}

/// One parent as saved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KnownParent {
    /// Node name.
    pub name: String,
    /// Its base export address (`host:port`).
    pub addr: String,
}

/// What the coordinator last said about one member image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KnownUpstream {
    /// The image.
    pub image: String,
    /// The manifest digest (hex) of the image version the volume holds.
    pub manifest_digest: String,
    /// The epoch of `parents`.
    pub epoch: u64,
    /// Parents in the coordinator's order of preference.
    pub parents: Vec<KnownParent>,
    /// With stripes, each stripe's parents; empty for one tree.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stripes: Vec<Vec<KnownParent>>,
    /// The image's origins' addresses.
    pub origins: Vec<String>,
}

impl KnownUpstream {
    /// The parents as fetch sources.
    pub fn parent_sources(&self) -> Vec<Source> {
        self.parents
            .iter()
            .map(|p| Source {
                name: p.name.clone(),
                addr: p.addr.clone(),
            })
            .collect()
    }

    /// Each stripe's parents as fetch sources (empty for one tree).
    pub fn stripe_sources(&self) -> Vec<Vec<Source>> {
        self.stripes
            .iter()
            .map(|l| {
                l.iter()
                    .map(|p| Source {
                        name: p.name.clone(),
                        addr: p.addr.clone(),
                    })
                    .collect()
            })
            .collect()
    }

    /// The origins as fetch sources, named as at join (`origin:I`).
    pub fn origin_sources(&self) -> Vec<Source> {
        origin_sources(&self.origins)
    }

    /// Writes the file at `path` atomically (its directory is created).
    pub fn save(&self, path: &Path) -> Result<(), CheckedFileError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| CheckedFileError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let body = serde_json::to_vec(self).map_err(|e| CheckedFileError::Invalid {
            path: path.to_path_buf(),
            reason: format!("encoding the saved upstream: {e}"),
        })?;
        checked::write_checked(&KNOWN_FORMAT, path, &body)
    }

    /// Reads and checks the file at `path`, which must be about `image` at
    /// manifest digest `digest`. `Ok(None)` when there is no file.
    pub fn load(
        path: &Path,
        image: &str,
        digest: &str,
    ) -> Result<Option<KnownUpstream>, CheckedFileError> {
        let body = match checked::read_checked(&KNOWN_FORMAT, path) {
            Ok(b) => b,
            Err(CheckedFileError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let invalid = |reason: String| CheckedFileError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let k: KnownUpstream = serde_json::from_slice(&body)
            .map_err(|e| invalid(format!("not a valid saved upstream: {e}")))?;
        if k.image != image {
            return Err(invalid(format!(
                "saved for image {:?}, not {image:?}",
                k.image
            )));
        }
        if k.manifest_digest != digest {
            return Err(invalid(format!(
                "saved for manifest {}, but the cached volume holds {digest}",
                k.manifest_digest
            )));
        }
        if k.origins.is_empty() && k.parents.is_empty() {
            return Err(invalid("no parents and no origins".into()));
        }
        Ok(Some(k))
    }
}

/// Origin addresses as fetch sources, named `origin:I` (origins are never
/// reported to the coordinator).
pub fn origin_sources(origins: &[String]) -> Vec<Source> {
    origins
        .iter()
        .enumerate()
        .map(|(i, a)| Source {
            name: format!("origin:{i}"),
            addr: a.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> KnownUpstream {
        KnownUpstream {
            image: "img".into(),
            manifest_digest: "ab".repeat(32),
            epoch: 7,
            parents: vec![KnownParent {
                name: "a1".into(),
                addr: "10.0.0.1:10809".into(),
            }],
            stripes: vec![
                vec![KnownParent {
                    name: "a1".into(),
                    addr: "10.0.0.1:10809".into(),
                }],
                Vec::new(),
            ],
            origins: vec!["10.0.0.9:10809".into()],
        }
    }

    #[test]
    fn round_trip_missing_and_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let path = known_path(dir.path(), "img");
        let digest = "ab".repeat(32);
        assert_eq!(KnownUpstream::load(&path, "img", &digest).unwrap(), None);
        let k = sample();
        k.save(&path).unwrap();
        assert_eq!(
            KnownUpstream::load(&path, "img", &digest).unwrap(),
            Some(k.clone())
        );
        assert_eq!(k.origin_sources()[0].name, "origin:0");
        assert_eq!(k.parent_sources()[0].addr, "10.0.0.1:10809");

        // Another image or version: refused, naming the file.
        let err = KnownUpstream::load(&path, "img", &"cd".repeat(32)).unwrap_err();
        assert!(err.to_string().contains("cached volume holds"), "{err}");
        assert_eq!(err.path(), path);
        let err = KnownUpstream::load(&path, "other", &digest).unwrap_err();
        assert!(err.to_string().contains("saved for image"), "{err}");

        // A flipped byte: refused as damaged.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[checked::HEADER_LEN + 3] ^= 0x20;
        std::fs::write(&path, &bytes).unwrap();
        let err = KnownUpstream::load(&path, "img", &digest).unwrap_err();
        assert!(err.to_string().contains("damaged"), "{err}");

        // Truncated: refused.
        std::fs::write(&path, &bytes[..10]).unwrap();
        assert!(KnownUpstream::load(&path, "img", &digest).is_err());

        // A well-formed checked file with a body that is not ours.
        checked::write_checked(&KNOWN_FORMAT, &path, b"{\"image\": 3}").unwrap();
        let err = KnownUpstream::load(&path, "img", &digest).unwrap_err();
        assert!(
            err.to_string().contains("not a valid saved upstream"),
            "{err}"
        );
    }
}
