//! HTTPS for the coordinator: a listener that hands axum TLS streams along
//! with who is at the other end, as the client certificate names it.
//!
//! ```text
//!   TCP accept ─► task per connection: TLS handshake (timeout) ─┐
//!                  (a slow client delays nobody else)           ▼
//!   axum::serve ◄── TlsListener::accept ◄── channel of (stream, Peer)
//!        └─ ConnectInfo<Peer> ─► auth (crate::auth): Node(name) | Operator(name)
//! ```
//!
//! The rustls configuration is swappable ([`HttpsConfig::set`], on SIGHUP):
//! handshakes that start after a swap use the new certificates.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::{CancellationToken, DropGuard};
use virtman_pki::Identity;

/// How long a client has to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes finished but not yet taken by the server.
const BACKLOG: usize = 256;

/// The coordinator's server-side TLS, swappable while it serves.
pub struct HttpsConfig {
    current: RwLock<Arc<rustls::ServerConfig>>,
}

impl std::fmt::Debug for HttpsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpsConfig").finish_non_exhaustive()
    }
}

impl HttpsConfig {
    /// HTTPS with `config` (its client verifier decides which certificates
    /// are accepted; see `virtman_pki::PeerVerification::Optional`).
    pub fn new(config: Arc<rustls::ServerConfig>) -> Arc<HttpsConfig> {
        Arc::new(HttpsConfig {
            current: RwLock::new(config),
        })
    }

    /// Replaces the configuration for handshakes from now on.
    pub fn set(&self, config: Arc<rustls::ServerConfig>) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = config;
    }

    fn get(&self) -> Arc<rustls::ServerConfig> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Who is at the other end of a connection.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The client's address.
    pub addr: SocketAddr,
    /// What its certificate names, when it presented one of the cluster CA
    /// that `virtman pki` issued.
    pub identity: Option<Identity>,
}

impl Connected<IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        stream.remote_addr().clone()
    }
}

/// Accepts TCP connections and yields them once their TLS handshake is done.
pub struct TlsListener {
    local: SocketAddr,
    ready: mpsc::Receiver<(TlsStream<TcpStream>, Peer)>,
    /// Stops the accept task when the listener is dropped.
    _stop: DropGuard,
}

impl std::fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsListener")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl TlsListener {
    /// Starts accepting on `listener`; each handshake runs in its own task
    /// with [`HANDSHAKE_TIMEOUT`]. Must be called inside a tokio runtime.
    pub fn new(listener: TcpListener, tls: Arc<HttpsConfig>) -> std::io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(BACKLOG);
        let stop = CancellationToken::new();
        tokio::spawn(accept_loop(listener, tls, tx, stop.clone()));
        Ok(TlsListener {
            local,
            ready,
            _stop: stop.drop_guard(),
        })
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: Arc<HttpsConfig>,
    tx: mpsc::Sender<(TlsStream<TcpStream>, Peer)>,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let (tcp, addr) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: wait, do not spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let acceptor = TlsAcceptor::from(tls.get());
        let (tx, stop) = (tx.clone(), stop.clone());
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
            let stream = tokio::select! {
                () = stop.cancelled() => return,
                r = handshake => match r {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%addr, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%addr, "TLS handshake timed out");
                        return;
                    }
                },
            };
            let identity = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| Identity::from_der(c));
            // The server has stopped when the channel is closed.
            let _ = tx.send((stream, Peer { addr, identity })).await;
        });
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(ready) => ready,
            // The accept task ended only if it was stopped, which happens
            // when this listener is dropped: never while it is polled.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(Peer {
            addr: self.local,
            identity: None,
        })
    }
}
