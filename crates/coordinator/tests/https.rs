//! The coordinator over HTTPS with a cluster PKI: nodes are known by their
//! certificates and act only as themselves, operators register and ban, the
//! token is the operator's, strangers are refused at the handshake, and a
//! banned node is refused everything and named to the others.

#![allow(missing_docs, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use virtman_coordinator::api::{
    HeartbeatRequest, JoinRequest, LeaveRequest, RegisterImage, ReportRequest, SessionBeat,
};
use virtman_coordinator::{Client, ClientError, Coordinator, HttpsConfig, Options, Token};
use virtman_pki::{Ca, NodeTls, PeerVerification, Role};

const TOKEN: &str = "operator-token-0123456789";

fn issue(ca: &Ca, dir: &Path, name: &str, role: Role) -> NodeTls {
    NodeTls::load(&virtman_testkit::pki::issue(
        ca,
        &dir.join(name),
        name,
        role,
    ))
    .unwrap()
}

struct Cluster {
    _dir: tempfile::TempDir,
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), virtman_coordinator::CoordinatorError>>,
    n1: Client,
    n2: Client,
    operator: Client,
    /// HTTPS without a certificate, with the operator token.
    token: Client,
    /// HTTPS without a certificate or token.
    anonymous: Client,
    /// A certificate of another CA, named like a member.
    stranger: Client,
    /// TLS that trusts the cluster CA and presents nothing.
    bare: Arc<rustls::ClientConfig>,
}

impl Cluster {
    async fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::init(&dir.path().join("ca"), 30).unwrap();
        let other = Ca::init(&dir.path().join("other-ca"), 30).unwrap();
        let coord = issue(&ca, dir.path(), "coordinator", Role::Node);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let https = HttpsConfig::new(coord.server_config(PeerVerification::Optional).unwrap());
        let options = Options {
            config: Default::default(),
            token: Token::new(TOKEN).unwrap(),
            tls: Some(https),
            data_dir: dir.path().join("data"),
        };
        let coordinator = Coordinator::open(options, shutdown.clone()).unwrap();
        let task = tokio::spawn(coordinator.serve(listener));
        let url = format!("https://{addr}");
        let client = |tls: &NodeTls, token: Option<&str>| {
            Client::with_tls(
                &url,
                token.map(str::to_owned),
                Some(tls.client_config().unwrap()),
            )
            .unwrap()
        };
        let n1 = issue(&ca, dir.path(), "n1", Role::Node);
        let n2 = issue(&ca, dir.path(), "n2", Role::Node);
        let alice = issue(&ca, dir.path(), "alice", Role::Operator);
        // The CA alone: trusts the coordinator, presents nothing.
        let bare = NodeTls::load(&dir.path().join("ca")).unwrap();
        let stranger = issue(&other, dir.path(), "n1-stranger", Role::Node);
        // The stranger trusts the real CA (it dialled the right server) but
        // presents a certificate of its own CA.
        let stranger_config = {
            let mut c = (*stranger.client_config().unwrap()).clone();
            let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
                bare.roots(),
                Arc::new(rustls::crypto::ring::default_provider()),
            )
            .build()
            .unwrap();
            c.dangerous().set_certificate_verifier(verifier);
            Arc::new(c)
        };
        Cluster {
            addr,
            shutdown,
            task,
            n1: client(&n1, None),
            n2: client(&n2, None),
            operator: client(&alice, None),
            token: client(&bare, Some(TOKEN)),
            anonymous: client(&bare, None),
            stranger: Client::with_tls(&url, None, Some(stranger_config)).unwrap(),
            bare: bare.client_config().unwrap(),
            _dir: dir,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

fn image() -> RegisterImage {
    RegisterImage {
        name: "debian".into(),
        size: 1 << 30,
        manifest_digest: "0f".repeat(32),
        origins: vec!["127.0.0.1:10809".into()],
        fanout: None,
        parents: None,
        stripes: None,
    }
}

fn join(node: &str) -> JoinRequest {
    JoinRequest {
        node: node.into(),
        addr: format!("127.0.0.1:{}", 20000 + node.len()),
        labels: BTreeMap::new(),
    }
}

fn beat(node: &str) -> HeartbeatRequest {
    HeartbeatRequest {
        node: node.into(),
        sessions: vec![SessionBeat {
            image: "debian".into(),
            progress: 0.5,
            complete: false,
            known_epoch: 0,
        }],
        ..Default::default()
    }
}

fn status(e: &ClientError) -> Option<(u16, &str)> {
    match e {
        ClientError::Api { status, code, .. } => Some((*status, code.as_str())),
        _ => None,
    }
}

#[tokio::test]
async fn nodes_act_only_as_themselves_and_operators_register_and_read() {
    let c = Cluster::start().await;
    // Operators (by certificate or by token) register; so may a node (an
    // origin registers what it serves).
    c.operator.register_image(&image()).await.unwrap();
    c.token.register_image(&image()).await.unwrap();
    c.n1.register_image(&image()).await.unwrap();

    c.n1.join("debian", &join("n1")).await.unwrap();
    let e = c.n1.join("debian", &join("n2")).await.unwrap_err();
    assert_eq!(status(&e), Some((403, "forbidden")), "{e}");
    assert!(e.to_string().contains("may not act as node \"n2\""), "{e}");
    // The token no longer speaks for nodes, nor does an operator.
    let e = c.token.join("debian", &join("n3")).await.unwrap_err();
    assert_eq!(status(&e), Some((403, "forbidden")), "{e}");
    let e = c.operator.join("debian", &join("alice")).await.unwrap_err();
    assert_eq!(status(&e), Some((403, "forbidden")), "{e}");
    c.n2.join("debian", &join("n2")).await.unwrap();

    // Heartbeats, reports and leaves as another node are refused and
    // change nothing.
    let e = c.n1.heartbeat(&beat("n2")).await.unwrap_err();
    assert_eq!(status(&e), Some((403, "forbidden")), "{e}");
    let report = ReportRequest {
        node: "n2".into(),
        parent: "n1".into(),
    };
    let e = c.n1.report("debian", &report).await.unwrap_err();
    assert_eq!(status(&e), Some((403, "forbidden")), "{e}");
    let leave = LeaveRequest { node: "n2".into() };
    let e = c.n1.leave("debian", &leave).await.unwrap_err();
    assert_eq!(status(&e), Some((403, "forbidden")), "{e}");
    let tree = c.operator.tree("debian").await.unwrap();
    let members: Vec<_> = tree.nodes.iter().filter(|n| !n.origin).collect();
    assert_eq!(members.len(), 2, "{tree:?}");
    assert!(members.iter().all(|n| n.progress == 0.0), "{tree:?}");

    c.n1.heartbeat(&beat("n1")).await.unwrap();
    // Reads need a certificate or the token; health stays open.
    c.n1.tree("debian").await.unwrap();
    c.token.node("n1").await.unwrap();
    let e = c.anonymous.tree("debian").await.unwrap_err();
    assert_eq!(status(&e), Some((401, "unauthorized")), "{e}");
    let e = c.anonymous.images().await.unwrap_err();
    assert_eq!(status(&e), Some((401, "unauthorized")), "{e}");
    let health = get_text(&c, "/v1/health").await;
    assert!(health.contains("ok"), "{health}");
    let metrics = get_text(&c, "/metrics").await;
    assert!(metrics.contains("# EOF"), "{metrics}");

    // Another CA's certificate never gets past the handshake.
    let e = c.stranger.images().await.unwrap_err();
    assert!(matches!(e, ClientError::Http(_)), "{e:?}");
    // Nor does plaintext HTTP.
    let plain = Client::new(&format!("http://{}", c.addr), Some(TOKEN.into())).unwrap();
    let e = plain.images().await.unwrap_err();
    assert!(matches!(e, ClientError::Http(_)), "{e:?}");
    // An http:// URL with TLS configured is a mistake caught at once.
    let e = Client::with_tls(
        &format!("http://{}", c.addr),
        None,
        Some(Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth(),
        )),
    )
    .unwrap_err();
    assert!(matches!(e, ClientError::Url(_)), "{e:?}");
    c.stop().await;
}

