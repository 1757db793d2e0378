//! Prefetch end to end, in one process: a coordinator, an origin agent and
//! member agents on loopback, VMs read through their snapshot exports with
//! the virtman NBD client.
//!
//! - A host that joins after another host booted fetches that host's boot
//!   profile and prefetches exactly its chunks before any VM reads.
//! - A pin fetches the whole image while a VM reads it (every byte right);
//!   once pinned, the host's reads survive its parents and the origin dying.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use common::{Node, origin_cluster, vm_client, wait_for};
use tokio_util::sync::CancellationToken;
use virtman_agent::prefetch::{PrefetchConfig, fetch_profile};

const CHUNK: u32 = 64 * 1024;
const TOKEN: &str = "prefetch-test-token-0123456789";

struct Cluster {
    dir: tempfile::TempDir,
    url: String,
    coord_stop: CancellationToken,
    image: Vec<u8>,
}

impl Cluster {
    /// A coordinator with fan-out 2 and one parent per host, and an image
    /// `img` of `chunks` chunks.
    async fn start(chunks: usize) -> (Cluster, Node) {
        Cluster::start_with_profile(chunks, &[]).await
    }

    /// The same, with a boot profile of `profile` (chunks in boot order)
    /// stored with the image at the origin, unless it is empty.
    async fn start_with_profile(chunks: usize, profile: &[u64]) -> (Cluster, Node) {
        let dir = tempfile::tempdir().unwrap();
        let image = virtman_testkit::pattern(chunks * CHUNK as usize, 7);
        let (url, coord_stop, origin) =
            origin_cluster(dir.path(), &image, CHUNK, profile, TOKEN, |_| {}).await;
        let c = Cluster {
            dir,
            url,
            coord_stop,
            image,
        };
        (c, origin)
    }

    async fn node(&self, name: &str) -> Node {
        Node::start(
            name,
            self.dir.path().join(name),
            &self.url,
            TOKEN,
            PrefetchConfig::default(),
        )
        .await
    }

