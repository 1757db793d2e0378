//! The cache group: one directory per host holding every cached volume and
//! snapshot, with one capacity shared by all volumes.
//!
//! ```text
//! GROUP/
//!   LOCK                  flock(LOCK_EX|LOCK_NB) held while the group is open
//!   volumes/NAME/         one cached volume (see crate::volume)
//!   snapshots/NAME/       one VM snapshot (see crate::snapshot)
//!   volumes/.NAME.new     a volume being created (removed at open)
//!   */.NAME.del           an object being deleted (removed at open)
//! ```
//!
//! Usage, eviction and [`CacheError::NoSpace`] are the accounting's (see
//! `crate::accounting`), one per group, shared by its volumes.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use virtman_image::{Manifest, checked::sync_dir, valid_name};

use crate::accounting::Accounting;
use crate::disk::DiskFaults;
use crate::error::CacheError;
use crate::snapshot::Snapshot;
use crate::volume::CachedVolume;

/// Tunables of a cache group.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    /// Most bytes of present chunks, over all volumes.
    pub capacity: u64,
    /// Eviction drains usage to this fraction of the capacity (0 < f <= 1), so
    /// that a storm of misses does not evict one chunk per fetch.
    #[serde(default = "default_low_watermark")]
    pub low_watermark: f64,
    /// How long a fetched chunk may stay stored but not yet durable, in
    /// milliseconds: stored chunks are synced and recorded in the presence
    /// file in one batch at most this long after the first of them (0: as
    /// soon as possible). A crash loses at most this much fetching (those
    /// chunks are fetched again); a longer interval keeps the sync and its
    /// writeback out of a boot storm. Clean shutdown and eviction commit
    /// first regardless.
    #[serde(default = "default_commit_interval_ms")]
    pub commit_interval_ms: u64,
}

fn default_low_watermark() -> f64 {
    0.9
}

fn default_commit_interval_ms() -> u64 {
    DEFAULT_COMMIT_INTERVAL_MS
}

/// The default of [`GroupConfig::commit_interval_ms`]: 5 s.
pub const DEFAULT_COMMIT_INTERVAL_MS: u64 = 5000;

/// The longest [`GroupConfig::commit_interval_ms`] accepted: 10 minutes.
pub const MAX_COMMIT_INTERVAL_MS: u64 = 600_000;

impl GroupConfig {
    /// A group of `capacity` bytes, draining to 90 % when full, committing
    /// fetched chunks every 5 s.
    pub fn with_capacity(capacity: u64) -> GroupConfig {
        GroupConfig {
            capacity,
            low_watermark: default_low_watermark(),
            commit_interval_ms: DEFAULT_COMMIT_INTERVAL_MS,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Usage of a cache group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    /// Bytes of present chunks.
    pub used: u64,
    /// The capacity.
    pub capacity: u64,
}

#[derive(Debug)]
struct GroupInner {
    dir: PathBuf,
    _lock: File,
    acct: Arc<Accounting>,
    faults: DiskFaults,
    volumes: Mutex<BTreeMap<String, Arc<CachedVolume>>>,
    snapshots: Mutex<BTreeMap<String, Arc<Snapshot>>>,
}

/// A host's cache group. Cheap to clone; the lock is released when the last
/// clone (and every volume and snapshot handle) is dropped.
#[derive(Clone, Debug)]
pub struct CacheGroup {
    inner: Arc<GroupInner>,
}

const VOLUMES: &str = "volumes";
const SNAPSHOTS: &str = "snapshots";

fn check_name(what: &'static str, name: &str) -> Result<(), CacheError> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(CacheError::Name {
            what,
            name: name.to_owned(),
        })
    }
}

