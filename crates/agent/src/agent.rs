//! The agent: one per host. It owns the host's cache group, serves base exports
//! to children over TCP and VM snapshots over a local unix socket, and follows
//! the coordinator's parent lists.
//!
//! ```text
//!             coordinator ◄─ join / heartbeat / report ─┐
//!                                                       │ (control loop: assignments, re-joins)
//!  image store ─► origin export (CountingExport) ──┐    │
//!                                                  ├─ base server (TCP) ──► children
//!  cache group ─► cached volume ─► VolumeExport ───┘
//!       │              ▲ misses: Parents (upstream.rs) ─► parents' base exports … origin
//!       └► snapshots ──┴─ vm server (unix socket) ──► qemu
//! ```
//!
//! Every image this host takes part in is an entry of `images`: either an
//! origin (it holds the image whole in its store) or a member (a cached volume
//! fed by parents). Manifests travel over NBD too: each node exports
//! `manifest/IMAGE`, and a joining node checks what it reads against the digest
//! the coordinator registered.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};
use virtman_cache::{BootProfile, CacheError, CacheGroup, CachedVolume, GroupConfig, Upstream};
use virtman_coordinator::api::{Assignment, ImageInfo, JoinRequest};
use virtman_image::{ImageStore, Manifest, StoredImage};
use virtman_nbd::{Export, FileExport, Listener, MemExport, Server, ServerConfig};

use crate::known::{self, KnownParent, KnownUpstream};
use crate::origin::CountingExport;
use crate::prefetch::{self, ImagePrefetch, PrefetchConfig, profile_export};
use crate::small_export::read_small_export;
use crate::upstream::{BadParent, FetchConfig, Parents, Source};

mod control_loop;
mod eviction;
mod status;
mod vms;

pub use status::{ImageStatus, MemberStats, OriginSent, Status};
pub use vms::VmInfo;

/// Settings of an agent.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// This node's name, unique in the cluster.
    pub name: String,
    /// Where the cache group, the sockets and (by default) the image store live.
    pub data_dir: PathBuf,
    /// The image store this node serves as an origin (default `DATA_DIR/images`).
    pub image_store: Option<PathBuf>,
    /// Coordinator base URL.
    pub coordinator: String,
    /// Bearer token for the coordinator.
    pub token: Option<String>,
    /// The address children reach this node's base exports at (`host:port`).
    pub advertise: String,
    /// The cache group's capacity and tunables.
    pub cache: GroupConfig,
    /// Labels sent on join (e.g. `rack`).
    pub labels: BTreeMap<String, String>,
    /// Fetching from parents.
    pub fetch: FetchConfig,
    /// Heartbeat period until the coordinator says otherwise.
    pub heartbeat_interval: Duration,
}

/// Why an agent operation failed.
#[derive(Debug, Error)]
pub enum AgentError {
    /// The coordinator does not know the image.
    #[error("unknown image {0:?}: no origin has registered it with the coordinator")]
    UnknownImage(String),
    /// A VM of that name exists.
    #[error("a VM named {0:?} already exists")]
    VmExists(String),
    /// No VM of that name.
    #[error("no VM named {0:?}")]
    NoVm(String),
    /// The image is not on this host.
    #[error("image {0:?} is not cached on this host")]
    NotCached(String),
    /// Still in use.
    #[error("{0}")]
    InUse(String),
    /// The coordinator refused or is unreachable.
    #[error("coordinator: {0}")]
    Coordinator(String),
    /// The manifest could not be obtained or did not match.
    #[error("manifest of image {image:?}: {reason}")]
    Manifest {
        /// The image.
        image: String,
        /// What went wrong.
        reason: String,
    },
    /// The cache group failed.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// Local I/O failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// A bad request.
    #[error("{0}")]
    Invalid(String),
}

/// One image this host takes part in.
enum Role {
    /// Holds the image whole.
    Origin { export: Arc<CountingExport> },
    /// A cached volume fed by parents.
    Member {
        volume: Arc<CachedVolume>,
        parents: Arc<Parents>,
        epoch: AtomicU64,
        prefetch: Arc<ImagePrefetch>,
        /// False while the upstream is the one saved before a restart and the
        /// coordinator has not answered a join yet (not heartbeaten then).
        joined: AtomicBool,
        /// What was last written to `DATA_DIR/upstream/IMAGE`.
        saved: tokio::sync::Mutex<Option<KnownUpstream>>,
    },
}

struct ImageEntry {
    manifest: Arc<Manifest>,
    role: Role,
}

