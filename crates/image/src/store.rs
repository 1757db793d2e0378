//! The image store: a directory of imported images, each a raw file and its
//! manifest.
//!
//! ```text
//! STORE/
//!   NAME/
//!     manifest      checked file (see crate::manifest)
//!     image.raw     the image's bytes, sparse where chunks are all zero
//!     profile       optional: the image's boot profile (virtman-cache's
//!                   format), which an origin publishes for prefetch
//!   .NAME.import/   an import in progress; renamed to NAME when complete
//! ```
//!
//! Import reads the source once, chunk by chunk, hashing each chunk and
//! writing it (all-zero chunks are left as holes), then syncs the data,
//! writes the manifest and renames the directory into place, so a crash
//! leaves either no image or a complete one. A qcow2 source is first
//! converted to raw with `qemu-img convert` inside the import directory.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use thiserror::Error;

use crate::checked::{CheckedFileError, sync_dir};
use crate::manifest::{Manifest, ManifestError, check_chunk_size, chunk_count, digest};

/// File name of an image's manifest.
pub const MANIFEST_FILE: &str = "manifest";
/// File name of an image's data.
pub const DATA_FILE: &str = "image.raw";
/// File name of an image's boot profile, when it has one.
pub const PROFILE_FILE: &str = "profile";

/// Why an image store operation failed.
#[derive(Debug, Error)]
pub enum ImageError {
    /// A file operation failed.
    #[error("image {name:?}: {op} {path}: {source}")]
    Io {
        /// The image.
        name: String,
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// The manifest file was refused.
    #[error("image {name:?}: {source}")]
    Manifest {
        /// The image.
        name: String,
        /// Why.
        source: CheckedFileError,
    },
    /// The manifest could not be built.
    #[error("image {name:?}: {source}")]
    Build {
        /// The image.
        name: String,
        /// Why.
        source: ManifestError,
    },
    /// The name is not acceptable.
    #[error("invalid image name {0:?}: use 1-128 of A-Z a-z 0-9 . _ -, not starting with '.'")]
    Name(String),
    /// An image of that name exists already.
    #[error("image {0:?} exists already")]
    Exists(String),
    /// No image of that name.
    #[error("no image {name:?} in {store}")]
    NotFound {
        /// The image.
        name: String,
        /// The store directory.
        store: PathBuf,
    },
    /// `qemu-img convert` failed.
    #[error("image {name:?}: qemu-img convert of {path} failed: {reason}")]
    Convert {
        /// The image.
        name: String,
        /// The source.
        path: PathBuf,
        /// What qemu-img said.
        reason: String,
    },
    /// The data file's size disagrees with the manifest.
    #[error("image {name:?}: {path} is {actual} bytes, the manifest says {expected}")]
    SizeMismatch {
        /// The image.
        name: String,
        /// The data file.
        path: PathBuf,
        /// Size in the manifest.
        expected: u64,
        /// Size of the file.
        actual: u64,
    },
}

/// Checks an image (or volume, or snapshot) name: 1-128 characters of
/// `A-Z a-z 0-9 . _ -`, not starting with a dot.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// An image in the store.
#[derive(Clone, Debug)]
pub struct StoredImage {
    /// Its name.
    pub name: String,
    /// Its manifest.
    pub manifest: Manifest,
    /// Its raw data file.
    pub data_path: PathBuf,
}

/// The outcome of [`ImageStore::verify`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Chunks checked.
    pub chunks: u64,
    /// Chunks whose digest does not match the manifest.
    pub bad_chunks: Vec<u64>,
}

/// Source formats [`ImageStore::import`] reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceFormat {
    /// Raw bytes.
    Raw,
    /// A qcow2 file (converted with `qemu-img`).
    Qcow2,
}

/// Guesses the format of a source file from its first bytes.
pub fn detect_format(path: &Path) -> io::Result<SourceFormat> {
    let mut magic = [0u8; 4];
    let mut f = File::open(path)?;
    let n = f.read(&mut magic)?;
    Ok(if n == 4 && magic == *b"QFI\xfb" {
        SourceFormat::Qcow2
    } else {
        SourceFormat::Raw
    })
}

/// A directory of images.
#[derive(Clone, Debug)]
pub struct ImageStore {
    dir: PathBuf,
}

