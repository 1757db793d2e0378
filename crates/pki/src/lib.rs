//! The cluster PKI: one certificate authority per cluster, a certificate per
//! node (and per operator), and the rustls configurations built from them.
//!
//! ```text
//!  virtman pki init CADIR          CADIR/ca-cert.pem, ca-key.pem (0600)
//!  virtman pki issue CADIR --name host7 --ip 10.0.0.7 --out NODEDIR
//!        NODEDIR/ca-cert.pem                     the cluster CA
//!                server-cert.pem  client-cert.pem  one certificate, both uses
//!                server-key.pem   client-key.pem   one key (0600)
//! ```
//!
//! A node directory has the layout qemu's `tls-creds-x509` object reads, so
//! the same directory serves virtman and qemu. A certificate's subject says
//! who holds it: `CN` is the node's name (its identity everywhere in the
//! cluster) and `OU` its role (`node` or `operator`); see [`Identity`].
//!
//! Keys are ECDSA P-256, which rustls and qemu's GnuTLS both accept. Every
//! configuration uses the `ring` provider explicitly, so which providers the
//! rest of the build enables does not matter.

mod ca;
mod cert;
mod error;
mod files;
mod tls;

pub use ca::{Ca, DEFAULT_CA_DAYS, DEFAULT_NODE_DAYS, IssueRequest, Issued};
pub use cert::{CertInfo, Identity, Role};
pub use error::PkiError;
pub use files::{
    CA_CERT, CA_KEY, CLIENT_CERT, CLIENT_KEY, SERVER_CERT, SERVER_KEY, write_node_dir,
};
pub use tls::{NodeTls, PeerVerification, provider};
