//! `virtman serve` under a long mixed load keeps its threads and memory
//! bounded: many connections, small and large reads and writes, requests
//! up to the maximum; threads stay under a small multiple of the cores
//! throughout, and the memory the server holds comes back down once the
//! clients have gone. Bounds are generous (memory and threads, not times).
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use virtman_nbd::{Client, ClientConfig, Endpoint};

const SIZE: u64 = 128 << 20;

/// What the server may hold once its clients have gone: 1.25x what nbdkit
/// held after the same kind of load (39 MiB).
const RSS_BOUND_KIB: u64 = 48 * 1024;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `Threads` and `VmRSS` (KiB) of `pid`.
fn usage(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    (field("Threads:"), field("VmRSS:"))
}

#[test]
fn many_connections_with_large_requests_keep_threads_and_memory_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.raw");
    std::fs::write(&file, virtman_testkit::pattern(SIZE as usize, 3)).unwrap();
    let sock = dir.path().join("nbd.sock");
    let server = Server(
        Command::new(env!("CARGO_BIN_EXE_virtman"))
            .arg("serve")
            .arg(&file)
            .args(["--name", "disk", "--socket"])
            .arg(&sock)
            .env("VIRTMAN_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = server.0.id();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "the server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let (idle_threads, idle_rss) = usage(pid);

    // The load: 48 clients of 2 connections each, 8 requests in flight on
    // each, for 4 s, looping over reads of 4 KiB to 32 MiB (the maximum)
    // and writes of 4 KiB to 4 MiB, half of them FUA; a sampler keeps the
    // most threads seen.
    let stop = Arc::new(AtomicBool::new(false));
    let most_threads = Arc::new(AtomicU64::new(0));
    let sampler = {
        let stop = Arc::clone(&stop);
        let most = Arc::clone(&most_threads);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                most.fetch_max(usage(pid).0, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let bytes_moved: u64 = rt.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for c in 0..48u64 {
            let sock = sock.clone();
            tasks.spawn(async move {
                let config = ClientConfig {
                    export: "disk".into(),
                    connections: 2,
                    ..ClientConfig::default()
                };
                let client = Client::connect(&Endpoint::Unix(sock), &config)
                    .await
                    .unwrap();
                let mut workers = tokio::task::JoinSet::new();
                for w in 0..8u64 {
                    let client = client.clone();
                    workers.spawn(async move {
                        let sizes = [4 << 10, 64 << 10, 1 << 20, 8 << 20, 32 << 20];
                        let started = Instant::now();
                        let mut moved = 0u64;
                        let mut i = c * 8 + w;
                        while started.elapsed() < Duration::from_secs(4) {
                            let len = sizes[(i % 5) as usize];
                            let offset = (i * 7919 * 4096) % (SIZE - len);
                            if i % 3 == 0 {
                                // Every other write durable (FUA: an fdatasync
                                // that holds a blocking thread for a while).
                                let len = len.min(4 << 20);
                                let data = Bytes::from(vec![(i % 251) as u8; len as usize]);
                                client.write(offset, data, i % 2 == 0).await.unwrap();
                                moved += len;
                            } else {
                                moved += client.read(offset, len).await.unwrap().len() as u64;
                            }
                            i += 1;
                        }
                        moved
                    });
                }
                let mut moved = 0;
                while let Some(m) = workers.join_next().await {
                    moved += m.unwrap();
                }
                client.disconnect().await.unwrap();
                moved
            });
        }
        let mut total = 0;
        while let Some(r) = tasks.join_next().await {
            total += r.unwrap();
        }
        total
    });
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let most_threads = most_threads.load(Ordering::Relaxed);

    // Once the clients are gone the memory comes back down.
    let deadline = Instant::now() + Duration::from_secs(10);
    let rss_after = loop {
        let (_, rss) = usage(pid);
        if rss <= RSS_BOUND_KIB || Instant::now() > deadline {
            break rss;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!(
        "moved {} MiB; threads idle {idle_threads}, at most {most_threads}; \
         RSS idle {} MiB, after {} MiB",
        bytes_moved >> 20,
        idle_rss >> 10,
        rss_after >> 10
    );
    assert!(bytes_moved > 256 << 20, "the load did not run");
    // The main thread, a worker per core, the blocking pool (four per core,
    // at least eight), the buffer trimmer, and two to spare.
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get() as u64);
    let bound = 1 + cores + (4 * cores).max(8) + 1 + 2;
    assert!(
        most_threads <= bound,
        "{most_threads} threads (bound {bound})"
    );
    assert!(
        rss_after <= RSS_BOUND_KIB,
        "{} MiB held 10 s after the clients left",
        rss_after >> 10
    );
}
