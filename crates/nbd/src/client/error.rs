//! What can go wrong, with the context needed to act on it from one log line:
//! every error names the server, export, operation, offset and length.

use std::io;
use std::time::Duration;

use thiserror::Error;

use crate::proto::Errno;

/// Why a request failed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RequestFailure {
    /// The server answered with an error.
    #[error("server replied {errno}{}", if message.is_empty() { String::new() } else { format!(": {message}") })]
    Server {
        /// The error value.
        errno: Errno,
        /// The server's message, if any.
        message: String,
    },
    /// No reply within the timeout.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The connection is gone.
    #[error("connection lost: {0}")]
    Disconnected(String),
    /// The server's reply broke the protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
}

/// A client error, with the context needed to act on it from one log line.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The server could not be reached.
    #[error("cannot connect to NBD server {server}: {source}")]
    Connect {
        /// The server.
        server: String,
        /// The socket error.
        source: io::Error,
    },
    /// The handshake failed.
    #[error("NBD handshake with {server} for export {export:?} failed: {reason}")]
    Handshake {
        /// The server.
        server: String,
        /// The export.
        export: String,
        /// What went wrong.
        reason: String,
    },
    /// A request failed.
    #[error(
        "NBD {op} of {length} bytes at offset {offset} on export {export:?} at {server}: {failure}"
    )]
    Request {
        /// The server.
        server: String,
        /// The export.
        export: String,
        /// The operation.
        op: &'static str,
        /// Its offset.
        offset: u64,
        /// Its length.
        length: u64,
        /// What went wrong.
        failure: RequestFailure,
    },
}

impl ClientError {
    /// The server's errno, if the server answered with an error.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            ClientError::Request {
                failure: RequestFailure::Server { errno, .. },
                ..
            } => Some(*errno),
            _ => None,
        }
    }
}
