//! How operator commands (`virtman tree`, `virtman node`) reach the
//! coordinator: its URL, and an operator certificate or the token.
//!
//! ```text
//!   --coordinator URL ─┐
//!   --tls DIR ─────────┼─► virtman_coordinator::Client (HTTPS with DIR's certificate)
//!   --token-file FILE ─┘                               (Bearer token)
//! ```
//!
//! The URL: `--coordinator` (or `VIRTMAN_COORDINATOR`); else the one the
//! agent of `--data-dir` (or `VIRTMAN_DATA_DIR`, or the default data
//! directory when an agent runs there) uses; else `http://127.0.0.1:7600`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use virtman_coordinator::Client;

/// The coordinator and the operator's credentials.
#[derive(Debug, Args)]
pub struct Remote {
    /// The coordinator's base URL (https:// when it runs with --tls), or
    /// several separated by commas (coordinators on etcd). Default: the one
    /// this host's agent uses (see --data-dir), else http://127.0.0.1:7600.
    #[arg(
        long,
        global = true,
        value_name = "URL[,URL...]",
        env = "VIRTMAN_COORDINATOR"
    )]
    pub coordinator: Option<String>,

    /// The data directory of this host's agent, whose coordinator to use
    /// when --coordinator is not given.
    #[arg(long, global = true, value_name = "DIR", env = "VIRTMAN_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// A directory from `virtman pki issue --operator` (or a node's): HTTPS
    /// that trusts only its CA and presents its certificate.
    #[arg(long, global = true, value_name = "DIR", env = "VIRTMAN_TLS")]
    pub tls: Option<PathBuf>,

    /// A file holding the coordinator's (operator) token.
    #[arg(long, global = true, value_name = "FILE", env = "VIRTMAN_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

/// Where operator commands look for an agent when no data directory is given.
const FALLBACK_URL: &str = "http://127.0.0.1:7600";

impl Remote {
    /// The coordinator's URL (see the module).
    pub fn url(&self) -> anyhow::Result<String> {
        if let Some(u) = &self.coordinator {
            return Ok(u.clone());
        }
        let dir = match &self.data_dir {
            Some(d) => d.clone(),
            None => {
                let d = PathBuf::from(crate::agent::DEFAULT_DATA_DIR);
                if !d.join("agent.sock").exists() {
                    return Ok(FALLBACK_URL.to_owned());
                }
                d
            }
        };
        let ctl = virtman_agent::control::ControlClient::new(dir.join("agent.sock"));
        let status = runtime()?.block_on(ctl.status()).with_context(|| {
            format!(
                "asking the agent of {} for its coordinator (or give --coordinator)",
                dir.display()
            )
        })?;
        if status.coordinator.is_empty() {
            anyhow::bail!(
                "the agent of {} does not say its coordinator (an older agent?): give --coordinator",
                dir.display()
            );
        }
        Ok(status.coordinator)
    }

    /// A client with these credentials, and the URL it talks to.
    pub fn client(&self) -> anyhow::Result<(Client, String)> {
        let url = self.url()?;
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
        Ok((Client::with_tls(&url, token, tls)?, url))
    }
}

/// A runtime for one command's few requests.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}
