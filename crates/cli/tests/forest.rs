//! A striped forest end to end on loopback: a coordinator with `--stripes
//! 2`, an origin and eight member agents as real processes (the cluster of
//! `cluster.rs`), VMs on every host reading the image through their
//! snapshots.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod harness;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use harness::{CHUNK, Cluster, read_vm};
use virtman_testkit::pattern;

const HOSTS: usize = 8;

/// The cluster with every host joined (a VM each) and its parent lists
/// settled (a few heartbeats), before anything is read. `agent` arguments
/// go to every member.
fn striped(size: usize, agent: &[&str]) -> (Cluster, Vec<PathBuf>) {
    let c = Cluster::with_args(HOSTS, pattern(size, 23), agent, &["--stripes", "2"]);
    let socks = (1..=HOSTS)
        .map(|i| c.vm_create(i, &format!("vm{i}")))
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    (c, socks)
}

/// Each member's home stripe, from the coordinator's tree.
fn homes(c: &Cluster) -> BTreeMap<String, u64> {
    let t = c.tree().unwrap();
    t["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| !n["origin"].as_bool().unwrap())
        .map(|n| {
            assert_eq!(n["stripe_parents"].as_array().unwrap().len(), 2, "{n}");
            (
                n["node"].as_str().unwrap().to_owned(),
                n["home"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_host_relays_its_own_stripe_and_the_origin_sends_each_chunk_once() {
    // Without hedges: a parent slow for a moment on two busy cores would
    // have the chunk asked of the next source too, the origin last, and the
    // count below would measure the machine's load, not the forest.
    let (c, socks) = striped(8 << 20, &["--no-hedge"]);
    let homes = homes(&c);
    assert_eq!(homes.len(), HOSTS);
    assert_eq!(homes.values().filter(|&&h| h == 0).count(), HOSTS / 2);
    let mut reads = tokio::task::JoinSet::new();
    for (i, sock) in socks.iter().enumerate() {
        let (size, export) = (c.image.len(), format!("vm{}", i + 1));
        reads.spawn(read_vm(sock.clone(), export, size, Arc::default()));
    }
    while let Some(r) = reads.join_next().await {
        assert!(
            r.unwrap() == c.image,
            "a VM read bytes that differ from the image"
        );
    }
    // The origin fed one head per stripe: each chunk left it once.
    let origin = c.control("origin").status().await.unwrap();
    let sent = origin.images[0].sent.unwrap();
    let chunks = (c.image.len() / CHUNK) as u64;
    assert_eq!(sent.chunks_sent, chunks);
    assert_eq!(sent.max_per_chunk, 1, "origin sent a chunk twice: {sent:?}");
    // Every chunk a host fetched from a member came from a relay of the
    // chunk's stripe: what each host served its children is its own stripe.
    let mut served: BTreeMap<String, [u64; 2]> = BTreeMap::new();
    for i in 1..=HOSTS {
        let s = c.control(&format!("a{i}")).status().await.unwrap();
        let img = &s.images[0];
        assert!((img.progress - 1.0).abs() < 1e-9);
        for (source, stripe, n) in &img.fetched_by_stripe {
            if let Some(&home) = homes.get(source) {
                served.entry(source.clone()).or_default()[*stripe as usize] += n;
                assert_eq!(
                    u64::from(*stripe),
                    home,
                    "a{i} fetched {n} chunks of stripe {stripe} from {source}, a relay of stripe {home}"
                );
            }
        }
    }
    // Relays of both stripes served (the forest is not one tree in disguise).
    let relaying: Vec<u64> = served.keys().map(|s| homes[s]).collect();
    assert!(relaying.contains(&0) && relaying.contains(&1), "{served:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_mid_read_changes_nothing_a_vm_sees() {
    let (mut c, socks) = striped(16 << 20, &[]);
    let t = c.tree().unwrap();
    // A member that relays its stripe to children: the one to kill.
    let victim = t["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| !n["origin"].as_bool().unwrap() && n["children"].as_u64().unwrap() > 0)
        .map(|n| n["node"].as_str().unwrap().to_owned())
        .expect("a relay with children");
    let victim_i: usize = victim[1..].parse().unwrap();
    c.kill_mid_read(&socks, victim_i, 8 << 20).await;
    // The coordinator repairs every stripe: nobody keeps the victim.
    c.wait_for(
        |c| {
            let t = c.tree().unwrap();
            t["nodes"].as_array().unwrap().iter().all(|n| {
                n["node"] != victim.as_str()
                    && n["stripe_parents"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .flat_map(|l| l.as_array().unwrap())
                        .all(|p| p != victim.as_str())
            })
        },
        "every stripe to be repaired",
    );
}
