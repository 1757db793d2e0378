//! What a host's status says, and that it agrees with everything else:
//!
//! - "How much a host holds" is one figure everywhere: a host that fetched
//!   every non-zero chunk of a sparse image holds all of it in its status,
//!   its heartbeats (the coordinator marks it complete: a root for the
//!   others), its metrics and its `x-virtman:present` context.
//! - A host with no image yet says the coordinator is reachable as soon as
//!   it answers (not only once the host joins a session).
//! - A host that joined learns within a second the parents that hosts
//!   joining just after it gave it, however long the heartbeat interval.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use common::{Node, origin_cluster, origin_cluster_with, serve_coordinator, vm_client, wait_for};
use virtman_agent::prefetch::PrefetchConfig;

const CHUNK: u32 = 64 * 1024;
const CHUNKS: usize = 32;
const DATA: [usize; 3] = [0, 5, 17];
const TOKEN: &str = "held-test-token-0123456789abcdef";

/// Member agent `name`, its data under `dir`, with the default prefetch.
async fn member(dir: &std::path::Path, url: &str, name: &str) -> Node {
    Node::start(name, dir.join(name), url, TOKEN, PrefetchConfig::default()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_holding_every_non_zero_chunk_of_a_sparse_image_holds_it_all() {
    let dir = tempfile::tempdir().unwrap();
    // A sparse image: three chunks of data, the rest zero.
    let mut image = vec![0u8; CHUNKS * CHUNK as usize];
    for &i in &DATA {
        let at = i * CHUNK as usize;
        image[at..at + CHUNK as usize]
            .copy_from_slice(&virtman_testkit::pattern(CHUNK as usize, i as u64 + 1));
    }
    let (url, stop, origin) = origin_cluster(dir.path(), &image, CHUNK, &[], TOKEN, |_| {}).await;
    let a1 = member(dir.path(), &url, "a1").await;
    a1.agent.create_vm("vm1", "img").await.unwrap();
    let vm = vm_client(a1.agent.vm_socket(), "vm1").await;
    for &i in &DATA {
        let off = (i * CHUNK as usize) as u64;
        let got = vm.read(off, u64::from(CHUNK)).await.unwrap();
        assert_eq!(
            &got[..],
            &image[off as usize..off as usize + CHUNK as usize]
        );
    }
    let v = a1.agent.volume("img").unwrap();
    assert_eq!(v.present_chunks(), DATA.len() as u64, "only data is stored");
    assert_eq!(v.held_chunks(), CHUNKS as u64);
    assert!(v.is_complete());

    // Status.
    let status = a1.agent.status();
    let img = status.images.iter().find(|i| i.name == "img").unwrap();
    assert!((img.progress - 1.0).abs() < 1e-9, "{}", img.progress);
    // The x-virtman:present context: one held run over the whole image.
    let runs = v.present_runs(0, (CHUNKS * CHUNK as usize) as u32);
    assert_eq!(
        runs,
        vec![((CHUNKS * CHUNK as usize) as u64, virtman_cache::PRESENT)]
    );
    // Metrics.
    let stats = a1.agent.member_stats();
    let m = stats.iter().find(|s| s.image == "img").unwrap();
    assert_eq!((m.held_chunks, m.chunks), (CHUNKS as u64, CHUNKS as u64));
    // The coordinator, from heartbeats: complete, a root.
    let client = virtman_coordinator::Client::new(&url, Some(TOKEN.into())).unwrap();
    wait_for("the coordinator to see a1 complete", || async {
        client.tree("img").await.is_ok_and(|t| {
            t.nodes
                .iter()
                .any(|n| n.node == "a1" && n.complete && (n.progress - 1.0).abs() < 1e-9)
        })
    })
    .await;
    // What the base exports served: the origin to its child a1; then a
    // plain reader of a1's export (as an `nbdcopy` would) counts apart.
    let o = origin.agent.status();
    assert!(
        o.served_to_children >= DATA.len() as u64 * u64::from(CHUNK),
        "{o:?}"
    );
    assert_eq!(o.served_to_others, 0);
    let plain = virtman_nbd::Client::connect(
        &virtman_nbd::Endpoint::Tcp(a1.addr.clone()),
        &virtman_nbd::ClientConfig {
            export: "img".into(),
            ..virtman_nbd::ClientConfig::default()
        },
    )
    .await
    .unwrap();
    let got = plain
        .read(5 * u64::from(CHUNK), u64::from(CHUNK))
        .await
        .unwrap();
    assert_eq!(&got[..], &image[5 * CHUNK as usize..6 * CHUNK as usize]);
    let s = a1.agent.status();
    assert_eq!(s.served_to_children, 0, "{s:?}");
    assert_eq!(s.served_to_others, u64::from(CHUNK), "{s:?}");
    drop(vm);
    a1.kill().await;
    origin.kill().await;
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_with_no_image_sees_the_coordinator_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, _task) = serve_coordinator(dir.path().join("coord"), TOKEN, listener);
    let idle = Node::start(
        "idle",
        dir.path().join("idle"),
        &url,
        TOKEN,
        PrefetchConfig::default(),
    )
    .await;
    let t0 = std::time::Instant::now();
    wait_for("the coordinator to be seen", || async {
        idle.agent.status().coordinator_ok
    })
    .await;
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        t0.elapsed()
    );
    idle.kill().await;
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_that_just_joined_learn_their_new_parents_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let image = virtman_testkit::pattern(CHUNKS * CHUNK as usize, 9);
    // Two stripes, heartbeats 5 s apart: of two hosts joining at once,
    // the first relays stripe 0 and is lent stripe 1 until the second
    // joins and takes it back; each then follows the other in the other's
    // stripe. The first learns that only from a heartbeat.
    let config = virtman_coordinator::CoordinatorConfig {
        fanout: 2,
        parents: 1,
        stripes: 2,
        heartbeat_interval_ms: 5000,
        heartbeat_timeout_ms: 20_000,
        ..virtman_coordinator::CoordinatorConfig::default()
    };
    let (url, stop, origin) =
        origin_cluster_with(dir.path(), &image, CHUNK, &[], TOKEN, Some(config), |_| {}).await;
    let (a, b) = (
        member(dir.path(), &url, "a").await,
        member(dir.path(), &url, "b").await,
    );
    let t0 = std::time::Instant::now();
    let (ra, rb) = tokio::join!(
        a.agent.create_vm("vm-a", "img"),
        b.agent.create_vm("vm-b", "img")
    );
    ra.unwrap();
    rb.unwrap();
    let parents = |n: &Node| {
        n.agent
            .status()
            .images
            .into_iter()
            .find(|i| i.name == "img")
            .map(|i| i.parents)
            .unwrap_or_default()
    };
    wait_for("each host to follow the other", || async {
        parents(&a).contains(&"b".to_string()) && parents(&b).contains(&"a".to_string())
    })
    .await;
    assert!(
        t0.elapsed() < std::time::Duration::from_millis(2500),
        "{:?}: a {:?}, b {:?}",
        t0.elapsed(),
        parents(&a),
        parents(&b)
    );
    a.kill().await;
    b.kill().await;
    origin.kill().await;
    stop.cancel();
}
