//! The NBD server: named exports, TCP and unix listeners, one task per
//! connection, many requests in flight per connection.
//!
//! ```text
//! Listener ──accept──► connection task
//!                        ├─ handshake (server/handshake.rs): options until GO / EXPORT_NAME
//!                        └─ transmission (server/transmission.rs):
//!                             reader ──spawn per request──► export ──► reply ──mpsc──► writer
//!                             (a byte budget bounds what is in flight)
//! ```
//!
//! The server takes its listener and a [`CancellationToken`]; on cancellation
//! it stops accepting, lets connections finish the requests in flight, and
//! returns once every connection task has ended.

mod handshake;
mod transmission;

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::export::Export;
pub use crate::io::{BoxRead, BoxWrite};
use crate::tls::ServerTls;

/// Tunables of the server. The defaults suit an agent serving a few hundred
/// VMs and children on one host.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Bytes of request and reply payload one connection may hold in flight;
    /// reading further requests waits until replies are sent. Bounds memory per
    /// connection whatever the client does.
    pub connection_budget: u32,
    /// Time a client has to finish the handshake.
    pub handshake_timeout: Duration,
    /// Most connections served at once; further ones are closed at accept.
    pub max_connections: usize,
    /// How long a handshake waits for an export that is expected (see
    /// [`Server::expect_export`]) but not there yet, before refusing it as
    /// unknown.
    pub expect_wait: Duration,
    /// How long a closing connection waits for its requests in flight (an
    /// export stuck on a dead upstream must not hold shutdown forever).
    pub drain_timeout: Duration,
    /// TLS: when set, clients must upgrade with `NBD_OPT_STARTTLS` before
    /// anything else (see [`crate::tls`]).
    pub tls: Option<Arc<ServerTls>>,
    /// Which clients may see and open which exports (all may, without it).
    pub access: Option<Arc<dyn ExportAccess>>,
    /// A cap on the export data sent, all clients together: each read's
    /// reply waits for its bytes (holes are free). Its rate can change while
    /// the server runs (see [`crate::rate`]).
    pub upload: Option<Arc<crate::rate::TokenBucket>>,
    /// A metadata context whose request tags a client: the data read by
    /// clients that asked for it (in `NBD_OPT_SET_META_CONTEXT`, whether the
    /// export has it or not) is also counted in
    /// [`ServerStats::bytes_read_tagged`] (an agent's children ask for
    /// `x-virtman:present`, so what other readers take is told apart).
    pub tag_context: Option<String>,
}

/// Decides which client may see and open which export, by the certificate
/// it presented over TLS. A refused export is left out of `NBD_OPT_LIST`
/// and answered `NBD_REP_ERR_POLICY` with the reason (INFO, GO, meta
/// contexts), or the connection is closed (`NBD_OPT_EXPORT_NAME`).
///
/// The decision may take time (asking a coordinator); the handshake waits
/// for it, within its timeout.
pub trait ExportAccess: Send + Sync + std::fmt::Debug {
    /// `Ok` when the client with certificate `peer` (none: no TLS, or no
    /// client certificate) may use `export`, or why not.
    fn check<'a>(
        &'a self,
        peer: Option<&'a CertificateDer<'static>>,
        export: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;

    /// What the client with certificate `peer` sees of `export` once it is
    /// open: the export itself (the default), or a view of it for that
    /// client alone (same size and flags, answers of its own).
    fn view(
        &self,
        peer: Option<&CertificateDer<'static>>,
        name: &str,
        export: Arc<dyn Export>,
    ) -> Arc<dyn Export> {
        let _ = (peer, name);
        export
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            connection_budget: 64 * 1024 * 1024,
            handshake_timeout: Duration::from_secs(30),
            max_connections: 4096,
            // Below a 2 s client connect timeout: a client waits for an
            // export being set up rather than giving up on the server.
            expect_wait: Duration::from_millis(1500),
            drain_timeout: Duration::from_secs(10),
            tls: None,
            access: None,
            upload: None,
            tag_context: None,
        }
    }
}

/// Counters of one server, for metrics and tests.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Connections that reached the transmission phase.
    pub sessions: AtomicU64,
    /// Requests received in the transmission phase.
    pub requests: AtomicU64,
    /// Bytes of export data sent to clients (holes not counted).
    pub bytes_read: AtomicU64,
    /// Of those, bytes sent to clients that asked for
    /// [`ServerConfig::tag_context`].
    pub bytes_read_tagged: AtomicU64,
    /// Bytes written by clients.
    pub bytes_written: AtomicU64,
    /// Requests answered with an error.
    pub errors: AtomicU64,
}

