//! Certificates for tests: one call issues a node's (or an operator's)
//! directory from a test CA.

use std::path::{Path, PathBuf};

use virtman_pki::{Ca, IssueRequest, Role, write_node_dir};

/// Issues `name`'s certificate (`role`, valid a day, for 127.0.0.1) from
/// `ca` into the node directory `out`, and returns `out`.
///
/// # Panics
/// When the CA refuses the name or `out` cannot be written: a test's setup
/// failing.
pub fn issue(ca: &Ca, out: &Path, name: &str, role: Role) -> PathBuf {
    let issued = ca
        .issue(&IssueRequest {
            name: name.into(),
            role,
            ips: vec![std::net::Ipv4Addr::LOCALHOST.into()],
            dns: vec![],
            days: 1,
        })
        .unwrap_or_else(|e| panic!("issuing {name}'s certificate: {e}"));
    write_node_dir(out, ca.cert_pem(), &issued)
        .unwrap_or_else(|e| panic!("writing {}: {e}", out.display()));
    out.to_owned()
}
