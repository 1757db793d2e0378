//! Preheat end to end, in one process: a coordinator, an origin holding an
//! image with a boot profile, and hosts with labels on loopback.
//!
//! - Labels select three of six hosts: those hold the profile's chunks
//!   before any VM exists, the others hold nothing; the origin sent each
//!   chunk once; a host that comes later with the label preheats too.
//! - A cancelled preheat stops fetching.
//! - Bad input: an unknown image, a selector that matches no host; an image
//!   larger than one host's cache fails there and the rest go on.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Node, origin_cluster, wait_for};
use tokio_util::sync::CancellationToken;
use virtman_cache::FetchClass;
use virtman_coordinator::api::{PreheatRequest, PreheatState};

const CHUNK: u32 = 64 * 1024;
const CHUNKS: usize = 48;
const PROFILE: [u64; 6] = [7, 2, 30, 11, 40, 3];
const TOKEN: &str = "preheat-test-token-0123456789abc";

struct Cluster {
    dir: tempfile::TempDir,
    url: String,
    _stop: CancellationToken,
    client: virtman_coordinator::Client,
}

async fn cluster() -> (Cluster, Node) {
    let dir = tempfile::tempdir().unwrap();
    let image = virtman_testkit::pattern(CHUNKS * CHUNK as usize, 5);
    let (url, stop, origin) =
        origin_cluster(dir.path(), &image, CHUNK, &PROFILE, TOKEN, |_| {}).await;
    let client = virtman_coordinator::Client::new(&url, Some(TOKEN.into())).unwrap();
    (
        Cluster {
            dir,
            url,
            _stop: stop,
            client,
        },
        origin,
    )
}

impl Cluster {
    async fn host(
        &self,
        name: &str,
        rack: &str,
        edit: impl FnOnce(&mut virtman_agent::AgentConfig),
    ) -> Node {
        let rack = rack.to_owned();
        Node::start_edited(
            name,
            self.dir.path().join(name),
            &self.url,
            TOKEN,
            move |c| {
                c.labels.insert("rack".into(), rack);
                edit(c);
            },
        )
        .await
    }

    /// Waits until every host the order concerns is in `state`, and returns
    /// their names.
    async fn wait_all(&self, n: usize, state: PreheatState) -> Vec<String> {
        wait_for("the preheat's hosts", || async {
            self.client
                .preheat_status("img")
                .await
                .is_ok_and(|s| s.hosts.len() == n && s.hosts.iter().all(|h| h.state == state))
        })
        .await;
        let s = self.client.preheat_status("img").await.unwrap();
        s.hosts.into_iter().map(|h| h.node).collect()
    }
}

fn labels(rack: &str) -> BTreeMap<String, String> {
    [("rack".to_owned(), rack.to_owned())].into()
}