impl ServerStats {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// Where a server accepts connections.
#[derive(Debug)]
pub enum Listener {
    /// A TCP listener (children hosts, tools).
    Tcp(TcpListener),
    /// A unix socket listener (local VMs); the path is removed on shutdown.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Binds a unix socket at `path`, replacing a stale socket file left there.
    pub fn bind_unix(path: impl Into<PathBuf>) -> io::Result<Listener> {
        let path = path.into();
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() {
                std::fs::remove_file(&path)?;
            }
        }
        let l = UnixListener::bind(&path)?;
        Ok(Listener::Unix(l, path))
    }

    /// A printable address.
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "tcp:?".into()),
            Listener::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }
}

/// An export announced by [`Server::expect_export`]; dropping it ends the
/// announcement (clients still waiting for the export are then refused).
#[derive(Debug)]
pub struct ExpectedExport {
    server: Arc<Server>,
    name: String,
}

impl Drop for ExpectedExport {
    fn drop(&mut self) {
        {
            let mut e = self
                .server
                .expected
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(n) = e.get_mut(&self.name) {
                *n -= 1;
                if *n == 0 {
                    e.remove(&self.name);
                }
            }
        }
        self.server.changed.notify_waiters();
    }
}

/// An NBD server with a set of named exports that can change at run time.
pub struct Server {
    exports: RwLock<BTreeMap<String, Arc<dyn Export>>>,
    /// Exports announced by [`Server::expect_export`], with how many
    /// announcements of each are alive.
    expected: std::sync::Mutex<BTreeMap<String, usize>>,
    /// Woken when an export is added or an expectation ends.
    changed: tokio::sync::Notify,
    /// Per export name, the token that [`Server::disconnect_export`]
    /// cancels to end the connections using it.
    kicks: std::sync::Mutex<BTreeMap<String, CancellationToken>>,
    config: ServerConfig,
    stats: ServerStats,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("exports", &self.export_names())
            .field("config", &self.config)
            .finish()
    }
}

impl Server {
    /// A server with no exports yet.
    pub fn new(config: ServerConfig) -> Arc<Server> {
        Arc::new(Server {
            exports: RwLock::new(BTreeMap::new()),
            expected: std::sync::Mutex::new(BTreeMap::new()),
            changed: tokio::sync::Notify::new(),
            kicks: std::sync::Mutex::new(BTreeMap::new()),
            config,
            stats: ServerStats::default(),
        })
    }

    /// Adds or replaces the export called `name` (new connections see it).
    pub fn add_export(&self, name: impl Into<String>, export: Arc<dyn Export>) {
        self.exports_mut().insert(name.into(), export);
        self.changed.notify_waiters();
    }

