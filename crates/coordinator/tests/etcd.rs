//! Coordinators on a real etcd (Debian's etcd-server on loopback): one leads
//! and the others redirect, a stopped leader is replaced with the trees
//! intact, fenced writes, etcd down and back, one etcd member killed, and
//! prefixes and endpoints that are not virtman's.

#![allow(missing_docs, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use virtman_coordinator::api::{HeartbeatRequest, JoinRequest, RegisterImage, SessionBeat};
use virtman_coordinator::lease::LeaseClock;
use virtman_coordinator::metrics::Metrics;
use virtman_coordinator::store::etcd::{EtcdStore, Keys, check_prefix};
use virtman_coordinator::store::{Backend, Batch, StoreError};
use virtman_coordinator::{
    Client, ClientError, Coordinator, CoordinatorConfig, CoordinatorError, EtcdOptions, Options,
    Token,
};
use virtman_testkit::etcd::Etcd;

const TOKEN: &str = "test-token-0123456789abcdef";

struct Running {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), CoordinatorError>>,
}

impl Running {
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

fn options(dir: &Path) -> Options {
    Options {
        // One tree per image: the cases check trees' shapes.
        config: CoordinatorConfig {
            stripes: 1,
            ..CoordinatorConfig::default()
        },
        token: Token::new(TOKEN).unwrap(),
        tls: None,
        data_dir: dir.to_owned(),
    }
}

fn etcd_options(endpoints: Vec<String>, prefix: &str, addr: SocketAddr) -> EtcdOptions {
    EtcdOptions {
        endpoints,
        prefix: prefix.into(),
        lease_ttl: Duration::from_secs(2),
        name: format!("c-{}", addr.port()),
        advertise: format!("http://{addr}"),
        tls: None,
    }
}

async fn start(dir: &Path, endpoints: Vec<String>, prefix: &str) -> Running {
    start_with(options(dir), endpoints, prefix).await
}

async fn start_with(options: Options, endpoints: Vec<String>, prefix: &str) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let c = Coordinator::open_etcd(
        options,
        etcd_options(endpoints, prefix, addr),
        shutdown.clone(),
    )
    .await
    .unwrap();
    let task = tokio::spawn(c.serve(listener));
    Running {
        addr,
        shutdown,
        task,
    }
}

fn client(urls: &[String]) -> Client {
    Client::new(&urls.join(","), Some(TOKEN.into())).unwrap()
}

