//! `virtman sim`: a boot storm of many hosts on virtual time (`virtman-sim`).
//!
//! ```text
//!   args ──► trace (file or synthetic) ──► one Config per mode / fan-out / parents
//!        ──► virtman_sim::run each ──► text (or JSON) on stdout, SVG chart to --chart
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use virtman_sim::config::{FailSpec, parse_duration, parse_fail, parse_rate};
use virtman_sim::{Config, JoinLead, Mode, Report, SecondImage, SyntheticSpec, Trace};

use crate::units::parse_size;

/// Which modes to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// Relay trees (the default).
    Virtman,
    /// Every host fetches from the origin into its own cache.
    CacheOnly,
    /// Every VM reads the origin, no cache.
    Direct,
    /// The three, side by side.
    All,
}

/// Arguments of `virtman sim`.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  virtman sim --hosts 100 --vms 1000 --image-size 15G --working-set 300M --mode all --chart storm.svg
  virtman sim --hosts 1000 --vms 10000 --fanout 2,4,8 --parents 1,2 --json
  virtman sim --hosts 500 --vms 2000 --fail 10%@5s --parents 1,2
  virtman sim --hosts 50 --vms 200 --trace boot.trace --link-rate 1G --hop-latency 200us
  virtman sim --hosts 8 --vms 32 --trace traces/debian12-boot.trace --shared-cores 2 --mode all

CPU: every host (and origin) has --host-cores cores of its own, and each step
of the data path costs CPU time measured on the project's machine (see
virtman_sim::CpuCosts::MEASURED): serving a chunk, receiving, verifying and
storing it, and serving each VM read. --shared-cores C puts every process on
C cores of one machine; --no-cpu turns the model off.