    /// Announces that an export called `name` is being set up: until it is
    /// added or the returned guard is dropped, a client asking for it waits
    /// (up to [`ServerConfig::expect_wait`]) instead of being refused. A relay
    /// whose children learn of it before it has fetched the image's manifest
    /// thus answers them late rather than "unknown export".
    pub fn expect_export(self: &Arc<Self>, name: impl Into<String>) -> ExpectedExport {
        let name = name.into();
        *self
            .expected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name.clone())
            .or_insert(0) += 1;
        ExpectedExport {
            server: Arc::clone(self),
            name,
        }
    }

    fn is_expected(&self, name: &str) -> bool {
        self.expected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(name)
    }

    /// Waits until `name` is an export, is no longer expected, or `deadline`
    /// (set at the first wait to [`ServerConfig::expect_wait`] from now) has
    /// passed; at once if it is not expected.
    pub(crate) async fn wait_for_export(
        &self,
        name: &str,
        deadline: &mut Option<tokio::time::Instant>,
    ) {
        if self.lookup(name).is_some() || !self.is_expected(name) {
            return;
        }
        let deadline =
            *deadline.get_or_insert_with(|| tokio::time::Instant::now() + self.config.expect_wait);
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the checks, so a change between them and the
            // wait below is not missed.
            changed.as_mut().enable();
            if self.lookup(name).is_some() || !self.is_expected(name) {
                return;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return;
            }
        }
    }

    /// Removes an export; connections already using it keep it until they end.
    pub fn remove_export(&self, name: &str) -> Option<Arc<dyn Export>> {
        self.exports_mut().remove(name)
    }

    /// Ends every connection using export `name` (as a shutdown does: no new
    /// request is read, requests in flight finish and the socket closes).
    /// Remove the export first, or clients may connect again. Returns at
    /// once; the connections drop their handles of the export as they end.
    pub fn disconnect_export(&self, name: &str) {
        let kick = self
            .kicks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        if let Some(k) = kick {
            k.cancel();
        }
    }

    /// The token [`Server::disconnect_export`] cancels for `name`.
    fn kick_token(&self, name: &str) -> CancellationToken {
        self.kicks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name.to_owned())
            .or_default()
            .clone()
    }

    /// The names of the exports, sorted.
    pub fn export_names(&self) -> Vec<String> {
        self.exports_ref().keys().cloned().collect()
    }

    /// The server's counters.
    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }

    /// Looks an export up by name; the empty name is the default export, which
    /// exists when the server has exactly one export.
    /// Whether the client with certificate `peer` may use export `name`
    /// ([`ServerConfig::access`]; all may without a policy).
    /// The export as this client sees it ([`ExportAccess::view`]).
    fn view(
        &self,
        peer: Option<&CertificateDer<'static>>,
        name: &str,
        export: Arc<dyn Export>,
    ) -> Arc<dyn Export> {
        match &self.config.access {
            Some(a) => a.view(peer, name, export),
            None => export,
        }
    }

    async fn check_access(
        &self,
        peer: Option<&CertificateDer<'static>>,
        name: &str,
    ) -> Result<(), String> {
        match &self.config.access {
            Some(a) => a.check(peer, name).await,
            None => Ok(()),
        }
    }

    fn lookup(&self, name: &str) -> Option<(String, Arc<dyn Export>)> {
        let exports = self.exports_ref();
        if let Some(e) = exports.get(name) {
            return Some((name.to_owned(), Arc::clone(e)));
        }
        if name.is_empty() && exports.len() == 1 {
            return exports
                .iter()
                .next()
                .map(|(n, e)| (n.clone(), Arc::clone(e)));
        }
        None
    }

    fn exports_ref(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<dyn Export>>> {
        // A panic while holding this lock cannot leave the map half-updated.
        self.exports.read().unwrap_or_else(|p| p.into_inner())
    }

    fn exports_mut(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<dyn Export>>> {
        self.exports.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Accepts connections on `listener` until `shutdown` is cancelled, then
    /// waits for every connection to end.
    pub async fn serve(
        self: Arc<Self>,
        listener: Listener,
        shutdown: CancellationToken,
    ) -> io::Result<()> {
        let tracker = TaskTracker::new();
        let limit = Arc::new(tokio::sync::Semaphore::new(self.config.max_connections));
        info!(listen = %listener.describe(), "NBD server listening");
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                a = accept(&listener) => a,
            };
            let (read, write, peer) = match accepted {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
                warn!(%peer, "too many connections; closing");
                continue;
            };
            ServerStats::add(&self.stats.connections, 1);
            let server = Arc::clone(&self);
            let shutdown = shutdown.clone();
            tracker.spawn(async move {
                let _permit = permit;
                debug!(%peer, "connection opened");
                server.connection(read, write, &peer, shutdown).await;
                debug!(%peer, "connection closed");
            });
        }
        tracker.close();
        tracker.wait().await;
        if let Listener::Unix(_, path) = &listener {
            let _ = std::fs::remove_file(path);
        }
        info!(listen = %listener.describe(), "NBD server stopped");
        Ok(())
    }

    /// Serves one connection from handshake to close.
    pub async fn connection(
        self: Arc<Self>,
        mut read: BoxRead,
        mut write: BoxWrite,
        peer: &str,
        shutdown: CancellationToken,
    ) {
        let negotiated = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = tokio::time::timeout(
                self.config.handshake_timeout,
                handshake::negotiate(&self, &mut read, &mut write),
            ) => r,
        };
        let session = match negotiated {
            Ok(Ok(Some(s))) => s,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                debug!(%peer, error = %e, "handshake ended");
                return;
            }
            Err(_) => {
                debug!(%peer, "handshake timed out");
                return;
            }
        };
        ServerStats::add(&self.stats.sessions, 1);
        debug!(%peer, export = %session.name, structured = session.negotiated.structured, "transmission");
        // The connection ends on shutdown or when its export is disconnected.
        let conn = shutdown.child_token();
        let kick = self.kick_token(&session.name);
        let kicked = {
            let conn = conn.clone();
            async move {
                kick.cancelled().await;
                conn.cancel();
                std::future::pending::<()>().await;
            }
        };
        let result = tokio::select! {
            r = transmission::run(&self, session, read, write, peer, conn) => r,
            () = kicked => Ok(()),
        };
        if let Err(e) = result {
            debug!(%peer, error = %e, "connection ended with error");
        }
    }
}

async fn accept(l: &Listener) -> io::Result<(BoxRead, BoxWrite, String)> {
    match l {
        Listener::Tcp(l) => {
            let (s, addr) = l.accept().await?;
            s.set_nodelay(true)?;
            let (r, w) = s.into_split();
            Ok((Box::new(r), Box::new(w), addr.to_string()))
        }
        Listener::Unix(l, path) => {
            let (s, _) = l.accept().await?;
            let (r, w) = s.into_split();
            Ok((Box::new(r), Box::new(w), format!("unix:{}", path.display())))
        }
    }
}
