//! A node directory as the commands use it: loaded into the TLS of a server
//! (`serve --tls`, the agent's base exports, the coordinator's HTTPS) and of
//! clients (the agent's fetches and its coordinator client), and loaded
//! again on SIGHUP.
//!
//! ```text
//!  NODEDIR ─ load ─► ServerTls   (NBD server config)       ─┐  SIGHUP: load again;
//!                ├─► ClientTls   (NBD client config)        │  set all, or keep all
//!                ├─► HttpsConfig (coordinator, certs optional)
//!                └─► coordinator Client (HTTPS client config)┘
//! ```
//!
//! A reload that fails (a file half written, an expired certificate) is
//! logged and changes nothing; connections made after a good one use the
//! new files, those already open keep theirs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use virtman_coordinator::HttpsConfig;
use virtman_nbd::{ClientTls, ServerTls};
use virtman_pki::{Identity, NodeTls, PeerVerification};

/// The TLS of one process, from one node directory.
#[derive(Clone, Debug)]
pub struct NodeTlsHandles {
    dir: PathBuf,
    verify: PeerVerification,
    /// The server side, if the process serves.
    pub server: Option<Arc<ServerTls>>,
    /// The client side, if the process connects to peers.
    pub client: Option<ClientTls>,
    /// The coordinator's HTTPS, if the process is a coordinator.
    pub https: Option<Arc<HttpsConfig>>,
    /// A coordinator client speaking HTTPS with this directory's
    /// certificate, renewed with the rest (set it with
    /// [`NodeTlsHandles::follow`]).
    pub coordinator: Option<virtman_coordinator::Client>,
    /// Who the node's certificate names, as loaded at start.
    pub identity: Option<Identity>,
}

impl NodeTlsHandles {
    /// Loads `dir`; `serve` and `connect` say which sides to build.
    pub fn load(
        dir: &Path,
        verify: PeerVerification,
        serve: bool,
        connect: bool,
    ) -> anyhow::Result<NodeTlsHandles> {
        let node = load(dir)?;
        let server = match serve {
            true => Some(ServerTls::new(node.server_config(verify)?)),
            false => None,
        };
        let client = match connect {
            true => Some(ClientTls::new(node.client_config()?)),
            false => None,
        };
        Ok(NodeTlsHandles {
            dir: dir.to_owned(),
            verify,
            server,
            client,
            https: None,
            coordinator: None,
            identity: node.identity().cloned(),
        })
    }

    /// Loads `dir` for a coordinator: HTTPS where clients may present a
    /// certificate of the CA (nodes must; operators may use the token).
    pub fn load_https(dir: &Path) -> anyhow::Result<NodeTlsHandles> {
        let node = load(dir)?;
        let https = HttpsConfig::new(node.server_config(PeerVerification::Optional)?);
        Ok(NodeTlsHandles {
            dir: dir.to_owned(),
            verify: PeerVerification::Optional,
            server: None,
            client: None,
            https: Some(https),
            coordinator: None,
            identity: node.identity().cloned(),
        })
    }

    /// The client configuration for the coordinator client.
    pub fn coordinator_config(&self) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        Ok(load(&self.dir)?.client_config()?)
    }

    /// Renews `client`'s TLS along with the rest on every reload.
    pub fn follow(&mut self, client: virtman_coordinator::Client) {
        self.coordinator = Some(client);
    }

    /// Loads the directory again and swaps both sides, or neither.
    pub fn reload(&self) -> anyhow::Result<()> {
        let node = load(&self.dir)?;
        let server = match &self.server {
            Some(_) => Some(node.server_config(self.verify)?),
            None => None,
        };
        let client = match self.client.is_some() || self.coordinator.is_some() {
            true => Some(node.client_config()?),
            false => None,
        };
        let https = match &self.https {
            Some(_) => Some(node.server_config(PeerVerification::Optional)?),
            None => None,
        };
        if let (Some(c), Some(config)) = (&self.coordinator, &client) {
            c.set_tls(Arc::clone(config))?;
        }
        if let (Some(tls), Some(config)) = (&self.https, https) {
            tls.set(config);
        }
        if let (Some(tls), Some(config)) = (&self.server, server) {
            tls.set(config);
        }
        if let (Some(tls), Some(config)) = (&self.client, client) {
            tls.set(config);
        }
        Ok(())
    }

    /// Reloads on every SIGHUP until the process ends.
    pub async fn reload_on_hangup(self) {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            match self.reload() {
                Ok(()) => tracing::info!(dir = %self.dir.display(), "TLS certificates reloaded"),
                Err(e) => tracing::error!(
                    error = %format!("{e:#}"),
                    "TLS reload failed; keeping the old certificates"
                ),
            }
        }
    }
}

fn load(dir: &Path) -> anyhow::Result<NodeTls> {
    NodeTls::load(dir).context("loading the TLS directory")
}
