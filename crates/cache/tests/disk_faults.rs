//! A failing cache disk (see `virtman_cache::disk`): EIO and ENOSPC on reads,
//! writes, syncs and map writes, and short writes. A volume's failed read is
//! fetched again or is EIO, never wrong bytes; a failed sync never marks
//! chunks durable; a snapshot's failures reach the VM as errors and its map
//! never claims what a failed sync may have lost.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use common::*;
use rustix::io::Errno as Os;
use virtman_cache::disk::{Io, Role};
use virtman_cache::volume::{PRESENCE_FILE, PRESENCE_FORMAT};
use virtman_cache::{CacheGroup, CachedVolume, DiskFaults, Fault, GroupConfig, Upstream, bitmap};
use virtman_image::Manifest;
use virtman_nbd::{Export, proto::Errno};

const CHUNK: u32 = 16384;
const CHUNKS: usize = 10;

struct Setup {
    dir: tempfile::TempDir,
    data: Vec<u8>,
    manifest: Manifest,
    faults: DiskFaults,
}

impl Setup {
    fn new(seed: u64) -> Setup {
        let data = image_bytes(seed, CHUNKS * CHUNK as usize, CHUNK as usize);
        let manifest = Manifest::of_bytes(&data, CHUNK).unwrap();
        Setup {
            dir: tempfile::tempdir().unwrap(),
            data,
            manifest,
            faults: DiskFaults::armed(),
        }
    }

    fn open(&self, capacity: u64) -> (CacheGroup, Arc<CachedVolume>, Arc<MemUpstream>) {
        let g = CacheGroup::open_with_faults(
            self.dir.path(),
            GroupConfig::with_capacity(capacity),
            self.faults.clone(),
        )
        .unwrap();
        let v = g.add_volume("img", &self.manifest).unwrap();
        let up = MemUpstream::new(self.data.clone());
        v.set_upstream(Some(up.clone() as Arc<dyn Upstream>));
        (g, v, up)
    }

    fn chunk(&self, i: u64) -> &[u8] {
        let s = i as usize * CHUNK as usize;
        &self.data[s..s + CHUNK as usize]
    }

    /// The chunks the presence file on disk claims.
    fn claimed(&self) -> Vec<u64> {
        let map = bitmap::load(
            &PRESENCE_FORMAT,
            &self.dir.path().join("volumes/img").join(PRESENCE_FILE),
            &self.manifest.id().0,
            self.manifest.chunks(),
        )
        .unwrap();
        map.ones().collect()
    }
}

async fn read_chunk(v: &Arc<CachedVolume>, i: u64) -> Bytes {
    v.read_bytes(i * u64::from(CHUNK), CHUNK).await.unwrap()
}

#[tokio::test]
async fn a_failed_local_read_is_fetched_again_or_is_eio_never_wrong_bytes() {
    let s = Setup::new(1);
    let (_g, v, up) = s.open(1 << 30);
    v.read_bytes(0, (CHUNKS as u32) * CHUNK).await.unwrap();
    v.sync().await.unwrap();
    let fetched = up.fetches.load(Ordering::SeqCst);
    assert_eq!(s.claimed(), v.present_list());

    // One failed read of the data file: chunks 1 and 2 (one pread) are
    // dropped and fetched again; the reader sees the right bytes.
    s.faults
        .add(Fault::new(Io::Read, Os::IO).on(Role::Volume).times(1));
    let got = v
        .read_bytes(u64::from(CHUNK) + 100, 2 * CHUNK - 200)
        .await
        .unwrap();
    assert_eq!(
        &got[..],
        &s.data[CHUNK as usize + 100..3 * CHUNK as usize - 100]
    );
    assert_eq!(s.faults.injected(), 1);
    assert_eq!(up.fetches.load(Ordering::SeqCst), fetched + 2);
    assert_eq!(v.stats().disk_errors.load(Ordering::Relaxed), 1);
    assert!(v.is_present(1) && v.is_present(2), "stored again");

    // The disk keeps failing and no source is left: EIO to the VM or child.
    s.faults.add(Fault::new(Io::Read, Os::IO));
    v.set_upstream(None);
    let e = v
        .export()
        .read(5 * u64::from(CHUNK), 4096)
        .await
        .unwrap_err();
    assert_eq!(e.errno(), Errno::Io, "{e}");
    assert!(!v.is_present(5));
    // All-zero chunks need no disk.
    assert!(
        v.read_bytes(3 * u64::from(CHUNK), CHUNK)
            .await
            .unwrap()
            .iter()
            .all(|&b| b == 0)
    );

    // The disk is back: what was dropped is fetched again.
    s.faults.clear();
    v.set_upstream(Some(up.clone() as Arc<dyn Upstream>));
    assert_eq!(read_chunk(&v, 5).await, s.chunk(5));
    v.sync().await.unwrap();
    assert_eq!(s.claimed(), v.present_list());
    assert!(v.verify_present().unwrap().is_empty());
}

