//! A helper process for the cache group's crash and lock tests (not a user tool).
//!
//! - `torture DIR IMAGE_A IMAGE_B CAPACITY SEQ SEED`: opens the group, makes
//!   sure volumes `a` and `b` and snapshot `vm` (over `a`) exist, prints
//!   `READY`, then writes, flushes and fetches until killed. Each snapshot
//!   write fills whole 4 KiB blocks with a pattern naming (block, seq) and is
//!   printed as `W seq first count` once acknowledged; `F seq` after a flush
//!   returns means every write up to `seq` is durable.
//! - `hold DIR`: opens the group, prints `READY`, sleeps until killed.
//! - `fulldisk DIR IMAGE`: fetches a whole image into a group on a file system
//!   too small for it, checking every read; prints `FULL disk_errors=N` and
//!   `OK present=N`.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use virtman_cache::{CacheGroup, FileUpstream, GroupConfig, Upstream};
use virtman_image::Manifest;
use virtman_nbd::Export;

/// Snapshot blocks written by the torture.
const BLOCK: u64 = 4096;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let res = match args.get(1).map(String::as_str) {
        Some("torture") if args.len() == 8 => torture(&args[2..]),
        Some("hold") if args.len() == 3 => hold(&args[2]),
        Some("fulldisk") if args.len() == 4 => fulldisk(&args[2], &args[3]),
        _ => Err("usage: virtman-cache-torture torture|hold|fulldisk ...".into()),
    };
    if let Err(e) = res {
        eprintln!("virtman-cache-torture: {e}");
        std::process::exit(1);
    }
}

type Res = Result<(), Box<dyn std::error::Error>>;

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// The content of `block` written by write `seq`: a header naming both, then
/// bytes derived from them.
pub fn pattern(block: u64, seq: u64) -> Vec<u8> {
    let mut v = vec![0u8; 4096];
    let mut h = blake3::Hasher::new();
    h.update(&block.to_le_bytes());
    h.update(&seq.to_le_bytes());
    h.finalize_xof().fill(&mut v);
    v[..4].copy_from_slice(b"VMTW");
    v[4..12].copy_from_slice(&block.to_le_bytes());
    v[12..20].copy_from_slice(&seq.to_le_bytes());
    v
}

fn manifest_of(path: &str, chunk: u32) -> Result<Manifest, Box<dyn std::error::Error>> {
    Ok(Manifest::of_bytes(&std::fs::read(path)?, chunk)?)
}

fn runtime() -> Result<tokio::runtime::Runtime, std::io::Error> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn torture(a: &[String]) -> Res {
    let (dir, img_a, img_b) = (&a[0], &a[1], &a[2]);
    let capacity: u64 = a[3].parse()?;
    let mut seq: u64 = a[4].parse()?;
    let mut rng = Rng(a[5].parse::<u64>()? | 1);
    runtime()?.block_on(async move {
        // Commit at once: kills then land in and around commits, which is
        // what this torture is for (the default interval would defer them
        // past most kills).
        let config = GroupConfig {
            commit_interval_ms: 0,
            ..GroupConfig::with_capacity(capacity)
        };
        let g = CacheGroup::open(dir, config)?;
        let ma = manifest_of(img_a, 16384)?;
        let mb = manifest_of(img_b, 16384)?;
        let va = g.add_volume("a", &ma)?;
        let vb = g.add_volume("b", &mb)?;
        va.set_upstream(Some(
            Arc::new(FileUpstream::open(Path::new(img_a))?) as Arc<dyn Upstream>
        ));
        vb.set_upstream(Some(
            Arc::new(FileUpstream::open(Path::new(img_b))?) as Arc<dyn Upstream>
        ));
        let snap = match g.snapshot("vm") {
            Some(s) => s,
            None => g.create_snapshot("vm", "a")?,
        };
        say("READY");
        // Background fetches of both volumes (b is evicted under pressure).
        for (k, v) in [va.clone(), vb.clone(), vb].into_iter().enumerate() {
            let mut r = Rng(rng.next() ^ ((k as u64 + 1) * 0x9e37_79b9));
            tokio::spawn(async move {
                loop {
                    let size = v.size();
                    let off = r.next() % size;
                    let len = (1 + r.next() % 100_000).min(size - off);
                    let _ = v.read(off, u32::try_from(len).unwrap_or(1)).await;
                }
            });
        }
        let blocks = snap.size() / BLOCK;
        loop {
            let n = 1 + rng.next() % 4;
            let first = rng.next() % (blocks - n);
            seq += 1;
            let mut buf = Vec::with_capacity(4 * 4096);
            for b in first..first + n {
                buf.extend_from_slice(&pattern(b, seq));
            }
            let fua = rng.next().is_multiple_of(7);
            Export::write(&*snap, first * BLOCK, Bytes::from(buf), fua).await?;
            say(&format!("W {seq} {first} {n}"));
            if fua {
                say(&format!("U {seq}"));
            }
            if rng.next().is_multiple_of(5) {
                Export::flush(&*snap).await?;
                say(&format!("F {seq}"));
            }
        }
        #[allow(unreachable_code)]
        Ok(())
    })
}

fn hold(dir: &str) -> Res {
    let _g = CacheGroup::open(dir, GroupConfig::with_capacity(1 << 20))?;
    say("READY");
    loop {
        std::thread::sleep(std::time::Duration::from_secs(60));
    }
}

fn fulldisk(dir: &str, image: &str) -> Res {
    runtime()?.block_on(async move {
        let g = CacheGroup::open(dir, GroupConfig::with_capacity(1 << 40))?;
        let m = manifest_of(image, 65536)?;
        let v = g.add_volume("big", &m)?;
        v.set_upstream(Some(
            Arc::new(FileUpstream::open(Path::new(image))?) as Arc<dyn Upstream>
        ));
        // Every read succeeds and is right: what no longer fits on the disk
        // is served from memory, counted as a disk error.
        let e = v.export();
        let mut off = 0;
        while off < m.size() {
            let got = virtman_cache::flatten(e.read(off, 65536).await?);
            if !m.verify_chunk(m.chunk_of(off), &got) {
                return Err(format!("chunk at {off} read wrong").into());
            }
            off += 65536;
        }
        let errors = v
            .stats()
            .disk_errors
            .load(std::sync::atomic::Ordering::Relaxed);
        if errors == 0 {
            return Err("the whole image fitted".into());
        }
        say(&format!("FULL disk_errors={errors}"));
        let present = v.present_list();
        if v.verify_present()? != Vec::<u64>::new() {
            return Err("a present chunk is wrong".into());
        }
        if let Some(&p) = present.first() {
            let got = v.read_bytes(m.chunk_offset(p), m.chunk_len(p)).await?;
            if !m.verify_chunk(p, &got) {
                return Err("reread of a present chunk is wrong".into());
            }
        }
        say(&format!("OK present={}", present.len()));
        Ok(())
    })
}
