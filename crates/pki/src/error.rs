//! What can go wrong with certificates and keys; every variant names the file
//! or the value at fault.

use std::path::PathBuf;

use thiserror::Error;

/// An error of the cluster PKI.
#[derive(Debug, Error)]
pub enum PkiError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file would be overwritten.
    #[error("{} exists: remove it or choose another directory", path.display())]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// A file holds no usable certificate or key.
    #[error("{}: {message}", path.display())]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A request for a certificate is not valid.
    #[error("{0}")]
    BadRequest(String),
    /// A certificate could not be made.
    #[error("making a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused a configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

impl PkiError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> PkiError {
        PkiError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn bad_file(path: impl Into<PathBuf>, message: impl Into<String>) -> PkiError {
        PkiError::BadFile {
            path: path.into(),
            message: message.into(),
        }
    }
}
