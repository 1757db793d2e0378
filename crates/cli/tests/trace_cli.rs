//! `virtman trace`: synthetic traces, and a trace recorded from a real boot
//! of the test guest of `virtman-testkit` under qemu, replayed against the
//! same disk over NBD. Needs qemu-system-x86, busybox-static, cpio, e2fsprogs
//! and apt access for the kernel .deb (installed by `.ci/run`).
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;
use virtman_nbd::{
    Capabilities, Client, ClientConfig, Endpoint, Export, ExportError, FileExport, Listener,
    ReadChunk, Server, ServerConfig,
};
use virtman_sim::Trace;
use virtman_testkit::guest::{self, BOOTS_FILE, DONE_LINE, MARKER};

const BIN: &str = env!("CARGO_BIN_EXE_virtman");

fn virtman(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).output().unwrap()
}

#[test]
fn synth_writes_a_seeded_trace_of_the_working_set() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    for out in [&a, &b] {
        let o = virtman(&[
            "trace",
            "synth",
            "--image-size",
            "64M",
            "--working-set",
            "4M",
            "--seed",
            "3",
            "-o",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let text = std::fs::read_to_string(&a).unwrap();
    assert_eq!(text, std::fs::read_to_string(&b).unwrap(), "same seed");
    let t = Trace::parse(&text).unwrap();
    assert_eq!(t.image_size, 64 << 20);
    assert_eq!(t.chunk_bytes(256 << 10), 4 << 20);

    // JSON to standard output parses too.
    let o = virtman(&[
        "trace",
        "synth",
        "--image-size",
        "64M",
        "--working-set",
        "4M",
        "--json",
    ]);
    assert!(o.status.success());
    Trace::parse(&String::from_utf8(o.stdout).unwrap()).unwrap();

    // A working set larger than the image is refused with the reason.
    let o = virtman(&[
        "trace",
        "synth",
        "--image-size",
        "1M",
        "--working-set",
        "4M",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("does not fit"), "{err}");
}

/// An export that notes every read's range.
struct Noting {
    inner: FileExport,
    reads: Mutex<Vec<(u64, u32)>>,
}

#[async_trait]
impl Export for Noting {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadChunk>, ExportError> {
        self.reads.lock().unwrap().push((offset, len));
        self.inner.read(offset, len).await
    }
}

fn chunks(ranges: impl Iterator<Item = (u64, u64)>, chunk: u64) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    for (off, len) in ranges {
        for c in off / chunk..=(off + len - 1) / chunk {
            out.insert(c);
        }
    }
    out
}

/// Replays `trace`'s reads (back to back) against `disk` served over NBD;
/// returns the ranges the server saw.
async fn replay(trace: &Trace, disk: &Path, dir: &Path) -> Vec<(u64, u64)> {
    let export = Arc::new(Noting {
        inner: FileExport::open(disk, true).unwrap(),
        reads: Mutex::new(Vec::new()),
    });
    let server = Server::new(ServerConfig::default());
    server.add_export("disk", Arc::clone(&export) as Arc<dyn Export>);
    let socket = dir.join("replay.sock");
    let stop = CancellationToken::new();
    let task = tokio::spawn(
        Arc::clone(&server).serve(Listener::bind_unix(socket.clone()).unwrap(), stop.clone()),
    );
    let cfg = ClientConfig {
        export: "disk".into(),
        request_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(5),
        connections: 1,
        tls: None,
        meta_contexts: Vec::new(),
    };
    let client = Client::connect(&Endpoint::Unix(socket), &cfg)
        .await
        .unwrap();
    for r in &trace.reads {
        client.read(r.offset, r.length).await.unwrap();
    }
    client.disconnect().await.unwrap();
    stop.cancel();
    task.await.unwrap().unwrap();
    let seen = export.reads.lock().unwrap().clone();
    seen.into_iter().map(|(o, l)| (o, u64::from(l))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_boot_replays_to_the_same_chunks() {
    let assets = guest::assets().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    assets.copy_disk(&disk).unwrap();
    let before = std::fs::read(&disk).unwrap();
    let out = dir.path().join("boot.trace");
    let console = dir.path().join("console.txt");
    let o = tokio::task::spawn_blocking({
        let (disk, out, console) = (disk.clone(), out.clone(), console.clone());
        let (kernel, initrd) = (assets.kernel.clone(), assets.initrd.clone());
        move || {
            Command::new(BIN)
                .args(["trace", "record", "--kernel"])
                .arg(&kernel)
                .arg("--initrd")
                .arg(&initrd)
                .arg("--disk")
                .arg(&disk)
                .args(["--append", "quiet virtman.id=trace", "--timeout", "120s"])
                .arg("--console")
                .arg(&console)
                .arg("-o")
                .arg(&out)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let console = std::fs::read_to_string(&console).unwrap();
    assert!(console.contains(MARKER), "console:\n{console}");
    assert!(console.contains(DONE_LINE), "console:\n{console}");
    // The guest booted from a copy: the disk given is untouched.
    assert!(
        std::fs::read(&disk).unwrap() == before,
        "the disk was written"
    );
    assert_eq!(guest::read_disk_file(&disk, BOOTS_FILE).unwrap(), "");

    let trace = Trace::parse(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(trace.image_size, before.len() as u64);
    assert!(trace.reads.len() >= 5, "{} reads", trace.reads.len());
    eprintln!(
        "recorded {} reads, {} bytes, {} bytes of 256 KiB chunks, over {} us",
        trace.reads.len(),
        trace.bytes(),
        trace.chunk_bytes(256 << 10),
        trace.reads.last().unwrap().at_us
    );

    let seen = replay(&trace, &disk, dir.path()).await;
    for chunk in [64u64 << 10, 256 << 10] {
        let recorded = chunks(trace.reads.iter().map(|r| (r.offset, r.length)), chunk);
        let replayed = chunks(seen.iter().copied(), chunk);
        assert_eq!(recorded, replayed, "chunks of {chunk} bytes");
    }
}
