//! A boot storm: N VMs over M hosts replay a boot trace at once, in one of
//! three modes, and every VM's time is measured.
//!
//! ```text
//!  virtman     coordinator + origin + M agents, relay tree (fan-out k, p parents)
//!  cache-only  the same processes, fan-out M and one parent: every host fetches
//!              from the origin, each once (host cache)
//!  direct      qemu-nbd -e 64 serving the image; every VM reads it, no cache
//!
//!  t0 ─► every VM at once: [create its snapshot] ─► connect ─► read 0 ─ think ─►
//!        read 1 ─ … ─► last read = booted
//! ```
//!
//! Time 0 is when the whole request arrives: in the cached modes a VM's
//! snapshot is created on the clock (a host joins the image, and starts its
//! prefetch, when its first VM is created), while `direct` has nothing to
//! create.
//!
//! A VM's replay issues its reads one at a time, each `at_us` gap after the
//! previous one completed (the guest's think time), or back to back. Every
//! byte read is compared with the image, so a storm is also a correctness run.
//!
//! With [`QemuBoot`], every VM is a real guest instead: qemu boots the given
//! kernel from the VM's disk (its snapshot export, or the plain server with
//! qemu's own temporary overlay in `direct` mode), and the VM has booted when
//! its serial console prints the marker line.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use virtman_agent::control::ControlClient;
use virtman_nbd::{Client, ClientConfig, Endpoint};
use virtman_sim::Trace;

use crate::cluster::{Cluster, ClusterConfig, ClusterError};
use crate::guest::{Console, Guest};

/// How VMs get their image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StormMode {
    /// Relay tree.
    Virtman,
    /// Host caches, every host fetching from the origin.
    CacheOnly,
    /// Every VM reading a plain NBD server, no cache.
    Direct,
}

impl StormMode {
    /// The mode's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            StormMode::Virtman => "virtman",
            StormMode::CacheOnly => "cache-only",
            StormMode::Direct => "direct",
        }
    }
}

/// A storm to run.
#[derive(Clone, Debug)]
pub struct StormConfig {
    /// The `virtman` binary.
    pub bin: PathBuf,
    /// Work directory (a cluster per mode is made and removed in it).
    pub dir: PathBuf,
    /// Hosts.
    pub hosts: usize,
    /// VMs, spread round-robin over the hosts.
    pub vms: usize,
    /// The raw image.
    pub image: PathBuf,
    /// The trace every VM replays.
    pub trace: Arc<Trace>,
    /// Replay reads back to back, ignoring the trace's think time.
    pub back_to_back: bool,
    /// Fan-out in `virtman` mode.
    pub fanout: u32,
    /// Parents per host in `virtman` mode.
    pub parents: u32,
    /// In `virtman` mode, store the trace as the image's boot profile at the
    /// origin, so hosts prefetch it ahead of their VMs (as after an earlier
    /// boot of the image, or `virtman image profile`).
    pub prefetch: bool,
    /// Network namespaces and shaped links (root only), or loopback.
    pub net: Option<crate::cluster::NetConfig>,
    /// The latency `net` adds per request, applied by `direct` VMs themselves
    /// (agents apply it to their fetches).
    pub link_delay: Duration,
    /// Boot real guests under qemu instead of replaying the trace.
    pub qemu: Option<QemuBoot>,
    /// Where to keep every cluster process's log after each mode
    /// (`LOGS/MODE/NAME.log`), or nowhere: the cluster's directory is removed.
    pub logs: Option<PathBuf>,
}

/// Real guests: how each VM is booted under qemu, and how a boot is seen.
#[derive(Clone, Debug)]
pub struct QemuBoot {
    /// The guest (its kernel command line should put a console on ttyS0,
    /// so the marker can be seen).
    pub guest: Guest,
    /// A VM has booted when a console line contains this.
    pub marker: String,
    /// A VM that has not booted by then fails.
    pub timeout: Duration,
}

