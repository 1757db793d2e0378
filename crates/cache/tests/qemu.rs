//! qemu's own tools through the NBD exports: `qemu-io` and `qemu-img convert`
//! read a cached volume (filled on demand from a file upstream) and read and
//! write a snapshot, and get the expected bytes.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use common::*;
use tokio_util::sync::CancellationToken;
use virtman_cache::{CacheGroup, GroupConfig, Upstream, X_VIRTMAN_PRESENT};
use virtman_nbd::{Export, Listener, Server, ServerConfig};

const MIB: usize = 1 << 20;

fn image() -> Vec<u8> {
    let mut v = image_bytes(21, 4 * MIB, 65536);
    v[..MIB].fill(0x11);
    v[MIB..2 * MIB].fill(0);
    v[2 * MIB..3 * MIB].fill(0x33);
    v
}

async fn run(cmd: &str, args: Vec<String>) -> (bool, String) {
    let cmd = cmd.to_owned();
    tokio::task::spawn_blocking(move || {
        let out = Command::new(&cmd).args(&args).output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    })
    .await
    .unwrap()
}

async fn qemu_io(uri: &str, read_only: bool, cmds: &[&str]) -> String {
    let mut args = vec!["-f".to_owned(), "raw".to_owned()];
    if read_only {
        args.push("-r".into());
    }
    for c in cmds {
        args.push("-c".into());
        args.push((*c).to_owned());
    }
    args.push(uri.to_owned());
    let (ok, out) = run("qemu-io", args).await;
    assert!(ok, "qemu-io failed: {out}");
    assert!(!out.contains("verification failed"), "{out}");
    assert!(!out.contains("failed"), "{out}");
    out
}

