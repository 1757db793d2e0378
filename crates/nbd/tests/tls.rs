//! NBD over TLS between virtman's own client and server: FORCEDTLS as the
//! spec says it (everything but STARTTLS and ABORT refused first, STARTTLS
//! with data or twice refused, no state kept across the upgrade), client
//! certificates verified against the cluster CA, names checked, a stalled
//! handshake timed out, and exports shown and opened only to the clients
//! the access policy allows.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use common::{Raw, TestServer, pattern};
use rustls_pki_types::CertificateDer;
use tokio::io::AsyncWriteExt;
use virtman_nbd::client::list_exports;
use virtman_nbd::proto::handshake::{GoRequest, MetaRequest};
use virtman_nbd::proto::{opt, rep};
use virtman_nbd::{
    Client, ClientConfig, ClientTls, Export, ExportAccess, MemExport, ServerConfig, ServerTls,
};
use virtman_pki::{Ca, Identity, NodeTls, PeerVerification, Role};

const SIZE: usize = 1 << 20;

struct Pki {
    _dir: tempfile::TempDir,
    server: NodeTls,
    client: NodeTls,
    stranger: NodeTls,
}

fn issue(ca: &Ca, out: &Path, name: &str) -> NodeTls {
    NodeTls::load(&virtman_testkit::pki::issue(ca, out, name, Role::Node)).unwrap()
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::init(&dir.path().join("ca"), 30).unwrap();
    let other = Ca::init(&dir.path().join("other"), 30).unwrap();
    Pki {
        server: issue(&ca, &dir.path().join("server"), "server1"),
        client: issue(&ca, &dir.path().join("client"), "client1"),
        stranger: issue(&other, &dir.path().join("stranger"), "client1"),
        _dir: dir,
    }
}

/// Lets a client open `secret` only if its certificate names `client1`.
#[derive(Debug)]
struct OnlyClient1;

impl ExportAccess for OnlyClient1 {
    fn check<'a>(
        &'a self,
        peer: Option<&'a CertificateDer<'static>>,
        export: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
        Box::pin(async move {
            // Decided after a pause, as a policy asking a coordinator would.
            tokio::time::sleep(Duration::from_millis(5)).await;
            let client1 = peer
                .and_then(|c| Identity::from_der(c))
                .is_some_and(|id| id.name == "client1");
            if export != "secret" || client1 {
                Ok(())
            } else {
                Err("only client1 reads the secret".into())
            }
        })
    }
}

async fn tls_server(p: &Pki, verify: PeerVerification) -> TestServer {
    let disk: Arc<dyn Export> = Arc::new(MemExport::new(pattern(SIZE, 7)).read_only());
    let secret: Arc<dyn Export> = Arc::new(MemExport::new(pattern(SIZE, 8)).read_only());
    TestServer::start(
        ServerConfig {
            tls: Some(ServerTls::new(p.server.server_config(verify).unwrap())),
            access: Some(Arc::new(OnlyClient1)),
            handshake_timeout: Duration::from_secs(2),
            ..ServerConfig::default()
        },
        vec![("disk", disk), ("secret", secret)],
    )
    .await
}

fn config(export: &str, tls: &NodeTls, name: Option<&str>) -> ClientConfig {
    ClientConfig {
        export: export.into(),
        connect_timeout: Duration::from_secs(5),
        tls: Some({
            let mut t = ClientTls::new(tls.client_config().unwrap());
            t.server_name = name.map(str::to_owned);
            t
        }),
        ..ClientConfig::default()
    }
}