/// Why a storm failed.
#[derive(Debug, Error)]
pub enum StormError {
    /// The cluster failed.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// A VM could not be created or read.
    #[error("VM {vm}: {message}")]
    Vm {
        /// The VM.
        vm: String,
        /// What happened.
        message: String,
    },
    /// Bad configuration.
    #[error("{0}")]
    Config(String),
}

/// One VM's result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmResult {
    /// The VM.
    pub vm: String,
    /// Its host.
    pub host: String,
    /// Seconds from the storm's start until its last read completed (or
    /// until it failed).
    pub boot_secs: f64,
    /// Bytes it read.
    pub bytes: u64,
    /// Why it did not boot (its host died, a read failed or differed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One host's figures.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HostResult {
    /// The host.
    pub host: String,
    /// Its depth in the tree (1 = child of the origin).
    pub depth: Option<u64>,
    /// Bytes it fetched from parents that are not origins.
    pub from_parents: u64,
    /// Bytes it fetched from origins.
    pub from_origin: u64,
    /// Bytes it served to child hosts.
    pub served_to_children: u64,
}

/// The result of one storm.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StormReport {
    /// The mode.
    pub mode: StormMode,
    /// Hosts.
    pub hosts: usize,
    /// VMs.
    pub vms: usize,
    /// Bytes of the image.
    pub image_size: u64,
    /// Bytes of distinct chunks the trace touches (the working set).
    pub working_set: u64,
    /// Whether reads were replayed back to back.
    pub back_to_back: bool,
    /// Every VM.
    pub vm_results: Vec<VmResult>,
    /// Every host (empty in `direct` mode).
    pub host_results: Vec<HostResult>,
    /// Bytes the origin (or the plain server) sent.
    pub origin_bytes: u64,
    /// Whether `origin_bytes` was measured: not for real guests reading a
    /// plain server on loopback (qemu-nbd counts nothing), nor when the
    /// origin died.
    #[serde(default = "yes")]
    pub origin_measured: bool,
    /// Seconds until every VM had booted (or failed, when some did).
    pub all_booted_secs: f64,
    /// Processes of the cluster found dead after the storm (`hostN`,
    /// `origin`, `coordinator`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dead: Vec<String>,
}

fn yes() -> bool {
    true
}

impl StormReport {
    /// The VMs that did not boot.
    pub fn failed(&self) -> impl Iterator<Item = &VmResult> {
        self.vm_results.iter().filter(|v| v.error.is_some())
    }

    /// The boot time below which a fraction `q` of the booted VMs finished.
    pub fn percentile(&self, q: f64) -> f64 {
        let mut t: Vec<f64> = self
            .vm_results
            .iter()
            .filter(|v| v.error.is_none())
            .map(|v| v.boot_secs)
            .collect();
        t.sort_by(f64::total_cmp);
        if t.is_empty() {
            return 0.0;
        }
        let i = ((t.len() as f64 - 1.0) * q.clamp(0.0, 1.0)).round();
        // In [0, len - 1] by construction: the cast cannot truncate.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let i = i as usize;
        t[i.min(t.len() - 1)]
    }
}

/// The bytes each of `trace`'s reads must return, in trace order, read from
/// `image` once before the storm so that checking a VM's reads costs the
/// replayers a comparison, not a read of the image per VM.
fn expected_reads(trace: &Trace, image: &File) -> Result<Vec<Vec<u8>>, StormError> {
    trace
        .reads
        .iter()
        .map(|r| {
            let len = usize::try_from(r.length)
                .map_err(|_| StormError::Config(format!("a read of {} bytes", r.length)))?;
            let mut want = vec![0u8; len];
            image.read_exact_at(&mut want, r.offset).map_err(|e| {
                StormError::Config(format!(
                    "reading the image at {} (+{}): {e}",
                    r.offset, r.length
                ))
            })?;
            Ok(want)
        })
        .collect()
}

