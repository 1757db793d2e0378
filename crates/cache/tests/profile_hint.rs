//! Boot profiles recorded through snapshots and kept across a reopen,
//! CMD_CACHE hints from a VM fetched in the background, and which waiting
//! reads a profile replay yields to.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use common::*;
use virtman_cache::{CacheGroup, CachedVolume, ChunkRequest, GroupConfig, Upstream, UpstreamError};
use virtman_nbd::Export;

const CHUNK: u32 = 16384;

fn group(dir: &std::path::Path) -> CacheGroup {
    CacheGroup::open(dir, GroupConfig::with_capacity(1 << 30)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_reads_record_first_touches_and_the_profile_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let data = image_bytes(5, 16 * CHUNK as usize, CHUNK as usize);
    let m = virtman_image::Manifest::of_bytes(&data, CHUNK).unwrap();
    {
        let g = group(dir.path());
        let v = g.add_volume("img", &m).unwrap();
        v.set_upstream(Some(MemUpstream::new(data.clone()) as Arc<dyn Upstream>));
        let s = g.create_snapshot("vm", "img").unwrap();
        // A write first: reads of written blocks do not touch the base.
        Export::write(
            &*s,
            2 * u64::from(CHUNK),
            Bytes::from(vec![7u8; 4096]),
            false,
        )
        .await
        .unwrap();
        s.read(2 * u64::from(CHUNK), 4096).await.unwrap();
        // Reads spanning chunks 6-7, then 1, then 7 again, then 8 (all
        // zero: nothing to fetch, so not in the profile).
        s.read(7 * u64::from(CHUNK) - 100, 200).await.unwrap();
        s.read(u64::from(CHUNK), 10).await.unwrap();
        s.read(7 * u64::from(CHUNK), 10).await.unwrap();
        s.read(8 * u64::from(CHUNK), 10).await.unwrap();
        assert_eq!(v.boot_profile().chunks().collect::<Vec<_>>(), vec![6, 7, 1]);
        // Reads of the volume itself (children, prefetch) are not boot reads.
        v.read(12 * u64::from(CHUNK), 10).await.unwrap();
        v.prefetch(13 * u64::from(CHUNK), 10).await.unwrap();
        assert_eq!(v.boot_profile_len(), 3);
        // The agent saves it every heartbeat and on exit (and a volume's
        // last drop saves it).
        v.save_profile().unwrap();
    }
    // The profile is on disk and continues after a reopen.
    let g = group(dir.path());
    let v = g.volume("img").unwrap();
    v.set_upstream(Some(MemUpstream::new(data.clone()) as Arc<dyn Upstream>));
    assert_eq!(v.boot_profile().chunks().collect::<Vec<_>>(), vec![6, 7, 1]);
    let s = g.snapshot("vm").unwrap();
    s.read(0, 10).await.unwrap();
    assert_eq!(
        v.boot_profile().chunks().collect::<Vec<_>>(),
        vec![6, 7, 1, 0]
    );
    v.save_profile().unwrap();

    // A damaged profile file is refused and recording starts anew.
    drop((s, v));
    drop(g);
    let path = dir.path().join("volumes/img/profile");
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let g = group(dir.path());
    assert_eq!(g.volume("img").unwrap().boot_profile_len(), 0);
}

/// An upstream whose fetches wait for permits.
struct Gated {
    data: Vec<u8>,
    gate: tokio::sync::Semaphore,
}

#[async_trait]
impl Upstream for Gated {
    fn name(&self) -> String {
        "gated".into()
    }
    async fn fetch(&self, req: ChunkRequest) -> Result<Bytes, UpstreamError> {
        self.gate.acquire().await.unwrap().forget();
        let s = req.offset as usize;
        Ok(Bytes::copy_from_slice(&self.data[s..s + req.len as usize]))
    }
}

/// A group in a new directory with volume "img" of an 8-chunk image (its
/// bytes), whose upstream is [`Gated`] with no permit yet.
fn gated_volume() -> (
    tempfile::TempDir,
    CacheGroup,
    Vec<u8>,
    Arc<CachedVolume>,
    Arc<Gated>,
) {
    let dir = tempfile::tempdir().unwrap();
    let data = image_bytes(9, 8 * CHUNK as usize, CHUNK as usize);
    let m = virtman_image::Manifest::of_bytes(&data, CHUNK).unwrap();
    let g = group(dir.path());
    let v = g.add_volume("img", &m).unwrap();
    let up = Arc::new(Gated {
        data: data.clone(),
        gate: tokio::sync::Semaphore::new(0),
    });
    v.set_upstream(Some(Arc::clone(&up) as Arc<dyn Upstream>));
    (dir, g, data, v, up)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_cache_hint_returns_at_once_and_fetches_in_the_background() {
    let (_dir, g, data, v, up) = gated_volume();
    let s = g.create_snapshot("vm", "img").unwrap();

    // The hint is answered although no fetch can complete yet.
    tokio::time::timeout(Duration::from_secs(10), Export::cache(&*s, 0, 3 * CHUNK))
        .await
        .expect("CMD_CACHE waited for the fetch")
        .unwrap();
    assert_eq!(v.present_chunks(), 0);
    // Out of range is still an error.
    assert!(Export::cache(&*s, 8 * u64::from(CHUNK), 1).await.is_err());

    // A demand read meanwhile gets the right bytes (single flight with the hint).
    up.gate.add_permits(1000);
    let got = s.read_bytes(u64::from(CHUNK) + 5, 100).await.unwrap();
    assert_eq!(&got[..], &data[CHUNK as usize + 5..CHUNK as usize + 105]);
    for _ in 0..1000 {
        if (0..3).all(|i| v.is_present(i)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!((0..3).all(|i| v.is_present(i)), "{:?}", v.present_list());
    assert_eq!(v.present_chunks(), 3);
    let st = v.stats();
    // A chunk is present as soon as it is stored; the fetch counter follows a
    // moment later. Wait for it, then check no chunk was fetched twice.
    for _ in 0..1000 {
        if st.fetched_chunks.load(Ordering::Relaxed) >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(st.prefetched_chunks.load(Ordering::Relaxed) >= 2);
    assert_eq!(
        st.fetched_chunks.load(Ordering::Relaxed),
        3,
        "a chunk fetched twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_of_expected_chunks_are_not_unexpected_while_any_replay_runs() {
    let (_dir, _g, _, v, up) = gated_volume();
    // Reads of chunks 1 and 5 wait (no fetch can complete).
    let readers: Vec<_> = [1u64, 5]
        .into_iter()
        .map(|i| {
            let v = Arc::clone(&v);
            tokio::spawn(async move { v.read_bytes(i * u64::from(CHUNK), 10).await })
        })
        .collect();
    while v.demand_waiting() < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(v.demand_unexpected(), 2, "no replay: every chunk waited on");
    // Two replays, one expecting chunk 1, the other 1 and 5; chunks out of
    // range are ignored.
    let first = v.expect([1, 1000]);
    let second = v.expect([1, 5]);
    assert_eq!(v.demand_unexpected(), 0);
    // The first ending does not end the second's expectation.
    drop(first);
    assert_eq!(v.demand_unexpected(), 0);
    drop(second);
    assert_eq!(v.demand_unexpected(), 2);
    up.gate.add_permits(1000);
    for r in readers {
        r.await.unwrap().unwrap();
    }
    assert_eq!(v.demand_waiting(), 0);
    assert_eq!(v.demand_unexpected(), 0);
}
