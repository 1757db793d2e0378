//! The cluster PKI end to end: a CA, node directories in qemu's layout,
//! certificates read back, and TLS handshakes between nodes in memory:
//! identities learned, other CAs, wrong names and expired files refused.
#![allow(clippy::unwrap_used)]

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use rustls::{ClientConnection, ServerConnection};
use rustls_pki_types::{CertificateDer, ServerName};
use virtman_pki::{
    CA_CERT, CA_KEY, CLIENT_CERT, CLIENT_KEY, Ca, CertInfo, Identity, IssueRequest, NodeTls,
    PeerVerification, PkiError, Role, SERVER_CERT, SERVER_KEY, write_node_dir,
};

fn node(ca: &Ca, out: &Path, name: &str, role: Role) -> NodeTls {
    let issued = ca
        .issue(&IssueRequest {
            name: name.into(),
            role,
            ips: vec!["127.0.0.1".parse().unwrap()],
            dns: vec![],
            days: 30,
        })
        .unwrap();
    write_node_dir(out, ca.cert_pem(), &issued).unwrap();
    NodeTls::load(out).unwrap()
}

/// Runs a handshake in memory; returns the client identity the server saw.
fn handshake(
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    name: &str,
) -> Result<Option<Identity>, rustls::Error> {
    let mut s = ServerConnection::new(server)?;
    let mut c = ClientConnection::new(client, ServerName::try_from(name.to_owned()).unwrap())?;
    for _ in 0..20 {
        let mut buf = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() {
            s.read_tls(&mut &buf[..]).unwrap();
            s.process_new_packets()?;
        }
        let mut buf = Vec::new();
        while s.wants_write() {
            s.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() {
            c.read_tls(&mut &buf[..]).unwrap();
            c.process_new_packets()?;
        }
        if !c.is_handshaking() && !s.is_handshaking() {
            let peer = s
                .peer_certificates()
                .and_then(|certs| certs.first())
                .and_then(|d: &CertificateDer<'_>| Identity::from_der(d));
            return Ok(peer);
        }
    }
    panic!("handshake did not finish");
}

#[test]
fn a_node_directory_has_qemus_layout_private_keys_and_the_requested_names() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::init(&dir.path().join("ca"), 3650).unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir.path().join("ca").join(CA_KEY)), 0o600);
    let out = dir.path().join("host1");
    let issued = ca
        .issue(&IssueRequest {
            name: "host1".into(),
            role: Role::Node,
            ips: vec!["10.1.2.3".parse().unwrap(), "::1".parse().unwrap()],
            dns: vec!["host1.example".into()],
            days: 10,
        })
        .unwrap();
    write_node_dir(&out, ca.cert_pem(), &issued).unwrap();
    for f in [SERVER_KEY, CLIENT_KEY] {
        assert_eq!(mode(&out.join(f)), 0o600, "{f}");
    }
    for f in [CA_CERT, SERVER_CERT, CLIENT_CERT] {
        assert_eq!(mode(&out.join(f)), 0o644, "{f}");
    }
    let info = CertInfo::from_pem_file(&out.join(SERVER_CERT)).unwrap();
    assert_eq!(
        info.identity,
        Some(Identity {
            name: "host1".into(),
            role: Role::Node
        })
    );
    assert_eq!(info.dns, ["host1", "host1.example"]);
    let ips: Vec<IpAddr> = vec!["10.1.2.3".parse().unwrap(), "::1".parse().unwrap()];
    assert_eq!(info.ips, ips);
    assert!(!info.is_ca);
    let days = (info.not_after - info.not_before).whole_days();
    assert_eq!(days, 10, "five minutes of backdating round down");
    let ca_info = CertInfo::from_pem_file(&out.join(CA_CERT)).unwrap();
    assert!(ca_info.is_ca);
    assert_eq!(ca_info.subject, info.issuer);

    // Nothing is overwritten: not a CA, not a node directory.
    let e = Ca::init(&dir.path().join("ca"), 3650).unwrap_err();
    assert!(matches!(e, PkiError::Exists { .. }), "{e}");
    let e = write_node_dir(&out, ca.cert_pem(), &issued).unwrap_err();
    assert!(e.to_string().contains("exists"), "{e}");

    // A CA loaded again issues certificates the same peers trust.
    let again = Ca::load(&dir.path().join("ca")).unwrap();
    let a = node(&again, &dir.path().join("a"), "a", Role::Operator);
    let b = NodeTls::load(&out).unwrap();
    let seen = handshake(
        b.server_config(PeerVerification::Required).unwrap(),
        a.client_config().unwrap(),
        "host1",
    )
    .unwrap();
    assert_eq!(
        seen,
        Some(Identity {
            name: "a".into(),
            role: Role::Operator
        })
    );
}