/// Replays `trace` against one VM's export, checking every byte against
/// `expected` (from [`expected_reads`]).
async fn replay(
    endpoint: Endpoint,
    export: String,
    trace: Arc<Trace>,
    expected: Arc<Vec<Vec<u8>>>,
    back_to_back: bool,
    t0: Instant,
    per_read_delay: Duration,
) -> Result<(f64, u64), String> {
    let c = Client::connect(
        &endpoint,
        &ClientConfig {
            export,
            request_timeout: Duration::from_secs(120),
            ..ClientConfig::default()
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    let mut last_at = 0u64;
    let mut bytes = 0u64;
    for (r, want) in trace.reads.iter().zip(expected.iter()) {
        if !back_to_back && r.at_us > last_at {
            tokio::time::sleep(Duration::from_micros(r.at_us - last_at)).await;
        }
        last_at = r.at_us;
        if !per_read_delay.is_zero() {
            tokio::time::sleep(per_read_delay).await;
        }
        let got = c
            .read(r.offset, r.length)
            .await
            .map_err(|e| e.to_string())?;
        if got[..] != want[..] {
            return Err(format!(
                "read of {} bytes at {} differs from the image",
                r.length, r.offset
            ));
        }
        bytes += r.length;
    }
    let _ = c.disconnect().await;
    Ok((t0.elapsed().as_secs_f64(), bytes))
}

/// Where a VM's disk comes from.
enum VmDisk {
    /// An export that already exists (the plain server of `direct` mode).
    Ready(Endpoint, String),
    /// A snapshot to create through the host's agent, named after the VM.
    Create(ControlClient),
}

impl VmDisk {
    /// The endpoint and export name of `vm`'s disk, creating it if needed.
    async fn open(self, vm: &str) -> Result<(Endpoint, String), String> {
        match self {
            VmDisk::Ready(endpoint, export) => Ok((endpoint, export)),
            VmDisk::Create(ctl) => {
                let info = ctl
                    .create_vm(vm, "img")
                    .await
                    .map_err(|e| format!("creating the VM: {e}"))?;
                let sock = info.uri.split("socket=").nth(1).unwrap_or_default();
                Ok((Endpoint::Unix(sock.into()), vm.to_owned()))
            }
        }
    }
}

/// Boots one real guest from `endpoint`'s `export` and waits for the marker.
async fn boot_guest(
    q: &QemuBoot,
    endpoint: &Endpoint,
    export: &str,
    overlay: bool,
    t0: Instant,
) -> Result<(f64, u64), String> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
    let uri = match endpoint {
        Endpoint::Unix(p) => format!("nbd+unix:///{export}?socket={}", p.display()),
        Endpoint::Tcp(a) => format!("nbd://{a}/{export}"),
    };
    let mut cmd =
        tokio::process::Command::from(q.guest.command(&uri, overlay, Console::Captured)?);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("starting {} (install qemu-system-x86): {e}", q.guest.qemu))?;
    let stdout = child.stdout.take().ok_or("no qemu stdout")?;
    let mut stderr = child.stderr.take().ok_or("no qemu stderr")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut tail: Vec<String> = Vec::new();
    let watch = async {
        while let Some(line) = lines.next_line().await.map_err(|e| e.to_string())? {
            if line.contains(&q.marker) {
                return Ok(t0.elapsed().as_secs_f64());
            }
            if tail.len() == 20 {
                tail.remove(0);
            }
            tail.push(line.trim_end().to_owned());
        }
        Err("qemu exited".to_owned())
    };
    let result = tokio::time::timeout(q.timeout, watch).await;
    // Booted or not, the guest is done with: stop it.
    let _ = child.start_kill();
    let _ = child.wait().await;
    match result {
        Ok(Ok(secs)) => Ok((secs, 0)),
        Ok(Err(why)) => {
            let mut err = String::new();
            let _ = stderr.read_to_string(&mut err).await;
            Err(format!(
                "{why} before the marker {:?}; last console lines:\n{}\nqemu: {}",
                q.marker,
                tail.join("\n"),
                err.trim()
            ))
        }
        Err(_) => Err(format!(
            "no marker {:?} within {:?}; last console lines:\n{}",
            q.marker,
            q.timeout,
            tail.join("\n")
        )),
    }
}