#[tokio::test]
async fn a_client_of_the_cluster_reads_over_tls_and_others_are_refused() {
    let p = pki();
    let s = tls_server(&p, PeerVerification::Required).await;

    // Verified by the address dialled (an IP SAN) and by name.
    for name in [None, Some("server1")] {
        let c = Client::connect(&s.endpoint(), &config("disk", &p.client, name))
            .await
            .unwrap();
        assert_eq!(
            &c.read(4096, 65536).await.unwrap()[..],
            &pattern(SIZE, 7)[4096..4096 + 65536]
        );
        c.disconnect().await.unwrap();
    }

    // The server's certificate does not carry this name.
    let e = Client::connect(&s.endpoint(), &config("disk", &p.client, Some("server2")))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("TLS handshake") && e.contains("not valid for name"),
        "{e}"
    );

    // A certificate of another CA: refused by the server, and the client
    // refuses the server it cannot verify.
    let e = Client::connect(&s.endpoint(), &config("disk", &p.stranger, None))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("TLS handshake"), "{e}");

    // A plaintext client is told TLS is required; the server goes on.
    let e = Client::connect(
        &s.endpoint(),
        &ClientConfig {
            export: "disk".into(),
            ..ClientConfig::default()
        },
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("NBD_REP_ERR_TLS_REQD") && e.contains("STARTTLS"),
        "{e}"
    );

    // A TLS client against a plaintext server never falls back.
    let plain = TestServer::start(
        ServerConfig::default(),
        vec![(
            "disk",
            Arc::new(MemExport::new(pattern(SIZE, 7))) as Arc<dyn Export>,
        )],
    )
    .await;
    let e = Client::connect(&plain.endpoint(), &config("disk", &p.client, None))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("refused TLS") && e.contains("NBD_REP_ERR_POLICY"),
        "{e}"
    );
    plain.stop().await;

    let c = Client::connect(&s.endpoint(), &config("disk", &p.client, None))
        .await
        .unwrap();
    assert_eq!(c.read(0, 512).await.unwrap().len(), 512);
    s.stop().await;
}

#[tokio::test]
async fn forced_tls_refuses_options_before_starttls_and_starttls_with_data_or_twice() {
    let p = pki();
    let s = tls_server(&p, PeerVerification::Required).await;
    let mut r = Raw::start(s.addr).await;
    for (code, data) in [
        (opt::LIST, Vec::new()),
        (opt::STRUCTURED_REPLY, Vec::new()),
        (
            opt::INFO,
            GoRequest {
                name: "disk".into(),
                requests: vec![],
            }
            .encode(),
        ),
        (
            opt::GO,
            GoRequest {
                name: "disk".into(),
                requests: vec![],
            }
            .encode(),
        ),
        (
            opt::SET_META_CONTEXT,
            MetaRequest {
                name: "disk".into(),
                queries: vec![],
            }
            .encode(),
        ),
        (4242, Vec::new()),
        // Malformed: refused for want of TLS all the same.
        (opt::INFO, vec![0, 0]),
    ] {
        r.option(code, &data).await;
        let (o, t, msg) = r.reply().await;
        assert_eq!((o, t), (code, rep::ERR_TLS_REQD), "option {code}");
        assert!(String::from_utf8_lossy(&msg).contains("STARTTLS"));
    }
    // STARTTLS with data is invalid; the connection goes on in plaintext.
    r.option(opt::STARTTLS, b"x").await;
    assert_eq!(r.reply().await.1, rep::ERR_INVALID);
    // ABORT is answered.
    r.option(opt::ABORT, &[]).await;
    assert_eq!(r.reply().await.1, rep::ACK);
    assert!(r.closed().await);

    // STARTTLS after refused options upgrades all the same, and the
    // options answer over TLS.
    let mut r = Raw::start(s.addr).await;
    r.option(opt::STRUCTURED_REPLY, &[]).await;
    assert_eq!(r.reply().await.1, rep::ERR_TLS_REQD);
    r.option(opt::STARTTLS, &[]).await;
    assert_eq!(r.reply().await.1, rep::ACK);
    let stream = tokio_rustls::TlsConnector::from(p.client.client_config().unwrap())
        .connect("server1".try_into().unwrap(), r.s)
        .await
        .unwrap();
    let mut t = common::RawStream::new(stream);
    t.option(opt::STRUCTURED_REPLY, &[]).await;
    assert_eq!(t.reply().await.1, rep::ACK);

    // EXPORT_NAME cannot be refused with a reply: the connection closes.
    let mut r = Raw::start(s.addr).await;
    r.option(opt::EXPORT_NAME, b"disk").await;
    assert!(r.closed().await);

    // A second STARTTLS, over TLS, is invalid; and what was negotiated
    // before TLS is forgotten: the virtman client's own handshake proves
    // the rest. Here the raw client upgrades and asks again.
    let mut r = Raw::start(s.addr).await;
    r.option(opt::STARTTLS, &[]).await;
    assert_eq!(r.reply().await.1, rep::ACK);
    let cfg = p.client.client_config().unwrap();
    let stream = tokio_rustls::TlsConnector::from(cfg)
        .connect("server1".try_into().unwrap(), r.s)
        .await
        .unwrap();
    let mut t = common::RawStream::new(stream);
    t.option(opt::STARTTLS, &[]).await;
    assert_eq!(t.reply().await.1, rep::ERR_INVALID);
    t.option(opt::LIST, &[]).await;
    let names: Vec<u32> = t.replies().await.into_iter().map(|r| r.1).collect();
    assert_eq!(
        names,
        [rep::SERVER, rep::SERVER, rep::ACK],
        "client1 sees both exports"
    );
    s.stop().await;
}

