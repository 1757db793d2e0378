//! Restarting an agent while the coordinator is down, in one process: a
//! coordinator (stopped and started again on the same address), an origin
//! agent and member agents on loopback, VMs read through their snapshot
//! exports with the virtman NBD client.
//!
//! - A host that held part of an image restarts while the coordinator is
//!   down: its VM reads the whole image right at once, the absent chunks
//!   coming from the parent it saved and, once that parent dies too, the
//!   origin it saved; when the coordinator is back the host joins again and
//!   the coordinator's list replaces the saved one.
//! - A damaged saved file is refused with a clear error; the host still
//!   starts, and serves the image once the coordinator answers.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{Node, serve_coordinator, vm_client, wait_for, wait_for_image};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use virtman_agent::known::{KnownUpstream, known_path};
use virtman_agent::prefetch::PrefetchConfig;
use virtman_image::ImageStore;
use virtman_nbd::Client;

const CHUNK: u32 = 64 * 1024;
const CHUNKS: usize = 32;
const TOKEN: &str = "restart-test-token-0123456789";

struct Cluster {
    dir: tempfile::TempDir,
    coord_addr: SocketAddr,
    url: String,
    coord: Option<(CancellationToken, JoinHandle<()>)>,
    image: Vec<u8>,
}

impl Cluster {
    /// A coordinator with fan-out 2 and one parent per host, and an origin
    /// serving image `img`.
    async fn start() -> (Cluster, Node) {
        let dir = tempfile::tempdir().unwrap();
        let image = virtman_testkit::pattern(CHUNKS * CHUNK as usize, 11);
        let raw = dir.path().join("img.raw");
        std::fs::write(&raw, &image).unwrap();
        ImageStore::open(dir.path().join("origin/images"))
            .unwrap()
            .import(&raw, "img", CHUNK, &mut |_, _| {})
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let coord_addr = listener.local_addr().unwrap();
        let mut c = Cluster {
            dir,
            coord_addr,
            url: format!("http://{coord_addr}"),
            coord: None,
            image,
        };
        c.coord = Some(serve_coordinator(
            c.dir.path().join("coord"),
            TOKEN,
            listener,
        ));
        let origin = c.node("origin").await;
        wait_for_image(&c.url, "img").await;
        (c, origin)
    }

    async fn stop_coordinator(&mut self) {
        let (stop, task) = self.coord.take().unwrap();
        stop.cancel();
        task.await.unwrap();
    }