/// Open files one VM costs the storm process (its connection, or a qemu's
/// pipes) and its host's agent (its connection, its snapshot's files), with
/// room for everything else.
const FILES_PER_VM: u64 = 4;
const FILES_BASE: u64 = 256;

/// Refuses a storm this machine cannot hold: more VMs than the open file
/// limit allows one process (the `virtman` binary raises its soft limit to
/// the hard one at start; the cluster's processes inherit it), or less free
/// disk than the origin's copy of the image and every host's cache of the
/// working set take.
fn check_capacity(
    config: &StormConfig,
    mode: StormMode,
    image_size: u64,
    working_set: u64,
) -> Result<(), StormError> {
    let files = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX);
    std::fs::create_dir_all(&config.dir).map_err(|e| StormError::Config(e.to_string()))?;
    let free = rustix::fs::statvfs(&config.dir)
        .map_or(u64::MAX, |st| st.f_bavail.saturating_mul(st.f_frsize));
    let need = Needs::of(config.vms, config.hosts, mode, image_size, working_set);
    need.check(files, free, &config.dir)
        .map_err(StormError::Config)
}

/// What a storm takes of one machine.
#[derive(Debug, PartialEq, Eq)]
struct Needs {
    vms: usize,
    /// Open files of the busiest process (an agent, or the storm itself).
    files: u64,
    /// Disk bytes: the origin's copy of the image and the hosts' caches.
    disk: u64,
}

impl Needs {
    fn of(vms: usize, hosts: usize, mode: StormMode, image_size: u64, working_set: u64) -> Needs {
        // The storm process holds a connection (or a qemu's pipes) for every
        // VM, more than any agent holds for its own VMs.
        let busiest = vms as u64;
        let disk = if mode == StormMode::Direct {
            0
        } else {
            let cache = if working_set > 0 {
                working_set
            } else {
                image_size
            };
            image_size.saturating_add(cache.saturating_mul(hosts as u64))
        };
        Needs {
            vms,
            files: busiest
                .saturating_mul(FILES_PER_VM)
                .saturating_add(FILES_BASE),
            disk,
        }
    }

    fn check(&self, files: u64, free: u64, dir: &Path) -> Result<(), String> {
        if self.files > files {
            return Err(format!(
                "{} VMs need about {} open files in one process, but the limit is {files} \
                 (ulimit -n): use fewer VMs, or raise the hard limit",
                self.vms, self.files
            ));
        }
        if self.disk > free {
            return Err(format!(
                "the origin's copy of the image and the host caches need about {} MiB under {}, \
                 but only {} MiB are free: use fewer hosts, or another TMPDIR",
                self.disk >> 20,
                dir.display(),
                free >> 20
            ));
        }
        Ok(())
    }
}

/// Bytes sent so far by network namespace `ns`'s link (`eth0`), headers
/// included.
fn ns_tx_bytes(ns: &str) -> Option<u64> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "cat",
            "/sys/class/net/eth0/statistics/tx_bytes",
        ])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// Runs one storm in `mode`; `on_boot(booted, total)` is called each time a