#[test]
fn peers_of_another_ca_wrong_names_and_missing_client_certificates_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::init(&dir.path().join("ca"), 3650).unwrap();
    let other = Ca::init(&dir.path().join("other"), 3650).unwrap();
    let server = node(&ca, &dir.path().join("s"), "server1", Role::Node);
    let client = node(&ca, &dir.path().join("c"), "client1", Role::Node);
    let stranger = node(&other, &dir.path().join("x"), "client1", Role::Node);

    // The name or the address dialled must be in the certificate.
    assert!(
        handshake(
            server.server_config(PeerVerification::Required).unwrap(),
            client.client_config().unwrap(),
            "server1"
        )
        .is_ok()
    );
    assert!(
        handshake(
            server.server_config(PeerVerification::Required).unwrap(),
            client.client_config().unwrap(),
            "127.0.0.1"
        )
        .is_ok()
    );
    let e = handshake(
        server.server_config(PeerVerification::Required).unwrap(),
        client.client_config().unwrap(),
        "server2",
    )
    .unwrap_err();
    assert!(e.to_string().contains("not valid for name"), "{e}");

    // A client of another CA is refused by the server; a server of
    // another CA by the client.
    let e = handshake(
        server.server_config(PeerVerification::Required).unwrap(),
        stranger.client_config().unwrap(),
        "server1",
    )
    .unwrap_err();
    assert!(e.to_string().contains("certificate"), "{e}");
    let e = handshake(
        stranger.server_config(PeerVerification::None).unwrap(),
        client.client_config().unwrap(),
        "client1",
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("invalid peer certificate: UnknownIssuer"),
        "{e}"
    );

    // A client with only the CA (no certificate) is refused where one is
    // required, and accepted where none is.
    let bare = dir.path().join("bare");
    std::fs::create_dir(&bare).unwrap();
    std::fs::copy(dir.path().join("ca").join(CA_CERT), bare.join(CA_CERT)).unwrap();
    let bare = NodeTls::load(&bare).unwrap();
    assert!(
        bare.server_config(PeerVerification::None).is_err(),
        "no server certificate"
    );
    assert!(
        handshake(
            server.server_config(PeerVerification::Required).unwrap(),
            bare.client_config().unwrap(),
            "server1"
        )
        .is_err()
    );
    assert_eq!(
        handshake(
            server.server_config(PeerVerification::None).unwrap(),
            bare.client_config().unwrap(),
            "server1"
        )
        .unwrap(),
        None
    );
}

#[test]
fn expired_damaged_and_half_present_files_are_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::init(&dir.path().join("ca"), 3650).unwrap();
    let out = dir.path().join("n");
    node(&ca, &out, "n", Role::Node);

    // An expired certificate, signed by the same CA.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["n".to_owned()]).unwrap();
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(10);
    params.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    let ca_key = rcgen::KeyPair::from_pem(
        &std::fs::read_to_string(dir.path().join("ca").join(CA_KEY)).unwrap(),
    )
    .unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(ca.cert_pem(), ca_key).unwrap();
    let expired = params.signed_by(&key, &issuer).unwrap();
    std::fs::write(out.join(SERVER_CERT), expired.pem()).unwrap();
    std::fs::write(out.join(SERVER_KEY), key.serialize_pem()).unwrap();
    let e = NodeTls::load(&out).unwrap_err().to_string();
    assert!(
        e.contains("server-cert.pem") && e.contains("not valid now"),
        "{e}"
    );

    std::fs::write(out.join(SERVER_CERT), "garbage").unwrap();
    let e = NodeTls::load(&out).unwrap_err().to_string();
    assert!(e.contains("server-cert.pem"), "{e}");

    std::fs::remove_file(out.join(SERVER_CERT)).unwrap();
    let e = NodeTls::load(&out).unwrap_err().to_string();
    assert!(
        e.contains("server-cert.pem") && e.contains("missing"),
        "{e}"
    );

    let e = NodeTls::load(&dir.path().join("nowhere"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("ca-cert.pem"), "{e}");

    let e = ca
        .issue(&IssueRequest {
            name: "bad name".into(),
            role: Role::Node,
            ips: vec![],
            dns: vec![],
            days: 1,
        })
        .unwrap_err();
    assert!(e.to_string().contains("must be 1 to 64"), "{e}");
}
