//! Crash consistency: a child process writing to a snapshot and fetching
//! into two volumes (one of them evicted under pressure) is killed with
//! SIGKILL at random points, many times. After each kill the group is
//! reopened: every present chunk must match the manifest, and every snapshot
//! block must hold the base or a whole write of it no older than its last
//! flushed write (or than what the previous check saw). Also: a second
//! process is refused by the lock, and a full disk gives ENOSPC and nothing
//! breaks.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use virtman_cache::{CacheError, CacheGroup, GroupConfig, Upstream};

const HELPER: &str = env!("CARGO_BIN_EXE_virtman-cache-torture");
const BLOCK: u64 = 4096;
const SIZE: usize = 1 << 20;

fn pattern(block: u64, seq: u64) -> Vec<u8> {
    let mut v = vec![0u8; BLOCK as usize];
    let mut h = blake3::Hasher::new();
    h.update(&block.to_le_bytes());
    h.update(&seq.to_le_bytes());
    h.finalize_xof().fill(&mut v);
    v[..4].copy_from_slice(b"VMTW");
    v[4..12].copy_from_slice(&block.to_le_bytes());
    v[12..20].copy_from_slice(&seq.to_le_bytes());
    v
}

/// Kills the child on drop, so a failing test leaves no process behind.
struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns the helper and a thread forwarding its complete stdout lines.
fn spawn(args: &[&str]) -> (Killed, mpsc::Receiver<String>) {
    let mut child = Command::new(HELPER)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(out);
        let mut line = String::new();
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                // A line cut by the kill has no newline: ignore it.
                Ok(_) if !line.ends_with('\n') => break,
                Ok(_) => {
                    if tx.send(line.trim_end().to_owned()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    (Killed(child), rx)
}

fn wait_ready(rx: &mpsc::Receiver<String>) {
    let l = rx.recv_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(l, "READY");
}

#[test]
fn sigkill_at_random_points_loses_nothing_flushed_and_stores_nothing_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let gdir = dir.path().join("group");
    let a = image_bytes(11, SIZE, 16384);
    let b = image_bytes(12, SIZE, 16384);
    let (pa, ma) = image_file(dir.path(), "a.raw", &a, 16384);
    let (pb, _) = image_file(dir.path(), "b.raw", &b, 16384);
    let capacity = (SIZE + SIZE / 2) as u64;
    let blocks = SIZE as u64 / BLOCK;
    // The oldest write each block may show (0: the base is allowed).
    let mut floor: HashMap<u64, u64> = HashMap::new();
    let mut seq = 0u64;
    let mut rng = 0x5eed_u64;
    let mut total_writes = 0;
    let mut total_flushes = 0;
    let iterations = 16;
    for it in 0..iterations {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let (child, rx) = spawn(&[
            "torture",
            gdir.to_str().unwrap(),
            pa.to_str().unwrap(),
            pb.to_str().unwrap(),
            &capacity.to_string(),
            &seq.to_string(),
            &rng.to_string(),
        ]);
        wait_ready(&rx);
        if it == 0 {
            // The group is held: a second opener is refused by the lock.
            let err = CacheGroup::open(&gdir, GroupConfig::with_capacity(capacity)).unwrap_err();
            assert!(matches!(err, CacheError::Locked { .. }), "{err}");
        }
        std::thread::sleep(Duration::from_millis(20 + rng % 300));
        drop(child); // SIGKILL, then reap.
        // Apply what the child reported before it died.
        let mut writes: Vec<(u64, u64, u64)> = Vec::new();
        for line in rx.try_iter() {
            let f: Vec<u64> = line[2..].split(' ').map(|x| x.parse().unwrap()).collect();
            match &line[..1] {
                "W" => {
                    writes.push((f[0], f[1], f[2]));
                    seq = seq.max(f[0]);
                    total_writes += 1;
                }
                "F" => {
                    total_flushes += 1;
                    for &(s, first, n) in writes.iter().filter(|w| w.0 <= f[0]) {
                        for blk in first..first + n {
                            let e = floor.entry(blk).or_insert(0);
                            *e = (*e).max(s);
                        }
                    }
                }
                "U" => {
                    for &(s, first, n) in writes.iter().filter(|w| w.0 == f[0]) {
                        for blk in first..first + n {
                            let e = floor.entry(blk).or_insert(0);
                            *e = (*e).max(s);
                        }
                    }
                }
                other => panic!("unexpected line {other:?}"),
            }
        }
        // Writes in flight at the kill may have landed: skip their numbers.
        seq += 100;
        check(&gdir, &pa, &ma, &a, blocks, seq, &mut floor, capacity);
    }
    assert!(total_writes > 50, "too few writes: {total_writes}");
    assert!(total_flushes > 5, "too few flushes: {total_flushes}");
}

#[allow(clippy::too_many_arguments)]
fn check(
    gdir: &Path,
    pa: &Path,
    ma: &virtman_image::Manifest,
    a: &[u8],
    blocks: u64,
    max_seq: u64,
    floor: &mut HashMap<u64, u64>,
    capacity: u64,
) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let g = CacheGroup::open(gdir, GroupConfig::with_capacity(capacity)).unwrap();
        for v in g.volumes() {
            assert!(!v.was_rebuilt(), "volume {} was rebuilt", v.name());
            let bad = v.verify_present().unwrap();
            assert!(
                bad.is_empty(),
                "volume {}: wrong chunks {bad:?} marked present",
                v.name()
            );
        }
        assert!(g.usage().used <= capacity + 2 * 16384, "{:?}", g.usage());
        let va = g.volume("a").unwrap();
        assert_eq!(va.manifest(), ma);
        va.set_upstream(Some(file_upstream(pa) as Arc<dyn Upstream>));
        let snap = g.snapshot("vm").unwrap();
        let all = snap.read_bytes(0, SIZE as u32).await.unwrap();
        for blk in 0..blocks {
            let got = &all[(blk * BLOCK) as usize..((blk + 1) * BLOCK) as usize];
            let min = floor.get(&blk).copied().unwrap_or(0);
            let seen = if got == &a[(blk * BLOCK) as usize..((blk + 1) * BLOCK) as usize] {
                0
            } else {
                assert_eq!(
                    &got[..4],
                    b"VMTW",
                    "block {blk}: neither the base nor a write"
                );
                let s = u64::from_le_bytes(got[12..20].try_into().unwrap());
                assert_eq!(
                    got,
                    &pattern(blk, s)[..],
                    "block {blk}: a torn or foreign write"
                );
                assert!(s <= max_seq, "block {blk}: write {s} from the future");
                s
            };
            assert!(
                seen >= min,
                "block {blk}: shows write {seen} but write {min} was flushed or seen before"
            );
            floor.insert(blk, seen);
        }
    });
}