/// VM finishes (for live progress).
pub async fn run(
    config: &StormConfig,
    mode: StormMode,
    on_boot: &(dyn Fn(usize, usize) + Send + Sync),
) -> Result<StormReport, StormError> {
    if config.hosts == 0 || config.vms == 0 {
        return Err(StormError::Config(
            "a storm needs at least one host and one VM".into(),
        ));
    }
    let image = File::open(&config.image)
        .map_err(|e| StormError::Config(format!("opening {}: {e}", config.image.display())))?;
    let image_size = image
        .metadata()
        .map_err(|e| StormError::Config(e.to_string()))?
        .len();
    if config.trace.image_size > image_size {
        return Err(StormError::Config(format!(
            "the trace was recorded on a {} byte image, larger than {} ({} bytes)",
            config.trace.image_size,
            config.image.display(),
            image_size
        )));
    }
    let dir = config.dir.join(mode.name());
    let working_set = config.trace.chunk_bytes(virtman_image::DEFAULT_CHUNK_SIZE);
    check_capacity(config, mode, image_size, working_set)?;
    // Real guests check themselves (they boot or not); replays check bytes.
    let expected = Arc::new(if config.qemu.is_none() {
        expected_reads(&config.trace, &image)?
    } else {
        Vec::new()
    });

    // Set up the mode's servers and one endpoint per VM.
    let mut cluster = None;
    let mut direct = None;
    // Real guests in direct mode: the plain server's namespace, whose link
    // counts what it sent (qemu-nbd has no counter of its own).
    let mut direct_ns: Option<(String, u64)> = None;
    let mut endpoints = Vec::new();
    match mode {
        StormMode::Direct => {
            std::fs::create_dir_all(&dir).map_err(|e| StormError::Config(e.to_string()))?;
            // With namespaces, the plain server runs in the origin's namespace
            // behind its shaped link (an origin-only cluster provides it).
            let origin_ns = match &config.net {
                Some(net) => {
                    let c = Cluster::up(&ClusterConfig {
                        bin: config.bin.clone(),
                        dir: dir.join("net"),
                        hosts: 0,
                        image: config.image.clone(),
                        image_name: "img".into(),
                        fanout: 2,
                        origin_fanout: 1,
                        parents: 1,
                        cache_size: "64M".into(),
                        profile_trace: None,
                        net: Some(net.clone()),
                    })?;
                    let o = c.state.members.iter().find(|m| m.name == "origin").cloned();
                    cluster = Some(c);
                    o.and_then(|o| {
                        let ip = o.addr.rsplit_once(':')?.0.to_owned();
                        Some((o.netns?, ip))
                    })
                }
                None => None,
            };
            let sock = dir.join("qemu-nbd.sock");
            let mut cmd = match &origin_ns {
                Some((ns, _)) => {
                    let mut c = Command::new("ip");
                    c.args(["netns", "exec", ns, "qemu-nbd"]);
                    c
                }
                None => Command::new("qemu-nbd"),
            };
            cmd.args(["-r", "-t", "-e", "1024", "-f", "raw", "-x", "img"]);
            match &origin_ns {
                Some((_, ip)) => cmd.args(["-b", ip, "-p", "10809"]),
                None => cmd.arg("--socket").arg(&sock),
            };
            let child = cmd
                .arg(&config.image)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| {
                    StormError::Config(format!("starting qemu-nbd (install qemu-utils): {e}"))
                })?;
            direct = Some(KillOnDrop(child));
            if config.qemu.is_some()
                && let Some((ns, _)) = &origin_ns
                && let Some(before) = ns_tx_bytes(ns)
            {
                direct_ns = Some((ns.clone(), before));
            }
            let endpoint = match &origin_ns {
                Some((_, ip)) => Endpoint::Tcp(format!("{ip}:10809")),
                None => Endpoint::Unix(sock.clone()),
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let ready = match &endpoint {
                    Endpoint::Unix(p) => p.exists(),
                    Endpoint::Tcp(a) => std::net::TcpStream::connect(a).is_ok(),
                };
                if ready {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(StormError::Config("qemu-nbd did not start".into()));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            for i in 0..config.vms {
                let host = format!("host{}", i % config.hosts + 1);
                endpoints.push((
                    format!("vm{}", i + 1),
                    host,
                    VmDisk::Ready(endpoint.clone(), "img".to_owned()),
                ));
            }
        }
        StormMode::Virtman | StormMode::CacheOnly => {
            // Cache-only: every host a child of the origin.
            let (fanout, origin_fanout, parents) = match mode {
                StormMode::Virtman => (config.fanout, 1, config.parents),
                _ => {
                    let k = u32::try_from(config.hosts).unwrap_or(u32::MAX).max(2);
                    (k, k, 1)
                }
            };
            let profile_trace = if mode == StormMode::Virtman && config.prefetch {
                // Beside the cluster's directory, which must start empty.
                std::fs::create_dir_all(&config.dir)
                    .map_err(|e| StormError::Config(e.to_string()))?;
                let path = config.dir.join("boot.trace");
                std::fs::write(&path, config.trace.to_text())
                    .map_err(|e| StormError::Config(format!("writing {}: {e}", path.display())))?;
                Some(path)
            } else {
                None
            };
            let c = Cluster::up(&ClusterConfig {
                bin: config.bin.clone(),
                dir: dir.clone(),
                hosts: config.hosts,
                image: config.image.clone(),
                image_name: "img".into(),
                fanout,
                origin_fanout,
                parents,
                cache_size: format!("{}", image_size.saturating_mul(2).max(64 << 20)),
                profile_trace,
                net: config.net.clone(),
            })?;
            // Each VM's snapshot is created inside the storm, on the clock:
            // a host joins the image (and starts its prefetch) only when its
            // first VM is created, as when a user's request arrives.
            let hosts: Vec<_> = c.state.hosts().cloned().collect();
            for i in 0..config.vms {
                let h = &hosts[i % hosts.len()];
                let ctl = ControlClient::new(h.data_dir.join("agent.sock"));
                endpoints.push((format!("vm{}", i + 1), h.name.clone(), VmDisk::Create(ctl)));
            }
            cluster = Some(c);
        }
    }

    // The storm: every VM starts at once (its snapshot created first, in
    // the cached modes: time 0 is the moment the whole request arrives).
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (vm, host, disk) in endpoints {
        let trace = Arc::clone(&config.trace);
        let expected = Arc::clone(&expected);
        let b2b = config.back_to_back;
        let delay = if mode == StormMode::Direct && config.net.is_some() {
            config.link_delay
        } else {
            Duration::ZERO
        };
        let qemu = config.qemu.clone();
        let overlay = mode == StormMode::Direct;
        tasks.spawn(async move {
            let r = match disk.open(&vm).await {
                Err(e) => Err(e),
                Ok((endpoint, export)) => match qemu {
                    Some(q) => boot_guest(&q, &endpoint, &export, overlay, t0).await,
                    None => replay(endpoint, export, trace, expected, b2b, t0, delay).await,
                },
            };
            (vm, host, r)
        });
    }
    let mut vm_results = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (vm, host, r) = done.map_err(|e| StormError::Config(e.to_string()))?;
        // A VM that fails (its host died, say) is reported, not waited for.
        let (boot_secs, bytes, error) = match r {
            Ok((secs, bytes)) => (secs, bytes, None),
            Err(e) => (t0.elapsed().as_secs_f64(), 0, Some(e)),
        };
        vm_results.push(VmResult {
            vm,
            host,
            boot_secs,
            bytes,
            error,
        });
        on_boot(vm_results.len(), config.vms);
    }
    let all_booted_secs = t0.elapsed().as_secs_f64();
    vm_results.sort_by(|a, b| a.vm.cmp(&b.vm));

    let dead: Vec<String> = cluster.as_ref().map_or_else(Vec::new, |c| {
        c.state
            .members
            .iter()
            .filter(|m| !crate::cluster::alive(m.pid))
            .map(|m| m.name.clone())
            .collect()
    });
    if let (Some(c), Some(logs)) = (&cluster, &config.logs) {
        save_logs(c, &logs.join(mode.name()));
    }
    let mut host_results = Vec::new();
    let mut origin_measured = true;
    let origin_bytes = match &cluster {
        // Real guests: what the plain server's link sent, if it has its own.
        _ if mode == StormMode::Direct && config.qemu.is_some() => {
            match direct_ns
                .as_ref()
                .and_then(|(ns, before)| Some(ns_tx_bytes(ns)?.saturating_sub(*before)))
            {
                Some(b) => b,
                None => {
                    origin_measured = false;
                    0
                }
            }
        }
        _ if mode == StormMode::Direct => vm_results.iter().map(|v| v.bytes).sum(),
        None => 0,
        Some(c) => {
            let depths = tree_depths(&config.bin, &c.state.coordinator);
            for h in c.state.hosts().filter(|h| !dead.contains(&h.name)) {
                let s = ControlClient::new(h.data_dir.join("agent.sock"))
                    .status()
                    .await
                    .map_err(|e| StormError::Config(format!("status of {}: {e}", h.name)))?;
                let (mut from_parents, mut from_origin) = (0, 0);
                for i in &s.images {
                    for (_, origin, b) in &i.fetched {
                        if *origin {
                            from_origin += b;
                        } else {
                            from_parents += b;
                        }
                    }
                }
                host_results.push(HostResult {
                    host: h.name.clone(),
                    depth: depths.iter().find(|(n, _)| *n == h.name).map(|d| d.1),
                    from_parents,
                    from_origin,
                    served_to_children: s.served_to_children,
                });
            }
            let origin = c
                .state
                .members
                .iter()
                .find(|m| m.name == "origin")
                .ok_or_else(|| StormError::Config("no origin".into()))?;
            if dead.contains(&origin.name) {
                origin_measured = false; // it died with its counters
                0
            } else {
                let s = ControlClient::new(origin.data_dir.join("agent.sock"))
                    .status()
                    .await
                    .map_err(|e| StormError::Config(format!("status of the origin: {e}")))?;
                s.images
                    .iter()
                    .filter_map(|i| i.sent.map(|x| x.bytes))
                    .sum()
            }
        }
    };
    drop(cluster);
    drop(direct);
    Ok(StormReport {
        mode,
        hosts: config.hosts,
        vms: config.vms,
        image_size,
        working_set,
        back_to_back: config.back_to_back,
        vm_results,
        host_results,
        origin_bytes,
        all_booted_secs,
        dead,
        origin_measured,
    })
}