#[tokio::test]
async fn a_failed_or_short_write_serves_the_verified_chunk_and_keeps_it_absent() {
    let s = Setup::new(2);
    {
        let (g, v, up) = s.open(1 << 30);
        s.faults
            .add(Fault::new(Io::Write, Os::IO).on(Role::Volume).times(1));
        assert_eq!(read_chunk(&v, 1).await, s.chunk(1));
        assert!(!v.is_present(1));
        s.faults
            .add(Fault::new(Io::Write, Os::NOSPC).short().times(1));
        assert_eq!(read_chunk(&v, 2).await, s.chunk(2));
        assert!(!v.is_present(2), "half a chunk on disk is not a chunk");
        assert_eq!(s.faults.injected(), 2);
        assert_eq!(v.stats().disk_errors.load(Ordering::Relaxed), 2);
        assert_eq!(g.usage().used, v.present_bytes());
        // The next read fetches and stores it.
        assert_eq!(read_chunk(&v, 1).await, s.chunk(1));
        assert!(v.is_present(1));
        assert_eq!(up.fetches.load(Ordering::SeqCst), 3);
        v.sync().await.unwrap();
        assert_eq!(s.claimed(), vec![1]);
    }
    let (_g, v, _up) = s.open(1 << 30);
    assert_eq!(v.present_list(), vec![1]);
    assert!(v.verify_present().unwrap().is_empty());
    assert_eq!(read_chunk(&v, 2).await, s.chunk(2));
}

