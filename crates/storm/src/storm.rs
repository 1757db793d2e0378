//! A boot storm: N VMs over M hosts replay a boot trace at once, in one of
//! three modes, and every VM's time is measured.
//!
//! ```text
//!  virtman     coordinator + origin + M agents, relay tree (fan-out k, p parents)
//!  cache-only  the same processes, fan-out M and one parent: every host fetches
//!              from the origin, each once (host cache)
//!  direct      a plain NBD server of the image; every VM reads it, no cache
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
//!
//! Here: the configuration and [`run`], which sets up a mode, starts every VM
//! and gathers the report. Its parts: `capacity` (will this machine hold
//! the storm), `direct` (the plain server of `direct` mode), `vm` (one VM's
//! disk, replay or real boot), `measure` (hosts' and origin's figures, logs),
//! `results` (the report's types).

mod capacity;
mod chaos;
mod direct;
mod leader;
mod measure;
mod results;
mod vm;

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use virtman_agent::control::ControlClient;
use virtman_sim::Trace;

pub use results::{ChaosReport, ControlReport, HostResult, StormReport, TreeFacts, VmResult};

use crate::cluster::{Cluster, ClusterConfig, ClusterError};
use crate::guest::Guest;
use capacity::check_capacity;
use direct::ns_tx_bytes;
use measure::save_logs;
use virtman_nbd::rate::{Rate, TokenBucket};
use vm::{Link, VmDisk, boot_guest, expected_reads, replay};

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
    /// Stripes of the forest in `virtman` mode (1: one tree).
    pub stripes: u32,
    /// In `virtman` mode, store the trace as the image's boot profile at the
    /// origin, so hosts prefetch it ahead of their VMs (as after an earlier
    /// boot of the image, or `virtman image profile`).
    pub prefetch: bool,
    /// Network namespaces and shaped links (root only), or loopback.
    pub net: Option<crate::cluster::NetConfig>,
    /// The latency a link adds per request (with `net` or `link_rate`),
    /// applied by `direct` VMs themselves (agents apply it to their fetches).
    pub link_delay: Duration,
    /// Without `net`: every host's link in user space, in bytes a second:
    /// each agent's (the origin's too) upload and download caps, the plain
    /// server's cap in `direct` mode, and one cap shared by each host's VMs
    /// there; `link_delay` per request. None: loopback as it is.
    pub link_rate: Option<u64>,
    /// Boot real guests under qemu instead of replaying the trace.
    pub qemu: Option<QemuBoot>,
    /// TLS between hosts in the cached modes (see [`ClusterConfig::tls`]).
    pub tls: bool,
    /// Where to keep every cluster process's log after each mode
    /// (`LOGS/MODE/NAME.log`), or nowhere: the cluster's directory is removed.
    pub logs: Option<PathBuf>,
    /// Chaos in the cached modes (see [`crate::chaos`]); none: a calm storm.
    pub chaos: Vec<crate::chaos::Event>,
    /// The seed that picks the hosts chaos hits.
    pub seed: u64,
    /// Arguments every agent gets (see [`ClusterConfig::agent_args`]).
    pub agent_args: Vec<String>,
    /// Coordinators in the cached modes (see [`ClusterConfig::coordinators`]).
    pub coordinators: usize,
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