/// The agent.
pub struct Agent {
    config: AgentConfig,
    group: CacheGroup,
    store: ImageStore,
    base: Arc<Server>,
    vms: Arc<Server>,
    vm_socket: PathBuf,
    coord: virtman_coordinator::Client,
    images: Mutex<BTreeMap<String, Arc<ImageEntry>>>,
    /// Serialises joins so one image is joined once.
    join_lock: tokio::sync::Mutex<()>,
    reports: mpsc::UnboundedSender<BadParent>,
    reports_rx: Mutex<Option<mpsc::UnboundedReceiver<BadParent>>>,
    coordinator_ok: std::sync::atomic::AtomicBool,
    heartbeat_ms: AtomicU64,
    /// Background prefetch settings (see [`Agent::set_prefetch`]).
    prefetch: Mutex<PrefetchConfig>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("name", &self.config.name)
            .field("advertise", &self.config.advertise)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The manifest export's name for an image.
pub fn manifest_export(image: &str) -> String {
    format!("manifest/{image}")
}

impl Agent {
    /// Opens the cache group and image store and prepares the servers. Nothing
    /// is served until [`Agent::run`].
    pub fn open(mut config: AgentConfig) -> Result<Arc<Agent>, AgentError> {
        let io = |what: String| move |source| AgentError::Io { what, source };
        std::fs::create_dir_all(&config.data_dir)
            .map_err(io(format!("creating {}", config.data_dir.display())))?;
        // Absolute, so the socket paths in VM URIs work from any directory.
        config.data_dir = std::path::absolute(&config.data_dir)
            .map_err(io(format!("resolving {}", config.data_dir.display())))?;
        let group = CacheGroup::open(config.data_dir.join("cache"), config.cache.clone())?;
        let store_dir = config
            .image_store
            .clone()
            .unwrap_or_else(|| config.data_dir.join("images"));
        let store = ImageStore::open(&store_dir)
            .map_err(io(format!("opening image store {}", store_dir.display())))?;
        let coord = virtman_coordinator::Client::new(&config.coordinator, config.token.clone())
            .map_err(|e| AgentError::Coordinator(e.to_string()))?;
        let (tx, rx) = mpsc::unbounded_channel();
        let hb = u64::try_from(config.heartbeat_interval.as_millis()).unwrap_or(1000);
        Ok(Arc::new(Agent {
            vm_socket: config.data_dir.join("vms.sock"),
            base: Server::new(ServerConfig::default()),
            vms: Server::new(ServerConfig::default()),
            group,
            store,
            coord,
            images: Mutex::new(BTreeMap::new()),
            join_lock: tokio::sync::Mutex::new(()),
            reports: tx,
            reports_rx: Mutex::new(Some(rx)),
            coordinator_ok: std::sync::atomic::AtomicBool::new(false),
            heartbeat_ms: AtomicU64::new(hb.max(50)),
            prefetch: Mutex::new(PrefetchConfig::default()),
            config,
        }))
    }

