//! Cached volumes and the cache group: on-demand fill, single flight, lying
//! upstreams, eviction under a small capacity, restarts and bad input.
#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::needless_range_loop,
    clippy::type_complexity
)]

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use virtman_cache::{CacheError, CacheGroup, GroupConfig, Upstream};
use virtman_nbd::{Export, ExportError, ReadChunk, proto::Errno};

const CHUNK: u32 = 16384;

fn group(dir: &std::path::Path, capacity: u64) -> CacheGroup {
    CacheGroup::open(dir, GroupConfig::with_capacity(capacity)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fills_on_demand_single_flight_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let data = image_bytes(1, 10 * CHUNK as usize + 1000, CHUNK as usize);
    let m = virtman_image::Manifest::of_bytes(&data, CHUNK).unwrap();
    let g = group(&dir.path().join("g"), 1 << 30);
    let v = g.add_volume("img", &m).unwrap();
    // Same name and image: the same volume; same name, other image: refused.
    assert!(Arc::ptr_eq(&v, &g.add_volume("img", &m).unwrap()));
    let other = virtman_image::Manifest::of_bytes(&data[..5000], 4096).unwrap();
    assert!(matches!(
        g.add_volume("img", &other),
        Err(CacheError::Exists { .. })
    ));

    let up = MemUpstream::slow(data.clone(), Duration::from_millis(50));
    v.set_upstream(Some(up.clone() as Arc<dyn Upstream>));
    // 16 readers of chunk 1 at once: one fetch.
    let mut set = tokio::task::JoinSet::new();
    for k in 0..16u64 {
        let v = Arc::clone(&v);
        set.spawn(async move { v.read_bytes(u64::from(CHUNK) + k * 100, 3000).await });
    }
    let mut k = 0u64;
    let mut outs = Vec::new();
    while let Some(r) = set.join_next().await {
        outs.push(r.unwrap().unwrap());
        k += 1;
    }
    assert_eq!(k, 16);
    assert_eq!(up.fetches.load(Ordering::SeqCst), 1);
    for o in &outs {
        assert!(data.windows(o.len()).any(|w| w == &o[..]));
    }
    // A read spanning chunks 2..=6 (chunk 3 is all zero): four fetches, in
    // parallel (each upstream fetch takes 50 ms, so they overlap).
    let got = v
        .read_bytes(2 * u64::from(CHUNK) + 5, 5 * CHUNK - 10)
        .await
        .unwrap();
    let s = 2 * CHUNK as usize + 5;
    assert_eq!(&got[..], &data[s..s + 5 * CHUNK as usize - 10]);
    assert_eq!(up.fetches.load(Ordering::SeqCst), 5);
    assert!(
        up.max_in_flight.load(Ordering::SeqCst) >= 2,
        "chunks of one read were fetched one by one"
    );
    assert!(!v.is_present(3), "zero chunks are never fetched or stored");
    // The short last chunk.
    let got = v.read_bytes(10 * u64::from(CHUNK), 1000).await.unwrap();
    assert_eq!(&got[..], &data[10 * CHUNK as usize..]);
    // Past the end.
    assert!(matches!(
        v.read(m.size() - 10, 11).await,
        Err(CacheError::PastEnd { .. })
    ));
    v.sync().await.unwrap();
    let present = v.present_list();
    assert_eq!(present, vec![1, 2, 4, 5, 6, 10]);
    assert_eq!(g.usage().used, v.present_bytes());
    drop((v, g));

    // Reopen: the same chunks, verified, no upstream needed for them.
    let g = group(&dir.path().join("g"), 1 << 30);
    let v = g.volume("img").unwrap();
    assert!(!v.was_rebuilt());
    assert_eq!(v.present_list(), present);
    assert!(v.verify_present().unwrap().is_empty());
    let got = v.read_bytes(u64::from(CHUNK), CHUNK).await.unwrap();
    assert_eq!(&got[..], &data[CHUNK as usize..2 * CHUNK as usize]);
    let err = v.read(0, 10).await.unwrap_err();
    assert!(
        matches!(err.root(), CacheError::NoUpstream { chunk: 0, .. }),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetched_chunks_are_committed_in_one_batch_after_the_commit_interval() {
    let dir = tempfile::tempdir().unwrap();
    let data = image_bytes(3, 8 * CHUNK as usize, CHUNK as usize);
    let m = virtman_image::Manifest::of_bytes(&data, CHUNK).unwrap();
    let interval = Duration::from_millis(400);
    let g = CacheGroup::open(
        dir.path(),
        GroupConfig {
            commit_interval_ms: interval.as_millis() as u64,
            ..GroupConfig::with_capacity(1 << 30)
        },
    )
    .unwrap();
    let v = g.add_volume("img", &m).unwrap();
    v.set_upstream(Some(MemUpstream::new(data.clone()) as Arc<dyn Upstream>));
    let first = std::time::Instant::now();
    v.read_bytes(0, CHUNK).await.unwrap();
    v.read_bytes(4 * u64::from(CHUNK), 2 * CHUNK).await.unwrap();
    // Stored and readable at once, durable only later: nothing is synced
    // before the interval has passed since the first chunk.
    assert_eq!(v.present_list(), vec![0, 4, 5]);
    tokio::time::sleep(interval / 4).await;
    assert_eq!(v.pending_chunks(), 3);
    while v.pending_chunks() > 0 {
        assert!(first.elapsed() < Duration::from_secs(20), "never committed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(first.elapsed() >= interval, "committed before the interval");
    // What the commit recorded survives a restart.
    drop((v, g));
    let g = group(dir.path(), 1 << 30);
    assert_eq!(g.volume("img").unwrap().present_list(), vec![0, 4, 5]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lying_upstream_never_gets_a_wrong_byte_to_a_reader() {
    let dir = tempfile::tempdir().unwrap();
    let data = image_bytes(2, 24 * CHUNK as usize + 333, CHUNK as usize);
    let m = virtman_image::Manifest::of_bytes(&data, CHUNK).unwrap();
    let g = group(dir.path(), 1 << 30);
    let v = g.add_volume("img", &m).unwrap();
    let liar = Arc::new(LyingUpstream {
        data: Arc::new(data.clone()),
        counter: Default::default(),
        schedule: vec![
            Lie::FlipByte,
            Lie::Truth,
            Lie::Short,
            Lie::Error,
            Lie::Long,
            Lie::OtherChunk,
            Lie::FlipByte,
            Lie::Truth,
        ],
        // A claim to have verified another image's chunks changes nothing.
        claims: Some(virtman_image::ImageId([7; 32])),
    });
    v.set_upstream(Some(liar.clone() as Arc<dyn Upstream>));
    let export = v.export();
    let mut ok = 0;
    let mut refused = 0;
    let mut rng = 12345u64;
    for _ in 0..300 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let off = rng % m.size();
        let len = (1 + (rng >> 20) % 40_000).min(m.size() - off) as u32;
        match export.read(off, len).await {
            Ok(chunks) => {
                let got = virtman_cache::flatten(chunks);
                assert_eq!(&got[..], &data[off as usize..off as usize + len as usize]);
                ok += 1;
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("liar:9"),
                    "error does not name the source: {msg}"
                );
                assert_eq!(e.errno(), Errno::Io);
                refused += 1;
            }
        }
    }
    assert!(ok > 20 && refused > 20, "ok {ok} refused {refused}");
    v.sync().await.unwrap();
    assert!(v.verify_present().unwrap().is_empty());
    // Nothing wrong was stored: every present chunk matches on disk after reopen.
    let present = v.present_list();
    assert!(!present.is_empty());
    drop((export, v, g));
    let g = group(dir.path(), 1 << 30);
    let v = g.volume("img").unwrap();
    assert_eq!(v.present_list(), present);
    assert!(v.verify_present().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_under_small_capacity() {
    let dir = tempfile::tempdir().unwrap();
    let chunk = 16384u32;
    let vols = 8;
    let size = 16 * chunk as usize; // 256 KiB per volume
    let capacity = 6 * 16384 * 4; // 384 KiB in all
    let g = group(dir.path(), capacity);
    let mut images = Vec::new();
    let mut volumes = Vec::new();
    for k in 0..vols {
        let data = image_bytes(100 + k, size, chunk as usize);
        let m = virtman_image::Manifest::of_bytes(&data, chunk).unwrap();
        let v = g.add_volume(&format!("v{k}"), &m).unwrap();
        v.set_upstream(Some(MemUpstream::new(data.clone()) as Arc<dyn Upstream>));
        images.push(data);
        volumes.push(v);
    }
    // Volume 0 is in use (as if a snapshot or a child read it): fill it.
    let in_use = volumes[0].export();
    volumes[0].read_bytes(0, size as u32).await.unwrap();
    let kept = volumes[0].present_list();
    assert!(!kept.is_empty());
    let mut rng = 99u64;
    for _ in 0..400 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let k = (rng % vols) as usize;
        let off = (rng >> 8) % size as u64;
        let len = (1 + (rng >> 30) % 50_000).min(size as u64 - off) as u32;
        let got = volumes[k].read_bytes(off, len).await.unwrap();
        assert_eq!(
            &got[..],
            &images[k][off as usize..off as usize + len as usize]
        );
        let u = g.usage();
        assert!(u.used <= u.capacity, "{u:?}");
        assert_eq!(
            volumes[0].present_list(),
            kept,
            "an in-use volume lost chunks"
        );
        if k.is_multiple_of(3) {
            volumes[k].sync().await.unwrap();
        }
    }
    let evicted: u64 = volumes
        .iter()
        .map(|v| v.stats().evicted_chunks.load(Ordering::Relaxed))
        .sum();
    assert!(evicted > 50, "evicted {evicted}");
    for v in &volumes {
        v.sync().await.unwrap();
        assert!(v.verify_present().unwrap().is_empty());
    }
    let total: u64 = volumes.iter().map(|v| v.present_bytes()).sum();
    assert_eq!(total, g.usage().used);

    // Everything in use and full: a fetch fails with ENOSPC, reads of present
    // chunks keep working, and releasing a use makes room again.
    let uses: Vec<_> = volumes.iter().map(|v| v.acquire()).collect();
    let mut no_space = None;
    for k in 1..vols as usize {
        let e = volumes[k].export();
        if let Err(err) = e.read(0, size as u32).await {
            no_space = Some(err);
            break;
        }
    }
    let err = no_space.expect("a full group with nothing evictable accepted more chunks");
    assert_eq!(err.errno(), Errno::NoSpc, "{err}");
    assert!(matches!(err, ExportError::NoSpace(_)));
    let p = volumes[0].present_list()[0];
    volumes[0]
        .read_bytes(u64::from(chunk) * p, chunk)
        .await
        .unwrap();
    drop(uses);
    drop(in_use);
    for k in 0..vols as usize {
        let got = volumes[k].read_bytes(0, size as u32).await.unwrap();
        assert_eq!(&got[..], &images[k][..]);
    }
    assert!(g.usage().used <= capacity);
}

#[tokio::test]
async fn bad_presence_maps_are_rebuilt_empty() {
    let dir = tempfile::tempdir().unwrap();
    let data = image_bytes(3, 8 * CHUNK as usize, CHUNK as usize);
    let m = virtman_image::Manifest::of_bytes(&data, CHUNK).unwrap();
    let damage: [(&str, fn(&mut Vec<u8>)); 4] = [
        ("truncated", |b| b.truncate(b.len() - 3)),
        ("other version", |b| b[8] = 9),
        ("bad checksum", |b| {
            let n = b.len();
            b[n - 40] ^= 4;
        }),
        ("empty", |b| b.clear()),
    ];
    for (what, f) in damage {
        {
            let g = group(dir.path(), 1 << 30);
            let v = g.add_volume("img", &m).unwrap();
            v.set_upstream(Some(MemUpstream::new(data.clone()) as Arc<dyn Upstream>));
            v.read_bytes(0, 8 * CHUNK).await.unwrap();
            v.sync().await.unwrap();
            assert_eq!(v.present_chunks(), 7, "{what}");
        }
        let p = dir.path().join("volumes/img/presence");
        let mut b = std::fs::read(&p).unwrap();
        f(&mut b);
        std::fs::write(&p, &b).unwrap();
        let g = group(dir.path(), 1 << 30);
        let v = g.volume("img").unwrap();
        assert!(v.was_rebuilt(), "{what}");
        assert_eq!(v.present_chunks(), 0, "{what}");
        assert_eq!(g.usage().used, 0);
        drop(v);
        g.remove_volume("img").unwrap();
    }
}

#[tokio::test]
async fn bad_manifest_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = image_bytes(4, 4 * CHUNK as usize, CHUNK as usize);
    let m = virtman_image::Manifest::of_bytes(&data, CHUNK).unwrap();
    drop(group(dir.path(), 1 << 30).add_volume("img", &m).unwrap());
    let p = dir.path().join("volumes/img/manifest");
    let b = std::fs::read(&p).unwrap();
    std::fs::write(&p, &b[..b.len() - 1]).unwrap();
    let err = CacheGroup::open(dir.path(), GroupConfig::with_capacity(1 << 30)).unwrap_err();
    assert!(err.to_string().contains(&p.display().to_string()), "{err}");
}

#[tokio::test]
async fn in_use_objects_and_second_opener_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = image_bytes(5, 4 * CHUNK as usize, CHUNK as usize);
    let m = virtman_image::Manifest::of_bytes(&data, CHUNK).unwrap();
    let g = group(dir.path(), 1 << 30);
    // A second open (another open file description, as another process would
    // have) is refused while the group is open.
    let err = CacheGroup::open(dir.path(), GroupConfig::with_capacity(1 << 30)).unwrap_err();
    assert!(matches!(err, CacheError::Locked { .. }), "{err}");
    let v = g.add_volume("img", &m).unwrap();
    let s = g.create_snapshot("vm1", "img").unwrap();
    let err = g.remove_volume("img").unwrap_err();
    assert!(err.to_string().contains("vm1"), "{err}");
    let err = g.delete_snapshot("vm1").unwrap_err();
    assert!(matches!(err, CacheError::InUse { .. }), "{err}");
    drop(s);
    g.delete_snapshot("vm1").unwrap();
    let e = v.export();
    assert!(matches!(
        g.remove_volume("img"),
        Err(CacheError::InUse { .. })
    ));
    drop(e);
    drop(v);
    g.remove_volume("img").unwrap();
    assert!(g.volume("img").is_none());
    assert!(!dir.path().join("volumes/img").exists());
    assert!(matches!(
        g.remove_volume("img"),
        Err(CacheError::NotFound { .. })
    ));
    assert!(matches!(
        g.add_volume("../x", &m),
        Err(CacheError::Name { .. })
    ));
    assert!(matches!(
        g.create_snapshot("vm2", "nope"),
        Err(CacheError::NotFound { .. })
    ));
    assert!(
        CacheGroup::open(
            dir.path().join("x"),
            GroupConfig {
                low_watermark: 0.0,
                ..GroupConfig::with_capacity(1)
            }
        )
        .is_err()
    );
    drop(g);
    // Released: opens again.
    group(dir.path(), 1 << 30);
}

#[tokio::test]
async fn base_export_is_read_only_and_reports_zero_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let data = image_bytes(6, 6 * CHUNK as usize, CHUNK as usize);
    let m = virtman_image::Manifest::of_bytes(&data, CHUNK).unwrap();
    let g = group(dir.path(), 1 << 30);
    let v = g.add_volume("img", &m).unwrap();
    v.set_upstream(Some(MemUpstream::new(data.clone()) as Arc<dyn Upstream>));
    let e = v.export();
    assert!(e.capabilities().read_only);
    assert!(
        e.write(0, bytes::Bytes::from_static(b"x"), false)
            .await
            .is_err()
    );
    let ext = e.block_status(0, 6 * CHUNK).await.unwrap();
    assert_eq!(ext.len(), 3);
    assert!(!ext[0].zero && ext[1].zero && ext[1].hole && !ext[2].zero);
    assert_eq!(ext[0].length, 3 * u64::from(CHUNK));
    let r = e.read(3 * u64::from(CHUNK), CHUNK).await.unwrap();
    assert_eq!(r, vec![ReadChunk::Zero(CHUNK)]);
    e.cache(0, 6 * CHUNK).await.unwrap();
    assert_eq!(v.present_chunks(), 5);
}
