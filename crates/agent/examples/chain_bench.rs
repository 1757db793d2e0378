//! Relay chain benchmark: how long the leaf of a chain of hosts takes to read a
//! working set cold, at depth 1 (straight from the origin) and deeper.
//!
//! ```text
//! origin (file export) ─NBD─► host 1 (cached volume) ─NBD─► host 2 ─► … ─► leaf: reads W bytes
//! ```
//!
//! Every hop is a real cached volume with its `Parents` upstream and its base
//! export on a loopback TCP NBD server, as in the agent; only the coordinator is
//! left out (the chain is wired by hand). Cut-through means a deeper chain
//! should add latency per chunk, not a copy of the working set per hop.
//!
//! Usage: `cargo run --release -p virtman-agent --example chain_bench -- [WORKING_SET_MIB] [DEPTHS...]`
//! (default 256 MiB, depths 1 and 4).

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use virtman_agent::upstream::{FetchConfig, Parents, Source};
use virtman_cache::{CacheGroup, GroupConfig, Upstream};
use virtman_image::{DEFAULT_CHUNK_SIZE, ImageStore};
use virtman_nbd::{Export, FileExport, Listener, Server, ServerConfig};

async fn serve(export: Arc<dyn Export>, stop: &CancellationToken) -> anyhow::Result<String> {
    let s = Server::new(ServerConfig::default());
    s.add_export("img", export);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?.to_string();
    tokio::spawn(s.serve(Listener::Tcp(l), stop.clone()));
    Ok(addr)
}

/// Builds a chain of `depth` hosts under an origin and returns the time the
/// leaf takes to read the whole image, 1 MiB at a time, 8 reads in flight.
async fn run(depth: usize, store: &ImageStore, work: &std::path::Path) -> anyhow::Result<f64> {
    let stop = CancellationToken::new();
    let img = store.open_image("img")?;
    let manifest = Arc::new(img.manifest.clone());
    let origin = FileExport::open(&img.data_path, true)?;
    let mut parent = serve(Arc::new(origin), &stop).await?;
    let (tx, _rx) = mpsc::unbounded_channel();
    let mut groups = Vec::new();
    let mut leaf = None;
    for hop in 1..=depth {
        let dir = work.join(format!("depth{depth}-host{hop}"));
        let group = CacheGroup::open(&dir, GroupConfig::with_capacity(4 << 30))?;
        let volume = group.add_volume("img", &manifest)?;
        let parents = Arc::new(Parents::new(
            "img",
            Arc::clone(&manifest),
            vec![],
            FetchConfig::default(),
            tx.clone(),
        ));
        parents.set(vec![Source {
            name: format!("host{}", hop - 1),
            addr: parent.clone(),
        }]);
        volume.set_upstream(Some(parents as Arc<dyn Upstream>));
        parent = serve(Arc::new(volume.export()), &stop).await?;
        leaf = Some(Arc::clone(&volume));
        groups.push(group);
    }
    let leaf = leaf.ok_or_else(|| anyhow::anyhow!("depth 0"))?;
    let size = manifest.size();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let step = 1u64 << 20;
    let mut off = 0;
    while off < size {
        while tasks.len() >= 8 {
            tasks
                .join_next()
                .await
                .ok_or_else(|| anyhow::anyhow!("join"))???;
        }
        let v = Arc::clone(&leaf);
        let len = u32::try_from(step.min(size - off))?;
        tasks.spawn(async move {
            v.read_bytes(off, len)
                .await
                .map(|_| ())
                .map_err(anyhow::Error::from)
        });
        off += step;
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let secs = started.elapsed().as_secs_f64();
    stop.cancel();
    Ok(secs)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mib: u64 = args.first().map(|s| s.parse()).transpose()?.unwrap_or(256);
    let depths: Vec<usize> = if args.len() > 1 {
        args[1..]
            .iter()
            .map(|s| s.parse())
            .collect::<Result<_, _>>()?
    } else {
        vec![1, 4]
    };
    let work = tempfile::tempdir()?;
    let raw = work.path().join("img.raw");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&raw)?;
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..mib {
            for b in buf.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x.to_be_bytes()[4];
            }
            f.write_all(&buf)?;
        }
    }
    let store = ImageStore::open(work.path().join("store"))?;
    store.import(&raw, "img", DEFAULT_CHUNK_SIZE, &mut |_, _| {})?;
    println!(
        "working set {mib} MiB, chunks of {} KiB, cold caches, loopback",
        DEFAULT_CHUNK_SIZE >> 10
    );
    println!(
        "{:>6} {:>10} {:>10} {:>8}",
        "depth", "seconds", "MiB/s", "vs d1"
    );
    let mut base = None;
    for d in depths {
        let s = run(d, &store, work.path()).await?;
        let b = *base.get_or_insert(s);
        println!("{d:>6} {s:>10.2} {:>10.0} {:>7.2}x", mib as f64 / s, s / b);
    }
    Ok(())
}