/// Waits until the coordinator has heard from every host (it knows hosts,
/// and their labels, from their heartbeats).
async fn wait_seen(hosts: &[&Node]) {
    for h in hosts {
        wait_for("a host's first heartbeat", || async {
            h.agent.status().coordinator_ok
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_pick_the_hosts_that_preheat_and_latecomers_join_in() {
    let (c, origin) = cluster().await;
    let mut hosts = Vec::new();
    for i in 1..=6 {
        let rack = if i <= 3 { "r1" } else { "r2" };
        hosts.push(c.host(&format!("h{i}"), rack, |_| {}).await);
    }
    wait_seen(&hosts.iter().collect::<Vec<_>>()).await;

    // Bad input first: an unknown image; a selector no host matches.
    let e = c
        .client
        .preheat("nope", &PreheatRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("unknown_image"), "{e}");
    let e = c
        .client
        .preheat(
            "img",
            &PreheatRequest {
                labels: labels("r9"),
                ..PreheatRequest::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("no_host"), "{e}");
    let e = c.client.preheat_status("img").await.unwrap_err();
    assert_eq!(e.code(), Some("no_preheat"), "{e}");

    let s = c
        .client
        .preheat(
            "img",
            &PreheatRequest {
                labels: labels("r1"),
                ..PreheatRequest::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(s.hosts.len(), 3, "{s:?}");
    let done = c.wait_all(3, PreheatState::Done).await;
    assert_eq!(done, ["h1", "h2", "h3"]);
    let mut profile = PROFILE.to_vec();
    profile.sort_unstable();
    for h in &hosts[..3] {
        let v = h
            .agent
            .volume("img")
            .expect("a preheated host holds a volume");
        assert_eq!(v.present_list(), profile, "{}", h.agent.name());
        assert!(h.agent.list_vms().is_empty());
        // Counted as preheat, not as prefetch.
        let caps = h.agent.caps();
        assert!(caps.fetched(FetchClass::Preheat) >= PROFILE.len() as u64 * u64::from(CHUNK));
        assert_eq!(caps.fetched(FetchClass::Prefetch), 0);
    }
    for h in &hosts[3..] {
        assert!(
            h.agent.volume("img").is_none(),
            "{} preheated",
            h.agent.name()
        );
    }
    // Each profile chunk left the origin once: to the relay head.
    let sent = origin.agent.origin_counts("img").unwrap();
    assert_eq!(sent.chunks_sent, PROFILE.len() as u64);
    assert_eq!(sent.max_per_chunk, 1);

    // A latecomer with the label preheats too.
    let late = c.host("h7", "r1", |_| {}).await;
    let done = c.wait_all(4, PreheatState::Done).await;
    assert!(done.contains(&"h7".to_owned()));
    assert_eq!(late.agent.volume("img").unwrap().present_list(), profile);

    c.client.cancel_preheat("img").await.unwrap();
    let e = c.client.cancel_preheat("img").await.unwrap_err();
    assert_eq!(e.code(), Some("no_preheat"), "{e}");
    late.kill().await;
    for h in hosts {
        h.kill().await;
    }
    origin.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_preheat_stops_and_a_host_too_small_fails_alone() {
    let (c, origin) = cluster().await;
    // h1 fetches slowly (the image takes it 7 s); h2's cache is smaller than the image.
    let h1 = c
        .host("h1", "r1", |a| {
            a.caps = std::sync::Arc::new(virtman_agent::caps::Caps::new(
                virtman_agent::caps::CapRates {
                    upload: None,
                    download: Some(300_000),
                },
            ));
        })
        .await;
    let h2 = c
        .host("h2", "r1", |a| {
            a.cache = virtman_cache::GroupConfig::with_capacity(1 << 20);
        })
        .await;
    let h3 = c.host("h3", "r1", |_| {}).await;
    wait_seen(&[&h1, &h2, &h3]).await;
    c.client
        .preheat(
            "img",
            &PreheatRequest {
                labels: labels("r1"),
                whole: true,
                ..PreheatRequest::default()
            },
        )
        .await
        .unwrap();
    // h3 finishes, h2 fails saying why, h1 is still at it.
    wait_for("h3 done and h2 failed", || async {
        c.client.preheat_status("img").await.is_ok_and(|s| {
            let st = |n: &str| s.hosts.iter().find(|h| h.node == n).map(|h| h.state);
            st("h3") == Some(PreheatState::Done) && st("h2") == Some(PreheatState::Failed)
        })
    })
    .await;
    let s = c.client.preheat_status("img").await.unwrap();
    let h2s = s.hosts.iter().find(|h| h.node == "h2").unwrap();
    assert!(h2s.message.contains("does not fit"), "{h2s:?}");
    assert!(h3.agent.volume("img").unwrap().is_complete());
    let v1 = h1.agent.volume("img").unwrap();
    assert!(!v1.is_complete(), "h1 is capped: it cannot be done yet");

    // Cancel: h1's preheat stops fetching. The few fetches it had in flight
    // (two at a time, each at most a few attempts) may still land, at the
    // cap's pace and behind demand; the rest of the image is never asked
    // for. (What h1 fetches on demand for its children, it fetches as any
    // host does.)
    let at_cancel = h1.agent.caps().fetched(FetchClass::Preheat);
    c.client.cancel_preheat("img").await.unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after = h1.agent.caps().fetched(FetchClass::Preheat);
    assert!(
        after <= at_cancel + 8 * u64::from(CHUNK),
        "h1's preheat went on after the cancel: {at_cancel} then {after} bytes"
    );
    assert!(
        after < v1.manifest().size(),
        "the preheat was stopped early"
    );
    for h in [h1, h2, h3] {
        h.kill().await;
    }
    origin.kill().await;
}
