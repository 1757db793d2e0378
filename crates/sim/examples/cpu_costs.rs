//! Measures the CPU costs the simulator's CPU model takes as defaults
//! (`virtman_sim::CpuCosts::measured`), on the machine it runs on, with the
//! real code paths of the workspace crates. Not a test; run with
//!
//! ```text
//! cargo run --release -p virtman-sim --example cpu_costs
//! ```
//!
//! What it measures (CPU time from `/proc/PID/stat`, utime + stime, so every
//! thread of a process counts; the serving side runs in a child process, a
//! copy of this program, so client and server costs are told apart):
//!
//! ```text
//!  hash        blake3::hash of 256 KiB chunks                     (this process)
//!  fill        CachedVolume cold fill from a page-cached file:    (child)
//!              fetch + BLAKE3 verify + pwrite + batched commits, per chunk
//!  pread       a 256 KiB pread of a page-cached file              (this process)
//!  vol/TCP     the agent's base export (VolumeExport of a warm     (child: server,
//!              volume) over TCP, one request at a time             this: client)
//!  snap/unix   a VM snapshot export (Snapshot over the volume)     (child, this)
//!              over a unix socket, as the storm's replayers read it
//!  file/TCP    the origin's FileExport over TCP                    (child, this)
//!  qemu-nbd    the plain server of `direct` mode over TCP          (qemu-nbd, this)
//!  compare     the storm replayer's check: pread of the image + memcmp
//!  sleep       tokio::time::sleep overshoot (the storm's link delay and think time)
//!  start       how far apart the storm's replayers start: n tasks spawned at
//!              once, each connecting its NBD client before its first read
//! ```
//!
//! Each NBD path is read at 4 KiB, 64 KiB and 256 KiB; a least-squares line
//! through the three gives a per-request and a per-byte cost for each side.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss,
    clippy::unwrap_used
)]

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio_util::sync::CancellationToken;
use virtman_cache::{CacheGroup, FileUpstream, GroupConfig, Upstream};
use virtman_nbd::{
    Client, ClientConfig, Endpoint, Export, FileExport, Listener, Server, ServerConfig,
};

const CHUNK: u32 = 256 << 10;
const IMAGE: u64 = 128 << 20;
const SIZES: [u64; 3] = [4 << 10, 64 << 10, 256 << 10];

/// CPU seconds (user + system) of a process so far.
fn cpu_of(pid: u32) -> anyhow::Result<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = s.rsplit_once(')').map(|x| x.1).context("bad stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11).context("utime")?.parse()?;
    let stime: f64 = f.get(12).context("stime")?.parse()?;
    // USER_HZ is 100 on Linux.
    Ok((utime + stime) / 100.0)
}