impl ImageStore {
    /// Opens (creating if needed) the store at `dir`.
    pub fn open(dir: impl Into<PathBuf>) -> io::Result<ImageStore> {
        let dir = dir.into();
        fs::create_dir_all(&dir)?;
        Ok(ImageStore { dir })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn check_name(name: &str) -> Result<(), ImageError> {
        if valid_name(name) {
            Ok(())
        } else {
            Err(ImageError::Name(name.to_owned()))
        }
    }

    /// Imports `src` as `name`, chunked at `chunk_size`. `progress` is called
    /// with (bytes done, bytes total) as the import goes.
    pub fn import(
        &self,
        src: &Path,
        name: &str,
        chunk_size: u32,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<StoredImage, ImageError> {
        Self::check_name(name)?;
        let chunk_size =
            check_chunk_size(u64::from(chunk_size)).map_err(|source| ImageError::Build {
                name: name.to_owned(),
                source,
            })?;
        let io = |op: &'static str, path: &Path| {
            let name = name.to_owned();
            let path = path.to_path_buf();
            move |source| ImageError::Io {
                name,
                op,
                path,
                source,
            }
        };
        let final_dir = self.dir.join(name);
        if final_dir.exists() {
            return Err(ImageError::Exists(name.to_owned()));
        }
        let work = self.dir.join(format!(".{name}.import"));
        if work.exists() {
            fs::remove_dir_all(&work).map_err(io("removing stale", &work))?;
        }
        fs::create_dir_all(&work).map_err(io("creating", &work))?;
        let result = self.import_into(&work, src, name, chunk_size, progress);
        let manifest = match result {
            Ok(m) => m,
            Err(e) => {
                let _ = fs::remove_dir_all(&work);
                return Err(e);
            }
        };
        if final_dir.exists() {
            let _ = fs::remove_dir_all(&work);
            return Err(ImageError::Exists(name.to_owned()));
        }
        fs::rename(&work, &final_dir).map_err(io("renaming into place", &final_dir))?;
        sync_dir(&self.dir).map_err(io("syncing", &self.dir))?;
        tracing::info!(image = name, id = %manifest.id().short(), size = manifest.size(), "imported");
        Ok(StoredImage {
            name: name.to_owned(),
            manifest,
            data_path: final_dir.join(DATA_FILE),
        })
    }

    fn import_into(
        &self,
        work: &Path,
        src: &Path,
        name: &str,
        chunk_size: u32,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Manifest, ImageError> {
        let io = |op: &'static str, path: &Path| {
            let name = name.to_owned();
            let path = path.to_path_buf();
            move |source| ImageError::Io {
                name,
                op,
                path,
                source,
            }
        };
        let data_path = work.join(DATA_FILE);
        let format = detect_format(src).map_err(io("opening", src))?;
        let manifest = match format {
            SourceFormat::Qcow2 => {
                let out = Command::new("qemu-img")
                    .args(["convert", "-f", "qcow2", "-O", "raw", "-S", "4k"])
                    .arg(src)
                    .arg(&data_path)
                    .output()
                    .map_err(|e| ImageError::Convert {
                        name: name.to_owned(),
                        path: src.to_path_buf(),
                        reason: format!("running qemu-img: {e}"),
                    })?;
                if !out.status.success() {
                    return Err(ImageError::Convert {
                        name: name.to_owned(),
                        path: src.to_path_buf(),
                        reason: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                    });
                }
                let f = File::open(&data_path).map_err(io("opening", &data_path))?;
                hash_file(&f, None, chunk_size, progress).map_err(io("reading", &data_path))?
            }
            SourceFormat::Raw => {
                let input = File::open(src).map_err(io("opening", src))?;
                let out = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&data_path)
                    .map_err(io("creating", &data_path))?;
                hash_file(&input, Some(&out), chunk_size, progress)
                    .map_err(io("copying to", &data_path))?
            }
        };
        let (size, digests) = manifest;
        let manifest =
            Manifest::new(size, chunk_size, digests).map_err(|source| ImageError::Build {
                name: name.to_owned(),
                source,
            })?;
        let data = OpenOptions::new()
            .write(true)
            .open(&data_path)
            .map_err(io("opening", &data_path))?;
        rustix::fs::fdatasync(&data)
            .map_err(io::Error::from)
            .map_err(io("syncing", &data_path))?;
        manifest
            .store(&work.join(MANIFEST_FILE))
            .map_err(|source| ImageError::Manifest {
                name: name.to_owned(),
                source,
            })?;
        Ok(manifest)
    }

