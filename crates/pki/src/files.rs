//! The files of a CA directory and of a node directory, and how they are
//! written: a new file only (never over an existing one), keys created with
//! mode 0600 so they are never readable by others, each file synced and
//! renamed into place so a crash leaves it whole or absent.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::ca::Issued;
use crate::error::PkiError;

/// The CA's certificate, in the CA directory and in every node directory.
pub const CA_CERT: &str = "ca-cert.pem";
/// The CA's private key (CA directory only).
pub const CA_KEY: &str = "ca-key.pem";
/// The node's certificate as a TLS server (qemu's name for it).
pub const SERVER_CERT: &str = "server-cert.pem";
/// The node's key as a TLS server.
pub const SERVER_KEY: &str = "server-key.pem";
/// The node's certificate as a TLS client (the same certificate).
pub const CLIENT_CERT: &str = "client-cert.pem";
/// The node's key as a TLS client (the same key).
pub const CLIENT_KEY: &str = "client-key.pem";

/// Mode of key files.
pub(crate) const KEY_MODE: u32 = 0o600;
/// Mode of certificate files.
pub(crate) const CERT_MODE: u32 = 0o644;

/// Refuses if any of `names` exists in `dir`.
pub(crate) fn refuse_existing(dir: &Path, names: &[&str]) -> Result<(), PkiError> {
    for name in names {
        let path = dir.join(name);
        if path.exists() {
            return Err(PkiError::Exists { path });
        }
    }
    Ok(())
}

/// Writes `data` to `dir/name` with `mode`, through a temporary file that is
/// synced and renamed into place.
pub(crate) fn write_new(dir: &Path, name: &str, data: &[u8], mode: u32) -> Result<(), PkiError> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| PkiError::io(&tmp, e))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .map_err(|e| PkiError::io(&tmp, e))?;
    fs::rename(&tmp, &path).map_err(|e| PkiError::io(&path, e))?;
    Ok(())
}

/// Creates `dir` (and its parents) if needed.
pub(crate) fn create_dir(dir: &Path) -> Result<(), PkiError> {
    fs::create_dir_all(dir).map_err(|e| PkiError::io(dir, e))
}

/// Syncs `dir` itself, so the renames in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), PkiError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| PkiError::io(dir, e))
}

/// Writes a node directory: the CA's certificate, and `issued`'s certificate
/// and key under both the server and the client names (the layout qemu's
/// `tls-creds-x509` reads). Refuses if any of the files exists.
pub fn write_node_dir(out: &Path, ca_cert_pem: &str, issued: &Issued) -> Result<(), PkiError> {
    create_dir(out)?;
    refuse_existing(
        out,
        &[CA_CERT, SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY],
    )?;
    write_new(out, CA_CERT, ca_cert_pem.as_bytes(), CERT_MODE)?;
    write_new(out, SERVER_KEY, issued.key_pem.as_bytes(), KEY_MODE)?;
    write_new(out, CLIENT_KEY, issued.key_pem.as_bytes(), KEY_MODE)?;
    write_new(out, SERVER_CERT, issued.cert_pem.as_bytes(), CERT_MODE)?;
    write_new(out, CLIENT_CERT, issued.cert_pem.as_bytes(), CERT_MODE)?;
    sync_dir(out)
}

/// Reads a whole file, naming it on error.
pub(crate) fn read(path: &Path) -> Result<Vec<u8>, PkiError> {
    fs::read(path).map_err(|e| PkiError::io(path, e))
}