    /// Starts the coordinator again on the same address, from its data.
    async fn restart_coordinator(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match tokio::net::TcpListener::bind(self.coord_addr).await {
                Ok(l) => break l,
                Err(e) => {
                    assert!(Instant::now() < deadline, "rebinding the coordinator: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        self.coord = Some(serve_coordinator(
            self.dir.path().join("coord"),
            TOKEN,
            listener,
        ));
    }

    fn data_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    async fn node(&self, name: &str) -> Node {
        // No background prefetch: every chunk a VM reads is a demand fetch.
        Node::start(
            name,
            self.data_dir(name),
            &self.url,
            TOKEN,
            PrefetchConfig {
                profile: false,
                ..PrefetchConfig::default()
            },
        )
        .await
    }

    fn digest(&self) -> String {
        virtman_image::Manifest::load(&self.dir.path().join("origin/images/img/manifest"))
            .unwrap()
            .id()
            .to_hex()
    }

    /// The saved upstream of `img` on `node`, if any and valid.
    fn saved(&self, node: &str) -> Option<KnownUpstream> {
        KnownUpstream::load(
            &known_path(&self.data_dir(node), "img"),
            "img",
            &self.digest(),
        )
        .ok()
        .flatten()
    }

    /// Reads chunks `range` through `vm` and checks every byte.
    async fn read_chunks(&self, vm: &Client, range: std::ops::Range<usize>) {
        for i in range {
            let off = i * CHUNK as usize;
            let got = vm.read(off as u64, u64::from(CHUNK)).await.unwrap();
            assert!(
                got[..] == self.image[off..off + CHUNK as usize],
                "chunk {i}: wrong bytes"
            );
        }
    }
}

fn parents(node: &Node) -> Option<Vec<String>> {
    node.agent
        .status()
        .images
        .into_iter()
        .find(|i| i.name == "img")
        .map(|i| i.parents)
}

fn fetched_from(node: &Node, source: &str) -> u64 {
    let status = node.agent.status();
    let img = status.images.iter().find(|i| i.name == "img").unwrap();
    img.fetched
        .iter()
        .filter(|(n, _, _)| n == source)
        .map(|(_, _, b)| b)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_restarted_while_the_coordinator_is_down_reads_from_its_saved_parents() {
    let (mut c, origin) = Cluster::start().await;

    // a1 holds the whole image; a2, its child, holds the first quarter.
    let a1 = c.node("a1").await;
    a1.agent.create_vm("vm1", "img").await.unwrap();
    let vm1 = vm_client(a1.agent.vm_socket(), "vm1").await;
    c.read_chunks(&vm1, 0..CHUNKS).await;
    vm1.disconnect().await.unwrap();
    let a2 = c.node("a2").await;
    a2.agent.create_vm("vm2", "img").await.unwrap();
    wait_for("a2 to have a1 as parent", || async {
        parents(&a2) == Some(vec!["a1".to_string()])
    })
    .await;
    let vm2 = vm_client(a2.agent.vm_socket(), "vm2").await;
    c.read_chunks(&vm2, 0..CHUNKS / 4).await;
    vm2.disconnect().await.unwrap();
    // What the coordinator said is on disk.
    wait_for("a2 to save its parent", || async {
        c.saved("a2").is_some_and(|k| {
            k.parents.iter().map(|p| p.name.as_str()).eq(["a1"]) && k.origins.len() == 1
        })
    })
    .await;

    // The coordinator stops; a2 restarts without it.
    c.stop_coordinator().await;
    a2.kill().await;
    let a2 = c.node("a2").await;
    let vm2 = vm_client(a2.agent.vm_socket(), "vm2").await;
    // Up to half: the chunks a2 lacks come from its saved parent.
    c.read_chunks(&vm2, 0..CHUNKS / 2).await;
    assert_eq!(parents(&a2), Some(vec!["a1".to_string()]));
    assert_eq!(
        fetched_from(&a2, "a1"),
        (CHUNKS / 4) as u64 * u64::from(CHUNK)
    );
    assert!(
        !a2.agent.status().coordinator_ok,
        "the coordinator is down, yet the status says it answered"
    );
    assert!(a2.agent.status().images[0].on_saved_parents);
    // The saved parent dies too: the rest comes from the saved origin.
    a1.kill().await;
    c.read_chunks(&vm2, CHUNKS / 2..CHUNKS).await;
    assert_eq!(
        fetched_from(&a2, "origin:0"),
        (CHUNKS / 2) as u64 * u64::from(CHUNK)
    );
    // The whole image once more, now all local.
    let all = vm2.read(0, (CHUNKS * CHUNK as usize) as u64).await.unwrap();
    assert!(all[..] == c.image[..], "wrong bytes in the whole image");
    assert!(!a2.agent.status().coordinator_ok);

    // The coordinator comes back: a2 joins again, and the coordinator's
    // list (a1 is dead: no parent) replaces the saved one, on disk too.
    c.restart_coordinator().await;
    wait_for("a2 to reach the coordinator again", || async {
        a2.agent.status().coordinator_ok
    })
    .await;
    wait_for("a2 to join again", || async {
        !a2.agent.status().images[0].on_saved_parents
    })
    .await;
    wait_for(
        "the coordinator's list to replace the saved one",
        || async { parents(&a2).is_some_and(|p| !p.contains(&"a1".to_string())) },
    )
    .await;
    wait_for("the new list to be saved", || async {
        c.saved("a2")
            .is_some_and(|k| k.parents.iter().all(|p| p.name != "a1"))
    })
    .await;
    let client = virtman_coordinator::Client::new(&c.url, None).unwrap();
    let tree = client.tree("img").await.unwrap();
    assert!(tree.nodes.iter().any(|n| n.node == "a2"), "{tree:?}");

    vm2.disconnect().await.unwrap();
    a2.kill().await;
    origin.kill().await;
    c.stop_coordinator().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_saved_upstream_is_refused_and_the_host_still_starts() {
    let (mut c, origin) = Cluster::start().await;
    let a1 = c.node("a1").await;
    a1.agent.create_vm("vm1", "img").await.unwrap();
    let vm1 = vm_client(a1.agent.vm_socket(), "vm1").await;
    c.read_chunks(&vm1, 0..4).await;
    vm1.disconnect().await.unwrap();
    wait_for("a1 to save its upstream", || async {
        c.saved("a1").is_some()
    })
    .await;

    c.stop_coordinator().await;
    a1.kill().await;
    // One flipped bit in the body.
    let path = known_path(&c.data_dir("a1"), "img");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[40] ^= 0x04;
    std::fs::write(&path, &bytes).unwrap();
    let err = KnownUpstream::load(&path, "img", &c.digest())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&path.display().to_string()) && err.contains("damaged"),
        "{err}"
    );

    // The host starts anyway, with its VM, and waits for the coordinator
    // for the image (as without a saved file).
    let a1 = c.node("a1").await;
    let vm1 = vm_client(a1.agent.vm_socket(), "vm1").await;
    let status = a1.agent.status();
    assert_eq!(status.vms.len(), 1);
    assert!(status.images.iter().all(|i| i.name != "img"), "{status:?}");

    // The coordinator comes back: the host joins, its VM reads everything,
    // and a good file replaces the damaged one.
    c.restart_coordinator().await;
    wait_for("a1 to join again", || async {
        a1.agent.status().coordinator_ok && parents(&a1).is_some()
    })
    .await;
    c.read_chunks(&vm1, 0..CHUNKS).await;
    wait_for("a good file to replace the damaged one", || async {
        c.saved("a1").is_some()
    })
    .await;

    vm1.disconnect().await.unwrap();
    a1.kill().await;
    origin.kill().await;
    c.stop_coordinator().await;
}
