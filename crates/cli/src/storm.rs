//! `virtman storm`: boot N VMs over M hosts at once, in each mode, and compare.
//!
//! ```text
//!  trace (given, the shipped Debian boot, or synthetic) + image (given, or random of its size)
//!    └─► for each mode: cluster up ─► N VMs replay the trace at once ─► cluster down
//!    └─► table (ratios to virtman), OUT/report.json, OUT/boots.csv, OUT/chart.svg
//! ```

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use virtman_sim::{SyntheticSpec, Trace};
use virtman_storm::guest::{Accel, Guest};
use virtman_storm::storm::QemuBoot;
use virtman_storm::{StormConfig, StormMode, report};

use crate::units::{human, parse_size};

/// The trace of a real Debian 12 systemd boot, recorded with
/// `traces/build-debian-trace.sh` (see traces/README.md).
const DEBIAN_TRACE: &str = include_str!("../../../traces/debian12-boot.trace");

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ModeArg {
    Virtman,
    CacheOnly,
    Direct,
    All,
}

/// Arguments of `virtman storm`.
#[derive(Debug, Args)]
#[command(after_help = "\
Modes: `virtman` (relay tree: hosts fetch from their parents, and prefetch the
image's boot profile, which the origin holds from an earlier boot), `cache-only`
(host caches, every host fetches from the origin), `direct` (every VM reads a
plain server of the image: `virtman serve`, or qemu-nbd with --netns; no
cache), `all` (each in turn, then a table).

Links: every host and the image server get a --link-rate link (default
1 Gbit/s): with --netns shaped by the kernel, else in user space (agents'
caps, the plain server's cap, a cap per host for direct VMs), with
--link-delay per request. --link-rate 0: plain loopback, where nothing is
scarce.

Every VM replays the trace: its reads one at a time, each after the trace's think
time (or back to back with --back-to-back), and every byte is checked against
the image. A VM has booted when its last read completes.

Reading the table: `all s` is the time until every VM booted, `time x` its ratio
to virtman's; `origin MiB` is what the image server sent and `x WS` that amount
over the trace's working set (1.0 means each chunk left the origin once).

Chaos (--chaos SPEC[,SPEC...], cached modes): `kill:N@T` SIGKILLs N hosts (or
`P%` of them) T into the storm; `stop:N@T+D` SIGSTOPs them for D; `restart:N@T+D`
kills them and starts them again D later on the same data directory and
address; `coordinator:kill@T` and `coordinator:restart@T+D` do the same to the
coordinator; with --coordinators N, `leader:kill@T`, `leader:stop@T+D` and
`leader:restart@T+D` hit whichever coordinator leads then, and the report adds
the failover time (until another leads) and the tree before and after (members,
deaths and parent changes the new leader made). Hosts are picked with --seed, each at most once. The report then
says whether the promise held: no VM read a wrong byte, and no VM failed on a
host that was never killed (VMs of a killed host are lost with it); and the
longest and 99th-percentile read of VMs on hosts never hit. The exit status is
non-zero when it did not hold.

Example:
  virtman storm                                  # 8 hosts, 48 VMs, every mode, 1 Gbit/s links
  virtman storm --hosts 4 --vms 16 --mode all --link-rate 100mbit
  virtman storm --hosts 8 --vms 32 --image debian.raw --trace boot.trace --back-to-back
  virtman storm --hosts 8 --vms 32 --mode virtman --chaos kill:25%@1s,stop:1@1.5s+3s
  virtman storm --hosts 6 --vms 24 --mode virtman --coordinators 3 --chaos leader:kill@1s")]
pub struct StormArgs {
    /// Hosts (agents besides the origin).
    #[arg(long, default_value_t = 8)]
    hosts: usize,
    /// VMs, spread over the hosts.
    #[arg(long, default_value_t = 48)]
    vms: usize,
    /// Which mode to run.
    #[arg(long, value_enum, default_value_t = ModeArg::All)]
    mode: ModeArg,
    /// The raw image to boot (default: random bytes of --image-size).
    #[arg(long)]
    image: Option<PathBuf>,
    /// Size of the generated image (default: the trace's image size; 256 MiB
    /// with --synthetic).
    #[arg(long, value_parser = parse_size)]
    image_size: Option<u64>,
    /// A boot trace (virtman trace format). Default: the shipped trace of a
    /// real Debian 12 systemd boot (traces/debian12-boot.trace: 807 reads,
    /// 59.5 MiB of 256 KiB chunks in a 1 GiB image, 9.6 s).
    #[arg(long, conflicts_with = "synthetic")]
    trace: Option<PathBuf>,
    /// Use a synthetic trace instead (--working-set, --think-ms).
    #[arg(long)]
    synthetic: bool,
    /// Working set of the synthetic trace.
    #[arg(long, default_value = "32M", value_parser = parse_size, requires = "synthetic")]
    working_set: u64,
    /// Total think time of the synthetic trace, in milliseconds.
    #[arg(long, default_value_t = 2000, requires = "synthetic")]
    think_ms: u64,
    /// Replay reads back to back, ignoring think time.
    #[arg(long)]
    back_to_back: bool,
    /// Fan-out of the relay tree in `virtman` mode.
    #[arg(long, default_value_t = 2)]
    fanout: u32,
    /// Parents per host in `virtman` mode.
    #[arg(long, default_value_t = 2)]
    parents: u32,
    /// Stripes of a striped forest in `virtman` mode: chunk i follows stripe
    /// i mod S's tree and each host relays one stripe (use --fanout S); 1 is
    /// one tree.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    stripes: u32,
    /// In `virtman` mode, do not give the origin the trace as the image's
    /// boot profile (hosts then fetch on demand only, as on an image's very
    /// first boot anywhere).
    #[arg(long)]
    no_prefetch: bool,
    /// Put every host in its own network namespace with a shaped link (root
    /// only; needs iproute2). Without it, everything runs on loopback.
    #[arg(long)]
    netns: bool,
    /// Run the links between hosts without TLS (by default each cluster gets
    /// its own CA and every base export is TLS-only).
    #[arg(long)]
    no_tls: bool,
    /// Every host's link (tc syntax, e.g. 1gbit, 100mbit; or 125MB/s). With
    /// --netns a shaped veth; without, in user space: each agent's upload
    /// and download caps, the plain server's cap in `direct` mode and a cap
    /// shared by each host's VMs there. 0: no link (plain loopback).
    #[arg(long, default_value = "1gbit")]
    link_rate: String,
    /// Latency added to every request (in user space, with or without
    /// --netns; 0s for none).
    #[arg(long, default_value = "0.2ms", value_parser = crate::coordinator::parse_duration)]
    link_delay: std::time::Duration,
    /// Boot real guests under qemu instead of replaying a trace: each VM runs
    /// --kernel (and --initrd) with the image as its virtio disk, and has
    /// booted when its serial console prints --boot-marker. Needs --image (a
    /// bootable disk) and qemu-system-x86; KVM when usable, else TCG. With
    /// --trace (a trace of this guest's boot), virtman mode prefetches it.
    #[arg(long, requires_all = ["image", "kernel"], conflicts_with = "synthetic")]
    qemu: bool,
    /// The guest kernel (with --qemu).
    #[arg(long, requires = "qemu")]
    kernel: Option<PathBuf>,
    /// The guest's initial ramdisk (with --qemu).
    #[arg(long, requires = "qemu")]
    initrd: Option<PathBuf>,
    /// The guest kernel's command line (with --qemu).
    #[arg(long, default_value = "console=ttyS0 panic=-1", requires = "qemu")]
    append: String,
    /// A VM has booted when a line of its console contains this (with --qemu).
    #[arg(long, default_value = "login:", requires = "qemu")]
    boot_marker: String,
    /// Guest memory in MiB (with --qemu).
    #[arg(long, default_value_t = 256, requires = "qemu")]
    memory: u32,
    /// A guest that has not booted by then fails the storm (with --qemu).
    #[arg(long, default_value = "300s", value_parser = crate::coordinator::parse_duration, requires = "qemu")]
    boot_timeout: std::time::Duration,
    /// Chaos during the storm (see below), e.g. `kill:2@1s,stop:1@2s+3s`.
    #[arg(long, value_name = "SPEC[,SPEC...]", value_parser = parse_chaos)]
    chaos: Option<Chaos>,
    /// The seed that picks which hosts --chaos hits.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Coordinators in the cached modes: more than one share a local etcd
    /// of as many members (Debian's etcd-server), one leading.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=7))]
    coordinators: u32,
    /// An argument for every agent of the cached modes (repeat it), e.g.
    /// `--agent-arg=--no-hedge` to compare without hedged fetches.
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    agent_arg: Vec<String>,
    /// Where results go (report.json, boots.csv, chart.svg).
    #[arg(long, default_value = "storm-results")]
    out: PathBuf,
}

/// A parsed `--chaos` (one value holding every event).
#[derive(Clone, Debug)]
struct Chaos(Vec<virtman_storm::chaos::Event>);

fn parse_chaos(s: &str) -> Result<Chaos, String> {
    virtman_storm::chaos::parse(s).map(Chaos)
}

/// Runs `virtman storm`.
pub fn run(args: StormArgs) -> anyhow::Result<()> {
    if args.vms < args.hosts {
        bail!(
            "--vms {} is fewer than --hosts {}: some hosts would have no VM",
            args.vms,
            args.hosts
        );
    }
    let work = tempfile::Builder::new()
        .prefix("virtman-storm.")
        .tempdir()
        .context("creating a work directory")?;
    if args.qemu {
        check_memory(args.vms, args.memory)?;
    }
    // The trace first: it says how large an image it needs.
    let trace = match (&args.trace, args.synthetic) {
        // Real guests read what they read; no trace, no profile.
        (None, false) if args.qemu => Some(Trace {
            image_size: 0,
            reads: Vec::new(),
        }),
        (Some(p), _) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            Some(Trace::parse(&text).with_context(|| format!("trace {}", p.display()))?)
        }
        (None, false) => Some(Trace::parse(DEBIAN_TRACE).context("the built-in Debian trace")?),
        (None, true) => None,
    };
    let image = match &args.image {
        Some(p) => p.clone(),
        None => {
            let size = args
                .image_size
                .or(trace.as_ref().map(|t| t.image_size))
                .unwrap_or(256 << 20);
            let p = work.path().join("img.raw");
            eprintln!("generating a {} random image", human(size));
            write_random(&p, size)?;
            p
        }
    };
    let image_size = std::fs::metadata(&image)
        .with_context(|| format!("opening {}", image.display()))?
        .len();
    let trace = match trace {
        Some(t) => t,
        None => Trace::synthetic(
            &SyntheticSpec {
                image_size,
                working_set: args.working_set.min(image_size),
                chunk_size: virtman_image::DEFAULT_CHUNK_SIZE,
                read_size: 64 * 1024,
                think: std::time::Duration::from_millis(args.think_ms),
            },
            1,
        )
        .context("making a synthetic trace")?,
    };
    let modes = match args.mode {
        ModeArg::Virtman => vec![StormMode::Virtman],
        ModeArg::CacheOnly => vec![StormMode::CacheOnly],
        ModeArg::Direct => vec![StormMode::Direct],
        ModeArg::All => vec![StormMode::Virtman, StormMode::CacheOnly, StormMode::Direct],
    };
    let config = StormConfig {
        bin: std::env::current_exe().context("finding the virtman binary")?,
        dir: work.path().to_path_buf(),
        hosts: args.hosts,
        vms: args.vms,
        image,
        trace: Arc::new(trace),
        back_to_back: args.back_to_back,
        fanout: args.fanout,
        parents: args.parents,
        stripes: args.stripes,
        // Real guests prefetch only with a trace of their own boot.
        prefetch: !(args.no_prefetch || args.qemu && args.trace.is_none()),
        net: args.netns.then(|| virtman_storm::cluster::NetConfig {
            rate: args.link_rate.clone(),
            delay: format!("{}ms", args.link_delay.as_secs_f64() * 1000.0),
        }),
        link_delay: args.link_delay,
        link_rate: match args.link_rate.trim() {
            _ if args.netns => None,
            "0" => None,
            r => Some(
                crate::units::parse_rate_bytes(r)
                    .map_err(anyhow::Error::msg)
                    .context("--link-rate")?,
            ),
        },
        tls: !args.no_tls,
        logs: Some(args.out.join("logs")),
        chaos: args.chaos.clone().map(|c| c.0).unwrap_or_default(),
        seed: args.seed,
        agent_args: args.agent_arg.clone(),
        coordinators: args.coordinators as usize,
        qemu: match (&args.kernel, args.qemu) {
            (Some(kernel), true) => Some(QemuBoot {
                guest: Guest {
                    qemu: "qemu-system-x86_64".into(),
                    accel: Accel::Auto,
                    memory_mib: args.memory,
                    kernel: Some(kernel.clone()),
                    initrd: args.initrd.clone(),
                    append: args.append.clone(),
                    extra_args: Vec::new(),
                },
                marker: args.boot_marker.clone(),
                timeout: args.boot_timeout,
            }),
            _ => None,
        },
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let mut reports = Vec::new();
    for mode in modes {
        eprintln!(
            "storm: {} VMs on {} hosts, mode {} ...",
            args.vms,
            args.hosts,
            mode.name()
        );
        // Ctrl-C or SIGTERM drops the storm, whose cluster then stops every
        // process and removes its namespaces and files.
        let bar = progress(args.vms, mode.name());
        let on_boot = |booted: usize, _total: usize| {
            bar.set_position(u64::try_from(booted).unwrap_or(u64::MAX));
        };
        let r = runtime.block_on(async {
            tokio::select! {
                r = virtman_storm::storm::run(&config, mode, &on_boot) => r.map_err(anyhow::Error::from),
                s = crate::serve::wait_for_signal() => {
                    s?;
                    bail!("interrupted; the cluster was stopped and cleaned up")
                }
            }
        })?;
        bar.finish_and_clear();
        eprintln!(
            "  all booted in {:.2} s; origin sent {}",
            r.all_booted_secs,
            human(r.origin_bytes)
        );
        if let Some(c) = &r.chaos {
            for a in &c.actions {
                eprintln!("  chaos: {a}");
            }
            eprintln!(
                "  chaos: {} wrong bytes, {} VMs failed on live hosts, {} lost with their host; \
                 reads on hosts never hit: longest {:.0} ms, p99 {:.0} ms; promise {}",
                c.wrong_bytes,
                c.failed_on_live_hosts,
                c.lost_with_host,
                c.longest_read_ms,
                c.p99_read_ms,
                if c.held { "held" } else { "BROKEN" }
            );
            if let Some(ctl) = &c.control {
                let failovers: Vec<String> = ctl
                    .failovers_ms
                    .iter()
                    .map(|f| f.map_or("none".to_owned(), |ms| format!("{ms:.0} ms")))
                    .collect();
                let after = ctl.after.as_ref().map_or("no answer".to_owned(), |a| {
                    format!(
                        "{} members, {} deaths and {} parent changes since the new leader took over",
                        a.members.len(),
                        a.deaths,
                        a.parent_changes
                    )
                });
                eprintln!(
                    "  control: failover {}; tree before: {} members; after: {after}",
                    failovers.join(", "),
                    ctl.before.members.len()
                );
            }
        }
        reports.push(r);
    }
    print!("{}", report::table(&reports));
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let json = serde_json::to_vec_pretty(&reports)?;
    std::fs::write(args.out.join("report.json"), json)?;
    std::fs::write(args.out.join("boots.csv"), report::csv(&reports))?;
    std::fs::write(args.out.join("chart.svg"), report::chart(&reports))?;
    println!(
        "results in {}/: report.json, boots.csv, chart.svg (booted VMs over time), \
         logs/MODE/ (every cluster process's log)",
        args.out.display()
    );
    let wrong: u64 = reports
        .iter()
        .flat_map(|r| &r.vm_results)
        .map(|v| v.wrong_bytes)
        .sum();
    if wrong > 0 {
        bail!("VMs read {wrong} bytes that differ from the image (see report.json)");
    }
    if args.chaos.is_some() {
        // With chaos, VMs of killed hosts are expected to fail; the promise
        // is what counts.
        let broken: Vec<&str> = reports
            .iter()
            .filter(|r| r.chaos.as_ref().is_some_and(|c| !c.held))
            .map(|r| r.mode.name())
            .collect();
        if !broken.is_empty() {
            bail!(
                "the promise did not hold in {} (wrong bytes, or VMs failed on hosts that \
                 stayed up: see above and report.json)",
                broken.join(", ")
            );
        }
        return Ok(());
    }
    let failed: usize = reports.iter().map(|r| r.failed().count()).sum();
    if failed > 0 {
        bail!("{failed} VMs did not boot (see above and report.json)");
    }
    Ok(())
}

/// Refuses more guests than the machine's available memory holds (with a
/// fifth kept for the agents and the page cache).
fn check_memory(vms: usize, memory_mib: u32) -> anyhow::Result<()> {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let available_kib: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(u64::MAX);
    let need_mib = u64::try_from(vms).unwrap_or(u64::MAX) * u64::from(memory_mib);
    let can_mib = available_kib / 1024 / 5 * 4;
    if need_mib > can_mib {
        bail!(
            "--vms {vms} guests of {memory_mib} MiB need {need_mib} MiB, but only {can_mib} MiB \
             can be given to guests here (4/5 of the available memory): use fewer VMs or --memory"
        );
    }
    Ok(())
}

/// A bar of booted VMs on a terminal; hidden otherwise.
fn progress(vms: usize, mode: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(u64::try_from(vms).unwrap_or(u64::MAX));
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "  {msg:<11} [{bar:30}] {pos}/{len} VMs booted, {elapsed}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(mode.to_owned());
    bar
}

fn write_random(path: &std::path::Path, size: u64) -> anyhow::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut left = size;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        for w in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        let n = usize::try_from(left.min(1 << 20))?;
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.flush()?;
    Ok(())
}
