//! How operator commands (`virtman tree`, `virtman node`) reach the
//! coordinator: its URL, and an operator certificate or the token.
//!
//! ```text
//!   --coordinator URL ─┐
//!   --tls DIR ─────────┼─► virtman_coordinator::Client (HTTPS with DIR's certificate)
//!   --token-file FILE ─┘                               (Bearer token)
//! ```

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use virtman_coordinator::Client;

/// The coordinator and the operator's credentials.
#[derive(Debug, Args)]
pub struct Remote {
    /// The coordinator's base URL (https:// when it runs with --tls).
    #[arg(
        long,
        global = true,
        value_name = "URL",
        env = "VIRTMAN_COORDINATOR",
        default_value = "http://127.0.0.1:7600"
    )]
    pub coordinator: String,

    /// A directory from `virtman pki issue --operator` (or a node's): HTTPS
    /// that trusts only its CA and presents its certificate.
    #[arg(long, global = true, value_name = "DIR", env = "VIRTMAN_TLS")]
    pub tls: Option<PathBuf>,

    /// A file holding the coordinator's (operator) token.
    #[arg(long, global = true, value_name = "FILE", env = "VIRTMAN_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

impl Remote {
    /// A client with these credentials.
    pub fn client(&self) -> anyhow::Result<Client> {
        let token = match &self.token_file {
            Some(p) => Some(crate::agent::read_token(p)?),
            None => None,
        };
        let tls = match &self.tls {
            Some(dir) => Some(
                virtman_pki::NodeTls::load(dir)
                    .and_then(|n| n.client_config())
                    .with_context(|| format!("loading the TLS directory {}", dir.display()))?,
            ),
            None => None,
        };
        Ok(Client::with_tls(&self.coordinator, token, tls)?)
    }
}

/// A runtime for one command's few requests.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}
