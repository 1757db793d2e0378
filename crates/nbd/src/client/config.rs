//! What the client is told: where the server listens ([`Endpoint`]) and the
//! client's settings ([`ClientConfig`]: export, connections, timeouts).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::tls::ClientTls;

/// Where a server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `host:port`.
    Tcp(String),
    /// A unix socket path.
    Unix(PathBuf),
}

impl Endpoint {
    /// Parses `unix:PATH`, a path starting with `/`, or `HOST:PORT`.
    pub fn parse(s: &str) -> Endpoint {
        if let Some(p) = s.strip_prefix("unix:") {
            Endpoint::Unix(PathBuf::from(p))
        } else if s.starts_with('/') {
            Endpoint::Unix(PathBuf::from(s))
        } else {
            Endpoint::Tcp(s.to_owned())
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "{a}"),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Client settings.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Export to open (empty: the server's default export).
    pub export: String,
    /// Connections to open; more than one only if the server allows multi-conn.
    pub connections: usize,
    /// Time one request may take before it fails with a timeout.
    pub request_timeout: Duration,
    /// Time to connect and finish the handshake.
    pub connect_timeout: Duration,
    /// TLS: upgrade every connection with `NBD_OPT_STARTTLS`, or fail.
    pub tls: Option<ClientTls>,
    /// Metadata contexts to select besides `base:allocation` (those the
    /// export lacks are just not selected). An agent fetching from its
    /// parents selects `x-virtman:present`, which tells its parent it is a
    /// child (see `ServerConfig::tag_context`).
    pub meta_contexts: Vec<String>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            export: String::new(),
            connections: 1,
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            tls: None,
            meta_contexts: Vec::new(),
        }
    }
}
