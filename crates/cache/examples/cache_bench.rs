//! Benchmark driver for `bench/cache.sh` (not a test): measures the cold fill
//! rate of a cached volume from a local file upstream, then serves the warm
//! volume (`vol`) and a snapshot over it (`snap`) over NBD on 127.0.0.1 until
//! stdin closes, for fio to read.
//!
//! Usage: `cache_bench IMAGE GROUP_DIR CHUNK_SIZE [PORT [cold]]`; with no
//! port it only measures the fill and exits; with `cold` it serves the volume
//! without filling it first (a client's read then measures the cold path).

use std::io::Read;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use virtman_cache::{CacheGroup, FileUpstream, GroupConfig, Upstream};
use virtman_nbd::{Export, Listener, Server, ServerConfig};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        anyhow::bail!("usage: cache_bench IMAGE GROUP_DIR CHUNK_SIZE [PORT]");
    }
    let image = std::path::PathBuf::from(&args[1]);
    let group_dir = std::path::PathBuf::from(&args[2]);
    let chunk: u32 = args[3].parse().context("chunk size")?;
    let port: Option<u16> = args.get(4).map(|p| p.parse()).transpose()?;
    let cold = args.get(5).is_some_and(|a| a == "cold");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let _ = std::fs::remove_dir_all(&group_dir);
        // The manifest, as `virtman image import` computes it (timed apart).
        let t = Instant::now();
        let data = std::fs::read(&image)?;
        let manifest = virtman_image::Manifest::of_bytes(&data, chunk)?;
        drop(data);
        let hash_s = t.elapsed().as_secs_f64();
        let size = manifest.size();
        let g = CacheGroup::open(&group_dir, GroupConfig::with_capacity(size * 2))?;
        let v = g.add_volume("vol", &manifest)?;
        v.set_upstream(Some(
            Arc::new(FileUpstream::open(&image)?) as Arc<dyn Upstream>
        ));
        // Cold fill: sequential windows of 16 MiB, each window's chunks fetched
        // in parallel (as a reader with read-ahead would), then one final sync.
        let t = Instant::now();
        let window = 16u64 << 20;
        let mut off = if cold { size } else { 0 };
        while off < size {
            let n = window.min(size - off);
            v.prefetch(off, n).await?;
            off += n;
        }
        v.sync().await?;
        let fill_s = t.elapsed().as_secs_f64();
        let mb = size as f64 / 1e6;
        if !cold {
            println!(
                "chunk={chunk} size={size} manifest_hash={:.0}MB/s cold_fill={:.0}MB/s ({fill_s:.2}s)",
                mb / hash_s,
                mb / fill_s
            );
            let bad = v.verify_present()?;
            anyhow::ensure!(
                bad.is_empty() && v.present_bytes() == size,
                "fill incomplete or wrong"
            );
        }
        let Some(port) = port else { return Ok(()) };
        let snap = g.create_snapshot("snap", "vol")?;
        let server = Server::new(ServerConfig::default());
        server.add_export("vol", Arc::new(v.export()));
        server.add_export("snap", Arc::clone(&snap) as Arc<dyn Export>);
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        let cancel = CancellationToken::new();
        let task = tokio::spawn(Arc::clone(&server).serve(Listener::Tcp(listener), cancel.clone()));
        println!("serving on 127.0.0.1:{port}");
        // Serve until stdin closes.
        tokio::task::spawn_blocking(|| {
            let mut buf = [0u8; 64];
            while matches!(std::io::stdin().read(&mut buf), Ok(n) if n > 0) {}
        })
        .await?;
        cancel.cancel();
        task.await??;
        Ok(())
    })
}
