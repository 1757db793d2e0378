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
//!
//! This file holds the agent itself: its settings, its errors, its state and
//! [`Agent::run`]. The rest extends [`Agent`] in files named for what they do:
//!
//! - `agent/membership.rs`: joining an image (session, manifest, cached
//!   volume, exports, profile replay), confirming a restored one;
//! - `agent/restore.rs`: what is served again at start (origins, volumes on
//!   their saved parents, VMs), and saving each member's parents and origins;
//! - `agent/control_loop.rs`: registering origins, heartbeats, parent lists,
//!   reports of bad parents, re-joins, publishing boot profiles;
//! - `agent/vms.rs`: VM snapshots ([`VmInfo`]);
//! - `agent/eviction.rs`: evicting and pinning images;
//! - `agent/preheat.rs`: following the coordinator's preheat orders;
//! - `agent/status.rs`: the host's [`Status`] and the metrics' counters.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;
use virtman_cache::{CacheError, CacheGroup, CachedVolume, GroupConfig};
use virtman_image::{ImageStore, Manifest};
use virtman_nbd::{Listener, Server, ServerConfig, ServerTls};

use crate::access::MemberAccess;
use crate::known::KnownUpstream;
use crate::origin::CountingExport;
use crate::prefetch::{ImagePrefetch, PrefetchConfig};
use crate::upstream::{BadParent, FetchConfig, Parents};

mod control_loop;
mod eviction;
mod membership;
mod preheat;
mod restore;
mod status;
mod vms;

pub use status::{ImageStatus, MemberStats, OriginSent, Served, Status};
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
    /// HTTPS to the coordinator with the node's certificate (an `https://`
    /// coordinator URL that authenticates nodes by certificate).
    pub coordinator_tls: Option<Arc<rustls::ClientConfig>>,
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
    /// TLS on the base exports: children must upgrade and present a
    /// certificate the configuration trusts (the cluster CA). VMs' unix
    /// socket stays local and plaintext.
    pub serve_tls: Option<Arc<ServerTls>>,
    /// The group that may connect to the VM and control sockets besides the
    /// agent's user (see [`crate::sockets`]); none: the user only.
    pub socket_group: Option<u32>,
    /// Bandwidth caps on what this host sends to children and fetches from
    /// parents (see [`crate::caps`]); changeable while it runs.
    pub caps: Arc<crate::caps::Caps>,
    /// TEST ONLY: serve children corrupted chunks (see
    /// [`crate::loop_guard::Lying`]), for chaos storms to check that liars
    /// are caught. Never set it otherwise.
    pub test_lie: bool,
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
    /// Told at each join: the control loop then heartbeats sooner for a
    /// while ([`SETTLE_HEARTBEATS`]).
    joined: tokio::sync::Notify,
    /// Background prefetch settings (see [`Agent::set_prefetch`]).
    prefetch: Mutex<PrefetchConfig>,
    /// With TLS: the base exports serve only session members.
    access: Option<Arc<MemberAccess>>,
    /// Preheat orders followed, by image (see `agent/preheat.rs`).
    preheats: Mutex<BTreeMap<String, preheat::Run>>,
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
        let coord = virtman_coordinator::Client::with_tls(
            &config.coordinator,
            config.token.clone(),
            config.coordinator_tls.clone(),
        )
        .map_err(|e| AgentError::Coordinator(e.to_string()))?;
        let (tx, rx) = mpsc::unbounded_channel();
        let hb = u64::try_from(config.heartbeat_interval.as_millis()).unwrap_or(1000);
        // Identities come with client certificates, so with TLS only.
        let access = config
            .serve_tls
            .as_ref()
            .map(|_| MemberAccess::new(coord.clone(), config.name.clone()));
        Ok(Arc::new(Agent {
            vm_socket: config.data_dir.join("vms.sock"),
            base: Server::new(ServerConfig {
                tls: config.serve_tls.clone(),
                access: access
                    .clone()
                    .map(|a| a as Arc<dyn virtman_nbd::ExportAccess>),
                upload: Some(config.caps.upload()),
                tag_context: Some(virtman_cache::X_VIRTMAN_PRESENT.to_owned()),
                ..ServerConfig::default()
            }),
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
            joined: tokio::sync::Notify::new(),
            prefetch: Mutex::new(PrefetchConfig::default()),
            access,
            preheats: Mutex::new(BTreeMap::new()),
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

    /// Stops serving `image`'s exports to children (and forgets who was
    /// admitted to them).
    fn unexport(&self, image: &str) {
        self.base.remove_export(image);
        self.base.remove_export(&manifest_export(image));
        self.base
            .remove_export(&crate::prefetch::profile_export(image));
        if let Some(a) = &self.access {
            a.forget_image(image);
        }
    }

    /// The host's bandwidth caps.
    pub fn caps(&self) -> &crate::caps::Caps {
        &self.config.caps
    }

    /// Whether this host is an origin of `image` (it holds it whole).
    fn is_origin(&self, image: &str) -> bool {
        matches!(
            lock(&self.images).get(image).map(|e| &e.role),
            Some(Role::Origin { .. })
        )
    }

    /// The coordinator client (its clones share TLS renewals).
    pub fn coordinator(&self) -> &virtman_coordinator::Client {
        &self.coord
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
        crate::sockets::restrict(&self.vm_socket, self.config.socket_group).map_err(|source| {
            AgentError::Io {
                what: format!("restricting {}", self.vm_socket.display()),
                source,
            }
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