    /// Opens the image `name`, checking its manifest and data file size.
    pub fn open_image(&self, name: &str) -> Result<StoredImage, ImageError> {
        Self::check_name(name)?;
        let dir = self.dir.join(name);
        if !dir.is_dir() {
            return Err(ImageError::NotFound {
                name: name.to_owned(),
                store: self.dir.clone(),
            });
        }
        let manifest =
            Manifest::load(&dir.join(MANIFEST_FILE)).map_err(|source| ImageError::Manifest {
                name: name.to_owned(),
                source,
            })?;
        let data_path = dir.join(DATA_FILE);
        let actual = fs::metadata(&data_path)
            .map_err(|source| ImageError::Io {
                name: name.to_owned(),
                op: "opening",
                path: data_path.clone(),
                source,
            })?
            .len();
        if actual != manifest.size() {
            return Err(ImageError::SizeMismatch {
                name: name.to_owned(),
                path: data_path,
                expected: manifest.size(),
                actual,
            });
        }
        Ok(StoredImage {
            name: name.to_owned(),
            manifest,
            data_path,
        })
    }

    /// Every image in the store, by name, each opened (or the error that
    /// stopped it from opening).
    pub fn list(&self) -> io::Result<Vec<(String, Result<StoredImage, ImageError>)>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            if !entry.file_type()?.is_dir() {
                continue;
            }
            if let Some(n) = entry.file_name().to_str()
                && valid_name(n)
            {
                names.push(n.to_owned());
            }
        }
        names.sort();
        Ok(names
            .into_iter()
            .map(|n| {
                let r = self.open_image(&n);
                (n, r)
            })
            .collect())
    }

    /// Re-reads the image `name` and checks every chunk against its manifest.
    pub fn verify(
        &self,
        name: &str,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<VerifyReport, ImageError> {
        let image = self.open_image(name)?;
        let m = &image.manifest;
        let f = File::open(&image.data_path).map_err(|source| ImageError::Io {
            name: name.to_owned(),
            op: "opening",
            path: image.data_path.clone(),
            source,
        })?;
        let mut report = VerifyReport::default();
        let mut buf = vec![0u8; usize::try_from(m.chunk_size()).unwrap_or(0)];
        for i in 0..m.chunks() {
            let len = usize::try_from(m.chunk_len(i)).unwrap_or(0);
            let ok = match f.read_exact_at(&mut buf[..len], m.chunk_offset(i)) {
                Ok(()) => m.verify_chunk(i, &buf[..len]),
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => false,
                Err(source) => {
                    return Err(ImageError::Io {
                        name: name.to_owned(),
                        op: "reading",
                        path: image.data_path.clone(),
                        source,
                    });
                }
            };
            if !ok {
                report.bad_chunks.push(i);
            }
            report.chunks += 1;
            progress(m.chunk_offset(i) + len as u64, m.size());
        }
        Ok(report)
    }

    /// Removes the image `name` from the store.
    pub fn remove(&self, name: &str) -> Result<(), ImageError> {
        Self::check_name(name)?;
        let dir = self.dir.join(name);
        if !dir.is_dir() {
            return Err(ImageError::NotFound {
                name: name.to_owned(),
                store: self.dir.clone(),
            });
        }
        fs::remove_dir_all(&dir).map_err(|source| ImageError::Io {
            name: name.to_owned(),
            op: "removing",
            path: dir,
            source,
        })
    }
}

