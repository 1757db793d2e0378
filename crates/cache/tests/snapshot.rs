//! Snapshot cases the model test does not reach: concurrent partial writes
//! into one unallocated block, damaged maps, deletion and re-creation.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::*;
use virtman_cache::{CacheError, CacheGroup, GroupConfig, Upstream};
use virtman_nbd::Export;

const CHUNK: u32 = 16384;

fn setup(dir: &std::path::Path, data: &[u8]) -> CacheGroup {
    let g = CacheGroup::open(dir, GroupConfig::with_capacity(1 << 30)).unwrap();
    let m = virtman_image::Manifest::of_bytes(data, CHUNK).unwrap();
    let v = g.add_volume("img", &m).unwrap();
    v.set_upstream(Some(MemUpstream::new(data.to_vec()) as Arc<dyn Upstream>));
    g
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sector_writes_into_one_block_all_land() {
    let dir = tempfile::tempdir().unwrap();
    let data = image_bytes(31, 8 * CHUNK as usize, CHUNK as usize);
    let g = setup(dir.path(), &data);
    let s = g.create_snapshot("vm", "img").unwrap();
    for round in 0..20u64 {
        let block = round * 4096 + 8192;
        let mut set = tokio::task::JoinSet::new();
        // Seven of the eight sectors, each written by its own task.
        for k in 0..7u64 {
            let s = Arc::clone(&s);
            set.spawn(async move {
                let d = vec![(round as u8) ^ (k as u8 + 1); 512];
                Export::write(&*s, block + k * 512, Bytes::from(d), false)
                    .await
                    .unwrap();
            });
        }
        while set.join_next().await.is_some() {}
        let got = s.read_bytes(block, 4096).await.unwrap();
        for k in 0..7usize {
            assert!(
                got[k * 512..(k + 1) * 512]
                    .iter()
                    .all(|&b| b == (round as u8) ^ (k as u8 + 1)),
                "round {round}: sector {k} lost"
            );
        }
        let b = block as usize;
        assert_eq!(
            &got[3584..],
            &data[b + 3584..b + 4096],
            "round {round}: base sector lost"
        );
    }
}

#[tokio::test]
async fn damaged_snapshot_map_is_refused_naming_the_file() {
    let data = image_bytes(32, 2 * CHUNK as usize, CHUNK as usize);
    for damage in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        {
            let g = setup(dir.path(), &data);
            let s = g.create_snapshot("vm", "img").unwrap();
            s.write(0, Bytes::from(vec![7u8; 4096]), true)
                .await
                .unwrap();
        }
        let p = dir.path().join("snapshots/vm/map");
        let mut b = std::fs::read(&p).unwrap();
        match damage {
            0 => b.truncate(b.len() - 1),
            1 => b[8] = 2,
            _ => {
                let n = b.len();
                b[n - 33] ^= 1;
            }
        }
        std::fs::write(&p, &b).unwrap();
        let err = CacheGroup::open(dir.path(), GroupConfig::with_capacity(1 << 30)).unwrap_err();
        assert!(err.to_string().contains(&p.display().to_string()), "{err}");
        assert!(matches!(err, CacheError::Metadata(_)), "{err}");
    }
}

#[tokio::test]
async fn snapshots_are_private_and_deleted_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let data = image_bytes(33, 2 * CHUNK as usize, CHUNK as usize);
    let g = setup(dir.path(), &data);
    let a = g.create_snapshot("a", "img").unwrap();
    let b = g.create_snapshot("b", "img").unwrap();
    assert!(matches!(
        g.create_snapshot("a", "img"),
        Err(CacheError::Exists { .. })
    ));
    a.write(100, Bytes::from(vec![1u8; 5000]), false)
        .await
        .unwrap();
    assert_eq!(&b.read_bytes(0, 8192).await.unwrap()[..], &data[..8192]);
    assert_eq!(a.allocated_blocks(), 2);
    assert_eq!(g.volume("img").unwrap().uses(), 2);
    drop(a);
    g.delete_snapshot("a").unwrap();
    assert_eq!(g.volume("img").unwrap().uses(), 1);
    // A new snapshot of the same name starts from the base.
    let a = g.create_snapshot("a", "img").unwrap();
    assert_eq!(&a.read_bytes(0, 8192).await.unwrap()[..], &data[..8192]);
    assert_eq!(g.snapshots().len(), 2);
    // The export's view: writable, flush, trim, write zeroes.
    let caps = a.capabilities();
    assert!(!caps.read_only && caps.flush && caps.trim && caps.write_zeroes);
    Export::trim(&*a, 0, 4096, false).await.unwrap();
    assert!(a.read_bytes(0, 4096).await.unwrap().iter().all(|&x| x == 0));
    let e = Export::write(&*a, 2 * u64::from(CHUNK), Bytes::from_static(b"x"), false).await;
    assert_eq!(e.unwrap_err().errno(), virtman_nbd::proto::Errno::Inval);
}
