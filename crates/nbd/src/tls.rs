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

/// A server's TLS: the rustls configuration its handshakes use (clients
/// must upgrade before anything else: the spec's FORCEDTLS mode).
pub struct ServerTls {
    config: RwLock<Arc<rustls::ServerConfig>>,
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
            config: RwLock::new(config),
        })
    }

    /// Replaces the configuration: handshakes that start from now on use it.
    pub fn set(&self, config: Arc<rustls::ServerConfig>) {
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = config;
    }

    fn current(&self) -> Arc<rustls::ServerConfig> {
        Arc::clone(&self.config.read().unwrap_or_else(|e| e.into_inner()))
    }
}

/// A client's TLS. Clones share the configuration: [`ClientTls::set`] on
/// one (renewed certificates) reaches every clone, and connections made
/// after it use the new configuration.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<RwLock<Arc<rustls::ClientConfig>>>,
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
            config: Arc::new(RwLock::new(config)),
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
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = config;
    }

    fn current(&self) -> Arc<rustls::ClientConfig> {
        Arc::clone(&self.config.read().unwrap_or_else(|e| e.into_inner()))
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

/// Runs the server side of the TLS handshake over `r` and `w`; returns the
/// encrypted halves and the client's certificate, if it sent one.
pub(crate) async fn accept(
    tls: &ServerTls,
    r: BoxRead,
    w: BoxWrite,
) -> io::Result<(BoxRead, BoxWrite, Option<CertificateDer<'static>>)> {
    let stream = TlsAcceptor::from(tls.current())
        .accept(Joined { r, w })
        .await?;
    let peer = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.clone().into_owned());
    let (r, w) = split(stream);
    Ok((r, w, peer))
}

/// Runs the client side of the TLS handshake, verifying the server as `name`.
pub(crate) async fn connect(
    tls: &ClientTls,
    name: ServerName<'static>,
    r: BoxRead,
    w: BoxWrite,
) -> io::Result<(BoxRead, BoxWrite)> {
    let stream = TlsConnector::from(tls.current())
        .connect(name, Joined { r, w })
        .await?;
    Ok(split(stream))
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
