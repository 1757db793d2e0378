//! The cluster's certificate authority: made once (`virtman pki init`), then
//! loaded to issue node and operator certificates (`virtman pki issue`).
//!
//! ```text
//!  CA        CN "virtman cluster CA ID" (ID from its key), CA:TRUE pathlen 0, keyCertSign cRLSign
//!   └ node   CN NAME, OU node|operator, O virtman; CA:FALSE;
//!            digitalSignature keyEncipherment (qemu refuses a leaf without
//!            both), serverAuth + clientAuth; SANs: NAME when it is a DNS
//!            name, then every --dns and --ip
//! ```
//!
//! Validity starts five minutes in the past, so a peer whose clock runs a
//! little behind does not see a certificate from the future.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use time::{Duration, OffsetDateTime};

use crate::cert::{ORGANIZATION, Role};
use crate::error::PkiError;
use crate::files::{self, CA_CERT, CA_KEY, CERT_MODE, KEY_MODE};

/// Days a CA is valid by default (ten years).
pub const DEFAULT_CA_DAYS: u32 = 3650;
/// Days a node certificate is valid by default.
pub const DEFAULT_NODE_DAYS: u32 = 365;
/// The longest a certificate may be valid (twenty years).
const MAX_DAYS: u32 = 7300;
/// The longest name a certificate carries (X.509's bound on a common name).
const MAX_NAME: usize = 64;
/// How far back validity starts, for peers whose clocks are behind.
const BACKDATE: Duration = Duration::minutes(5);

/// A loaded CA: its certificate and key, ready to issue.
pub struct Ca {
    dir: PathBuf,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// What to put in a node's (or operator's) certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssueRequest {
    /// The node's name: its identity in the cluster (`CN`).
    pub name: String,
    /// What the holder may do.
    pub role: Role,
    /// Addresses peers dial it at (IP SANs).
    pub ips: Vec<IpAddr>,
    /// DNS names peers dial it at (the name itself is added when it is one).
    pub dns: Vec<String>,
    /// Days it is valid.
    pub days: u32,
}

/// A freshly issued certificate and its key.
pub struct Issued {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PEM (PKCS#8).
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<secret>")
            .finish()
    }
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Makes a new CA in `dir` (created if needed), valid for `days`.
    /// Refuses to overwrite an existing CA.
    pub fn init(dir: &Path, days: u32) -> Result<Ca, PkiError> {
        check_days(days)?;
        files::create_dir(dir)?;
        files::refuse_existing(dir, &[CA_CERT, CA_KEY])?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, ORGANIZATION);
        // Distinct names keep two clusters' CAs apart (a peer of the other
        // cluster is then an unknown issuer, not a bad signature).
        let id: String = key.public_key_raw()[1..7]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        dn.push(DnType::CommonName, format!("virtman cluster CA {id}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params, days);
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        files::write_new(dir, CA_KEY, key.serialize_pem().as_bytes(), KEY_MODE)?;
        files::write_new(dir, CA_CERT, cert_pem.as_bytes(), CERT_MODE)?;
        files::sync_dir(dir)?;
        Ok(Ca {
            dir: dir.to_owned(),
            cert_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads the CA in `dir`.
    pub fn load(dir: &Path) -> Result<Ca, PkiError> {
        let cert_path = dir.join(CA_CERT);
        let key_path = dir.join(CA_KEY);
        let cert_pem = String::from_utf8(files::read(&cert_path)?)
            .map_err(|_| PkiError::bad_file(&cert_path, "not a PEM file"))?;
        let key_pem = String::from_utf8(files::read(&key_path)?)
            .map_err(|_| PkiError::bad_file(&key_path, "not a PEM file"))?;
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| PkiError::bad_file(&key_path, format!("not a private key: {e}")))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
            .map_err(|e| PkiError::bad_file(&cert_path, format!("not a CA certificate: {e}")))?;
        Ok(Ca {
            dir: dir.to_owned(),
            cert_pem,
            issuer,
        })
    }

    /// The CA's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA's certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a certificate for `req` with a new key.
    pub fn issue(&self, req: &IssueRequest) -> Result<Issued, PkiError> {
        check_name(&req.name)?;
        check_days(req.days)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, ORGANIZATION);
        dn.push(DnType::OrganizationalUnitName, req.role.name());
        dn.push(DnType::CommonName, req.name.as_str());
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let mut dns: Vec<&str> = Vec::new();
        if is_dns_name(&req.name) {
            dns.push(&req.name);
        }
        for d in &req.dns {
            if !is_dns_name(d) {
                return Err(PkiError::BadRequest(format!("{d:?} is not a DNS name")));
            }
            if !dns.contains(&d.as_str()) {
                dns.push(d);
            }
        }
        for d in dns {
            let name = d
                .try_into()
                .map_err(|_| PkiError::BadRequest(format!("{d:?} is not a DNS name")))?;
            params.subject_alt_names.push(SanType::DnsName(name));
        }
        for ip in &req.ips {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        validity(&mut params, req.days);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + Duration::days(i64::from(days));
}

fn check_days(days: u32) -> Result<(), PkiError> {
    if days == 0 || days > MAX_DAYS {
        return Err(PkiError::BadRequest(format!(
            "validity of {days} days: give 1 to {MAX_DAYS}"
        )));
    }
    Ok(())
}

/// A node name as the coordinator accepts it, short enough for a common name.
fn check_name(name: &str) -> Result<(), PkiError> {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty() || name.len() > MAX_NAME || !name.chars().all(ok) {
        return Err(PkiError::BadRequest(format!(
            "name {name:?} must be 1 to {MAX_NAME} characters of A-Z a-z 0-9 . _ -"
        )));
    }
    Ok(())
}

/// Whether `s` is a DNS name (labels of letters, digits and inner hyphens).
fn is_dns_name(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_validity_are_checked() {
        assert!(check_name("host-7.rack_2").is_ok());
        for bad in ["", "a b", "host/1", &"x".repeat(65)] {
            let e = check_name(bad).unwrap_err().to_string();
            assert!(e.contains("must be 1 to 64 characters"), "{e}");
        }
        assert!(check_days(1).is_ok());
        assert!(check_days(0).is_err());
        assert!(check_days(MAX_DAYS + 1).is_err());
        assert!(is_dns_name("host1.example"));
        assert!(!is_dns_name("host_1"));
        assert!(!is_dns_name("-a"));
        assert!(!is_dns_name("a..b"));
    }
}
