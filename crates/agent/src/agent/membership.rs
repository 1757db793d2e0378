//! Membership: how this host takes part in an image. Joining its session
//! with the coordinator, fetching its manifest from the parents or origins
//! (`manifest/IMAGE`, checked against the digest the coordinator
//! registered), and installing the member: its cached volume's upstream, its
//! base and manifest exports, the boot profile's replay. A member restored
//! from disk is confirmed by joining again; one whose image changed is
//! dropped.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tracing::info;
use virtman_cache::{CachedVolume, Upstream};
use virtman_coordinator::api::{Assignment, ImageInfo, JoinRequest};
use virtman_image::Manifest;
use virtman_nbd::{Export, MemExport};

use super::{Agent, AgentError, ImageEntry, Role, lock, manifest_export};
use crate::known::{self, KnownUpstream};
use crate::prefetch::{self, ImagePrefetch};
use crate::small_export::read_small_export;
use crate::upstream::{FetchConfig, Parents, Source};
use virtman_nbd::ClientTls;

impl Agent {
    /// The coordinator's record of `image`.
    async fn image_info(&self, image: &str) -> Result<ImageInfo, AgentError> {
        self.coord
            .images()
            .await
            .map_err(|e| AgentError::Coordinator(e.to_string()))?
            .into_iter()
            .find(|i| i.name == image)
            .ok_or_else(|| AgentError::UnknownImage(image.to_owned()))
    }

    /// Joins the image's session with the coordinator, returning the assignment.
    pub(super) async fn join(&self, image: &str) -> Result<Assignment, AgentError> {
        let req = JoinRequest {
            node: self.config.name.clone(),
            addr: self.config.advertise.clone(),
            labels: self.config.labels.clone(),
        };
        match self.coord.join(image, &req).await {
            Ok(resp) => {
                self.heartbeat_ms
                    .store(resp.heartbeat_interval_ms.max(50), Ordering::Relaxed);
                self.apply(&resp.assignment);
                self.joined.notify_one();
                Ok(resp.assignment)
            }
            Err(e) if e.code() == Some("unknown_image") => {
                Err(AgentError::UnknownImage(image.to_owned()))
            }
            Err(e) if e.code() == Some("already_joined") => {
                // A restart before the coordinator noticed: the next heartbeat
                // (known epoch 0) brings the parent list.
                Ok(Assignment {
                    image: image.to_owned(),
                    epoch: 0,
                    parents: Vec::new(),
                    stripes: Vec::new(),
                    origins: Vec::new(),
                })
            }
            Err(e) => Err(AgentError::Coordinator(e.to_string())),
        }
    }

    /// Makes sure this host takes part in `image`: joins its session, gets its
    /// manifest, and creates (or reopens) its cached volume and base export.
    pub async fn ensure_image(self: &Arc<Self>, image: &str) -> Result<(), AgentError> {
        if lock(&self.images).contains_key(image) {
            return Ok(());
        }
        let _g = self.join_lock.lock().await;
        if lock(&self.images).contains_key(image) {
            return Ok(());
        }
        let info = self.image_info(image).await?;
        // Children may be told of this host as soon as it has joined, before
        // its export exists: they wait for it rather than report this host.
        let _expected = self.base.expect_export(image);
        let assignment = self.join(image).await?;

        let volume = match self.group.volume(image) {
            Some(v) if v.manifest().id().to_hex() == info.manifest_digest => v,
            Some(_) => {
                return Err(AgentError::Manifest {
                    image: image.to_owned(),
                    reason: "the cached volume holds another version of the image; evict it first"
                        .into(),
                });
            }
            None => {
                let mut sources: Vec<String> =
                    assignment.parents.iter().map(|p| p.addr.clone()).collect();
                sources.extend(info.origins.iter().cloned());
                let m = fetch_manifest(
                    image,
                    &info.manifest_digest,
                    &sources,
                    self.config.fetch.tls.as_ref(),
                )
                .await?;
                self.group.add_volume(image, &m)?
            }
        };
        let parent_list = self.parent_sources(&assignment);
        let entry = self.install_member(
            image,
            volume,
            &info.origins,
            parent_list,
            self.stripe_sources(&assignment),
            assignment.epoch,
            true,
            None,
        );
        self.save_known(image, &entry).await;
        info!(image, parents = ?assignment.parents.iter().map(|p| &p.node).collect::<Vec<_>>(), "joined");
        Ok(())
    }

