//! Bandwidth caps end to end, in one process: a coordinator, an origin and a
//! member on loopback.
//!
//! - A capped origin never sends faster than its cap (bytes at most rate x
//!   time plus the burst, an upper bound a slow machine cannot fail), and the
//!   cap holds the transfer back (it takes at least the time the cap allows).
//! - On a host whose download is capped, a VM's reads finish while a
//!   preheat of the whole image is still running: demand goes first.
//! - Caps change at run time through the control API; 0 is refused.
#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss
)]

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{Node, origin_cluster, vm_client, wait_for};
use tokio_util::sync::CancellationToken;
use virtman_agent::caps::{BURST, CapRates};
use virtman_agent::control::ControlClient;
use virtman_cache::FetchClass;

const CHUNK: u32 = 64 * 1024;
const CHUNKS: usize = 64;
const TOKEN: &str = "caps-test-token-0123456789abcdef";

struct Cluster {
    dir: tempfile::TempDir,
    url: String,
    _coord_stop: CancellationToken,
    image: Vec<u8>,
}

async fn cluster(origin_caps: CapRates) -> (Cluster, Node) {
    let dir = tempfile::tempdir().unwrap();
    let image = virtman_testkit::pattern(CHUNKS * CHUNK as usize, 11);
    let (url, stop, origin) = origin_cluster(dir.path(), &image, CHUNK, &[], TOKEN, |c| {
        c.caps = std::sync::Arc::new(virtman_agent::caps::Caps::new(origin_caps));
    })
    .await;
    (
        Cluster {
            dir,
            url,
            _coord_stop: stop,
            image,
        },
        origin,
    )
}

