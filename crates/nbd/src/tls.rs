//! NBD over TLS: the `NBD_OPT_STARTTLS` upgrade on both sides.
//!
//! ```text
//!  client                                server (FORCEDTLS)
//!  greeting, flags ────────────────────►
//!  any option but STARTTLS/ABORT ──────► NBD_REP_ERR_TLS_REQD (EXPORT_NAME: closed)
//!  NBD_OPT_STARTTLS ───────────────────► NBD_REP_ACK
//!  ◄════════════ TLS handshake (server certificate; client certificate if required) ═══
//!  options again, over TLS ────────────► answered; state from before TLS forgotten
//!  NBD_OPT_STARTTLS again ─────────────► NBD_REP_ERR_INVALID
//! ```
//!
//! The server's configuration can be replaced at run time ([`ServerTls::set`],
//! for renewed certificates): each handshake takes the one current when it
//! starts. The client verifies the server's certificate against the name it
//! was given, or else the host it dialled, and never falls back to plaintext.

use std::io;
use std::sync::{Arc, RwLock};

use rustls_pki_types::{CertificateDer, ServerName};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::client::Endpoint;
use crate::io::{BoxRead, BoxWrite, Joined, split};

/// A configuration that can be replaced while connections are made with it:
/// each handshake takes the one current when it starts.
struct Current<T>(RwLock<Arc<T>>);

impl<T> Current<T> {
    fn new(config: Arc<T>) -> Current<T> {
        Current(RwLock::new(config))
    }

    fn set(&self, config: Arc<T>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = config;
    }

    fn get(&self) -> Arc<T> {
        Arc::clone(&self.0.read().unwrap_or_else(|e| e.into_inner()))
    }
}

/// A server's TLS: the rustls configuration its handshakes use (clients
/// must upgrade before anything else: the spec's FORCEDTLS mode).
pub struct ServerTls {
    config: Current<rustls::ServerConfig>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").finish_non_exhaustive()
    }
}

impl ServerTls {
    /// TLS with `config`.
    pub fn new(config: Arc<rustls::ServerConfig>) -> Arc<ServerTls> {
        Arc::new(ServerTls {
            config: Current::new(config),
        })
    }

    /// Replaces the configuration: handshakes that start from now on use it.
    pub fn set(&self, config: Arc<rustls::ServerConfig>) {
        self.config.set(config);
    }
}

/// A client's TLS. Clones share the configuration: [`ClientTls::set`] on
/// one (renewed certificates) reaches every clone, and connections made
/// after it use the new configuration.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<Current<rustls::ClientConfig>>,
    /// The name to verify the server's certificate against; by default the
    /// host of the TCP address dialled (a unix socket needs one).
    pub server_name: Option<String>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// TLS with `config` (trust roots, client certificate), verifying
    /// servers by the host dialled.
    pub fn new(config: Arc<rustls::ClientConfig>) -> ClientTls {
        ClientTls {
            config: Arc::new(Current::new(config)),
            server_name: None,
        }
    }

    /// The same, verifying the server's certificate against `name`.
    pub fn with_server_name(mut self, name: impl Into<String>) -> ClientTls {
        self.server_name = Some(name.into());
        self
    }

    /// Replaces the configuration for this handle and all its clones.
    pub fn set(&self, config: Arc<rustls::ClientConfig>) {
        self.config.set(config);
    }

    /// The name the server's certificate must carry when dialled at `endpoint`.
    pub(crate) fn name_for(&self, endpoint: &Endpoint) -> Result<ServerName<'static>, String> {
        let host = match (&self.server_name, endpoint) {
            (Some(n), _) => n.clone(),
            (None, Endpoint::Tcp(addr)) => host_of(addr).to_owned(),
            (None, Endpoint::Unix(p)) => {
                return Err(format!(
                    "unix socket {} has no host name to verify its TLS certificate against: \
                     give the server's name",
                    p.display()
                ));
            }
        };
        ServerName::try_from(host.clone())
            .map_err(|_| format!("{host:?} is not a valid TLS server name"))
    }
}

/// The host part of `host:port` (`[v6]:port` too).
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// Runs the server side of the TLS handshake over `r` and `w`, replacing
/// them by the encrypted halves; returns the client's certificate, if it
/// sent one.
pub(crate) async fn accept(
    tls: &ServerTls,
    r: &mut BoxRead,
    w: &mut BoxWrite,
) -> io::Result<Option<CertificateDer<'static>>> {
    let stream = TlsAcceptor::from(tls.config.get())
        .accept(Joined::take(r, w))
        .await?;
    let peer = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.clone().into_owned());
    (*r, *w) = split(stream);
    Ok(peer)
}

/// Runs the client side of the TLS handshake, verifying the server as
/// `name`, and replaces `r` and `w` by the encrypted halves.
pub(crate) async fn connect(
    tls: &ClientTls,
    name: ServerName<'static>,
    r: &mut BoxRead,
    w: &mut BoxWrite,
) -> io::Result<()> {
    let stream = TlsConnector::from(tls.config.get())
        .connect(name, Joined::take(r, w))
        .await?;
    (*r, *w) = split(stream);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_of_an_address() {
        assert_eq!(host_of("10.0.0.1:10809"), "10.0.0.1");
        assert_eq!(host_of("host7:10809"), "host7");
        assert_eq!(host_of("[::1]:10809"), "::1");
        assert_eq!(host_of("host7"), "host7");
    }
}