fn self_cpu() -> anyhow::Result<f64> {
    cpu_of(std::process::id())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("serve") {
        return serve(Path::new(&args[2]), Path::new(&args[3]));
    }
    let dir = tempfile::Builder::new().prefix("cpu-costs.").tempdir()?;
    let image = dir.path().join("img.raw");
    let mut data = vec![0u8; IMAGE as usize];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
    }
    std::fs::write(&image, &data)?;

    // BLAKE3, one thread.
    let chunk = &data[..CHUNK as usize];
    let (mut n, t0, c0) = (0u64, Instant::now(), self_cpu()?);
    while t0.elapsed() < Duration::from_secs(2) {
        std::hint::black_box(blake3::hash(std::hint::black_box(chunk)));
        n += 1;
    }
    let hash_cpu = self_cpu()? - c0;
    let hash_rate = (n * u64::from(CHUNK)) as f64 / hash_cpu;
    println!(
        "hash: {:.0} MB/s of CPU (blake3::hash, 256 KiB chunks, {n} chunks in {hash_cpu:.2} s CPU, {:.2} s wall)",
        hash_rate / 1e6,
        t0.elapsed().as_secs_f64()
    );

    // pread of a page-cached 256 KiB, and the replayer's compare.
    let f = File::open(&image)?;
    let mut buf = vec![0u8; CHUNK as usize];
    let (mut n, t0, c0) = (0u64, Instant::now(), self_cpu()?);
    while t0.elapsed() < Duration::from_secs(2) {
        f.read_exact_at(&mut buf, (n * u64::from(CHUNK)) % IMAGE)?;
        n += 1;
    }
    let pread_s = (self_cpu()? - c0) / n as f64;
    println!("pread: {:.1} us per 256 KiB", pread_s * 1e6);
    let other = data[..CHUNK as usize].to_vec();
    let (mut n, t0, c0) = (0u64, Instant::now(), self_cpu()?);
    while t0.elapsed() < Duration::from_secs(2) {
        let off = (n * u64::from(CHUNK)) % IMAGE;
        f.read_exact_at(&mut buf, off)?;
        std::hint::black_box(buf[..] == other[..] || buf == data[off as usize..][..CHUNK as usize]);
        n += 1;
    }
    let compare_s = (self_cpu()? - c0) / n as f64;
    println!(
        "compare: {:.1} us per 256 KiB (pread + memcmp), {:.3} ns/byte",
        compare_s * 1e6,
        compare_s / f64::from(CHUNK) * 1e9
    );
    // The store's parts: pwrite of 256 KiB chunks into a new sparse file
    // (page cache), then one fdatasync of them all (the batched commit).
    let mut pw = 0.0;
    let mut sync = 0.0;
    let rounds = 4u64;
    for round in 0..rounds {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(dir.path().join(format!("store{round}")))?;
        out.set_len(IMAGE)?;
        let c0 = self_cpu()?;
        for (i, c) in data.chunks(CHUNK as usize).enumerate() {
            out.write_all_at(c, i as u64 * u64::from(CHUNK))?;
        }
        let c1 = self_cpu()?;
        out.sync_data()?;
        let c2 = self_cpu()?;
        pw += c1 - c0;
        sync += c2 - c1;
    }
    let chunks = (rounds * IMAGE / u64::from(CHUNK)) as f64;
    println!(
        "store: pwrite {:.1} us, fdatasync {:.1} us of this process's CPU per 256 KiB chunk",
        pw / chunks * 1e6,
        sync / chunks * 1e6
    );
    drop(data);

    // The serving child: fill, then serve vol (TCP), snap (unix), file (TCP).
    let sock = dir.path().join("snap.sock");
    let mut child = Command::new(std::env::current_exe()?)
        .arg("serve")
        .arg(&image)
        .arg(dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut out = BufReader::new(child.stdout.take().context("stdout")?);
    let mut line = String::new();
    let port: u16 = loop {
        line.clear();
        if out.read_line(&mut line)? == 0 {
            bail!("the serving child exited");
        }
        print!("{line}");
        if let Some(p) = line.strip_prefix("port ") {
            break p.trim().parse()?;
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let pid = child.id();
    let tcp = Endpoint::Tcp(format!("127.0.0.1:{port}"));
    let unix = Endpoint::Unix(sock.clone());
    let mut lines = Vec::new();
    for (name, ep, export) in [
        ("vol/TCP (base export to a child host)", &tcp, "vol"),
        ("snap/unix (snapshot export to a VM)", &unix, "snap"),
        ("file/TCP (origin FileExport)", &tcp, "file"),
    ] {
        lines.push((name, rt.block_on(path_costs(ep, export, pid))?));
    }
    let mut spreads = Vec::new();
    for n in [32usize, 64] {
        spreads.push((
            format!("{n} VMs, snapshot export over unix"),
            rt.block_on(start_spread(&unix, "snap", n))?,
        ));
    }
    drop(child.stdin.take());
    let _ = child.wait();

    // qemu-nbd, as direct mode runs it.
    let qport = port.wrapping_add(1);
    let q = Command::new("qemu-nbd")
        .args([
            "-r",
            "-t",
            "-e",
            "1024",
            "-f",
            "raw",
            "-x",
            "img",
            "-b",
            "127.0.0.1",
            "-p",
        ])
        .arg(qport.to_string())
        .arg(&image)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    match q {
        Ok(q) => {
            let mut q = Kill(q);
            let ep = Endpoint::Tcp(format!("127.0.0.1:{qport}"));
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::net::TcpStream::connect(("127.0.0.1", qport)).is_err() {
                anyhow::ensure!(Instant::now() < deadline, "qemu-nbd did not start");
                std::thread::sleep(Duration::from_millis(20));
            }
            let pid = q.0.id();
            lines.push((
                "qemu-nbd/TCP (direct mode's server)",
                rt.block_on(path_costs(&ep, "img", pid))?,
            ));
            let _ = q.0.kill();
        }
        Err(e) => println!("qemu-nbd: not measured ({e})"),
    }
    println!();
    println!("per request: server us + ns/byte | client us + ns/byte  (fit over 4K, 64K, 256K)");
    for (name, c) in &lines {
        println!(
            "{name}: server {:.1} us + {:.3} ns/B | client {:.1} us + {:.3} ns/B",
            c.server.0 * 1e6,
            c.server.1 * 1e9,
            c.client.0 * 1e6,
            c.client.1 * 1e9
        );
    }

    for (what, (first, last)) in &spreads {
        println!(
            "start spread, {what}: first read issued at {:.2} ms, last at {:.2} ms (spread {:.2} ms)",
            first * 1e3,
            last * 1e3,
            (last - first) * 1e3
        );
    }

    // tokio's timer: what sleep(d) really waits.
    rt.block_on(async {
        for d in [Duration::from_micros(200), Duration::from_millis(5)] {
            let n = 400u32;
            let t0 = Instant::now();
            for _ in 0..n {
                tokio::time::sleep(d).await;
            }
            let mean = t0.elapsed() / n;
            println!(
                "sleep({d:?}): {:.3} ms on average (overshoot {:.3} ms)",
                mean.as_secs_f64() * 1e3,
                (mean.as_secs_f64() - d.as_secs_f64()) * 1e3
            );
        }
    });
    Ok(())
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct PathCost {
    /// (seconds per request, seconds per byte)
    server: (f64, f64),
    client: (f64, f64),
}

/// Reads `export` one request at a time at each size for about 2 s of wall
/// time; fits CPU per request = a + b * bytes on each side.
async fn path_costs(ep: &Endpoint, export: &str, server_pid: u32) -> anyhow::Result<PathCost> {
    let c = Client::connect(
        ep,
        &ClientConfig {
            export: export.to_owned(),
            ..ClientConfig::default()
        },
    )
    .await?;
    let mut srv = Vec::new();
    let mut cli = Vec::new();
    for &size in &SIZES {
        // Warm up, then measure.
        for i in 0..50u64 {
            c.read((i * size) % (IMAGE - size), size).await?;
        }
        let (s0, c0, t0) = (cpu_of(server_pid)?, self_cpu()?, Instant::now());
        let mut n = 0u64;
        while t0.elapsed() < Duration::from_secs(3) {
            let off = (n * size) % (IMAGE - size);
            let b = c.read(off - off % 4096, size).await?;
            std::hint::black_box(b);
            n += 1;
        }
        let (s1, c1) = (cpu_of(server_pid)?, self_cpu()?);
        srv.push((size as f64, (s1 - s0) / n as f64));
        cli.push((size as f64, (c1 - c0) / n as f64));
        println!(
            "  {export} {size} B: {n} reads, server {:.1} us, client {:.1} us per read",
            (s1 - s0) / n as f64 * 1e6,
            (c1 - c0) / n as f64 * 1e6
        );
    }
    let _ = c.disconnect().await;
    Ok(PathCost {
        server: fit(&srv),
        client: fit(&cli),
    })
}

/// As the storm starts its replayers: `n` tasks spawned at t0, each connects
/// its NBD client and issues its first read; returns when the first and the
/// last of them issued it (seconds after t0).
async fn start_spread(ep: &Endpoint, export: &str, n: usize) -> anyhow::Result<(f64, f64)> {
    let t0 = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        let ep = ep.clone();
        let cfg = ClientConfig {
            export: export.to_owned(),
            ..ClientConfig::default()
        };
        set.spawn(async move {
            let c = Client::connect(&ep, &cfg).await?;
            let t = t0.elapsed().as_secs_f64();
            c.read(0, 4096).await?;
            anyhow::Ok((t, c))
        });
    }
    let mut times = Vec::new();
    let mut clients = Vec::new();
    while let Some(r) = set.join_next().await {
        let (t, c) = r??;
        times.push(t);
        clients.push(c);
    }
    for c in clients {
        let _ = c.disconnect().await;
    }
    let first = times.iter().copied().fold(f64::INFINITY, f64::min);
    let last = times.iter().copied().fold(0.0, f64::max);
    Ok((first, last))
}

/// Least squares y = a + b x.
fn fit(p: &[(f64, f64)]) -> (f64, f64) {
    let n = p.len() as f64;
    let mx = p.iter().map(|q| q.0).sum::<f64>() / n;
    let my = p.iter().map(|q| q.1).sum::<f64>() / n;
    let sxy: f64 = p.iter().map(|q| (q.0 - mx) * (q.1 - my)).sum();
    let sxx: f64 = p.iter().map(|q| (q.0 - mx) * (q.0 - mx)).sum();
    let b = sxy / sxx;
    (my - b * mx, b)
}

/// The child: a cache group filled from the image (fill CPU printed), then
/// the volume, a snapshot and the plain file served until stdin closes.
fn serve(image: &Path, dir: &Path) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let data = std::fs::read(image)?;
        let manifest = virtman_image::Manifest::of_bytes(&data, CHUNK)?;
        drop(data);
        let group_dir: PathBuf = dir.join("group");
        let g = CacheGroup::open(&group_dir, GroupConfig::with_capacity(IMAGE * 8))?;
        // Four cold fills (four volumes of the same image), for a CPU time
        // well above the 10 ms resolution of /proc/PID/stat.
        let fills = 4u64;
        let mut fill = 0.0;
        let t0 = Instant::now();
        for i in 0..fills {
            let name = if i == 0 { "vol".to_owned() } else { format!("vol{i}") };
            let v = g.add_volume(&name, &manifest)?;
            v.set_upstream(Some(Arc::new(FileUpstream::open(image)?) as Arc<dyn Upstream>));
            let c0 = self_cpu()?;
            let window = 16u64 << 20;
            let mut off = 0;
            while off < IMAGE {
                v.prefetch(off, window.min(IMAGE - off)).await?;
                off += window;
            }
            v.sync().await?;
            fill += self_cpu()? - c0;
        }
        let chunks = fills * IMAGE / u64::from(CHUNK);
        println!(
            "fill: {:.1} us CPU per 256 KiB chunk (fetch from a page-cached file, verify, store, commit; {chunks} chunks, {fill:.2} s CPU, {:.2} s wall)",
            fill / chunks as f64 * 1e6,
            t0.elapsed().as_secs_f64()
        );
        let v = g.volume("vol").context("vol")?;
        let snap = g.create_snapshot("snap", "vol")?;
        let server = Server::new(ServerConfig::default());
        server.add_export("vol", Arc::new(v.export()));
        server.add_export("snap", Arc::clone(&snap) as Arc<dyn Export>);
        server.add_export("file", Arc::new(FileExport::open(image, true)?));
        let tcp = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let port = tcp.local_addr()?.port();
        let unix = Listener::bind_unix(dir.join("snap.sock"))?;
        let cancel = CancellationToken::new();
        let a = tokio::spawn(Arc::clone(&server).serve(Listener::Tcp(tcp), cancel.clone()));
        let b = tokio::spawn(Arc::clone(&server).serve(unix, cancel.clone()));
        println!("port {port}");
        std::io::stdout().flush()?;
        tokio::task::spawn_blocking(|| {
            let mut s = String::new();
            while matches!(std::io::stdin().read_line(&mut s), Ok(n) if n > 0) {}
        })
        .await?;
        cancel.cancel();
        a.await??;
        b.await??;
        Ok(())
    })
}