impl Cluster {
    async fn node(&self, name: &str, caps: CapRates) -> Node {
        Node::start_capped(name, self.dir.path().join(name), &self.url, TOKEN, caps).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capped_origin_never_sends_faster_than_its_cap() {
    let rate = 2_000_000u64;
    let (c, origin) = cluster(CapRates {
        upload: Some(rate),
        download: None,
    })
    .await;
    let a1 = c.node("a1", CapRates::default()).await;
    a1.agent.create_vm("vm1", "img").await.unwrap();
    let vm = vm_client(a1.agent.vm_socket(), "vm1").await;
    let sent = || {
        origin
            .agent
            .base_server()
            .stats()
            .bytes_read
            .load(Ordering::Relaxed)
    };
    let before = sent();
    let t0 = Instant::now();
    // Eight readers over the whole image at once.
    let size = (CHUNKS * CHUNK as usize) as u64;
    let mut set = tokio::task::JoinSet::new();
    for k in 0..8u64 {
        let vm = vm.clone();
        set.spawn(async move {
            let part = size / 8;
            (k * part, vm.read(k * part, part).await.unwrap())
        });
    }
    while let Some(r) = set.join_next().await {
        let (off, got) = r.unwrap();
        assert_eq!(&got[..], &c.image[off as usize..off as usize + got.len()]);
    }
    let secs = t0.elapsed().as_secs_f64();
    let bytes = sent() - before;
    assert!(bytes >= size, "the origin sent {bytes} of {size}");
    let bound = rate as f64 * secs + BURST as f64;
    assert!(
        (bytes as f64) <= bound,
        "sent {bytes} in {secs:.2} s: above {bound:.0}"
    );
    // And it held the transfer back: at least (size - burst) / rate.
    let least = (size - BURST) as f64 / rate as f64;
    assert!(
        secs >= least * 0.95,
        "{secs:.2} s, the cap allows no less than {least:.2} s"
    );
    assert!(origin.agent.caps().upload_waited() > Duration::ZERO);
    a1.kill().await;
    origin.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demand_reads_on_a_capped_host_finish_while_a_preheat_runs() {
    let (c, origin) = cluster(CapRates::default()).await;
    // 1 MB/s: fetching the whole 4 MiB image needs at least 3 s.
    let a1 = c
        .node(
            "a1",
            CapRates {
                upload: None,
                download: Some(1_000_000),
            },
        )
        .await;
    a1.agent.create_vm("vm1", "img").await.unwrap();
    let vm = vm_client(a1.agent.vm_socket(), "vm1").await;
    wait_for("a1's first heartbeat", || async {
        a1.agent.status().coordinator_ok
    })
    .await;
    let client = virtman_coordinator::Client::new(&c.url, Some(TOKEN.into())).unwrap();
    client
        .preheat(
            "img",
            &virtman_coordinator::api::PreheatRequest {
                hosts: vec!["a1".into()],
                whole: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let caps = a1.agent.caps();
    wait_for("the preheat to start", || async {
        caps.fetched(FetchClass::Preheat) > 0
    })
    .await;
    let v = a1.agent.volume("img").unwrap();
    // The last eight chunks, the preheat's last to reach.
    let t0 = Instant::now();
    for i in (CHUNKS - 8)..CHUNKS {
        let off = (i * CHUNK as usize) as u64 + 100;
        let got = vm.read(off, 4096).await.unwrap();
        assert_eq!(&got[..], &c.image[off as usize..off as usize + 4096]);
    }
    let took = t0.elapsed();
    let held = v.present_chunks();
    assert!(
        held < CHUNKS as u64,
        "the preheat finished ({held} chunks) before 8 demand reads did ({took:?})"
    );
    assert!(caps.fetched(FetchClass::Demand) >= 8 * u64::from(CHUNK));
    wait_for("the preheat to finish", || async {
        v.present_chunks() == CHUNKS as u64
    })
    .await;
    assert!(
        caps.download_waited(FetchClass::Preheat) > caps.download_waited(FetchClass::Demand),
        "preheat {:?}, demand {:?}",
        caps.download_waited(FetchClass::Preheat),
        caps.download_waited(FetchClass::Demand)
    );
    a1.kill().await;
    origin.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caps_change_at_run_time_and_zero_is_refused() {
    let (c, origin) = cluster(CapRates::default()).await;
    // 100 kB/s: the pin alone would take 40 s.
    let a1 = c
        .node(
            "a1",
            CapRates {
                upload: None,
                download: Some(100_000),
            },
        )
        .await;
    let sock = c.dir.path().join("a1-control.sock");
    let listener = virtman_agent::control::bind(&sock, None).unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(virtman_agent::control::serve(
        std::sync::Arc::clone(&a1.agent),
        listener,
        sock.clone(),
        stop.clone(),
    ));
    let ctl = ControlClient::new(&sock);
    assert_eq!(ctl.caps().await.unwrap().download, Some(100_000));
    let e = ctl
        .set_caps(CapRates {
            upload: Some(0),
            download: None,
        })
        .await
        .unwrap_err();
    assert!(e.to_string().contains("stop all traffic"), "{e}");
    assert_eq!(
        ctl.caps().await.unwrap().download,
        Some(100_000),
        "unchanged"
    );

    a1.agent.pin_image("img").await.unwrap();
    let v = a1.agent.volume("img").unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(v.present_chunks() < CHUNKS as u64 / 2);
    // Lift the cap during the pin: it finishes soon after.
    let t0 = Instant::now();
    let now = ctl
        .set_caps(CapRates {
            upload: Some(5_000_000),
            download: None,
        })
        .await
        .unwrap();
    assert_eq!(
        now,
        CapRates {
            upload: Some(5_000_000),
            download: None
        }
    );
    wait_for("the pin to finish", || async {
        v.present_chunks() == CHUNKS as u64
    })
    .await;
    assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
    let metrics = ctl.metrics().await.unwrap();
    assert!(
        metrics.contains("virtman_cap_bytes_per_second{direction=\"upload\"} 5000000"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("direction=\"download\"} "),
        "no download cap any more"
    );
    stop.cancel();
    a1.kill().await;
    origin.kill().await;
}