    fn manifest(&self) -> virtman_image::Manifest {
        virtman_image::Manifest::load(&self.dir.path().join("origin/images/img/manifest")).unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_host_prefetches_the_boot_profile_before_its_vms_read() {
    let (c, origin) = Cluster::start(32).await;
    let manifest = c.manifest();

    // a1 boots a VM that touches four chunks, in this order.
    let a1 = c.node("a1").await;
    a1.agent.create_vm("vm1", "img").await.unwrap();
    let vm = vm_client(a1.agent.vm_socket(), "vm1").await;
    let order = [9u64, 3, 17, 4];
    for &i in &order {
        let off = i * u64::from(CHUNK) + 1000;
        let got = vm.read(off, 4096).await.unwrap();
        assert_eq!(&got[..], &c.image[off as usize..off as usize + 4096]);
    }
    // Again, and across a chunk boundary already seen: nothing new recorded.
    vm.read(9 * u64::from(CHUNK), 4096).await.unwrap();
    let v1 = a1.agent.volume("img").unwrap();
    assert_eq!(
        v1.boot_profile().chunks().collect::<Vec<_>>(),
        order.to_vec()
    );

    // a1 publishes it as profile/img.
    let a1_addr = vec![a1.addr.clone()];
    wait_for("a1's profile export", || async {
        fetch_profile("img", &manifest, &a1_addr, None)
            .await
            .is_some_and(|p| p.chunks().collect::<Vec<_>>() == order)
    })
    .await;
    // And keeps it in its volume's directory (checked file).
    let file = c.dir.path().join("a1/cache/volumes/img/profile");
    assert!(file.exists(), "no profile file");

    // a2 joins without any VM (beside a1, under the origin: it finds the
    // profile among the session's members): the profile's chunks, and only
    // those, arrive.
    let a2 = c.node("a2").await;
    a2.agent.ensure_image("img").await.unwrap();
    let v2 = a2.agent.volume("img").unwrap();
    let st = v2.stats();
    // The counter follows a chunk's presence by a moment: wait for both.
    wait_for("a2 to prefetch the profile", || async {
        order.iter().all(|&i| v2.is_present(i)) && st.prefetched_chunks.load(Ordering::Relaxed) == 4
    })
    .await;
    assert_eq!(st.misses.load(Ordering::Relaxed), 0, "a read happened");
    assert_eq!(st.hits.load(Ordering::Relaxed), 0, "a read happened");
    assert_eq!(st.prefetched_chunks.load(Ordering::Relaxed), 4);
    assert_eq!(
        st.prefetched_bytes.load(Ordering::Relaxed),
        4 * u64::from(CHUNK)
    );
    assert_eq!(v2.present_list(), vec![3, 4, 9, 17]);
    let status = a2.agent.status();
    let p = status.images[0].prefetch.clone().unwrap();
    assert_eq!(p.profile_chunks, 4);
    assert_eq!(p.prefetched_chunks, 4);
    // Until its own VMs touch anything, a2 passes the inherited profile on.
    let a2_addr = vec![a2.addr.clone()];
    wait_for("a2's profile export", || async {
        fetch_profile("img", &manifest, &a2_addr, None)
            .await
            .is_some_and(|p| p.chunks().collect::<Vec<_>>() == order)
    })
    .await;

    // A VM on a2 then boots from local chunks only.
    a2.agent.create_vm("vm2", "img").await.unwrap();
    let vm2 = vm_client(a2.agent.vm_socket(), "vm2").await;
    for &i in &order {
        let off = i * u64::from(CHUNK);
        let got = vm2.read(off, u64::from(CHUNK)).await.unwrap();
        assert_eq!(
            &got[..],
            &c.image[off as usize..(off + u64::from(CHUNK)) as usize]
        );
    }
    assert_eq!(st.misses.load(Ordering::Relaxed), 0);
    // The metrics show it.
    let text = {
        let mut reg = prometheus_client::registry::Registry::default();
        reg.register_collector(Box::new(virtman_agent::metrics::AgentCollector::new(
            Arc::clone(&a2.agent),
        )));
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &reg).unwrap();
        s
    };
    assert!(
        text.contains("prefetched_chunks_total{image=\"img\"} 4"),
        "{text}"
    );
    assert!(
        text.contains("cache_disk_errors_total{image=\"img\"} 0"),
        "{text}"
    );

    let _ = vm.disconnect().await;
    let _ = vm2.disconnect().await;
    a2.kill().await;
    a1.kill().await;
    origin.kill().await;
    c.coord_stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_prefetch_the_profile_stored_with_the_image_at_the_origin() {
    // As `virtman image profile` leaves it: the image's first boot is known
    // before any host of this cluster has booted it.
    let order = [12u64, 0, 7, 30, 5];
    let (c, origin) = Cluster::start_with_profile(32, &order).await;
    let manifest = c.manifest();
    let from_origin = vec![origin.addr.clone()];
    let got = fetch_profile("img", &manifest, &from_origin, None)
        .await
        .unwrap();
    assert_eq!(got.chunks().collect::<Vec<_>>(), order);

    // A host joins with no VM: exactly the profile's chunks arrive, through
    // the origin, once each.
    let a1 = c.node("a1").await;
    a1.agent.ensure_image("img").await.unwrap();
    let v1 = a1.agent.volume("img").unwrap();
    wait_for("a1 to prefetch the profile", || async {
        order.iter().all(|&i| v1.is_present(i))
    })
    .await;
    let mut sorted = order.to_vec();
    sorted.sort_unstable();
    assert_eq!(v1.present_list(), sorted);
    assert_eq!(v1.stats().misses.load(Ordering::Relaxed), 0);
    let sent = origin.agent.status().images[0].sent.unwrap();
    assert_eq!(sent.chunks_sent, order.len() as u64);
    assert_eq!(sent.max_per_chunk, 1);
    // The next host below it gets the profile and the chunks from a1.
    let a2 = c.node("a2").await;
    a2.agent.ensure_image("img").await.unwrap();
    let v2 = a2.agent.volume("img").unwrap();
    wait_for("a2 to prefetch the profile", || async {
        order.iter().all(|&i| v2.is_present(i))
    })
    .await;
    let sent = origin.agent.status().images[0].sent.unwrap();
    assert_eq!(sent.max_per_chunk, 1, "a2 went to the origin");

    a2.kill().await;
    a1.kill().await;
    origin.kill().await;
    c.coord_stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_host_reads_right_while_pinning_and_survives_its_parents() {
    let (c, origin) = Cluster::start(128).await;
    let size = c.image.len() as u64;
    let a1 = c.node("a1").await;
    a1.agent.ensure_image("img").await.unwrap();
    let a2 = c.node("a2").await;
    a2.agent.create_vm("vm2", "img").await.unwrap();
    let vm = vm_client(a2.agent.vm_socket(), "vm2").await;

    // Pin through the control API (as `virtman image pin` does), and read
    // the back half of the image through the VM at the same time (from the
    // end, towards the pin, which goes from the start).
    let sock = c.dir.path().join("a2/agent.sock");
    let control = tokio::spawn(virtman_agent::control::serve(
        Arc::clone(&a2.agent),
        virtman_agent::control::bind(&sock, None).unwrap(),
        sock.clone(),
        a2.stop.clone(),
    ));
    let ctl = virtman_agent::control::ControlClient::new(sock);
    ctl.pin("img").await.unwrap();
    let step = 3 * u64::from(CHUNK) / 2;
    let mut off = size;
    while off > size / 2 {
        let start = off.saturating_sub(step).max(size / 2);
        let got = vm.read(start, off - start).await.unwrap();
        assert!(
            got[..] == c.image[start as usize..off as usize],
            "wrong bytes at {start}"
        );
        off = start;
    }
    let v2 = a2.agent.volume("img").unwrap();
    wait_for("the pin to finish", || async {
        ctl.status().await.unwrap().images[0]
            .prefetch
            .as_ref()
            .is_some_and(|p| p.pinned && p.pin_done)
    })
    .await;
    assert_eq!(v2.present_chunks(), 128);
    assert!((a2.agent.status().images[0].progress - 1.0).abs() < 1e-9);
    assert_eq!(v2.verify_present().unwrap(), Vec::<u64>::new());

    // Its parent and the origin die; every read still succeeds.
    let _ = vm.disconnect().await;
    a1.kill().await;
    origin.kill().await;
    let vm = vm_client(a2.agent.vm_socket(), "vm2").await;
    let all = vm.read(0, size).await.unwrap();
    assert!(all[..] == c.image[..], "wrong bytes after the parents died");

    // Pinning again is a no-op; an unknown image is refused, by name.
    ctl.pin("img").await.unwrap();
    let err = ctl.pin("nope").await.unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
    let _ = vm.disconnect().await;
    a2.kill().await;
    control.await.unwrap().unwrap();
    c.coord_stop.cancel();
}
