//! Two hosts handed each other as parents (two epochs of the tree, for a
//! moment): a VM's read on either completes at once from the origin, not
//! after a request timeout. In one process, with TLS on every link (the loop
//! guard knows a child by its certificate) and without hedged fetches, so
//! only the guard can explain a quick read.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Node, serve_coordinator_with, vm_client, wait_for};
use virtman_agent::upstream::FetchConfig;
use virtman_coordinator::api::{Assignment, Parent};
use virtman_image::ImageStore;
use virtman_pki::{Ca, NodeTls, PeerVerification, Role};

const CHUNK: u32 = 64 * 1024;
const TOKEN: &str = "loops-test-token-0123456789";

fn issue(ca: &Ca, dir: &Path, name: &str) -> std::path::PathBuf {
    virtman_testkit::pki::issue(ca, &dir.join("pki").join(name), name, Role::Node)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_that_are_each_others_parents_read_from_the_origin_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let image = virtman_testkit::pattern(32 * CHUNK as usize, 5);
    let raw = dir.path().join("img.raw");
    std::fs::write(&raw, &image).unwrap();
    ImageStore::open(dir.path().join("origin/images"))
        .unwrap()
        .import(&raw, "img", CHUNK, &mut |_, _| {})
        .unwrap();
    let ca = Ca::init(&dir.path().join("pki/ca"), 1).unwrap();
    let coord_tls = NodeTls::load(&issue(&ca, dir.path(), "coordinator")).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    // Heartbeats far apart: the coordinator's lists do not undo the loop
    // while the test reads.
    let config = virtman_coordinator::CoordinatorConfig {
        fanout: 2,
        parents: 1,
        stripes: 1,
        heartbeat_interval_ms: 60_000,
        heartbeat_timeout_ms: 120_000,
        suspect_after_ms: 120_000,
        ..virtman_coordinator::CoordinatorConfig::default()
    };
    let https = virtman_coordinator::HttpsConfig::new(
        coord_tls.server_config(PeerVerification::Optional).unwrap(),
    );
    let (coord_stop, _task) = serve_coordinator_with(
        dir.path().join("coord"),
        TOKEN,
        listener,
        config,
        Some(https),
    );
    let fetch = FetchConfig {
        hedge: None,
        ..FetchConfig::default()
    };
    let start = |name: &'static str| {
        let (data, tls) = (dir.path().join(name), dir.path().join("pki").join(name));
        let (url, fetch) = (url.clone(), fetch.clone());
        async move { Node::start_tls(name, data, &url, &tls, fetch).await }
    };
    for name in ["origin", "a", "b"] {
        issue(&ca, dir.path(), name);
    }
    let origin = start("origin").await;
    let coord = virtman_coordinator::Client::with_tls(
        &url,
        Some(TOKEN.into()),
        Some(coord_tls.client_config().unwrap()),
    )
    .unwrap();
    wait_for("the image to be registered", || async {
        coord.images().await.is_ok_and(|l| l.len() == 1)
    })
    .await;
    let a = start("a").await;
    let b = start("b").await;
    let vm_a = a.agent.create_vm("vm-a", "img").await.unwrap();
    let vm_b = b.agent.create_vm("vm-b", "img").await.unwrap();

    // Let the heartbeat that follows each join pass (the next is a minute
    // away): it would put back the coordinator's lists.
    tokio::time::sleep(Duration::from_secs(1)).await;
    // a under the origin, b under a; now a is told to fetch from b too.
    let tree = coord.tree("img").await.unwrap();
    let parents_of = |n: &str| {
        tree.nodes
            .iter()
            .find(|v| v.node == n)
            .map(|v| v.parents.clone())
    };
    assert_eq!(parents_of("b"), Some(vec!["a".to_owned()]), "{tree:?}");
    a.agent.apply(&Assignment {
        image: "img".into(),
        epoch: 1_000,
        parents: vec![Parent {
            node: "b".into(),
            addr: b.addr.clone(),
        }],
        stripes: Vec::new(),
        origins: vec![origin.addr.clone()],
    });
    let parents = |n: &Node| {
        let status = n.agent.status();
        status.images.into_iter().find(|i| i.name == "img").unwrap()
    };
    assert_eq!(parents(&a).parents, ["b"]);
    assert_eq!(parents(&b).parents, ["a"]);

    let socket = |uri: &str| uri.split("socket=").nth(1).unwrap().to_owned();
    let on_a = vm_client(Path::new(&socket(&vm_a.uri)), "vm-a").await;
    let on_b = vm_client(Path::new(&socket(&vm_b.uri)), "vm-b").await;
    for (client, chunk) in [(&on_a, 5u64), (&on_b, 9), (&on_a, 20)] {
        let offset = chunk * u64::from(CHUNK);
        let started = Instant::now();
        let got = client.read(offset, u64::from(CHUNK)).await.unwrap();
        let took = started.elapsed();
        let at = offset as usize;
        assert!(got[..] == image[at..at + CHUNK as usize], "chunk {chunk}");
        // A loop would hold the read for the 2 s request timeout.
        assert!(took < Duration::from_secs(1), "chunk {chunk} took {took:?}");
    }
    // The loop held throughout; the chunks came from the origin.
    let (img_a, img_b) = (parents(&a), parents(&b));
    assert_eq!(img_a.parents, ["b"], "{img_a:?}");
    assert_eq!(img_b.parents, ["a"], "{img_b:?}");
    assert!(
        img_a.from_origins >= 2 && img_b.from_origins >= 1,
        "{img_a:?} {img_b:?}"
    );

    for n in [a, b, origin] {
        n.kill().await;
    }
    coord_stop.cancel();
}