    /// Replaces the prefetch settings (defaults: [`PrefetchConfig::default`]);
    /// images joined later use them.
    pub fn set_prefetch(&self, config: PrefetchConfig) {
        *lock(&self.prefetch) = config;
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The unix socket VMs connect to.
    pub fn vm_socket(&self) -> &Path {
        &self.vm_socket
    }

    /// The base export server (children).
    pub fn base_server(&self) -> &Arc<Server> {
        &self.base
    }

    /// The VM export server.
    pub fn vm_server(&self) -> &Arc<Server> {
        &self.vms
    }

    /// Serves until `shutdown`: base exports on `listener`, VM exports on the
    /// unix socket, and the coordinator loop.
    pub async fn run(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), AgentError> {
        let tasks = TaskTracker::new();
        let vm_listener =
            Listener::bind_unix(self.vm_socket.clone()).map_err(|source| AgentError::Io {
                what: format!("listening on {}", self.vm_socket.display()),
                source,
            })?;
        tasks.spawn(Arc::clone(&self.base).serve(Listener::Tcp(listener), shutdown.clone()));
        tasks.spawn(Arc::clone(&self.vms).serve(vm_listener, shutdown.clone()));

        self.restore();
        let me = Arc::clone(&self);
        let stop = shutdown.clone();
        tasks.spawn(async move { me.control_loop(stop).await });
        tasks.close();
        shutdown.cancelled().await;
        tasks.wait().await;
        let prefetches: Vec<Arc<ImagePrefetch>> = lock(&self.images)
            .values()
            .filter_map(|e| match &e.role {
                Role::Member { prefetch, .. } => Some(Arc::clone(prefetch)),
                Role::Origin { .. } => None,
            })
            .collect();
        for p in prefetches {
            p.stop().await;
        }
        // Make what was fetched durable before exiting.
        for v in self.group.volumes() {
            if let Err(e) = v.sync().await {
                warn!(volume = v.name(), error = %e, "sync on exit failed");
            }
            if let Err(e) = v.save_profile() {
                warn!(volume = v.name(), error = %e, "saving the boot profile on exit failed");
            }
        }
        Ok(())
    }

    /// Serves origin images and the volumes and snapshots a restart left.
    fn restore(self: &Arc<Self>) {
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

    /// Joins the image's session with the coordinator, returning the assignment.
    async fn join(&self, image: &str) -> Result<Assignment, AgentError> {
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
                    origins: Vec::new(),
                })
            }
            Err(e) => Err(AgentError::Coordinator(e.to_string())),
        }
    }

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
                let m = fetch_manifest(image, &info.manifest_digest, &sources).await?;
                self.group.add_volume(image, &m)?
            }
        };
        let parent_list = self.parent_sources(&assignment);
        let entry = self.install_member(
            image,
            volume,
            &info.origins,
            parent_list,
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
    fn install_member(
        self: &Arc<Self>,
        image: &str,
        volume: Arc<CachedVolume>,
        origins: &[String],
        parent_list: Vec<Source>,
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
        };
        let parents = Arc::new(Parents::new(
            image,
            Arc::clone(&manifest),
            known::origin_sources(origins),
            self.config.fetch.clone(),
            self.reports.clone(),
        ));
        parents.set(parent_list);
        volume.set_upstream(Some(Arc::clone(&parents) as Arc<dyn Upstream>));
        self.base.add_export(
            image.to_owned(),
            Arc::new(volume.export()) as Arc<dyn Export>,
        );
        self.base.add_export(
            manifest_export(image),
            Arc::new(MemExport::new(manifest.encode()).read_only()),
        );
        let prefetch = Arc::new(ImagePrefetch::default());
        let prefetch_config = lock(&self.prefetch).clone();
        if prefetch_config.profile {
            prefetch.tasks.spawn(prefetch::replay_profile(
                image.to_owned(),
                Arc::clone(&volume),
                Arc::clone(&prefetch),
                profile_sources,
                prefetch_config,
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
                origins: parents.origins().into_iter().map(|s| s.addr).collect(),
            }),
            Role::Origin { .. } => None,
        }
    }

    /// Writes `DATA_DIR/upstream/IMAGE` when what the coordinator said about
    /// the image changed since it was last written.
    async fn save_known(&self, image: &str, entry: &ImageEntry) {
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
    async fn save_all_known(&self) {
        let members: Vec<(String, Arc<ImageEntry>)> = lock(&self.images)
            .iter()
            .filter(|(_, e)| matches!(e.role, Role::Member { .. }))
            .map(|(n, e)| (n.clone(), Arc::clone(e)))
            .collect();
        for (image, entry) in members {
            self.save_known(&image, &entry).await;
        }
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

    /// Joins the session of an image served from its saved upstream; the
    /// coordinator's lists replace the saved ones.
    async fn confirm_restored(self: &Arc<Self>, image: &str) -> Result<(), AgentError> {
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
        self.base.remove_export(image);
        self.base.remove_export(&manifest_export(image));
        self.base.remove_export(&profile_export(image));
        lock(&self.images).remove(image);
    }
}

/// Reads `manifest/IMAGE` from the first source that has it and whose bytes
/// match the registered digest.
async fn fetch_manifest(
    image: &str,
    digest: &str,
    sources: &[String],
) -> Result<Manifest, AgentError> {
    let mut why = Vec::new();
    for addr in sources {
        let got = async {
            let (path, bytes) = read_small_export(addr, &manifest_export(image)).await?;
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

/// Resolves the address to advertise for a bound listener.
pub fn advertise_for(bound: SocketAddr, advertise: Option<&str>) -> Result<String, AgentError> {
    match advertise {
        Some(a) => Ok(a.to_owned()),
        None if bound.ip().is_unspecified() => Err(AgentError::Invalid(format!(
            "listening on {bound}: give --advertise HOST:PORT, the address children use"
        ))),
        None => Ok(bound.to_string()),
    }
}