#[tokio::test]
async fn a_failed_sync_never_marks_chunks_durable() {
    let s = Setup::new(3);
    let (g, v, up) = s.open(1 << 30);
    for i in [0, 1] {
        read_chunk(&v, i).await;
    }
    v.sync().await.unwrap();
    assert_eq!(s.claimed(), vec![0, 1]);
    for i in [2, 4, 5] {
        read_chunk(&v, i).await;
    }
    s.faults
        .add(Fault::new(Io::Sync, Os::IO).on(Role::Volume).times(1));
    let e = v.sync().await.unwrap_err();
    assert!(e.to_string().contains("syncing"), "{e}");
    // The batch is gone, not merely unrecorded: a second sync would succeed
    // without its pages, so nothing of it may ever be claimed.
    assert_eq!(v.present_list(), vec![0, 1]);
    assert_eq!(v.pending_chunks(), 0);
    assert_eq!(g.usage().used, v.present_bytes());
    v.sync().await.unwrap();
    assert_eq!(s.claimed(), vec![0, 1]);
    // Read again: fetched again, right, and then durable.
    let before = up.fetches.load(Ordering::SeqCst);
    for i in [2, 4, 5] {
        assert_eq!(read_chunk(&v, i).await, s.chunk(i));
    }
    assert_eq!(up.fetches.load(Ordering::SeqCst), before + 3);
    v.sync().await.unwrap();
    assert_eq!(s.claimed(), vec![0, 1, 2, 4, 5]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_stored_again_during_a_sync_waits_for_a_sync_of_its_own() {
    let s = Setup::new(4);
    let (_g, v, up) = s.open(1 << 30);
    for i in [0, 1, 2] {
        read_chunk(&v, i).await;
    }
    // A slow sync: its batch (0, 1, 2) is taken, then it takes 600 ms.
    s.faults.add(
        Fault::stall(Io::Sync, std::time::Duration::from_millis(600))
            .on(Role::Volume)
            .times(1),
    );
    let syncing = tokio::spawn({
        let v = Arc::clone(&v);
        async move { v.sync().await }
    });
    // The sync has taken its batch once it stalls.
    while s.faults.injected() == 0 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    // Meanwhile a read of chunk 1 fails on the disk: it is dropped, fetched
    // again and written again, after the sync began.
    let before = up.fetches.load(Ordering::SeqCst);
    s.faults
        .add(Fault::new(Io::Read, Os::IO).on(Role::Volume).times(1));
    assert_eq!(read_chunk(&v, 1).await, s.chunk(1));
    assert_eq!(
        up.fetches.load(Ordering::SeqCst),
        before + 1,
        "fetched again"
    );
    assert_eq!(s.faults.injected(), 2, "the stall, then the failed read");
    assert!(!syncing.is_finished(), "the read came during the sync");
    syncing.await.unwrap().unwrap();
    // That sync may not cover the new write: chunk 1 is not claimed until
    // a sync after it.
    assert_eq!(s.claimed(), vec![0, 2]);
    assert_eq!(v.pending_chunks(), 1);
    v.sync().await.unwrap();
    assert_eq!(s.claimed(), vec![0, 1, 2]);
    assert_eq!(v.pending_chunks(), 0);
}

#[tokio::test]
async fn enospc_on_the_presence_map_mid_commit_keeps_the_old_map_until_a_retry() {
    let s = Setup::new(4);
    {
        let (_g, v, _up) = s.open(1 << 30);
        read_chunk(&v, 0).await;
        v.sync().await.unwrap();
        read_chunk(&v, 1).await;
        read_chunk(&v, 2).await;
        s.faults
            .add(Fault::new(Io::Record, Os::NOSPC).on(Role::Volume));
        let e = v.sync().await.unwrap_err();
        assert!(e.is_no_space(), "{e}");
        assert_eq!(s.claimed(), vec![0]);
        assert_eq!(v.pending_chunks(), 2, "still to be recorded");
        // Still failing as the volume closes (a crash would do no better).
    }
    assert_eq!(s.claimed(), vec![0]);
    s.faults.clear();
    let (_g, v, _up) = s.open(1 << 30);
    assert_eq!(v.present_list(), vec![0]);
    read_chunk(&v, 1).await;
    v.sync().await.unwrap();
    assert_eq!(s.claimed(), vec![0, 1]);
}

#[tokio::test]
async fn eviction_that_cannot_record_or_punch_stays_consistent() {
    let s = Setup::new(5);
    // Room for three chunks; the volume unused, so its chunks can go.
    let (g, v, _up) = s.open(3 * u64::from(CHUNK));
    for i in [0, 1, 2] {
        read_chunk(&v, i).await;
    }
    v.sync().await.unwrap();
    // The presence map cannot be written: nothing is evicted, and the group
    // being full, the next store is refused for space (the read still fails
    // cleanly rather than overfilling the disk).
    s.faults
        .add(Fault::new(Io::Record, Os::IO).on(Role::Volume));
    let e = v.read_bytes(4 * u64::from(CHUNK), 10).await.unwrap_err();
    assert!(e.is_no_space(), "{e}");
    assert_eq!(v.present_list(), vec![0, 1, 2]);
    // Punching fails: the chunks are evicted all the same (recorded absent
    // first), and a later read of them refetches.
    s.faults.clear();
    s.faults.add(Fault::new(Io::Punch, Os::IO));
    assert_eq!(read_chunk(&v, 4).await, s.chunk(4));
    assert_eq!(read_chunk(&v, 5).await, s.chunk(5));
    assert!(g.usage().used <= 3 * u64::from(CHUNK));
    for i in 0..CHUNKS as u64 {
        assert_eq!(read_chunk(&v, i).await, s.chunk(i), "chunk {i}");
    }
    assert!(v.verify_present().unwrap().is_empty());
}

/// A snapshot "vm" over the volume, in a group with `faults`.
fn snapshot_group(s: &Setup) -> (CacheGroup, Arc<virtman_cache::Snapshot>) {
    let (g, v, _up) = s.open(1 << 30);
    let snap = match g.snapshot("vm") {
        Some(snap) => snap,
        None => g.create_snapshot("vm", v.name()).unwrap(),
    };
    (g, snap)
}

#[tokio::test]
async fn a_snapshot_write_that_fails_is_an_error_and_new_blocks_stay_the_base() {
    let s = Setup::new(6);
    let (_g, snap) = snapshot_group(&s);
    s.faults
        .add(Fault::new(Io::Write, Os::IO).on(Role::Snapshot).times(1));
    let e = Export::write(&*snap, 4096, Bytes::from(vec![9u8; 8192]), false)
        .await
        .unwrap_err();
    assert_eq!(e.errno(), Errno::Io);
    s.faults.add(
        Fault::new(Io::Write, Os::NOSPC)
            .on(Role::Snapshot)
            .short()
            .times(1),
    );
    let e = Export::write(&*snap, 100, Bytes::from(vec![9u8; 5000]), false)
        .await
        .unwrap_err();
    assert_eq!(e.errno(), Errno::NoSpc);
    assert_eq!(snap.allocated_blocks(), 0);
    assert_eq!(
        &snap.read_bytes(0, 16384).await.unwrap()[..],
        &s.data[..16384]
    );
    // A rewrite of an allocated block that fails leaves it as written
    // before or as the failed write (a block device's contract), and the
    // error is reported.
    snap.write(0, Bytes::from(vec![1u8; 4096]), false)
        .await
        .unwrap();
    s.faults.add(
        Fault::new(Io::Write, Os::IO)
            .on(Role::Snapshot)
            .short()
            .times(1),
    );
    assert!(
        snap.write(0, Bytes::from(vec![2u8; 4096]), false)
            .await
            .is_err()
    );
    let got = snap.read_bytes(0, 4096).await.unwrap();
    assert!(got.iter().all(|&b| b == 1 || b == 2));
    // TRIM that cannot punch is an error too; nothing marked.
    s.faults.add(Fault::new(Io::Punch, Os::IO).times(1));
    assert!(snap.zero(8192, 8192, false).await.is_err());
    assert_eq!(snap.allocated_blocks(), 1);
}

#[tokio::test]
async fn a_failed_overlay_read_is_eio_and_the_base_still_reads() {
    let s = Setup::new(7);
    let (_g, snap) = snapshot_group(&s);
    snap.write(0, Bytes::from(vec![5u8; 4096]), false)
        .await
        .unwrap();
    s.faults
        .add(Fault::new(Io::Read, Os::IO).on(Role::Snapshot));
    let e = Export::read(&*snap, 0, 8192).await.unwrap_err();
    assert_eq!(e.errno(), Errno::Io, "{e}");
    let got = snap.read_bytes(4096, 8192).await.unwrap();
    assert_eq!(&got[..], &s.data[4096..12288]);
}

#[tokio::test]
async fn a_failed_flush_poisons_the_snapshot_and_its_map_stays_at_the_last_good_flush() {
    let s = Setup::new(8);
    {
        let (_g, snap) = snapshot_group(&s);
        snap.write(0, Bytes::from(vec![1u8; 4096]), false)
            .await
            .unwrap();
        snap.flush().await.unwrap();
        snap.write(4096, Bytes::from(vec![2u8; 4096]), false)
            .await
            .unwrap();
        s.faults
            .add(Fault::new(Io::Sync, Os::IO).on(Role::Snapshot).times(1));
        assert_eq!(Export::flush(&*snap).await.unwrap_err().errno(), Errno::Io);
        s.faults.clear();
        // The kernel would now report success; the snapshot does not.
        let e = snap.flush().await.unwrap_err();
        assert!(e.to_string().contains("earlier sync"), "{e}");
        assert!(
            snap.write(8192, Bytes::from(vec![3u8; 10]), true)
                .await
                .is_err(),
            "FUA cannot be honoured either"
        );
        // Reads still work.
        assert!(
            snap.read_bytes(4096, 4096)
                .await
                .unwrap()
                .iter()
                .all(|&b| b == 2)
        );
    }
    let (_g, snap) = snapshot_group(&s);
    assert!(
        snap.read_bytes(0, 4096)
            .await
            .unwrap()
            .iter()
            .all(|&b| b == 1)
    );
    assert_eq!(
        &snap.read_bytes(4096, 4096).await.unwrap()[..],
        &s.data[4096..8192]
    );
    snap.write(4096, Bytes::from(vec![4u8; 4096]), false)
        .await
        .unwrap();
    snap.flush().await.unwrap();
}

#[tokio::test]
async fn enospc_on_the_snapshot_map_fails_the_flush_and_the_next_one_retries() {
    let s = Setup::new(9);
    let map = |s: &Setup| std::fs::read(s.dir.path().join("snapshots/vm/map")).unwrap();
    {
        let (_g, snap) = snapshot_group(&s);
        let before = map(&s);
        snap.write(0, Bytes::from(vec![1u8; 4096]), false)
            .await
            .unwrap();
        s.faults.add(
            Fault::new(Io::Record, Os::NOSPC)
                .on(Role::Snapshot)
                .times(1),
        );
        assert_eq!(
            Export::flush(&*snap).await.unwrap_err().errno(),
            Errno::NoSpc
        );
        assert_eq!(map(&s), before, "the old map stays");
        snap.flush().await.unwrap();
        assert_ne!(map(&s), before);
    }
    let (_g, snap) = snapshot_group(&s);
    assert!(
        snap.read_bytes(0, 4096)
            .await
            .unwrap()
            .iter()
            .all(|&b| b == 1)
    );
}

/// A small deterministic generator (xorshift), so that a failing seed can be
/// replayed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Waits until the fetches a failed read left running (a read that fails
/// returns at once; its other chunks' fetches go on and store) are over:
/// until then usage counts what they reserved and have not stored yet.
/// "Over" is no fetch in flight and usage equal to what is present: equal
/// usage alone can be the moment before a running fetch reserves.
/// A fetch whose every source fails is tried again for about 6 s: 15 s is
/// the most this waits.
async fn settle(g: &CacheGroup, v: &Arc<CachedVolume>) {
    for _ in 0..750 {
        if v.fetches_in_flight() == 0 && g.usage().used == v.present_bytes() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!(
        "{} fetches still running, usage {} for {} present, 15 s on",
        v.fetches_in_flight(),
        g.usage().used,
        v.present_bytes()
    );
}

/// Drops the group and the volume and waits until the volume is gone:
/// fetches it spawned hold it until they end, and reopening it while they
/// still run would race them on its files (the presence map's temporary
/// file), which no process does in service.
async fn close(g: CacheGroup, v: Arc<CachedVolume>) {
    let weak = Arc::downgrade(&v);
    drop(v);
    drop(g);
    for _ in 0..500 {
        if weak.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("a dropped volume is still held 10 s later");
}

fn random_fault(r: &mut Rng) -> Fault {
    let io = [Io::Read, Io::Write, Io::Sync, Io::Punch, Io::Record][r.below(5) as usize];
    let errno = if r.below(2) == 0 { Os::IO } else { Os::NOSPC };
    let mut f = Fault::new(io, errno)
        .skip(r.below(3) as u32)
        .times(1 + r.below(3) as u32);
    if r.below(2) == 0 {
        f = f.short();
    }
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_disk_faults_never_give_a_reader_a_wrong_byte() {
    let size = (CHUNKS as u64) * u64::from(CHUNK);
    for seed in 1..=12u64 {
        let s = Setup::new(100 + seed);
        let mut r = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        // Room for 6 of the 8 non-zero chunks: eviction happens.
        let capacity = 6 * u64::from(CHUNK);
        let (mut g, mut v, _up) = s.open(capacity);
        let (mut failed, mut reads) = (0, 0);
        for step in 0..150 {
            match r.below(10) {
                0 | 1 => s.faults.add(random_fault(&mut r)),
                2 => s.faults.clear(),
                3 => {
                    let _ = v.sync().await;
                }
                4 if step % 3 == 0 => {
                    settle(&g, &v).await;
                    close(g, v).await;
                    (g, v, _) = s.open(capacity);
                }
                _ => {
                    let off = r.below(size);
                    let len = (1 + r.below(3 * u64::from(CHUNK))).min(size - off) as u32;
                    reads += 1;
                    match v.read_bytes(off, len).await {
                        Ok(got) => assert_eq!(
                            &got[..],
                            &s.data[off as usize..off as usize + len as usize],
                            "seed {seed} step {step}: read {off}+{len}"
                        ),
                        // Only a full group whose map cannot be written
                        // (so nothing can be evicted) fails a read.
                        Err(e) => {
                            assert!(e.is_no_space(), "seed {seed} step {step}: {e}");
                            failed += 1;
                        }
                    }
                }
            }
            assert!(g.usage().used <= capacity, "seed {seed} step {step}");
        }
        s.faults.clear();
        settle(&g, &v).await;
        v.sync().await.unwrap();
        assert_eq!(g.usage().used, v.present_bytes(), "seed {seed}");
        close(g, v).await;
        let (g, v, _) = s.open(capacity);
        assert!(v.verify_present().unwrap().is_empty(), "seed {seed}");
        assert_eq!(g.usage().used, v.present_bytes(), "seed {seed}");
        // The whole image does not fit: chunk by chunk.
        for i in 0..CHUNKS as u64 {
            assert_eq!(read_chunk(&v, i).await, s.chunk(i), "seed {seed} chunk {i}");
        }
        assert!(failed < reads, "seed {seed}: every read failed");
        assert!(s.faults.injected() > 0, "seed {seed}: no fault was met");
    }
}