/// Reads `input` chunk by chunk, hashing each chunk and, with `out`, writing
/// the chunks that are not all zero at the same offsets (zero chunks stay
/// holes). Returns the size and the digests.
fn hash_file(
    input: &File,
    out: Option<&File>,
    chunk_size: u32,
    progress: &mut dyn FnMut(u64, u64),
) -> io::Result<(u64, Vec<[u8; 32]>)> {
    let total = input.metadata()?.len();
    let cs = usize::try_from(chunk_size).map_err(io::Error::other)?;
    let mut buf = vec![0u8; cs];
    let mut digests =
        Vec::with_capacity(usize::try_from(chunk_count(total, chunk_size)).unwrap_or(0));
    let mut reader = input;
    let mut pos = 0u64;
    loop {
        // Fill the buffer fully unless the input ends.
        let mut n = 0;
        while n < cs {
            match reader.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if n == 0 {
            break;
        }
        let chunk = &buf[..n];
        digests.push(digest(chunk));
        if let Some(out) = out
            && chunk.iter().any(|&b| b != 0)
        {
            out.write_all_at(chunk, pos)?;
        }
        pos += n as u64;
        progress(pos, total.max(pos));
        if n < cs {
            break;
        }
    }
    if let Some(out) = out {
        out.set_len(pos)?;
    }
    Ok((pos, digests))
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    fn pattern(len: usize) -> Vec<u8> {
        let mut v: Vec<u8> = (0..len).map(|i| (i * 7 % 253) as u8).collect();
        if len > 20_000 {
            v[8192..16384].fill(0);
        }
        v
    }

    #[test]
    fn import_raw_list_verify_remove() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.raw");
        let data = pattern(50_000);
        fs::write(&src, &data).unwrap();
        let store = ImageStore::open(dir.path().join("store")).unwrap();
        let mut calls = 0;
        let img = store
            .import(&src, "deb", 4096, &mut |d, t| {
                calls += 1;
                assert!(d <= t);
            })
            .unwrap();
        assert!(calls > 0);
        assert_eq!(img.manifest, Manifest::of_bytes(&data, 4096).unwrap());
        assert_eq!(fs::read(&img.data_path).unwrap(), data);
        assert!(matches!(
            store.import(&src, "deb", 4096, &mut |_, _| {}),
            Err(ImageError::Exists(_))
        ));
        let list = store.list().unwrap();
        assert_eq!(list.len(), 1);
        assert!(list[0].1.is_ok());
        let r = store.verify("deb", &mut |_, _| {}).unwrap();
        assert_eq!(r.chunks, 13);
        assert!(r.bad_chunks.is_empty());
        // Damage one chunk: verify names it.
        let f = OpenOptions::new().write(true).open(&img.data_path).unwrap();
        f.write_all_at(b"X", 4096 * 5 + 3).unwrap();
        let r = store.verify("deb", &mut |_, _| {}).unwrap();
        assert_eq!(r.bad_chunks, vec![5]);
        store.remove("deb").unwrap();
        assert!(matches!(
            store.open_image("deb"),
            Err(ImageError::NotFound { .. })
        ));
    }

    #[test]
    fn bad_names_and_sources() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        for bad in ["", ".x", "a/b", "a b", &"x".repeat(129)] {
            assert!(matches!(
                store.import(Path::new("/nonexistent"), bad, 65536, &mut |_, _| {}),
                Err(ImageError::Name(_))
            ));
        }
        let err = store
            .import(Path::new("/nonexistent"), "x", 65536, &mut |_, _| {})
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent"), "{err}");
        assert!(!dir.path().join(".x.import").exists());
        assert!(
            store
                .import(Path::new("/nonexistent"), "x", 1000, &mut |_, _| {})
                .is_err()
        );
    }

    #[test]
    fn damaged_manifest_refused_naming_file() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.raw");
        fs::write(&src, pattern(10_000)).unwrap();
        let store = ImageStore::open(dir.path().join("s")).unwrap();
        let img = store.import(&src, "a", 4096, &mut |_, _| {}).unwrap();
        let mpath = img.data_path.with_file_name(MANIFEST_FILE);
        let bytes = fs::read(&mpath).unwrap();
        fs::write(&mpath, &bytes[..bytes.len() / 2]).unwrap();
        let err = store.open_image("a").unwrap_err();
        assert!(
            err.to_string().contains(&mpath.display().to_string()),
            "{err}"
        );
        let list = store.list().unwrap();
        assert!(list[0].1.is_err());
    }

    #[test]
    fn import_qcow2_through_qemu_img() {
        if Command::new("qemu-img").arg("--version").output().is_err() {
            eprintln!("qemu-img not installed; skipping");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("src.raw");
        let data = pattern(300_000);
        fs::write(&raw, &data).unwrap();
        let qcow = dir.path().join("src.qcow2");
        let st = Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&qcow)
            .status()
            .unwrap();
        assert!(st.success());
        assert_eq!(detect_format(&qcow).unwrap(), SourceFormat::Qcow2);
        let store = ImageStore::open(dir.path().join("s")).unwrap();
        let img = store.import(&qcow, "q", 65536, &mut |_, _| {}).unwrap();
        // qcow2 rounds the virtual size up to 512 bytes.
        let got = fs::read(&img.data_path).unwrap();
        assert_eq!(&got[..data.len()], &data[..]);
        assert!(got[data.len()..].iter().all(|&b| b == 0));
        assert_eq!(img.manifest, Manifest::of_bytes(&got, 65536).unwrap());
    }
}
