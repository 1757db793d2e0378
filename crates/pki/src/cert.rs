//! Reading certificates back: who a certificate names ([`Identity`], what a
//! server learns of a TLS peer) and everything `virtman pki show` prints
//! ([`CertInfo`]).

use std::net::IpAddr;
use std::path::Path;

use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::pem::Pem;

use crate::error::PkiError;
use crate::files;

/// The organisation every virtman certificate names.
pub(crate) const ORGANIZATION: &str = "virtman";

/// What a certificate's holder may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// A cluster node (agent, origin, coordinator): acts only as itself.
    Node,
    /// An operator: registers images, bans nodes, reads everything.
    Operator,
}

impl Role {
    /// The role's name in a certificate's `OU`.
    pub fn name(self) -> &'static str {
        match self {
            Role::Node => "node",
            Role::Operator => "operator",
        }
    }

    fn parse(s: &str) -> Option<Role> {
        match s {
            "node" => Some(Role::Node),
            "operator" => Some(Role::Operator),
            _ => None,
        }
    }
}

/// Who a verified certificate names: its `CN` and its role.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    /// The node's (or operator's) name.
    pub name: String,
    /// Its role.
    pub role: Role,
}

impl Identity {
    /// The identity in a DER certificate (one the TLS layer has verified
    /// against the cluster CA). `None` for a certificate that is not one of
    /// ours: no `CN`, or no `OU` of a known role.
    pub fn from_der(der: &[u8]) -> Option<Identity> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        identity(&cert)
    }
}

fn identity(cert: &X509Certificate<'_>) -> Option<Identity> {
    let subject = cert.subject();
    let name = subject.iter_common_name().next()?.as_str().ok()?;
    let role = subject
        .iter_organizational_unit()
        .find_map(|ou| Role::parse(ou.as_str().ok()?))?;
    Some(Identity {
        name: name.to_owned(),
        role,
    })
}

/// What a certificate says, for people.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    /// The subject, as text.
    pub subject: String,
    /// The issuer, as text.
    pub issuer: String,
    /// The identity, for a node or operator certificate.
    pub identity: Option<Identity>,
    /// Whether it is a CA.
    pub is_ca: bool,
    /// DNS names it is valid for.
    pub dns: Vec<String>,
    /// Addresses it is valid for.
    pub ips: Vec<IpAddr>,
    /// Valid from.
    pub not_before: OffsetDateTime,
    /// Valid until.
    pub not_after: OffsetDateTime,
    /// Serial number, hex.
    pub serial: String,
}

impl CertInfo {
    /// The first certificate of the PEM file `path`.
    pub fn from_pem_file(path: &Path) -> Result<CertInfo, PkiError> {
        let data = files::read(path)?;
        let pem = Pem::iter_from_buffer(&data)
            .next()
            .ok_or_else(|| PkiError::bad_file(path, "no PEM block"))?
            .map_err(|e| PkiError::bad_file(path, format!("not PEM: {e}")))?;
        let cert = pem
            .parse_x509()
            .map_err(|e| PkiError::bad_file(path, format!("not a certificate: {e}")))?;
        Ok(CertInfo::of(&cert))
    }

    /// What a DER certificate says (`None` if it does not parse).
    pub fn from_der(der: &[u8]) -> Option<CertInfo> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        Some(CertInfo::of(&cert))
    }

    fn of(cert: &X509Certificate<'_>) -> CertInfo {
        let (mut dns, mut ips) = (Vec::new(), Vec::new());
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(d) => dns.push((*d).to_owned()),
                    GeneralName::IPAddress(b) => {
                        if let Ok(v4) = <[u8; 4]>::try_from(*b) {
                            ips.push(IpAddr::from(v4));
                        } else if let Ok(v6) = <[u8; 16]>::try_from(*b) {
                            ips.push(IpAddr::from(v6));
                        }
                    }
                    _ => {}
                }
            }
        }
        CertInfo {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            identity: identity(cert),
            is_ca: cert.is_ca(),
            dns,
            ips,
            not_before: cert.validity().not_before.to_datetime(),
            not_after: cert.validity().not_after.to_datetime(),
            serial: cert.raw_serial_as_string(),
        }
    }

    /// Whether it is valid at `now`.
    pub fn valid_at(&self, now: OffsetDateTime) -> bool {
        self.not_before <= now && now <= self.not_after
    }
}