async fn convert(uri: &str, out: &Path) -> Vec<u8> {
    let _ = std::fs::remove_file(out);
    let args = vec![
        "convert".into(),
        "-f".into(),
        "raw".into(),
        "-O".into(),
        "raw".into(),
        uri.to_owned(),
        out.display().to_string(),
    ];
    let (ok, text) = run("qemu-img", args).await;
    assert!(ok, "qemu-img convert failed: {text}");
    std::fs::read(out).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_and_qemu_img_through_volume_and_snapshot_exports() {
    let dir = tempfile::tempdir().unwrap();
    let data = image();
    let (img, m) = image_file(dir.path(), "img.raw", &data, 65536);
    let g = CacheGroup::open(dir.path().join("g"), GroupConfig::with_capacity(1 << 30)).unwrap();
    let v = g.add_volume("deb", &m).unwrap();
    v.set_upstream(Some(file_upstream(&img) as Arc<dyn Upstream>));
    let snap = g.create_snapshot("vm1", "deb").unwrap();

    let server = Server::new(ServerConfig::default());
    server.add_export("deb", Arc::new(v.export()));
    server.add_export("vm1", Arc::clone(&snap) as Arc<dyn Export>);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(Arc::clone(&server).serve(Listener::Tcp(listener), cancel.clone()));
    let base = format!("nbd://127.0.0.1:{port}/deb");
    let vm = format!("nbd://127.0.0.1:{port}/vm1");

    // The cached volume, cold: qemu-io's pattern checks, then a full copy.
    qemu_io(
        &base,
        true,
        &[
            "read -P 0x11 0 1M",
            "read -P 0 1M 1M",
            "read -P 0x33 2M 1M",
            "read -P 0x11 4095 3",
        ],
    )
    .await;
    let copy = convert(&base, &dir.path().join("base.raw")).await;
    assert!(
        copy == data,
        "qemu-img convert of the cached volume differs"
    );
    assert!(v.verify_present().unwrap().is_empty());
    // Writing to the base export is refused.
    let args = ["-f", "raw", "-c", "write -P 1 0 4k", &base]
        .map(String::from)
        .to_vec();
    let (_, out) = run("qemu-io", args).await;
    assert!(
        out.contains("failed") || out.contains("read-only") || out.contains("Permission"),
        "{out}"
    );

    // The snapshot: writes, write-zeroes and a flush, then reads and a copy.
    qemu_io(
        &vm,
        false,
        &[
            "write -P 0x55 4k 8k",
            "write -P 0x66 1048577 100",
            "write -z 2M 64k",
            "write -P 0x77 4190000 4304",
            "flush",
            "read -P 0x55 4k 8k",
            "read -P 0 2M 64k",
            "read -P 0x33 2162688 4096",
        ],
    )
    .await;
    let mut expect = data.clone();
    expect[4096..12288].fill(0x55);
    expect[1_048_577..1_048_677].fill(0x66);
    expect[2 * MIB..2 * MIB + 65536].fill(0);
    expect[4_190_000..4 * MIB].fill(0x77);
    let copy = convert(&vm, &dir.path().join("vm.raw")).await;
    assert!(copy == expect, "qemu-img convert of the snapshot differs");
    // The base is untouched.
    let copy = convert(&base, &dir.path().join("base2.raw")).await;
    assert!(copy == data, "the snapshot's writes reached the base");

    cancel.cancel();
    task.await.unwrap().unwrap();
    drop(server);
    // After a restart the snapshot still holds its writes.
    drop((snap, v, g));
    let g = CacheGroup::open(dir.path().join("g"), GroupConfig::with_capacity(1 << 30)).unwrap();
    let snap = g.snapshot("vm1").unwrap();
    let got = snap.read_bytes(0, (4 * MIB) as u32).await.unwrap();
    assert!(got[..] == expect[..], "snapshot changed across a restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_maps_the_chunks_a_host_holds_in_the_x_virtman_context() {
    let dir = tempfile::tempdir().unwrap();
    let data = image(); // 64 chunks of 64 KiB; 1 MiB to 2 MiB all zero
    let (img, m) = image_file(dir.path(), "img.raw", &data, 65536);
    let g = CacheGroup::open(dir.path().join("g"), GroupConfig::with_capacity(1 << 30)).unwrap();
    let v = g.add_volume("deb", &m).unwrap();
    v.set_upstream(Some(file_upstream(&img) as Arc<dyn Upstream>));
    // The host holds chunk 0 and chunks 48 and 49.
    v.read(100, 10).await.unwrap();
    v.read(3 * MIB as u64, 128 << 10).await.unwrap();

    let server = Server::new(ServerConfig::default());
    server.add_export("deb", Arc::new(v.export()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(Arc::clone(&server).serve(Listener::Tcp(listener), cancel.clone()));
    let uri = format!("nbd://127.0.0.1:{port}/deb");

    // The export offers the context beside base:allocation.
    let (ok, out) = run("nbdinfo", vec!["--json".into(), uri.clone()]).await;
    assert!(ok, "{out}");
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    let contexts = info["exports"][0]["contexts"].as_array().unwrap();
    assert!(contexts.iter().any(|c| c == "base:allocation"), "{info}");
    assert!(contexts.iter().any(|c| c == X_VIRTMAN_PRESENT), "{info}");

    let (ok, out) = run(
        "nbdinfo",
        vec![
            format!("--map={X_VIRTMAN_PRESENT}"),
            "--json".into(),
            uri.clone(),
        ],
    )
    .await;
    assert!(ok, "{out}");
    let map: serde_json::Value = serde_json::from_str(&out).unwrap();
    let runs: Vec<(u64, u64, u64)> = map
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let n = |k: &str| e[k].as_u64().unwrap();
            (n("offset"), n("length"), n("type"))
        })
        .collect();
    // Held: chunks 0, 48 and 49, and every all-zero chunk (1 MiB to 2 MiB,
    // and the few the generator made): a read of those needs no parent.
    let k = 64 << 10;
    let mut want: Vec<(u64, u64, u64)> = Vec::new();
    for (i, c) in data.chunks(k).enumerate() {
        let held = [0, 48, 49].contains(&i) || c.iter().all(|&b| b == 0);
        let (off, t) = ((i * k) as u64, u64::from(held));
        match want.last_mut() {
            Some(last) if last.2 == t => last.1 += k as u64,
            _ => want.push((off, k as u64, t)),
        }
    }
    assert!(want.len() >= 6, "{want:?}");
    assert_eq!(runs, want);
    // Both contexts at once: one block status request, a reply chunk for
    // each (libnbd's nbdsh calls back once per context).
    let script = format!(
        "import json\n\
         h.add_meta_context('base:allocation')\n\
         h.add_meta_context('{X_VIRTMAN_PRESENT}')\n\
         h.connect_uri('{uri}')\n\
         seen = {{}}\n\
         def cb(ctx, off, entries, err):\n    seen[ctx] = list(entries)\n\
         h.block_status(h.get_size(), 0, cb)\n\
         print(json.dumps(seen))\n"
    );
    // nbdsh is `python3 -m nbd`; Debian's Python, whatever comes first in PATH.
    let args = vec!["-m".into(), "nbd".into(), "-c".into(), script];
    let (ok, out) = run("/usr/bin/python3", args).await;
    assert!(ok, "nbdsh (Debian package python3-libnbd): {out}");
    let seen: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    // Entries are (length, flags) pairs. base:allocation: the first MiB is
    // data; x-virtman:present: chunk 0 held, the rest of that MiB not.
    let first = |ctx: &str, n: usize| seen[ctx].as_array().unwrap()[..n].to_vec();
    assert_eq!(first("base:allocation", 2), [1 << 20, 0], "{seen}");
    assert_eq!(
        first(X_VIRTMAN_PRESENT, 4),
        [65536, 1, (1 << 20) - 65536, 0],
        "{seen}"
    );

    // Asking for nothing the export has selects nothing (and fails cleanly).
    let (ok, _) = run(
        "nbdinfo",
        vec!["--map=x-virtman:nothing".into(), uri.clone()],
    )
    .await;
    assert!(!ok);
    cancel.cancel();
    task.await.unwrap().unwrap();
}