#[tokio::test]
async fn a_stalled_tls_handshake_times_out_and_the_server_stops_cleanly() {
    let p = pki();
    let s = tls_server(&p, PeerVerification::Required).await;
    let mut r = Raw::start(s.addr).await;
    r.option(opt::STARTTLS, &[]).await;
    assert_eq!(r.reply().await.1, rep::ACK);
    // Half a ClientHello, then nothing.
    r.s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();
    assert!(r.closed().await, "the 2 s handshake timeout closes it");
    // And one that stops mid-handshake is not waited for at shutdown.
    let mut r2 = Raw::start(s.addr).await;
    r2.option(opt::STARTTLS, &[]).await;
    assert_eq!(r2.reply().await.1, rep::ACK);
    s.stop().await;
    drop(r2);
}

#[tokio::test]
async fn exports_are_listed_and_opened_only_for_the_clients_allowed() {
    let p = pki();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::load(&p.server.dir().parent().unwrap().join("ca")).unwrap();
    let other = issue(&ca, &dir.path().join("c2"), "client2");
    let s = tls_server(&p, PeerVerification::Required).await;

    let tls = |n: &NodeTls| ClientTls::new(n.client_config().unwrap());
    let mut listed = list_exports(&s.endpoint(), Some(&tls(&p.client)))
        .await
        .unwrap();
    listed.sort();
    assert_eq!(
        listed.iter().map(|e| e.0.as_str()).collect::<Vec<_>>(),
        ["disk", "secret"]
    );
    let listed = list_exports(&s.endpoint(), Some(&tls(&other)))
        .await
        .unwrap();
    assert_eq!(
        listed.iter().map(|e| e.0.as_str()).collect::<Vec<_>>(),
        ["disk"]
    );

    let c = Client::connect(&s.endpoint(), &config("secret", &p.client, None))
        .await
        .unwrap();
    assert_eq!(
        &c.read(0, 4096).await.unwrap()[..],
        &pattern(SIZE, 8)[..4096]
    );
    let e = Client::connect(&s.endpoint(), &config("secret", &other, None))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("NBD_REP_ERR_POLICY")
            && e.contains("not open to this client: only client1 reads the secret"),
        "{e}"
    );
    let c2 = Client::connect(&s.endpoint(), &config("disk", &other, None))
        .await
        .unwrap();
    assert_eq!(c2.read(0, 512).await.unwrap().len(), 512);
    s.stop().await;
}

#[tokio::test]
async fn certificates_change_without_a_restart_on_both_sides() {
    let p = pki();
    let ca = Ca::load(&p.server.dir().parent().unwrap().join("ca")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let renewed = issue(&ca, &dir.path().join("server2"), "server2");
    let tls = ServerTls::new(p.server.server_config(PeerVerification::Required).unwrap());
    let disk: Arc<dyn Export> = Arc::new(MemExport::new(pattern(SIZE, 7)).read_only());
    let s = TestServer::start(
        ServerConfig {
            tls: Some(Arc::clone(&tls)),
            ..ServerConfig::default()
        },
        vec![("disk", disk)],
    )
    .await;
    Client::connect(&s.endpoint(), &config("disk", &p.client, Some("server1")))
        .await
        .unwrap();
    // The server takes its renewed certificate: new handshakes present it.
    tls.set(renewed.server_config(PeerVerification::Required).unwrap());
    Client::connect(&s.endpoint(), &config("disk", &p.client, Some("server2")))
        .await
        .unwrap();
    let e = Client::connect(&s.endpoint(), &config("disk", &p.client, Some("server1")))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("not valid for name"), "{e}");

    // A client's configuration is swapped for every clone of its handle.
    let client = ClientTls::new(p.stranger.client_config().unwrap());
    let clone = client.clone();
    let cfg = |t: &ClientTls| ClientConfig {
        export: "disk".into(),
        tls: Some(t.clone()),
        ..ClientConfig::default()
    };
    assert!(Client::connect(&s.endpoint(), &cfg(&clone)).await.is_err());
    client.set(p.client.client_config().unwrap());
    let c = Client::connect(&s.endpoint(), &cfg(&clone)).await.unwrap();
    assert_eq!(c.read(0, 4096).await.unwrap().len(), 4096);
    s.stop().await;
}