/// Copies each member's log to `to/NAME.log` (before the cluster and its
/// directory go). A log that cannot be copied is reported and skipped.
fn save_logs(cluster: &Cluster, to: &Path) {
    if let Err(e) = std::fs::create_dir_all(to) {
        tracing::warn!(dir = %to.display(), error = %e, "cannot keep the cluster's logs");
        return;
    }
    for m in &cluster.state.members {
        let from = m.data_dir.join("log");
        if let Err(e) = std::fs::copy(&from, to.join(format!("{}.log", m.name))) {
            tracing::warn!(log = %from.display(), error = %e, "cannot keep a log");
        }
    }
}

/// Each host's depth, from `virtman tree --json`.
fn tree_depths(bin: &Path, coordinator: &str) -> Vec<(String, u64)> {
    let Ok(out) = Command::new(bin)
        .args(["tree", "img", "--json", "--coordinator", coordinator])
        .output()
    else {
        return Vec::new();
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
        return Vec::new();
    };
    v["nodes"]
        .as_array()
        .map(|nodes| {
            nodes
                .iter()
                .filter_map(|n| Some((n["node"].as_str()?.to_owned(), n["depth"].as_u64()?)))
                .collect()
        })
        .unwrap_or_default()
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storms_larger_than_the_machine_are_refused_with_the_reason() {
        let dir = Path::new("/tmp/x");
        // 8 hosts x 100 VMs: the storm process holds 800 connections.
        let n = Needs::of(800, 8, StormMode::Virtman, 1 << 30, 60 << 20);
        assert_eq!(n.files, 800 * FILES_PER_VM + FILES_BASE);
        assert_eq!(n.disk, (1 << 30) + 8 * (60 << 20));
        assert!(n.check(n.files, n.disk, dir).is_ok());
        let e = n.check(n.files - 1, u64::MAX, dir).unwrap_err();
        assert!(
            e.contains("800 VMs need about 3456 open files") && e.contains("ulimit -n"),
            "{e}"
        );
        let e = n.check(u64::MAX, n.disk - 1, dir).unwrap_err();
        assert!(
            e.contains("need about 1504 MiB under /tmp/x") && e.contains("TMPDIR"),
            "{e}"
        );
        // Direct mode caches nothing; real guests without a trace count the
        // whole image per host.
        assert_eq!(Needs::of(8, 2, StormMode::Direct, 1 << 30, 0).disk, 0);
        assert_eq!(
            Needs::of(8, 2, StormMode::CacheOnly, 1 << 20, 0).disk,
            3 << 20
        );
    }
}