/// The agents' arguments that make their links in user space (see
/// [`StormConfig::link_rate`]): caps both ways and the delay per fetch.
fn user_link_args(config: &StormConfig) -> Vec<String> {
    match (&config.net, config.link_rate) {
        (None, Some(rate)) => {
            let rate = format!("{rate}B/s");
            let mut args = vec![
                "--upload-rate".to_owned(),
                rate.clone(),
                "--download-rate".to_owned(),
                rate,
            ];
            if !config.link_delay.is_zero() {
                args.extend([
                    "--link-delay".to_owned(),
                    format!("{}ms", config.link_delay.as_secs_f64() * 1000.0),
                ]);
            }
            args
        }
        _ => Vec::new(),
    }
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

    // Chaos hits the cached modes' hosts; liars lie from the start.
    let actions = match mode {
        StormMode::Direct => Vec::new(),
        _ => crate::chaos::plan(&config.chaos, config.hosts, config.seed)
            .map_err(StormError::Config)?,
    };
    let liars: Vec<String> = actions
        .iter()
        .filter(|a| a.what == crate::chaos::What::Lie)
        .map(|a| a.target.clone())
        .collect();

    // Set up the mode's servers and one endpoint per VM.
    let mut cluster: Option<Cluster>;
    let mut direct = None;
    // Real guests in direct mode: the plain server's namespace, whose link
    // counts what it sent (qemu-nbd has no counter of its own).
    let mut direct_ns: Option<(String, u64)> = None;
    let mut endpoints = Vec::new();
    match mode {
        StormMode::Direct => {
            let plain = direct::start(config, &dir).await?;
            cluster = plain.cluster;
            direct = Some(plain.server);
            direct_ns = plain.counter;
            let endpoint = plain.endpoint;
            // In user space, each host's VMs share its link.
            let links: Vec<Link> = (0..config.hosts)
                .map(|_| Link {
                    delay: config.link_delay,
                    cap: config
                        .net
                        .is_none()
                        .then_some(config.link_rate)
                        .flatten()
                        .map(|r| {
                            Arc::new(TokenBucket::new(Some(Rate {
                                bytes_per_sec: r,
                                burst: virtman_agent::caps::BURST,
                            })))
                        }),
                })
                .collect();
            for i in 0..config.vms {
                let host = format!("host{}", i % config.hosts + 1);
                endpoints.push((
                    format!("vm{}", i + 1),
                    host,
                    VmDisk::Ready(endpoint.clone(), "img".to_owned()),
                    links[i % config.hosts].clone(),
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
                store: None,
                fanout,
                origin_fanout,
                parents,
                stripes: if mode == StormMode::Virtman {
                    config.stripes
                } else {
                    1
                },
                cache_size: format!("{}", image_size.saturating_mul(2).max(64 << 20)),
                profile_trace,
                net: config.net.clone(),
                tls: config.tls,
                liars: liars.clone(),
                agent_args: [config.agent_args.clone(), user_link_args(config)].concat(),
                coordinators: config.coordinators,
            })?;
            // Each VM's snapshot is created inside the storm, on the clock:
            // a host joins the image (and starts its prefetch) only when its
            // first VM is created, as when a user's request arrives.
            let hosts: Vec<_> = c.state.hosts().cloned().collect();
            for i in 0..config.vms {
                let h = &hosts[i % hosts.len()];
                let ctl = ControlClient::new(h.data_dir.join("agent.sock"));
                endpoints.push((
                    format!("vm{}", i + 1),
                    h.name.clone(),
                    VmDisk::Create(ctl),
                    Link::default(),
                ));
            }
            cluster = Some(c);
        }
    }

    // The storm: every VM starts at once (its snapshot created first, in
    // the cached modes: time 0 is the moment the whole request arrives).
    let t0 = Instant::now();
    let chaos = cluster.as_ref().filter(|_| !actions.is_empty()).map(|c| {
        let coordinators = leader::Coordinators::new(config.bin.clone(), &c.state);
        tokio::spawn(chaos::run(
            actions.clone(),
            c.state.members.clone(),
            coordinators,
            t0,
        ))
    });
    let mut tasks = tokio::task::JoinSet::new();
    for (vm, host, disk, link) in endpoints {
        let trace = Arc::clone(&config.trace);
        let expected = Arc::clone(&expected);
        let b2b = config.back_to_back;
        let link = if config.net.is_some() || config.link_rate.is_some() {
            link
        } else {
            Link::default()
        };
        let qemu = config.qemu.clone();
        let overlay = mode == StormMode::Direct;
        tasks.spawn(async move {
            let r = match disk.open(&vm).await {
                Err(e) => Err(e),
                Ok((endpoint, export)) => match qemu {
                    Some(q) => boot_guest(&q, &endpoint, &export, overlay, t0).await,
                    None => replay(endpoint, export, trace, expected, b2b, t0, link).await,
                },
            };
            (vm, host, r)
        });
    }
    let mut vm_results = Vec::new();
    let mut reads_ms: Vec<(String, Vec<f32>)> = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (vm, host, r) = done.map_err(|e| StormError::Config(e.to_string()))?;
        // A VM that fails (its host died, say) is reported, not waited for.
        let result = match r {
            Ok(r) => {
                let longest = r.reads_ms.iter().copied().reduce(f32::max);
                reads_ms.push((host.clone(), r.reads_ms));
                VmResult {
                    vm,
                    host,
                    boot_secs: r.secs,
                    bytes: r.bytes,
                    error: None,
                    wrong_bytes: r.wrong_bytes,
                    longest_read_ms: longest,
                }
            }
            Err(e) => VmResult {
                vm,
                host,
                boot_secs: t0.elapsed().as_secs_f64(),
                bytes: 0,
                error: Some(e),
                wrong_bytes: 0,
                longest_read_ms: None,
            },
        };
        vm_results.push(result);
        on_boot(vm_results.len(), config.vms);
    }
    let all_booted_secs = t0.elapsed().as_secs_f64();
    vm_results.sort_by(|a, b| a.vm.cmp(&b.vm));
    // Every chaos action done (a stopped host continued, a restarted one
    // up again): the cluster then knows its processes' pids.
    let chaos_report = match chaos {
        Some(task) => {
            let done = task
                .await
                .map_err(|e| StormError::Config(format!("the chaos task failed: {e}")))?;
            if let Some(c) = cluster.as_mut() {
                for (name, pid) in &done.restarted {
                    if let Some(m) = c.state.members.iter_mut().find(|m| &m.name == name) {
                        m.pid = *pid;
                    }
                }
            }
            let tree_after = match (&done.tree_before, &cluster) {
                (Some(_), Some(c)) => {
                    leader::Coordinators::new(config.bin.clone(), &c.state)
                        .tree()
                        .await
                }
                _ => None,
            };
            Some(chaos::summarize(&done, &vm_results, &reads_ms, tree_after))
        }
        None => None,
    };

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
            let (hosts, origin) = measure::cluster_figures(config, c, &dead).await?;
            host_results = hosts;
            origin.unwrap_or_else(|| {
                origin_measured = false; // it died with its counters
                0
            })
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
        chaos: chaos_report,
    })
}