#[test]
fn second_process_is_refused_by_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let (child, rx) = spawn(&["hold", dir.path().to_str().unwrap()]);
    wait_ready(&rx);
    let err = CacheGroup::open(dir.path(), GroupConfig::with_capacity(1 << 20)).unwrap_err();
    assert!(matches!(err, CacheError::Locked { .. }), "{err}");
    assert!(err.to_string().contains("LOCK"), "{err}");
    drop(child);
    CacheGroup::open(dir.path(), GroupConfig::with_capacity(1 << 20)).unwrap();
}

/// Needs root for a private mount namespace with a small tmpfs (CI runs as
/// root); elsewhere it says so and checks nothing.
#[test]
fn a_full_disk_serves_reads_from_memory_and_breaks_nothing() {
    let probe = Command::new("unshare")
        .args(["-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"])
        .output();
    if !matches!(&probe, Ok(o) if o.status.success()) {
        eprintln!("cannot mount a tmpfs in a private namespace here; skipping");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = image_bytes(13, 4 << 20, 65536);
    let (img, _) = image_file(dir.path(), "big.raw", &data, 65536);
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let script = format!(
        "mount -t tmpfs -o size=1m tmpfs {m} && exec {h} fulldisk {m}/g {i}",
        m = mnt.display(),
        h = HELPER,
        i = img.display()
    );
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "helper failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("FULL disk_errors="), "{stdout}");
    assert!(stdout.contains("OK present="), "{stdout}");
}
