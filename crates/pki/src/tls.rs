//! A node directory loaded into rustls configurations.
//!
//! ```text
//!  NODEDIR ─ load ─► NodeTls ─ server_config(peers) ─► rustls::ServerConfig
//!                     │         (clients of the CA required, or none asked)
//!                     └────── client_config() ─────► rustls::ClientConfig
//!                               (servers verified against the CA only)
//! ```
//!
//! Only the cluster CA is trusted, never the system's roots: a certificate
//! from any other authority is refused both ways. Loading checks that the
//! node's own certificates are within their validity, so an expired one is
//! an error naming the file at start rather than refused handshakes later.
//! To pick up renewed files, load the directory again.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use time::OffsetDateTime;

use crate::cert::{CertInfo, Identity};
use crate::error::PkiError;
use crate::files::{self, CA_CERT, CLIENT_CERT, CLIENT_KEY, SERVER_CERT, SERVER_KEY};

/// The crypto provider of every configuration made here: `ring`, with
/// AES-128-GCM preferred (the fastest suite with AES-NI; ring's own order
/// puts AES-256 first). Chunks between hosts are the bulk of what is
/// encrypted, and both ends are virtman, so the preference decides.
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(p)
}

/// Whether a server asks its clients for a certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerVerification {
    /// Clients need no certificate (any client that speaks TLS).
    None,
    /// Clients must present a certificate of the cluster CA.
    Required,
    /// Clients may present a certificate; one that is presented must be of
    /// the cluster CA (an HTTPS API where operators may use a token instead).
    Optional,
}

/// A certificate chain and its key.
struct Pair {
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

/// A node directory, loaded.
pub struct NodeTls {
    dir: PathBuf,
    roots: Arc<RootCertStore>,
    server: Option<Pair>,
    client: Option<Pair>,
    identity: Option<Identity>,
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeTls")
            .field("dir", &self.dir)
            .field("identity", &self.identity)
            .field("server", &self.server.is_some())
            .field("client", &self.client.is_some())
            .finish()
    }
}

impl NodeTls {
    /// Loads `dir`: the CA's certificate (required), and the server and
    /// client certificates and keys that are there (each pair whole or
    /// absent). A certificate outside its validity is refused.
    pub fn load(dir: &Path) -> Result<NodeTls, PkiError> {
        let ca_path = dir.join(CA_CERT);
        let mut roots = RootCertStore::empty();
        let ca_certs = read_certs(&ca_path)?;
        for c in ca_certs {
            roots
                .add(c)
                .map_err(|e| PkiError::bad_file(&ca_path, format!("not a usable CA: {e}")))?;
        }
        let server = read_pair(dir, SERVER_CERT, SERVER_KEY)?;
        let client = read_pair(dir, CLIENT_CERT, CLIENT_KEY)?;
        let identity = [(CLIENT_CERT, &client), (SERVER_CERT, &server)]
            .into_iter()
            .find_map(|(_, p)| p.as_ref())
            .and_then(|p| Identity::from_der(&p.certs[0]));
        Ok(NodeTls {
            dir: dir.to_owned(),
            roots: Arc::new(roots),
            server,
            client,
            identity,
        })
    }

    /// The directory it was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Who the node's certificate names (`None` for a certificate not
    /// issued by `virtman pki`, which still works for TLS).
    pub fn identity(&self) -> Option<&Identity> {
        self.identity.as_ref()
    }

    /// The cluster CA as a trust store.
    pub fn roots(&self) -> Arc<RootCertStore> {
        Arc::clone(&self.roots)
    }

    /// A server configuration with the node's server certificate.
    pub fn server_config(
        &self,
        peers: PeerVerification,
    ) -> Result<Arc<rustls::ServerConfig>, PkiError> {
        let pair = self.server.as_ref().ok_or_else(|| {
            PkiError::bad_file(self.dir.join(SERVER_CERT), "missing: needed to serve TLS")
        })?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?;
        let builder = match peers {
            PeerVerification::None => builder.with_no_client_auth(),
            PeerVerification::Required | PeerVerification::Optional => {
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(self.roots(), provider());
                let verifier = match peers {
                    PeerVerification::Optional => verifier.allow_unauthenticated(),
                    _ => verifier,
                };
                let verifier = verifier.build().map_err(|e| {
                    PkiError::bad_file(self.dir.join(CA_CERT), format!("verifier: {e}"))
                })?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder.with_single_cert(pair.certs.clone(), pair.key.clone_key())?;
        Ok(Arc::new(config))
    }

    /// A client configuration that trusts only the cluster CA and presents
    /// the node's client certificate (when the directory has one).
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, PkiError> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(self.roots());
        let config = match &self.client {
            Some(pair) => {
                builder.with_client_auth_cert(pair.certs.clone(), pair.key.clone_key())?
            }
            None => builder.with_no_client_auth(),
        };
        Ok(Arc::new(config))
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let data = files::read(path)?;
    let certs = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::bad_file(path, format!("not a PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(PkiError::bad_file(path, "no certificate in it"));
    }
    // The first certificate is the node's (or the CA's) own.
    let info = CertInfo::from_der(&certs[0])
        .ok_or_else(|| PkiError::bad_file(path, "not an X.509 certificate"))?;
    let now = OffsetDateTime::now_utc();
    if !info.valid_at(now) {
        return Err(PkiError::bad_file(
            path,
            format!(
                "not valid now: valid from {} until {}",
                info.not_before, info.not_after
            ),
        ));
    }
    Ok(certs)
}

/// The pair `cert`/`key` of `dir`, if both are there.
fn read_pair(dir: &Path, cert: &str, key: &str) -> Result<Option<Pair>, PkiError> {
    let (cert_path, key_path) = (dir.join(cert), dir.join(key));
    match (cert_path.exists(), key_path.exists()) {
        (false, false) => return Ok(None),
        (true, false) => {
            return Err(PkiError::bad_file(
                &key_path,
                "missing (its certificate is there)",
            ));
        }
        (false, true) => return Err(PkiError::bad_file(&cert_path, "missing (its key is there)")),
        (true, true) => {}
    }
    let certs = read_certs(&cert_path)?;
    let data = files::read(&key_path)?;
    let key = PrivateKeyDer::from_pem_slice(&data)
        .map_err(|e| PkiError::bad_file(&key_path, format!("not a PEM private key: {e}")))?;
    Ok(Some(Pair { certs, key }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aes_128_gcm_comes_first_and_every_ring_suite_stays() {
        let p = provider();
        assert_eq!(
            p.cipher_suites[0].suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        );
        assert_eq!(
            p.cipher_suites.len(),
            rustls::crypto::ring::default_provider().cipher_suites.len()
        );
    }
}