/// GET `path` over HTTPS, trusting the cluster CA, without a certificate.
async fn get_text(c: &Cluster, path: &str) -> String {
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured((*c.bare).clone())
        .build()
        .unwrap();
    let resp = http
        .get(format!("https://{}{path}", c.addr))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{resp:?}");
    resp.text().await.unwrap()
}

#[tokio::test]
async fn a_banned_node_is_refused_everything_and_named_to_the_others() {
    let c = Cluster::start().await;
    c.operator.register_image(&image()).await.unwrap();
    c.n1.join("debian", &join("n1")).await.unwrap();
    c.n2.join("debian", &join("n2")).await.unwrap();
    assert!(c.n1.heartbeat(&beat("n1")).await.unwrap().banned.is_empty());

    // Only operators ban.
    let e = c.n1.ban("n2").await.unwrap_err();
    assert_eq!(status(&e), Some((403, "forbidden")), "{e}");
    let state = c.operator.ban("n2").await.unwrap();
    assert!(state.banned && state.sessions.is_empty(), "{state:?}");
    // A name never seen can be banned ahead.
    assert!(c.token.ban("n9").await.unwrap().banned);
    c.token.unban("n9").await.unwrap();
    c.token.ban("n9").await.unwrap();

    for e in [
        c.n2.heartbeat(&beat("n2")).await.unwrap_err(),
        c.n2.join("debian", &join("n2")).await.unwrap_err(),
        c.n2.leave("debian", &LeaveRequest { node: "n2".into() })
            .await
            .unwrap_err(),
    ] {
        assert_eq!(status(&e), Some((403, "banned")), "{e}");
    }
    let tree = c.operator.tree("debian").await.unwrap();
    assert!(!tree.nodes.iter().any(|n| n.node == "n2"), "{tree:?}");
    let hb = c.n1.heartbeat(&beat("n1")).await.unwrap();
    assert_eq!(hb.banned, ["n2", "n9"]);
    // A host in no session (an origin) learns the list with an empty beat.
    let empty = HeartbeatRequest {
        node: "n1".into(),
        sessions: vec![],
        ..Default::default()
    };
    assert_eq!(c.n1.heartbeat(&empty).await.unwrap().banned, ["n2", "n9"]);

    c.operator.unban("n2").await.unwrap();
    c.n2.join("debian", &join("n2")).await.unwrap();
    assert_eq!(c.n1.heartbeat(&beat("n1")).await.unwrap().banned, ["n9"]);
    c.stop().await;
}

#[tokio::test]
async fn a_client_stalled_in_the_handshake_delays_nobody_and_not_the_stop() {
    use tokio::io::AsyncWriteExt;
    let c = Cluster::start().await;
    // Half a ClientHello, then silence.
    let mut stalled = tokio::net::TcpStream::connect(c.addr).await.unwrap();
    stalled
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00])
        .await
        .unwrap();
    let idle = tokio::net::TcpStream::connect(c.addr).await.unwrap();
    let answered = tokio::time::timeout(Duration::from_secs(5), c.operator.images()).await;
    assert!(answered.unwrap().unwrap().is_empty());
    let stopped = tokio::time::timeout(Duration::from_secs(5), c.stop()).await;
    assert!(stopped.is_ok(), "the coordinator did not stop");
    drop((stalled, idle));
}