Prefetch (virtman mode): every host, once it joins, fetches the boot profile's
chunks (the trace's, in first-touch order) from its parents, one lane per
stripe, at most --prefetch-in-flight at once (shared by the lanes, at least one
each), passing over chunks being fetched already and pausing while a demand
read waits on a chunk outside the profile, as the agent does; --no-prefetch
fetches on demand only.

Units: sizes 4K/256M/15G (powers of 1024); rates 1G/100M/125MB/s (bits per second
unless B/s); durations 100us/250ms/10s/2m. Failures: 5%@10s (5% of hosts die at
10 s), 5%@10s+30s (they come back 30 s later), origin@20s.")]
pub struct SimArgs {
    /// Hosts (agents).
    #[arg(long)]
    pub hosts: u32,
    /// VMs of the image, placed round-robin over the hosts.
    #[arg(long)]
    pub vms: u32,
    /// Image size for the synthetic trace (or the size a --trace is checked against).
    #[arg(long, value_parser = parse_size)]
    pub image_size: Option<u64>,
    /// Bytes of distinct chunks one boot touches (synthetic trace).
    #[arg(long, value_parser = parse_size, default_value = "64M")]
    pub working_set: u64,
    /// Size of each read of the synthetic trace.
    #[arg(long, value_parser = parse_size, default_value = "128K")]
    pub read_size: u64,
    /// Think time of one boot (the guest's own work), spread over its reads.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub think: Duration,
    /// A boot trace to replay instead of the synthetic one (text or JSON; see `virtman_sim::trace`).
    #[arg(long, value_name = "FILE")]
    pub trace: Option<PathBuf>,
    /// Write the trace used (text form) to this file.
    #[arg(long, value_name = "FILE")]
    pub write_trace: Option<PathBuf>,
    /// Chunk size of the cached volumes.
    #[arg(long, value_parser = parse_size, default_value = "256K")]
    pub chunk_size: u64,
    /// Each host's uplink and downlink rate.
    #[arg(long, value_parser = parse_rate, default_value = "1G")]
    pub link_rate: f64,
    /// The origin's uplink rate (default: the link rate).
    #[arg(long, value_parser = parse_rate)]
    pub origin_rate: Option<f64>,
    /// A share of slow hosts and their link rate, e.g. `20%:100M`.
    #[arg(long, value_name = "PCT:RATE")]
    pub slow_hosts: Option<String>,
    /// One-way latency of one hop.
    #[arg(long, value_parser = parse_duration, default_value = "100us")]
    pub hop_latency: Duration,
    /// Token bucket of every link (as `tc tbf burst`); 0: none, as on a real NIC.
    /// The storm's shaped links have 256K.
    #[arg(long, value_parser = parse_size, default_value = "0")]
    pub link_burst: u64,
    /// Fan-out k; a comma list sweeps it.
    #[arg(long, value_delimiter = ',', default_value = "4")]
    pub fanout: Vec<u32>,
    /// Parents per node p; a comma list sweeps it.
    #[arg(long, value_delimiter = ',', default_value = "2")]
    pub parents: Vec<u32>,
    /// Stripes S of a striped forest (chunk i follows stripe i mod S's tree;
    /// each host relays one stripe); 1 is one tree. A comma list sweeps it.
    #[arg(long, value_delimiter = ',', default_value = "4")]
    pub stripes: Vec<u32>,
    /// A failure: `5%@10s`, `5%@10s+30s` (recovery), `origin@20s`; repeatable.
    #[arg(long, value_parser = parse_fail)]
    pub fail: Vec<FailSpec>,
    /// A second image whose VMs start mid-storm: `AT:VMS`, e.g. `20s:500`.
    #[arg(long, value_name = "AT:VMS")]
    pub second_image: Option<String>,
    /// Modes to run.
    #[arg(long, value_enum, default_value = "virtman")]
    pub mode: ModeArg,
    /// VMs start uniformly at random within this window.
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    pub start_spread: Duration,
    /// The most VMs a host can hold.
    #[arg(long, default_value_t = 128)]
    pub max_vms_per_host: u32,
    /// Virtual time after which the run stops and lists the VMs that never booted.
    #[arg(long, value_parser = parse_duration, default_value = "1h")]
    pub max_time: Duration,
    /// Recompute max-min rates at most this often (0: at every change, exact; larger is an approximation).
    #[arg(long, value_parser = parse_duration)]
    pub rate_interval: Option<Duration>,
    /// The agent's per-request timeout before it fails over to the next source.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    pub request_timeout: Duration,
    /// The agent's hedge: a fetch a source has not answered this long after
    /// it was asked also goes to the next source (0s: no hedging; the
    /// agent's adaptive delay is at most its --hedge-ceiling, 250 ms).
    #[arg(long, value_parser = parse_duration, default_value = "250ms")]
    pub hedge: Duration,
    /// The agent's parent choice: a parent with this many of the host's
    /// requests outstanding is asked after the less loaded ones (1: always
    /// the least loaded first, spreading fetches over every parent).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    pub parent_busy_at: u32,
    /// The agent's first heartbeats after a join, each this long after the
    /// one before, then every second (comma-separated; "none": none).
    #[arg(long, value_parser = parse_durations, default_value = "100ms,200ms,400ms")]
    pub settle_heartbeats: Durations,
    /// A fixed delay per chunk received before it can be served (on top of the CPU model).
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    pub chunk_service: Duration,
    /// Cores of each host (and origin), each host with its own: a real deployment.
    #[arg(long, default_value_t = 4.0)]
    pub host_cores: f64,
    /// Every host, origin and VM shares this many cores: a local cluster on
    /// one machine (as `virtman storm` runs it), instead of --host-cores each.
    #[arg(long, value_name = "CORES")]
    pub shared_cores: Option<f64>,
    /// No CPU model: serving, receiving, verifying and storing cost nothing.
    #[arg(long, conflicts_with = "shared_cores")]
    pub no_cpu: bool,
    /// Added to each think time of the trace: a replayer's timer overshoot
    /// (the storm's tokio sleeps overshoot by about 1.1 ms).
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    pub think_overhead: Duration,
    /// Replay the reads back to back, ignoring the trace's think time (as
    /// `virtman storm --back-to-back`).
    #[arg(long)]
    pub back_to_back: bool,
    /// No boot-profile prefetch in virtman mode (on by default, as in
    /// `virtman storm`): hosts fetch on demand only.
    #[arg(long)]
    pub no_prefetch: bool,
    /// Chunks a host's prefetch has in flight at once (the agent's 4).
    #[arg(long, default_value_t = 4)]
    pub prefetch_in_flight: u32,
    /// The boot whose first-touch order is the prefetched profile (default:
    /// the trace the VMs replay, as the storm stores it).
    #[arg(long, value_name = "FILE")]
    pub profile_trace: Option<PathBuf>,
    /// Hosts join (and prefetch) before the VMs start, as `virtman storm`
    /// joins them while it creates the VMs: host 0 FIRST before, the last
    /// host LAST before, the others evenly between (e.g. `1.2s:0.69s`).
    /// Reported times count from the VMs' start.
    #[arg(long, value_name = "FIRST:LAST")]
    pub join_lead: Option<String>,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print JSON (an array of reports) instead of text.
    #[arg(long)]
    pub json: bool,
    /// Write an SVG chart of booted VMs over time, one line per run.
    #[arg(long, value_name = "FILE")]
    pub chart: Option<PathBuf>,
}

/// Durations given as one comma-separated argument ("none": none).
#[derive(Clone, Debug)]
pub struct Durations(pub Vec<Duration>);

fn parse_durations(s: &str) -> Result<Durations, String> {
    if s == "none" {
        return Ok(Durations(Vec::new()));
    }
    s.split(',')
        .map(parse_duration)
        .collect::<Result<_, _>>()
        .map(Durations)
}

fn split_pair(s: &str, what: &str) -> anyhow::Result<(String, String)> {
    s.split_once(':')
        .map(|(a, b)| (a.trim().to_string(), b.trim().to_string()))
        .with_context(|| format!("{what} {s:?}: expected two values separated by ':'"))
}

fn load_trace(args: &SimArgs) -> anyhow::Result<Trace> {
    let chunk = u32::try_from(args.chunk_size).context("chunk size too large")?;
    if let Some(path) = &args.trace {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the trace {}", path.display()))?;
        let mut t = Trace::parse(&text).with_context(|| format!("trace {}", path.display()))?;
        if let Some(size) = args.image_size {
            t.image_size = size;
            t.validate().with_context(|| {
                format!(
                    "trace {} against an image of {size} bytes (--image-size)",
                    path.display()
                )
            })?;
        }
        return Ok(t);
    }
    let spec = SyntheticSpec {
        image_size: args.image_size.unwrap_or(4 << 30),
        working_set: args.working_set,
        chunk_size: chunk,
        read_size: args.read_size,
        think: args.think,
    };
    Trace::synthetic(&spec, args.seed).context("making the synthetic trace")
}

/// Builds the runs, runs them, prints the reports.
pub fn run(args: SimArgs) -> anyhow::Result<()> {
    let mut trace = load_trace(&args)?;
    if args.back_to_back {
        for r in &mut trace.reads {
            r.at_us = 0;
        }
    }
    let trace = Arc::new(trace);
    if let Some(path) = &args.write_trace {
        std::fs::write(path, trace.to_text())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let modes: &[Mode] = match args.mode {
        ModeArg::Virtman => &[Mode::Virtman],
        ModeArg::CacheOnly => &[Mode::CacheOnly],
        ModeArg::Direct => &[Mode::Direct],
        ModeArg::All => &[Mode::Virtman, Mode::CacheOnly, Mode::Direct],
    };
    let mut base = Config::new(Mode::Virtman, args.hosts, args.vms, Arc::clone(&trace));
    base.chunk_size = u32::try_from(args.chunk_size).context("chunk size too large")?;
    base.link_rate = args.link_rate;
    base.origin_rate = args.origin_rate.unwrap_or(args.link_rate);
    base.hop_latency = args.hop_latency;
    base.link_burst = args.link_burst;
    base.start_spread = args.start_spread;
    base.max_vms_per_host = args.max_vms_per_host;
    base.max_time = args.max_time;
    base.seed = args.seed;
    base.request_timeout = args.request_timeout;
    base.hedge = (!args.hedge.is_zero()).then_some(args.hedge);
    base.parent_busy_at = args.parent_busy_at;
    base.settle_heartbeats.clone_from(&args.settle_heartbeats.0);
    base.chunk_service = args.chunk_service;
    base.cpu.host_cores = args.host_cores;
    base.cpu.shared_cores = args.shared_cores;
    if args.no_cpu {
        base.cpu = virtman_sim::CpuModel::NONE;
    }
    base.think_overhead = args.think_overhead;
    base.prefetch.enabled = !args.no_prefetch;
    if let Some(s) = &args.join_lead {
        let (first, last) = split_pair(s, "--join-lead")?;
        base.join_lead = Some(JoinLead {
            first: parse_duration(&first).map_err(anyhow::Error::msg)?,
            last: parse_duration(&last).map_err(anyhow::Error::msg)?,
        });
    }
    base.prefetch.in_flight = args.prefetch_in_flight;
    if let Some(path) = &args.profile_trace {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the profile trace {}", path.display()))?;
        let t = Trace::parse(&text).with_context(|| format!("trace {}", path.display()))?;
        base.prefetch.profile = Some(Arc::new(t));
    }
    if let Some(r) = args.rate_interval {
        base.rate_interval = r;
    }
    if let Some(s) = &args.slow_hosts {
        let (pct, rate) = split_pair(s, "--slow-hosts")?;
        let pct: f64 = pct
            .trim_end_matches('%')
            .parse()
            .with_context(|| format!("--slow-hosts {s:?}: {pct:?} is not a percentage"))?;
        base.slow_fraction = pct / 100.0;
        base.slow_rate = parse_rate(&rate).map_err(anyhow::Error::msg)?;
    }
    if let Some(s) = &args.second_image {
        let (at, vms) = split_pair(s, "--second-image")?;
        base.second_image = Some(SecondImage {
            at: parse_duration(&at).map_err(anyhow::Error::msg)?,
            vms: vms
                .parse()
                .with_context(|| format!("--second-image {s:?}: {vms:?} is not a VM count"))?,
        });
    }
    for f in &args.fail {
        match *f {
            FailSpec::Wave(w) => base.failures.push(w),
            FailSpec::Origin(t) => base.origin_fail_at = Some(t),
        }
    }
    let mut configs = Vec::new();
    for &mode in modes {
        if mode == Mode::Virtman {
            for &s in &args.stripes {
                for &k in &args.fanout {
                    for &p in &args.parents {
                        let mut c = base.clone();
                        c.mode = mode;
                        c.topology.fanout = k;
                        c.topology.parents = p;
                        c.stripes = s;
                        configs.push(c);
                    }
                }
            }
        } else {
            let mut c = base.clone();
            c.mode = mode;
            configs.push(c);
        }
    }
    if configs.is_empty() {
        bail!("nothing to run");
    }
    // Refuse an impossible scenario before printing anything.
    for c in &configs {
        c.validate()
            .with_context(|| format!("the {} scenario", c.mode.name()))?;
    }
    if !args.json {
        println!(
            "trace: {} reads, {:.1} MiB read, {:.1} MiB of chunks, image {:.1} MiB",
            trace.reads.len(),
            mib(trace.bytes()),
            mib(trace.chunk_bytes(base.chunk_size)),
            mib(trace.image_size)
        );
    }
    let mut reports: Vec<Report> = Vec::new();
    for c in &configs {
        let r =
            virtman_sim::run(c).with_context(|| format!("simulating {} mode", c.mode.name()))?;
        if !args.json {
            print!("{}", r.text());
        }
        reports.push(r);
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&reports).context("encoding JSON")?
        );
    }
    if let Some(path) = &args.chart {
        std::fs::write(path, virtman_sim::chart_svg(&reports))
            .with_context(|| format!("writing the chart {}", path.display()))?;
    }
    Ok(())
}

fn mib(b: u64) -> f64 {
    #[allow(clippy::cast_precision_loss)]
    let x = b as f64 / 1_048_576.0;
    x
}