/// Waits until one of `urls` says it leads; returns its index.
async fn leader_of(urls: &[String], within: Duration) -> usize {
    let deadline = Instant::now() + within;
    loop {
        for (i, u) in urls.iter().enumerate() {
            if let Ok(s) = client(std::slice::from_ref(u)).coordinator_status().await
                && s.role == "leader"
            {
                return i;
            }
        }
        assert!(Instant::now() < deadline, "no leader within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn image() -> RegisterImage {
    RegisterImage {
        name: "img".into(),
        size: 1 << 30,
        manifest_digest: "0f".repeat(32),
        origins: vec!["10.0.0.1:10809".into()],
        fanout: Some(2),
        parents: Some(2),
        stripes: None,
    }
}

fn join(node: &str) -> JoinRequest {
    JoinRequest {
        node: node.into(),
        addr: format!("{node}.example:10809"),
        labels: BTreeMap::new(),
    }
}

fn beat(node: &str, known_epoch: u64) -> HeartbeatRequest {
    HeartbeatRequest {
        node: node.into(),
        sessions: vec![SessionBeat {
            image: "img".into(),
            progress: 0.5,
            complete: false,
            known_epoch,
        }],
        ..Default::default()
    }
}

/// (node, parents, epoch) of every member: what a change of leader must keep.
async fn shape(c: &Client) -> Vec<(String, Vec<String>, u64)> {
    c.tree("img")
        .await
        .unwrap()
        .nodes
        .into_iter()
        .filter(|n| !n.origin)
        .map(|n| (n.node, n.parents, n.epoch))
        .collect()
}

fn status_code(e: &ClientError) -> Option<(u16, &str)> {
    match e {
        ClientError::Api { status, code, .. } => Some((*status, code)),
        _ => None,
    }
}

async fn metric(url: &str, name: &str) -> f64 {
    let text = reqwest::get(format!("{url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leads_the_others_redirect_and_a_stopped_leader_is_replaced_with_the_trees_intact() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&dir.path().join("etcd"), 3);
    let mut running = Vec::new();
    for i in 0..3 {
        running.push(start(&dir.path().join(format!("c{i}")), etcd.endpoints(), "/v").await);
    }
    let urls: Vec<String> = running.iter().map(Running::url).collect();
    let first = leader_of(&urls, Duration::from_secs(10)).await;
    let follower = &urls[(first + 1) % 3];

    // A follower asked to write answers 307 to the leader, with the leader
    // named; the client follows it, token and all.
    let raw = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .post(format!("{follower}/v1/images"))
        .bearer_auth(TOKEN)
        .json(&image())
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), 307);
    assert_eq!(
        raw.headers()["location"].to_str().unwrap(),
        format!("{}/v1/images", urls[first])
    );
    assert_eq!(
        raw.headers()["x-virtman-leader"].to_str().unwrap(),
        urls[first]
    );
    let via_follower = client(std::slice::from_ref(follower));
    via_follower.register_image(&image()).await.unwrap();
    let all = client(&urls);
    for i in 0..7 {
        all.join("img", &join(&format!("h{i}"))).await.unwrap();
    }
    let before = shape(&all).await;
    assert_eq!(before.len(), 7);
    let s = client(std::slice::from_ref(follower))
        .coordinator_status()
        .await
        .unwrap();
    assert_eq!(s.role, "follower");
    assert_eq!(s.leader.as_ref().unwrap().url, urls[first]);
    assert_eq!(s.endpoints.len(), 3);
    assert!(s.endpoints.iter().all(|e| e.healthy), "{s:?}");

    // The leader goes; a follower leads within 5 s; every member keeps its
    // parents and epoch, and its heartbeat (through whichever coordinator)
    // tells it of no change: nobody died.
    let term = s.leader.unwrap().term;
    let stopped = Instant::now();
    running.remove(first).stop().await;
    let urls_left: Vec<String> = running.iter().map(Running::url).collect();
    let next = leader_of(&urls_left, Duration::from_secs(5)).await;
    eprintln!("new leader after {:?}", stopped.elapsed());
    let s = client(std::slice::from_ref(&urls_left[next]))
        .coordinator_status()
        .await
        .unwrap();
    assert!(s.leader.unwrap().term > term);
    assert_eq!(shape(&all).await, before);
    for (node, _, epoch) in &before {
        let r = all.heartbeat(&beat(node, *epoch)).await.unwrap();
        assert!(r.changed.is_empty(), "{node} told of a change: {r:?}");
    }
    assert_eq!(
        metric(&urls_left[next], "virtman_coordinator_deaths_total").await,
        0.0
    );
    assert_eq!(
        metric(&urls_left[next], "virtman_coordinator_leader").await,
        1.0
    );
    // It saw the first leader, then itself.
    let changes = metric(&urls_left[next], "virtman_coordinator_leader_changes_total").await;
    assert!(changes >= 2.0, "{changes}");
    for r in running {
        r.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_without_the_leader_key_is_refused_by_etcd_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&dir.path().join("etcd"), 1);
    let c = etcd_client::Client::connect(etcd.endpoints(), None)
        .await
        .unwrap();
    let keys = Keys::new("/fence");
    check_prefix(&c, &keys, true).await.unwrap();
    // A leader of term 5 whose key is gone (its lease lapsed during a
    // pause): its own clock still says the lease holds.
    let clock = Arc::new(LeaseClock::new());
    clock.extend(Instant::now(), Duration::from_secs(60));
    let metrics = Arc::new(Metrics::new());
    let store = EtcdStore::new(c.clone(), keys, 5, clock, Arc::clone(&metrics));
    let mut batch = Batch::default();
    batch.bans.insert("n1".into(), true);
    let err = store.commit(&batch).await.unwrap_err();
    assert!(matches!(err, StoreError::Fenced { term: 5 }), "{err}");
    assert_eq!(metrics.fenced.get(), 1);
    let mut kv = c.kv_client();
    let got = kv.get("/fence/bans/n1", None).await.unwrap();
    assert!(got.kvs().is_empty(), "a fenced write landed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_etcd_down_reads_come_from_memory_changes_get_503_and_all_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let mut etcd = Etcd::start(&dir.path().join("etcd"), 1);
    let r = start(&dir.path().join("c"), etcd.endpoints(), "/v").await;
    let urls = vec![r.url()];
    leader_of(&urls, Duration::from_secs(10)).await;
    let c = client(&urls);
    c.register_image(&image()).await.unwrap();
    for i in 0..3 {
        c.join("img", &join(&format!("h{i}"))).await.unwrap();
    }
    let before = shape(&c).await;

    etcd.kill_all();
    // Past the lease: the coordinator no longer leads.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(shape(&c).await, before, "reads from memory");
    let err = c.join("img", &join("late")).await.unwrap_err();
    assert_eq!(status_code(&err), Some((503, "unavailable")), "{err}");
    let s = c.coordinator_status().await.unwrap();
    assert_ne!(s.role, "leader");
    assert!(s.endpoints.iter().all(|e| !e.healthy), "{s:?}");

    etcd.restart_all();
    leader_of(&urls, Duration::from_secs(10)).await;
    assert_eq!(shape(&c).await, before, "the trees came back from etcd");
    c.join("img", &join("late")).await.unwrap();
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_etcd_member_killed_changes_nothing_for_clients() {
    let dir = tempfile::tempdir().unwrap();
    let mut etcd = Etcd::start(&dir.path().join("etcd"), 3);
    // These members never heartbeat: a timeout longer than the test keeps
    // them from being declared dead while etcd members restart (which took
    // past the default 4 s in about one run in four).
    let mut opts = options(&dir.path().join("c"));
    opts.config.heartbeat_timeout_ms = 120_000;
    let r = start_with(opts, etcd.endpoints(), "/v").await;
    let urls = vec![r.url()];
    leader_of(&urls, Duration::from_secs(10)).await;
    let c = client(&urls);
    c.register_image(&image()).await.unwrap();
    c.join("img", &join("h0")).await.unwrap();
    // Each member in turn, raft leader included somewhere along the way.
    for m in 0..3 {
        etcd.kill(m);
        let deadline = Instant::now() + Duration::from_secs(10);
        let node = format!("h{}", m + 1);
        loop {
            match c.join("img", &join(&node)).await {
                Ok(_) => break,
                Err(e) => {
                    assert!(Instant::now() < deadline, "member {m} down: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        etcd.restart(m);
    }
    assert_eq!(shape(&c).await.len(), 4);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_programs_prefix_a_newer_format_and_a_non_etcd_endpoint_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&dir.path().join("etcd"), 1);
    let mut kv = etcd_client::Client::connect(etcd.endpoints(), None)
        .await
        .unwrap();
    kv.put("/theirs/config", "keep me", None).await.unwrap();
    kv.put("/newer/format", "virtman-coordinator/9", None)
        .await
        .unwrap();
    kv.put("/odd/format", "something else", None).await.unwrap();
    let open = |prefix: &'static str, endpoints: Vec<String>| {
        let dir = dir.path().to_owned();
        async move {
            let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
            Coordinator::open_etcd(
                options(&dir),
                etcd_options(endpoints, prefix, addr),
                CancellationToken::new(),
            )
            .await
            .map(|_| ())
            .unwrap_err()
            .to_string()
        }
    };
    let e = open("/theirs", etcd.endpoints()).await;
    assert!(
        e.contains("virtman did not write") && e.contains("/theirs/config"),
        "{e}"
    );
    let e = open("/newer", etcd.endpoints()).await;
    assert!(e.contains("format 9 is not supported"), "{e}");
    let e = open("/odd", etcd.endpoints()).await;
    assert!(e.contains("virtman did not write"), "{e}");
    // Nothing was overwritten.
    let got = kv.get("/theirs/config", None).await.unwrap();
    assert_eq!(got.kvs()[0].value(), b"keep me");
    assert!(
        kv.get("/theirs/format", None)
            .await
            .unwrap()
            .kvs()
            .is_empty()
    );
    let got = kv.get("/newer/format", None).await.unwrap();
    assert_eq!(got.kvs()[0].value(), b"virtman-coordinator/9");

    // An HTTP server that is not etcd, and a port nobody listens on: a
    // clear error naming the endpoint, within seconds.
    let not_etcd = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let not_etcd_addr = not_etcd.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        while let Ok((mut s, _)) = not_etcd.accept().await {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi")
                .await;
        }
    });
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed_addr = closed.local_addr().unwrap();
    drop(closed);
    for addr in [not_etcd_addr, closed_addr] {
        let started = Instant::now();
        let e = open("/v", vec![format!("http://{addr}")]).await;
        assert!(
            e.contains(&format!("http://{addr}")) && e.contains("etcd"),
            "{e}"
        );
        assert!(started.elapsed() < Duration::from_secs(10), "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_over_tls_with_client_certificates_and_another_ca_refused() {
    use virtman_coordinator::EtcdTls;
    use virtman_pki::{Ca, Role};
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::init(&dir.path().join("ca"), 1).unwrap();
    let server = virtman_testkit::pki::issue(&ca, &dir.path().join("etcd-tls"), "etcd", Role::Node);
    let me = virtman_testkit::pki::issue(&ca, &dir.path().join("me"), "c1", Role::Node);
    let etcd = Etcd::start_tls(&dir.path().join("etcd"), 1, &server);
    assert!(etcd.endpoints()[0].starts_with("https://"));

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let mut opts = etcd_options(etcd.endpoints(), "/tls", addr);
    opts.tls = Some(EtcdTls::load(&me).unwrap());
    let c = Coordinator::open_etcd(options(dir.path()), opts, shutdown.clone())
        .await
        .unwrap();
    let task = tokio::spawn(c.serve(listener));
    let urls = vec![format!("http://{addr}")];
    leader_of(&urls, Duration::from_secs(10)).await;
    let cl = client(&urls);
    cl.register_image(&image()).await.unwrap();
    cl.join("img", &join("h0")).await.unwrap();
    let s = cl.coordinator_status().await.unwrap();
    assert!(s.endpoints[0].healthy, "{s:?}");
    shutdown.cancel();
    task.await.unwrap().unwrap();

    // A certificate of another CA, and no certificate at all: refused with
    // the reason, nothing written.
    let other = Ca::init(&dir.path().join("ca2"), 1).unwrap();
    let stranger =
        virtman_testkit::pki::issue(&other, &dir.path().join("stranger"), "c2", Role::Node);
    let mut opts = etcd_options(etcd.endpoints(), "/tls2", addr);
    opts.tls = Some(EtcdTls::load(&stranger).unwrap());
    let e = Coordinator::open_etcd(options(dir.path()), opts, CancellationToken::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("etcd") && e.to_lowercase().contains("certificate"),
        "{e}"
    );
    let e = Coordinator::open_etcd(
        options(dir.path()),
        etcd_options(etcd.endpoints(), "/tls2", addr),
        CancellationToken::new(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("etcd"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_that_does_not_load_keeps_it_from_leading_and_says_why_without_spinning() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&dir.path().join("etcd"), 1);
    let mut kv = etcd_client::Client::connect(etcd.endpoints(), None)
        .await
        .unwrap();
    kv.put("/bad/format", "virtman-coordinator/1", None)
        .await
        .unwrap();
    kv.put("/bad/images/x", "{not json", None).await.unwrap();
    let r = start(&dir.path().join("c"), etcd.endpoints(), "/bad").await;
    let c = client(&[r.url()]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = metric(&r.url(), "virtman_coordinator_etcd_seconds_count").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = metric(&r.url(), "virtman_coordinator_etcd_seconds_count").await;
    let s = c.coordinator_status().await.unwrap();
    assert_ne!(s.role, "leader", "{s:?}");
    let why = s.etcd_error.unwrap_or_default();
    assert!(
        why.contains("/bad/images/x") && why.contains("does not decode"),
        "{why}"
    );
    // A pause between tries: a handful of etcd requests a second, not a
    // tight loop.
    assert!(
        after - before < 60.0,
        "{} etcd requests in 2 s",
        after - before
    );
    let err = c.images().await.unwrap_err();
    assert_eq!(status_code(&err).map(|(s, _)| s), Some(503), "{err}");
    r.stop().await;
}