/// Removes leftovers of interrupted creations and deletions (dot entries).
fn clean_dir(dir: &Path) -> Result<Vec<String>, CacheError> {
    let mut names = Vec::new();
    let rd = fs::read_dir(dir).map_err(|e| CacheError::io("listing", dir, e))?;
    for entry in rd {
        let entry = entry.map_err(|e| CacheError::io("listing", dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            let p = entry.path();
            fs::remove_dir_all(&p).map_err(|e| CacheError::io("removing leftover", &p, e))?;
        } else if valid_name(&name) {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// Renames `dir` aside and removes it (a crash leaves a dot entry that the
/// next open removes).
fn remove_dir(parent: &Path, name: &str) -> Result<(), CacheError> {
    let from = parent.join(name);
    let to = parent.join(format!(".{name}.del"));
    fs::rename(&from, &to).map_err(|e| CacheError::io("removing", &from, e))?;
    sync_dir(parent).map_err(|e| CacheError::io("syncing", parent, e))?;
    fs::remove_dir_all(&to).map_err(|e| CacheError::io("removing", &to, e))
}

impl CacheGroup {
    /// Opens (creating if needed) the group at `dir`, restoring every volume
    /// and snapshot. Refused if another process (or another open handle) has
    /// it, or if any volume's manifest or snapshot's map is refused.
    pub fn open(dir: impl Into<PathBuf>, config: GroupConfig) -> Result<CacheGroup, CacheError> {
        Self::open_with_faults(dir, config, DiskFaults::default())
    }

    /// [`CacheGroup::open`] on a disk that fails when `faults` say so (for
    /// tests: see [`crate::disk`]).
    pub fn open_with_faults(
        dir: impl Into<PathBuf>,
        config: GroupConfig,
        faults: DiskFaults,
    ) -> Result<CacheGroup, CacheError> {
        let dir = dir.into();
        if !(config.low_watermark > 0.0 && config.low_watermark <= 1.0) {
            return Err(CacheError::Config(format!(
                "low watermark {} is not in (0, 1]",
                config.low_watermark
            )));
        }
        if config.commit_interval_ms > MAX_COMMIT_INTERVAL_MS {
            return Err(CacheError::Config(format!(
                "commit interval {} ms is longer than {MAX_COMMIT_INTERVAL_MS} ms",
                config.commit_interval_ms
            )));
        }
        for d in [dir.clone(), dir.join(VOLUMES), dir.join(SNAPSHOTS)] {
            fs::create_dir_all(&d).map_err(|e| CacheError::io("creating", &d, e))?;
        }
        let lock_path = dir.join("LOCK");
        let lock_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|e| CacheError::io("opening", &lock_path, e))?;
        match rustix::fs::flock(
            &lock_file,
            rustix::fs::FlockOperation::NonBlockingLockExclusive,
        ) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(CacheError::Locked { path: lock_path });
            }
            Err(e) => return Err(CacheError::io("locking", &lock_path, e.into())),
        }
        // Truncation to u64 of a fraction of the capacity is the intent here.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let low = ((config.capacity as f64) * config.low_watermark) as u64;
        let acct = Arc::new(Accounting::new(
            config.capacity,
            low.min(config.capacity),
            std::time::Duration::from_millis(config.commit_interval_ms),
        ));
        let mut volumes = BTreeMap::new();
        let vdir = dir.join(VOLUMES);
        for name in clean_dir(&vdir)? {
            let v = CachedVolume::open(&name, &vdir.join(&name), Arc::clone(&acct), &faults)?;
            volumes.insert(name, v);
        }
        let mut snapshots = BTreeMap::new();
        let sdir = dir.join(SNAPSHOTS);
        for name in clean_dir(&sdir)? {
            let s = Snapshot::open(&name, &sdir.join(&name), &volumes, &faults)?;
            snapshots.insert(name, Arc::new(s));
        }
        tracing::info!(dir = %dir.display(), volumes = volumes.len(), snapshots = snapshots.len(),
            used = acct.used(), capacity = config.capacity, "cache group open");
        Ok(CacheGroup {
            inner: Arc::new(GroupInner {
                dir,
                _lock: lock_file,
                acct,
                faults,
                volumes: Mutex::new(volumes),
                snapshots: Mutex::new(snapshots),
            }),
        })
    }

    /// The group's directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Bytes used and the capacity.
    pub fn usage(&self) -> Usage {
        Usage {
            used: self.inner.acct.used(),
            capacity: self.inner.acct.capacity(),
        }
    }

    /// Adds a volume for the image with `manifest` under `name`; if a volume
    /// of that name exists with the same image, returns it.
    pub fn add_volume(
        &self,
        name: &str,
        manifest: &Manifest,
    ) -> Result<Arc<CachedVolume>, CacheError> {
        check_name("volume", name)?;
        let mut vols = lock(&self.inner.volumes);
        if let Some(v) = vols.get(name) {
            if v.manifest().id() == manifest.id() {
                return Ok(Arc::clone(v));
            }
            return Err(CacheError::Exists {
                what: "volume",
                name: name.to_owned(),
                detail: format!(" for image {}", v.manifest().id().short()),
            });
        }
        let parent = self.inner.dir.join(VOLUMES);
        let tmp = parent.join(format!(".{name}.new"));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir(&tmp).map_err(|e| CacheError::io("creating", &tmp, e))?;
        CachedVolume::create_files(&tmp, manifest)?;
        let dir = parent.join(name);
        fs::rename(&tmp, &dir).map_err(|e| CacheError::io("creating", &dir, e))?;
        sync_dir(&parent).map_err(|e| CacheError::io("syncing", &parent, e))?;
        let v = CachedVolume::open(name, &dir, Arc::clone(&self.inner.acct), &self.inner.faults)?;
        vols.insert(name.to_owned(), Arc::clone(&v));
        Ok(v)
    }

    /// The volume holding the image `id`, if any.
    pub fn volume_by_image(&self, id: &virtman_image::ImageId) -> Option<Arc<CachedVolume>> {
        lock(&self.inner.volumes)
            .values()
            .find(|v| v.manifest().id() == *id)
            .cloned()
    }

    /// The volume `name`.
    pub fn volume(&self, name: &str) -> Option<Arc<CachedVolume>> {
        lock(&self.inner.volumes).get(name).cloned()
    }

    /// Every volume, by name.
    pub fn volumes(&self) -> Vec<Arc<CachedVolume>> {
        lock(&self.inner.volumes).values().cloned().collect()
    }

    /// Removes the volume `name` and its files. Refused while a snapshot or
    /// an export uses it.
    pub fn remove_volume(&self, name: &str) -> Result<(), CacheError> {
        let snaps = self.snapshots_of(name);
        let mut vols = lock(&self.inner.volumes);
        let Some(v) = vols.get(name) else {
            return Err(CacheError::NotFound {
                what: "volume",
                name: name.to_owned(),
            });
        };
        if !snaps.is_empty() || v.uses() > 0 {
            return Err(CacheError::InUse {
                what: "volume",
                name: name.to_owned(),
                users: if snaps.is_empty() {
                    format!("{} exports or other users", v.uses())
                } else {
                    format!("snapshots {}", snaps.join(", "))
                },
            });
        }
        let v = Arc::clone(v);
        vols.remove(name);
        drop(vols);
        self.inner.acct.sub_used(v.present_bytes());
        remove_dir(&self.inner.dir.join(VOLUMES), name)
    }

    fn snapshots_of(&self, volume: &str) -> Vec<String> {
        lock(&self.inner.snapshots)
            .iter()
            .filter(|(_, s)| s.base().name() == volume)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Creates the snapshot `name` over the volume `volume`.
    pub fn create_snapshot(&self, name: &str, volume: &str) -> Result<Arc<Snapshot>, CacheError> {
        check_name("snapshot", name)?;
        let base = self.volume(volume).ok_or_else(|| CacheError::NotFound {
            what: "volume",
            name: volume.to_owned(),
        })?;
        let mut snaps = lock(&self.inner.snapshots);
        if snaps.contains_key(name) {
            return Err(CacheError::Exists {
                what: "snapshot",
                name: name.to_owned(),
                detail: String::new(),
            });
        }
        let parent = self.inner.dir.join(SNAPSHOTS);
        let tmp = parent.join(format!(".{name}.new"));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir(&tmp).map_err(|e| CacheError::io("creating", &tmp, e))?;
        Snapshot::create_files(&tmp, &base)?;
        let dir = parent.join(name);
        fs::rename(&tmp, &dir).map_err(|e| CacheError::io("creating", &dir, e))?;
        sync_dir(&parent).map_err(|e| CacheError::io("syncing", &parent, e))?;
        let vols = lock(&self.inner.volumes).clone();
        let s = Arc::new(Snapshot::open(name, &dir, &vols, &self.inner.faults)?);
        snaps.insert(name.to_owned(), Arc::clone(&s));
        Ok(s)
    }

    /// The snapshot `name`.
    pub fn snapshot(&self, name: &str) -> Option<Arc<Snapshot>> {
        lock(&self.inner.snapshots).get(name).cloned()
    }

    /// Every snapshot, by name.
    pub fn snapshots(&self) -> Vec<Arc<Snapshot>> {
        lock(&self.inner.snapshots).values().cloned().collect()
    }

    /// Deletes the snapshot `name`. Refused while it is exported or otherwise
    /// held (any handle besides the group's).
    pub fn delete_snapshot(&self, name: &str) -> Result<(), CacheError> {
        let mut snaps = lock(&self.inner.snapshots);
        let Some(s) = snaps.get(name) else {
            return Err(CacheError::NotFound {
                what: "snapshot",
                name: name.to_owned(),
            });
        };
        let holders = Arc::strong_count(s) - 1;
        if holders > 0 {
            return Err(CacheError::InUse {
                what: "snapshot",
                name: name.to_owned(),
                users: format!("{holders} open handles or exports"),
            });
        }
        snaps.remove(name);
        drop(snaps);
        remove_dir(&self.inner.dir.join(SNAPSHOTS), name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_parses_strictly() {
        let c: GroupConfig = serde_json::from_str(r#"{"capacity": 1000}"#).unwrap();
        assert_eq!(c, GroupConfig::with_capacity(1000));
        assert!(serde_json::from_str::<GroupConfig>(r#"{"capacity": 1, "x": 2}"#).is_err());
        let dir = tempfile::tempdir().unwrap();
        for bad in [0.0, -1.0, 1.5, f64::NAN] {
            let err = CacheGroup::open(
                dir.path(),
                GroupConfig {
                    low_watermark: bad,
                    ..GroupConfig::with_capacity(10)
                },
            )
            .unwrap_err();
            assert!(matches!(err, CacheError::Config(_)), "{err}");
        }
        let err = CacheGroup::open(
            dir.path(),
            GroupConfig {
                commit_interval_ms: MAX_COMMIT_INTERVAL_MS + 1,
                ..GroupConfig::with_capacity(10)
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("commit interval"), "{err}");
    }

    #[test]
    fn volume_by_image_finds_the_volume() {
        let dir = tempfile::tempdir().unwrap();
        let g = CacheGroup::open(dir.path(), GroupConfig::with_capacity(1 << 20)).unwrap();
        let m = Manifest::of_bytes(&[1u8; 10_000], 4096).unwrap();
        let v = g.add_volume("x", &m).unwrap();
        assert!(Arc::ptr_eq(&g.volume_by_image(&m.id()).unwrap(), &v));
        let other = Manifest::of_bytes(&[2u8; 10_000], 4096).unwrap();
        assert!(g.volume_by_image(&other.id()).is_none());
    }
}