    /// Serves a member image: its volume's upstream (`parents`, then
    /// `origins`), its base and manifest exports, and the boot profile's
    /// replay. `joined` is false for an upstream restored from disk before
    /// the coordinator answered.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn install_member(
        self: &Arc<Self>,
        image: &str,
        volume: Arc<CachedVolume>,
        origins: &[String],
        parent_list: Vec<Source>,
        stripe_lists: Vec<Vec<Source>>,
        epoch: u64,
        joined: bool,
        saved: Option<KnownUpstream>,
    ) -> Arc<ImageEntry> {
        let manifest = Arc::new(volume.manifest().clone());
        let profile_sources = prefetch::ProfileSources {
            parents: parent_list.iter().map(|p| p.addr.clone()).collect(),
            origins: origins.to_vec(),
            me: self.config.name.clone(),
            coord: self.coord.clone(),
            tls: self.config.fetch.tls.clone(),
        };
        let parents = Arc::new(Parents::new(
            image,
            Arc::clone(&manifest),
            known::origin_sources(origins),
            FetchConfig {
                caps: Some(Arc::clone(&self.config.caps)),
                ..self.config.fetch.clone()
            },
            self.reports.clone(),
        ));
        parents.set_striped(parent_list, stripe_lists);
        volume.set_upstream(Some(Arc::clone(&parents) as Arc<dyn Upstream>));
        if let Some(access) = &self.access {
            access.guard(
                image,
                crate::loop_guard::Guarded {
                    volume: Arc::clone(&volume),
                    parents: Arc::clone(&parents),
                },
            );
        }
        let mut export = Arc::new(volume.export()) as Arc<dyn Export>;
        if self.config.test_lie {
            let chunk = manifest.chunk_size();
            export = Arc::new(crate::loop_guard::Lying::new(export, chunk));
        }
        self.base.add_export(image.to_owned(), export);
        self.base.add_export(
            manifest_export(image),
            Arc::new(MemExport::new(manifest.encode()).read_only()),
        );
        let prefetch = Arc::new(ImagePrefetch::default());
        // Joined for a preheat: its replay (and pin) count as preheat.
        prefetch.set_preheat(lock(&self.preheats).contains_key(image));
        let prefetch_config = lock(&self.prefetch).clone();
        if prefetch_config.profile {
            prefetch.tasks.spawn(prefetch::replay_profile(
                image.to_owned(),
                Arc::clone(&volume),
                Arc::clone(&prefetch),
                profile_sources,
                prefetch_config,
                parents.stripe_count(),
            ));
        }
        let entry = Arc::new(ImageEntry {
            manifest,
            role: Role::Member {
                volume,
                parents,
                epoch: AtomicU64::new(epoch),
                prefetch,
                joined: AtomicBool::new(joined),
                saved: tokio::sync::Mutex::new(saved),
            },
        });
        lock(&self.images).insert(image.to_owned(), Arc::clone(&entry));
        entry
    }

    /// Joins the session of an image served from its saved upstream; the
    /// coordinator's lists replace the saved ones.
    pub(super) async fn confirm_restored(self: &Arc<Self>, image: &str) -> Result<(), AgentError> {
        let _g = self.join_lock.lock().await;
        let Some(entry) = lock(&self.images).get(image).cloned() else {
            return Ok(());
        };
        let Role::Member {
            parents,
            epoch,
            joined,
            ..
        } = &entry.role
        else {
            return Ok(());
        };
        if joined.load(Ordering::Relaxed) {
            return Ok(());
        }
        let info = self.image_info(image).await?;
        if info.manifest_digest != entry.manifest.id().to_hex() {
            // As without a saved upstream: the volume gets none.
            self.drop_member(image, &entry);
            return Err(AgentError::Manifest {
                image: image.to_owned(),
                reason: "the cached volume holds another version of the image; evict it first"
                    .into(),
            });
        }
        if !info.origins.is_empty() {
            parents.set_origins(known::origin_sources(&info.origins));
        }
        let a = self.join(image).await?;
        if a.epoch == 0 {
            // Already a member (the coordinator did not notice the restart):
            // known epoch 0 makes the next heartbeat bring the list.
            epoch.store(0, Ordering::Relaxed);
        }
        joined.store(true, Ordering::Relaxed);
        info!(image, parents = ?parents.current().into_iter().map(|s| s.name).collect::<Vec<_>>(),
            "joined again; the coordinator's parent list replaces the saved one");
        self.save_known(image, &entry).await;
        Ok(())
    }

    /// Stops serving a member image (its volume stays on disk).
    fn drop_member(&self, image: &str, entry: &ImageEntry) {
        if let Role::Member { volume, .. } = &entry.role {
            volume.set_upstream(None);
        }
        self.unexport(image);
        lock(&self.images).remove(image);
    }
}

/// Reads `manifest/IMAGE` from the first source that has it and whose bytes
/// match the registered digest.
async fn fetch_manifest(
    image: &str,
    digest: &str,
    sources: &[String],
    tls: Option<&ClientTls>,
) -> Result<Manifest, AgentError> {
    let mut why = Vec::new();
    for addr in sources {
        let got = async {
            let (path, bytes) = read_small_export(addr, &manifest_export(image), tls).await?;
            let m = Manifest::decode(&path, &bytes).map_err(|e| e.to_string())?;
            if m.id().to_hex() != digest {
                return Err(format!(
                    "digest {} is not the registered {digest}",
                    m.id().to_hex()
                ));
            }
            Ok(m)
        }
        .await;
        match got {
            Ok(m) => return Ok(m),
            Err(e) => why.push(format!("{addr}: {e}")),
        }
    }
    Err(AgentError::Manifest {
        image: image.to_owned(),
        reason: format!("no source gave it: {}", why.join("; ")),
    })
}
