//! Restoring at start, and what makes it possible: the origin images of the
//! image store are served again, the volumes a restart left get an upstream
//! at once from what was saved before (the last parents, then the origins)
//! until the coordinator answers, and VM snapshots are exported again. What
//! the coordinator says about each member image is saved to
//! `DATA_DIR/upstream/IMAGE` whenever it changes.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tracing::{info, warn};
use virtman_cache::BootProfile;
use virtman_image::StoredImage;
use virtman_nbd::{Export, FileExport, MemExport};

use super::{Agent, ImageEntry, Role, lock, manifest_export};
use crate::known::{self, KnownParent, KnownUpstream};
use crate::origin::CountingExport;
use crate::prefetch::profile_export;

impl Agent {
    /// Serves origin images and the volumes and snapshots a restart left.
    pub(super) fn restore(self: &Arc<Self>) {
        match self.store.list() {
            Ok(list) => {
                for (name, img) in list {
                    match img {
                        Ok(img) => self.add_origin(img),
                        Err(e) => warn!(image = %name, error = %e, "skipping unreadable image"),
                    }
                }
            }
            Err(e) => warn!(error = %e, "cannot list the image store"),
        }
        self.restore_members();
        for s in self.group.snapshots() {
            self.vms
                .add_export(s.name().to_owned(), s as Arc<dyn Export>);
        }
    }

    fn add_origin(&self, img: StoredImage) {
        let file = match FileExport::open(&img.data_path, true) {
            Ok(f) => f.with_description(format!("virtman origin of image {}", img.name)),
            Err(e) => {
                warn!(image = %img.name, error = %e, "cannot open image data");
                return;
            }
        };
        let export = Arc::new(CountingExport::new(
            Arc::new(file),
            img.manifest.chunk_size(),
        ));
        self.base
            .add_export(img.name.clone(), Arc::clone(&export) as Arc<dyn Export>);
        self.base.add_export(
            manifest_export(&img.name),
            Arc::new(MemExport::new(img.manifest.encode()).read_only()),
        );
        // A boot profile stored with the image (`virtman image profile`)
        // goes down the tree like the manifest, for prefetch.
        let path = img
            .data_path
            .with_file_name(virtman_image::store::PROFILE_FILE);
        if path.exists() {
            match BootProfile::load(&path, &img.manifest) {
                Ok(p) => {
                    info!(image = %img.name, chunks = p.entries.len(), "publishing the image's boot profile");
                    self.base.add_export(
                        profile_export(&img.name),
                        Arc::new(MemExport::new(p.encode(&img.manifest)).read_only()),
                    );
                }
                Err(e) => warn!(image = %img.name, error = %e, "not publishing the boot profile"),
            }
        }
        info!(image = %img.name, size = img.manifest.size(), "serving as origin");
        lock(&self.images).insert(
            img.name.clone(),
            Arc::new(ImageEntry {
                manifest: Arc::new(img.manifest),
                role: Role::Origin { export },
            }),
        );
    }

    /// Gives each volume a restart left an upstream at once, from what was
    /// saved before: the last parents, then the origins. The control loop
    /// joins again when the coordinator answers, and its lists replace these.
    /// A missing or damaged file leaves the volume waiting for the
    /// coordinator, as before.
    fn restore_members(self: &Arc<Self>) {
        for volume in self.group.volumes() {
            let image = volume.name().to_owned();
            if lock(&self.images).contains_key(&image) {
                continue;
            }
            let path = known::known_path(&self.config.data_dir, &image);
            let digest = volume.manifest().id().to_hex();
            match KnownUpstream::load(&path, &image, &digest) {
                Ok(Some(k)) => {
                    info!(image, parents = ?k.parents.iter().map(|p| &p.name).collect::<Vec<_>>(),
                        origins = ?k.origins, epoch = k.epoch,
                        "serving the restored image with its saved parents and origins until the coordinator answers");
                    self.install_member(
                        &image,
                        volume,
                        &k.origins.clone(),
                        k.parent_sources(),
                        k.stripe_sources(),
                        k.epoch,
                        false,
                        Some(k),
                    );
                }
                Ok(None) => info!(
                    image,
                    file = %path.display(),
                    "no saved parents or origins for the restored image; its absent chunks wait for the coordinator"
                ),
                Err(e) => warn!(
                    image,
                    error = %e,
                    "refusing the saved parents and origins of the restored image; its absent chunks wait for the coordinator"
                ),
            }
        }
    }

    /// What this host knows now about a member image's upstream.
    fn known_now(image: &str, entry: &ImageEntry) -> Option<KnownUpstream> {
        match &entry.role {
            Role::Member { parents, epoch, .. } => Some(KnownUpstream {
                image: image.to_owned(),
                manifest_digest: entry.manifest.id().to_hex(),
                epoch: epoch.load(Ordering::Relaxed),
                parents: parents
                    .current()
                    .into_iter()
                    .map(|s| KnownParent {
                        name: s.name,
                        addr: s.addr,
                    })
                    .collect(),
                stripes: parents
                    .current_stripes()
                    .into_iter()
                    .map(|l| {
                        l.into_iter()
                            .map(|s| KnownParent {
                                name: s.name,
                                addr: s.addr,
                            })
                            .collect()
                    })
                    .collect(),
                origins: parents.origins().into_iter().map(|s| s.addr).collect(),
            }),
            Role::Origin { .. } => None,
        }
    }

    /// Writes `DATA_DIR/upstream/IMAGE` when what the coordinator said about
    /// the image changed since it was last written.
    pub(super) async fn save_known(&self, image: &str, entry: &ImageEntry) {
        let Role::Member { saved, joined, .. } = &entry.role else {
            return;
        };
        let mut saved = saved.lock().await;
        if !joined.load(Ordering::Relaxed) {
            return; // nothing new: it is what was loaded
        }
        let Some(now) = Self::known_now(image, entry) else {
            return;
        };
        if saved.as_ref() == Some(&now) {
            return;
        }
        let path = known::known_path(&self.config.data_dir, image);
        let k = now.clone();
        match tokio::task::spawn_blocking(move || k.save(&path)).await {
            Ok(Ok(())) => *saved = Some(now),
            Ok(Err(e)) => warn!(image, error = %e, "saving the image's parents and origins failed"),
            Err(e) => warn!(image, error = %e, "saving the image's parents and origins failed"),
        }
    }

    /// [`Agent::save_known`] for every member image.
    pub(super) async fn save_all_known(&self) {
        let members: Vec<(String, Arc<ImageEntry>)> = lock(&self.images)
            .iter()
            .filter(|(_, e)| matches!(e.role, Role::Member { .. }))
            .map(|(n, e)| (n.clone(), Arc::clone(e)))
            .collect();
        for (image, entry) in members {
            self.save_known(&image, &entry).await;
        }
    }
}
