//! One simulated storm's parameters, their defaults and their validation, and
//! the parsers of the units the CLI takes (durations, link rates, failure waves).
//!
//! ```text
//!   Config ──validate()──► refused with a ConfigError, or run by engine::run
//!     mode, hosts, vms, trace, links, latency, topology settings,
//!     agent timeouts, failure waves, second image, seed, bounds
//! ```
//!
//! Defaults mirror the real components: the coordinator's heartbeat (1 s),
//! timeout (4 s) and tick (250 ms), the agent's request timeout (2 s) and
//! cool-down (3 s), 256 KiB chunks, gigabit links with 100 µs per hop, and
//! the CPU costs measured by `examples/cpu_costs.rs` on hosts of 4 cores each.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use virtman_topology::Settings;

use crate::trace::Trace;

/// How VMs get their image's blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Relay trees: each host fetches missing chunks from its parents.
    Virtman,
    /// Every host fetches missing chunks from the origin; one cache per host.
    CacheOnly,
    /// Every VM reads the origin directly (exact byte ranges), no cache.
    Direct,
}

impl Mode {
    /// The mode's name as the CLI spells it.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Virtman => "virtman",
            Mode::CacheOnly => "cache-only",
            Mode::Direct => "direct",
        }
    }
}

/// A wave of host failures.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct FailureWave {
    /// Fraction of the hosts killed (0 to 1], chosen with the run's seed.
    pub fraction: f64,
    /// When they die (silently: no more heartbeats, no replies).
    pub at: Duration,
    /// If set, the killed hosts come back this long after `at`, keep their
    /// cached chunks, join again and restart their VMs from the beginning.
    pub recover_after: Option<Duration>,
}

/// A second image whose VMs start mid-storm (its own origin and tree).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SecondImage {
    /// When its VMs start.
    pub at: Duration,
    /// How many VMs of it start (placed round-robin over the hosts).
    pub vms: u32,
}

/// Everything one run needs. Build with [`Config::new`] and adjust fields.
#[derive(Debug, Clone)]
pub struct Config {
    /// How blocks travel.
    pub mode: Mode,
    /// Hosts (agents). VMs are placed round-robin: VM i on host i mod hosts.
    pub hosts: u32,
    /// VMs of the first image.
    pub vms: u32,
    /// The most VMs one host can hold (memory, cores); more is refused.
    pub max_vms_per_host: u32,
    /// The boot every VM replays (shared by both images).
    pub trace: Arc<Trace>,
    /// Chunk size of the cached volumes (bytes, a power of two).
    pub chunk_size: u32,
    /// Each host's uplink and downlink rate, bits per second.
    pub link_rate: f64,
    /// The origin's uplink rate, bits per second.
    pub origin_rate: f64,
    /// Fraction of hosts (chosen with the seed) whose links run at `slow_rate`.
    pub slow_fraction: f64,
    /// The slow hosts' link rate, bits per second.
    pub slow_rate: f64,
    /// One-way latency of one hop (a request or the tail of a reply).
    pub hop_latency: Duration,
    /// Token bucket of every link, bytes (0, the default: none). The storm's
    /// `tc tbf` shaping has a 256 KiB bucket: after a pause a link sends
    /// that much at once, faster than its rate.
    pub link_burst: u64,
    /// The tree's settings, given to the real topology state machine.
    pub topology: Settings,
    /// Stripes of the forest (`virtman_topology::Forest`): chunk i is
    /// fetched along stripe i mod S's tree; 1 is one tree (the default, 4,
    /// is the coordinator's).
    pub stripes: u32,
    /// How often agents heartbeat (and learn their new parents).
    pub heartbeat_interval: Duration,
    /// The agent's first heartbeats after a join, each this long after the
    /// one before (the agent's `SETTLE_HEARTBEATS`; never longer than
    /// `heartbeat_interval`), then every `heartbeat_interval`: a host displaced by hosts joining after it
    /// learns its new parents within a fraction of a second.
    pub settle_heartbeats: Vec<Duration>,
    /// How often the coordinator ticks (checks for timeouts).
    pub tick_interval: Duration,
    /// The agent's per-request timeout before it fails over to the next source.
    pub request_timeout: Duration,
    /// The agent's hedge: a fetch that a source has not answered this long
    /// after it was asked goes to the next source (the agent's hedge
    /// ceiling, the longest its adaptive delay gets); the unanswered request
    /// is still reported when its own timeout ends. `None`: no hedging, the
    /// fetch waits the request timeout.
    pub hedge: Option<Duration>,
    /// The agent's `FetchConfig::busy_at`: a parent with this many of the
    /// host's requests outstanding is asked after the parents with fewer
    /// (1: always the least loaded first).
    pub parent_busy_at: u32,
    /// How long a parent that failed is tried only after the healthy ones.
    pub cool_down: Duration,
    /// VMs start uniformly at random within this window after time zero.
    pub start_spread: Duration,
    /// Failure waves.
    pub failures: Vec<FailureWave>,
    /// The origin(s) die at this time, if set (the run may then not finish).
    pub origin_fail_at: Option<Duration>,
    /// A second image arriving mid-storm, if set.
    pub second_image: Option<SecondImage>,
    /// Rates are recomputed (exact max-min) at most this often; between two
    /// recomputations a new flow takes the capacity left free on its links.
    /// Zero (the default) recomputes at every change: exact, and fast enough
    /// for 10,000 hosts because only the changed links' components are redone.
    /// A non-zero interval is an approximation that favours whoever started
    /// first; it shifts tail boot times by up to ~10 % (see SCALE.md).
    pub rate_interval: Duration,
    /// Virtual time after which the run stops and reports what never booted.
    pub max_time: Duration,
    /// Seed of every random choice (start times, victims, slow hosts).
    pub seed: u64,
    /// A fixed delay per chunk a host receives before it is present, on top
    /// of the CPU model (`cpu`); zero by default. Kept for experiments: the
    /// CPU model's `receive_chunk` and `hash_per_byte` are the measured way.
    pub chunk_service: Duration,
    /// Every host joins the tree at time zero, before any VM starts, in
    /// reverse host order (so host 0, where VM 0 runs, is the deepest): the
    /// relay-chain experiment, a cold read through a tree of idle hosts.
    pub prejoin: bool,
    /// The CPU model: costs of each piece of work and the cores they share.
    pub cpu: CpuModel,
    /// Added to every think time of the trace (a gap between two reads
    /// above zero): the replayer's timer overshoot (tokio sleeps to the next
    /// millisecond tick; `examples/cpu_costs.rs` measures it). Zero by default.
    /// The agent's prefetch poll is a tokio sleep too and gets it as well.
    pub think_overhead: Duration,
    /// Boot-profile prefetch (virtman mode only, as `virtman storm` stores the
    /// profile only there): every host, as soon as it joins the image,
    /// fetches the profile's chunks in order from its parents, like
    /// `crates/agent/src/prefetch.rs`. On by default, as in the storm.
    pub prefetch: Prefetch,
    /// Hosts join before any VM starts, as in `virtman storm`, which creates
    /// every VM through the agents' control API (joining each host at its
    /// first VM, and so starting its prefetch) before it starts them all at
    /// once. `None` (the default): a host joins when its first VM starts.
    pub join_lead: Option<JoinLead>,
}

/// How long before the VMs start the hosts join: host 0 `first` before, the
/// last host `last` before, the others evenly between, in host order. Time
/// zero is host 0's join; the VMs start at `first` (plus their spread), and
/// the report counts times from there. Failure waves, the origin's failure
/// and a second image's start are from the VMs' start too.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct JoinLead {
    /// Host 0's lead.
    pub first: Duration,
    /// The last host's lead (at most `first`).
    pub last: Duration,
}

/// Boot-profile prefetch, as the agent's `PrefetchConfig` and
/// `fetch_in_stripes` do it: the profile's chunks in order, one lane per
/// stripe, missing ones only and not those being fetched already, at most
/// `in_flight` at once (shared by the lanes, at least one each), no new one
/// while a demand read on the host waits on a chunk outside the profile
/// (the loop then sleeps `poll` and looks again), single flight shared with
/// demand reads.
#[derive(Debug, Clone, PartialEq)]
pub struct Prefetch {
    /// Whether hosts replay the boot profile.
    pub enabled: bool,
    /// Chunks in flight at once, shared by the lanes
    /// (`PrefetchConfig::in_flight`, 4).
    pub in_flight: u32,
    /// How often a paused prefetch looks whether demand reads still wait
    /// (`PrefetchConfig::poll`, 5 ms).
    pub poll: Duration,
    /// The boot whose chunks, in first-touch order, are the profile; `None`
    /// (the default): the trace the VMs replay, as the storm stores it.
    pub profile: Option<Arc<Trace>>,
}

impl Default for Prefetch {
    /// On, the agent's defaults, the VMs' own trace as the profile.
    fn default() -> Self {
        Prefetch {
            enabled: true,
            in_flight: 4,
            poll: Duration::from_millis(5),
            profile: None,
        }
    }
}

impl Prefetch {
    /// No prefetch (on-demand fetching only, the model before prefetch).
    pub fn off() -> Self {
        Prefetch {
            enabled: false,
            ..Prefetch::default()
        }
    }
}

/// The CPU cost of one kind of work: a part per request and a part per byte.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct Cost {
    /// Seconds of one core per request.
    pub per_request_s: f64,
    /// Seconds of one core per byte.
    pub per_byte_s: f64,
}

impl Cost {
    /// A cost of `per_request_us` microseconds plus `per_byte_ns` nanoseconds a byte.
    pub const fn us_ns(per_request_us: f64, per_byte_ns: f64) -> Self {
        Self {
            per_request_s: per_request_us * 1e-6,
            per_byte_s: per_byte_ns * 1e-9,
        }
    }

    /// Seconds for one request of `bytes`.
    pub fn seconds(&self, bytes: u64) -> f64 {
        #[allow(clippy::cast_precision_loss)]
        let b = bytes as f64;
        self.per_request_s + self.per_byte_s * b
    }
}

/// CPU work per step of the data path. Every piece is a job on the CPU of
/// the node doing it (see [`CpuModel`]), taken in this order:
///
/// ```text
///  source serves a chunk   serve_chunk (host) / origin_serve (origin)  ─► wire
///  receiver gets it        receive_chunk + hash_per_byte x bytes ─► present
///  VM read, cached modes   vm_serve + vm_client, once its chunks are present
///  VM read, direct mode    plain_serve at the origin ─► wire ─► vm_client
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct CpuCosts {
    /// A host serving a chunk to a child host (its base export over TCP).
    pub serve_chunk: Cost,
    /// The origin serving a chunk (its file export over TCP).
    pub origin_serve: Cost,
    /// A host receiving a chunk: its NBD client, then storing it (pwrite and
    /// the batched durable commit); verification is `hash_per_byte`.
    pub receive_chunk: Cost,
    /// BLAKE3 verification, seconds per byte (once per chunk per hop).
    pub hash_per_byte_s: f64,
    /// A VM's read served by its host's snapshot export.
    pub vm_serve: Cost,
    /// The VM's own side of a read (NBD client; in the storm's replayer also
    /// the check of every byte against the image).
    pub vm_client: Cost,
    /// The plain NBD server of direct mode (qemu-nbd), per read.
    pub plain_serve: Cost,
    /// The VM's own side of a read in direct mode (NBD client over TCP; in
    /// the storm's replayer also the byte check).
    pub plain_client: Cost,
}

impl CpuCosts {
    /// No CPU cost at all (the model without CPU).
    pub const ZERO: CpuCosts = CpuCosts {
        serve_chunk: Cost::us_ns(0.0, 0.0),
        origin_serve: Cost::us_ns(0.0, 0.0),
        receive_chunk: Cost::us_ns(0.0, 0.0),
        hash_per_byte_s: 0.0,
        vm_serve: Cost::us_ns(0.0, 0.0),
        vm_client: Cost::us_ns(0.0, 0.0),
        plain_serve: Cost::us_ns(0.0, 0.0),
        plain_client: Cost::us_ns(0.0, 0.0),
    };

    /// Measured with `cargo run --release -p virtman-sim --example cpu_costs`
    /// (examples/cpu_costs.rs) on the project's 2-core machine (2026-11-25,
    /// release build, the median of four runs while other jobs loaded it):
    /// CPU time (user + system, every thread) of the real code paths, each
    /// NBD path read one request at a time at 4, 64 and 256 KiB and fitted as
    /// per request + per byte, the server in a child process so both sides
    /// are told apart. crates/sim/SCALE.md ("The CPU model") has the spread
    /// over the runs and the calibration against measured storms.
    ///
    /// | step | measured path | cost |
    /// | --- | --- | --- |
    /// | `serve_chunk` | `VolumeExport` of a warm volume over TCP, server | 62 µs + 0.156 ns/B |
    /// | `origin_serve` | `FileExport` over TCP, server | 2.6 µs + 0.415 ns/B |
    /// | `receive_chunk` | NBD client over TCP (30 µs + 0.104 ns/B) + store: cold fill of a `CachedVolume` from a page-cached `FileUpstream` (855 µs per 256 KiB chunk) less its BLAKE3 (27 µs) and pread (11 µs): 3.12 ns/B | 30 µs + 3.22 ns/B |
    /// | `hash_per_byte` | `blake3::hash` of 256 KiB, one thread: 9.85 GB/s | 0.1015 ns/B |
    /// | `vm_serve` | `Snapshot` export over a unix socket, server | 63 µs + 0.124 ns/B |
    /// | `vm_client` | that read's client (28 µs + 0.070 ns/B) + the storm replayer's check, pread + memcmp (0.081 ns/B) | 28 µs + 0.151 ns/B |
    /// | `plain_serve` | `qemu-nbd -r -t -e 1024` over TCP, server | 30.5 µs + 0.991 ns/B |
    /// | `plain_client` | its client over TCP (32.7 µs + 0.223 ns/B) + the check | 32.7 µs + 0.304 ns/B |
    ///
    /// A 256 KiB chunk thus costs its receiver about 0.9 ms of CPU (mostly
    /// storing it: write and durable commit), its sender 0.1 ms; a 64 KiB
    /// VM read about 0.11 ms.
    pub const MEASURED: CpuCosts = CpuCosts {
        serve_chunk: Cost::us_ns(62.4, 0.156),
        origin_serve: Cost::us_ns(2.6, 0.415),
        receive_chunk: Cost::us_ns(30.0, 3.22),
        hash_per_byte_s: 0.1015e-9,
        vm_serve: Cost::us_ns(63.3, 0.124),
        vm_client: Cost::us_ns(27.9, 0.151),
        plain_serve: Cost::us_ns(30.5, 0.991),
        plain_client: Cost::us_ns(32.7, 0.304),
    };

    /// Whether every cost is zero (the CPU model is then skipped entirely).
    pub fn is_zero(&self) -> bool {
        *self == Self::ZERO
    }
}

/// Where CPU work runs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CpuModel {
    /// What each step costs.
    pub costs: CpuCosts,
    /// Cores of each host and each origin when hosts have their own CPUs
    /// (the default: a real deployment).
    pub host_cores: f64,
    /// If set, every host, origin and VM shares this many cores (a local
    /// cluster on one machine, like `virtman storm`), instead of `host_cores` each.
    pub shared_cores: Option<f64>,
}

impl CpuModel {
    /// No CPU: every step is free.
    pub const NONE: CpuModel = CpuModel {
        costs: CpuCosts::ZERO,
        host_cores: 4.0,
        shared_cores: None,
    };
}

impl Default for CpuModel {
    /// The measured costs on hosts of 4 cores each.
    fn default() -> Self {
        CpuModel {
            costs: CpuCosts::MEASURED,
            host_cores: 4.0,
            shared_cores: None,
        }
    }
}

/// Why a configuration was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// No hosts or no VMs.
    #[error("a storm needs at least one host and one VM (got {hosts} hosts, {vms} VMs)")]
    Empty {
        /// Hosts asked for.
        hosts: u32,
        /// VMs asked for.
        vms: u32,
    },
    /// More VMs than the hosts can hold.
    #[error("{vms} VMs do not fit on {hosts} hosts of at most {per_host} VMs each (at most {max})")]
    TooManyVms {
        /// VMs asked for (both images).
        vms: u64,
        /// Hosts.
        hosts: u32,
        /// Limit per host.
        per_host: u32,
        /// hosts * per_host.
        max: u64,
    },
    /// A link rate is zero, negative or not a number.
    #[error("{what} must be a positive rate, got {rate} bit/s")]
    Rate {
        /// Which rate.
        what: &'static str,
        /// The value.
        rate: f64,
    },
    /// The stripe count is 0 or above `virtman_topology::MAX_STRIPES`.
    #[error("stripes must be between 1 and {max}, got {0}", max = virtman_topology::MAX_STRIPES)]
    Stripes(u32),
    /// The chunk size is not a power of two between 4 KiB and 16 MiB.
    #[error("chunk size must be a power of two between 4 KiB and 16 MiB, got {0}")]
    ChunkSize(u32),
    /// A fraction is outside its range.
    #[error("{what} must be a fraction in (0, 1], got {value}")]
    Fraction {
        /// Which fraction.
        what: &'static str,
        /// The value.
        value: f64,
    },
    /// An event is scheduled at or after the end of the simulated time.
    #[error("{what} at {at:?} is not before the end of the run ({max:?}; raise --max-time)")]
    AfterEnd {
        /// Which event.
        what: &'static str,
        /// Its time.
        at: Duration,
        /// The bound.
        max: Duration,
    },
    /// A core count is zero, negative or not a number.
    #[error("{what} must be a positive number, got {cores}")]
    Cores {
        /// Which count.
        what: &'static str,
        /// The value.
        cores: f64,
    },
    /// A CPU cost is negative or not a number.
    #[error("CPU costs must be finite and not negative")]
    Cost,
    /// The last host's join lead is longer than the first's.
    #[error("the last host's join lead ({last:?}) must not be longer than the first's ({first:?})")]
    JoinLead {
        /// Host 0's lead.
        first: Duration,
        /// The last host's.
        last: Duration,
    },
    /// A timing setting is zero where it cannot be.
    #[error("{0} must be above zero")]
    Zero(&'static str),
    /// The tree settings are refused by the topology crate.
    #[error("tree settings: {0}")]
    Topology(#[from] virtman_topology::SettingsError),
}

impl Config {
    /// A storm of `vms` VMs on `hosts` hosts replaying `trace`, with defaults.
    pub fn new(mode: Mode, hosts: u32, vms: u32, trace: Arc<Trace>) -> Self {
        Self {
            mode,
            hosts,
            vms,
            max_vms_per_host: 128,
            trace,
            chunk_size: 256 << 10,
            link_rate: 1e9,
            origin_rate: 1e9,
            slow_fraction: 0.0,
            slow_rate: 1e8,
            hop_latency: Duration::from_micros(100),
            link_burst: 0,
            topology: Settings::default(),
            stripes: 4,
            heartbeat_interval: Duration::from_secs(1),
            settle_heartbeats: [100, 200, 400].map(Duration::from_millis).to_vec(),
            tick_interval: Duration::from_millis(250),
            request_timeout: Duration::from_secs(2),
            hedge: Some(Duration::from_millis(250)),
            parent_busy_at: 4,
            cool_down: Duration::from_secs(3),
            start_spread: Duration::ZERO,
            failures: Vec::new(),
            origin_fail_at: None,
            second_image: None,
            rate_interval: Duration::ZERO,
            max_time: Duration::from_secs(3600),
            seed: 1,
            prejoin: false,
            chunk_service: Duration::ZERO,
            cpu: CpuModel::default(),
            think_overhead: Duration::ZERO,
            prefetch: Prefetch::default(),
            join_lead: None,
        }
    }

    /// When the VMs start (virtual time): after the join lead, if any.
    pub fn epoch(&self) -> Duration {
        self.join_lead.map_or(Duration::ZERO, |l| l.first)
    }

    /// Whether this run's hosts prefetch the boot profile (virtman mode with
    /// prefetch on).
    pub fn prefetching(&self) -> bool {
        self.mode == Mode::Virtman && self.prefetch.enabled
    }

    /// All VMs of both images.
    pub fn total_vms(&self) -> u64 {
        u64::from(self.vms) + self.second_image.map_or(0, |s| u64::from(s.vms))
    }

    /// The longest a read can stall because hosts died, in this model: a
    /// death is seen by the coordinator within the heartbeat timeout plus a
    /// tick, every agent has new parents one heartbeat later, and a request
    /// sent to the dead host before that moves on after the hedge delay (or
    /// the request timeout without hedging); from then on no request goes to
    /// a dead host.
    pub fn failover_time(&self) -> Duration {
        self.topology.heartbeat_timeout
            + self.tick_interval
            + self.heartbeat_interval
            + self.give_up_time()
    }

    /// How long a fetch waits on a source that never answers before it asks
    /// the next one: the hedge delay, or the request timeout without it.
    pub fn give_up_time(&self) -> Duration {
        self.hedge
            .map_or(self.request_timeout, |h| h.min(self.request_timeout))
    }

    /// Refuses impossible scenarios with a message that says why.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.hosts == 0 || self.vms == 0 {
            return Err(ConfigError::Empty {
                hosts: self.hosts,
                vms: self.vms,
            });
        }
        let max = u64::from(self.hosts) * u64::from(self.max_vms_per_host);
        // Both images' VMs share the hosts: VM i of either image goes on host i mod H.
        let per_host_needed = u64::from(self.vms).div_ceil(u64::from(self.hosts))
            + self
                .second_image
                .map_or(0, |s| u64::from(s.vms).div_ceil(u64::from(self.hosts)));
        if per_host_needed > u64::from(self.max_vms_per_host) {
            return Err(ConfigError::TooManyVms {
                vms: self.total_vms(),
                hosts: self.hosts,
                per_host: self.max_vms_per_host,
                max,
            });
        }
        for (what, rate) in [
            ("the link rate", self.link_rate),
            ("the origin's rate", self.origin_rate),
            ("the slow hosts' rate", self.slow_rate),
        ] {
            if !rate.is_finite() || rate < 1.0 {
                return Err(ConfigError::Rate { what, rate });
            }
        }
        if !self.chunk_size.is_power_of_two() || !(4096..=(16 << 20)).contains(&self.chunk_size) {
            return Err(ConfigError::ChunkSize(self.chunk_size));
        }
        if !(0.0..=1.0).contains(&self.slow_fraction) {
            return Err(ConfigError::Fraction {
                what: "the slow-host fraction",
                value: self.slow_fraction,
            });
        }
        for (what, d) in [
            ("the heartbeat interval", self.heartbeat_interval),
            ("the tick interval", self.tick_interval),
            ("the request timeout", self.request_timeout),
            ("the run's time bound", self.max_time),
            ("the prefetch poll", self.prefetch.poll),
        ] {
            if d.is_zero() {
                return Err(ConfigError::Zero(what));
            }
        }
        if let Some(l) = self.join_lead
            && l.last > l.first
        {
            return Err(ConfigError::JoinLead {
                first: l.first,
                last: l.last,
            });
        }
        if self.prefetch.in_flight == 0 {
            return Err(ConfigError::Zero("the prefetch's chunks in flight"));
        }
        if self.parent_busy_at == 0 {
            return Err(ConfigError::Zero("the requests that make a parent busy"));
        }
        self.topology.validate()?;
        if !(1..=virtman_topology::MAX_STRIPES).contains(&self.stripes) {
            return Err(ConfigError::Stripes(self.stripes));
        }
        for (what, cores) in [
            ("the cores per host", Some(self.cpu.host_cores)),
            ("the shared cores", self.cpu.shared_cores),
        ] {
            if let Some(c) = cores
                && !(c.is_finite() && c > 0.0)
            {
                return Err(ConfigError::Cores { what, cores: c });
            }
        }
        let c = &self.cpu.costs;
        let all = [
            c.serve_chunk,
            c.origin_serve,
            c.receive_chunk,
            c.vm_serve,
            c.vm_client,
            c.plain_serve,
            c.plain_client,
        ];
        if all
            .iter()
            .flat_map(|k| [k.per_request_s, k.per_byte_s])
            .chain([c.hash_per_byte_s])
            .any(|v| !(v.is_finite() && v >= 0.0))
        {
            return Err(ConfigError::Cost);
        }
        for w in &self.failures {
            if !(w.fraction > 0.0 && w.fraction <= 1.0) {
                return Err(ConfigError::Fraction {
                    what: "a failure wave's fraction",
                    value: w.fraction,
                });
            }
            self.before_end("a failure wave", self.epoch() + w.at)?;
        }
        if let Some(t) = self.origin_fail_at {
            self.before_end("the origin's failure", self.epoch() + t)?;
        }
        if let Some(s) = self.second_image {
            self.before_end("the second image", self.epoch() + s.at)?;
        }
        self.before_end("the last VM start", self.epoch() + self.start_spread)?;
        Ok(())
    }

    fn before_end(&self, what: &'static str, at: Duration) -> Result<(), ConfigError> {
        if at >= self.max_time {
            return Err(ConfigError::AfterEnd {
                what,
                at,
                max: self.max_time,
            });
        }
        Ok(())
    }
}

/// Parses a duration: `250ms`, `10s`, `1.5s`, `100us`, `2m`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix("us").or_else(|| t.strip_suffix("µs")) {
        (n, 1e-6)
    } else if let Some(n) = t.strip_suffix("ns") {
        (n, 1e-9)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = t.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (t, 1.0)
    };
    num.trim()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)
        .and_then(|v| Duration::try_from_secs_f64(v * scale).ok())
        .ok_or_else(|| format!("{s:?} is not a duration (e.g. 250ms, 10s, 1.5s, 2m)"))
}

/// Parses a link rate in bits per second: `1G`, `100M`, `10Gbit`, `2.5G`,
/// `1000000000`; `B/s` suffixes (`125MB/s`) are bytes per second.
pub fn parse_rate(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let (t, bytes) = match t.strip_suffix("B/s") {
        Some(n) => (n, true),
        None => (
            t.strip_suffix("bit/s")
                .or_else(|| t.strip_suffix("bit"))
                .or_else(|| t.strip_suffix("bps"))
                .unwrap_or(t),
            false,
        ),
    };
    // Either case: a rate has no milli (tc writes 1gbit, 100mbit).
    let (num, scale) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1e3),
        Some('m' | 'M') => (&t[..t.len() - 1], 1e6),
        Some('g' | 'G') => (&t[..t.len() - 1], 1e9),
        Some('t' | 'T') => (&t[..t.len() - 1], 1e12),
        _ => (t, 1.0),
    };
    let factor = if bytes { 8.0 } else { 1.0 };
    num.trim()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)
        .map(|v| v * scale * factor)
        .ok_or_else(|| format!("{s:?} is not a link rate (e.g. 1G, 100M, 10Gbit, 125MB/s)"))
}

/// A parsed `--fail` argument: a wave of hosts, or the origin.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FailSpec {
    /// `5%@10s` or `5%@10s+30s` (recover 30 s later).
    Wave(FailureWave),
    /// `origin@10s`: every origin dies.
    Origin(Duration),
}

/// Parses `5%@10s`, `5%@10s+30s` or `origin@10s`.
pub fn parse_fail(s: &str) -> Result<FailSpec, String> {
    let bad = || format!("{s:?} is not a failure (e.g. 5%@10s, 5%@10s+30s, origin@20s)");
    let (what, when) = s.split_once('@').ok_or_else(bad)?;
    let (at, recover) = match when.split_once('+') {
        Some((a, r)) => (parse_duration(a)?, Some(parse_duration(r)?)),
        None => (parse_duration(when)?, None),
    };
    if what.trim() == "origin" {
        if recover.is_some() {
            return Err(bad());
        }
        return Ok(FailSpec::Origin(at));
    }
    let pct = what
        .trim()
        .strip_suffix('%')
        .and_then(|p| p.trim().parse::<f64>().ok())
        .filter(|p| p.is_finite())
        .ok_or_else(bad)?;
    Ok(FailSpec::Wave(FailureWave {
        fraction: pct / 100.0,
        at,
        recover_after: recover,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_parse() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("100us"), Ok(Duration::from_micros(100)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("soon").is_err());
        assert_eq!(parse_rate("1G"), Ok(1e9));
        assert_eq!(parse_rate("100M"), Ok(1e8));
        assert_eq!(parse_rate("10Gbit"), Ok(1e10));
        assert_eq!(parse_rate("125MB/s"), Ok(1e9));
        assert!(parse_rate("fast").is_err());
        assert_eq!(
            parse_fail("5%@10s"),
            Ok(FailSpec::Wave(FailureWave {
                fraction: 0.05,
                at: Duration::from_secs(10),
                recover_after: None
            }))
        );
        assert_eq!(
            parse_fail("10%@2s+30s"),
            Ok(FailSpec::Wave(FailureWave {
                fraction: 0.1,
                at: Duration::from_secs(2),
                recover_after: Some(Duration::from_secs(30))
            }))
        );
        assert_eq!(
            parse_fail("origin@20s"),
            Ok(FailSpec::Origin(Duration::from_secs(20)))
        );
        assert!(parse_fail("5@10s").is_err());
        assert!(parse_fail("5%").is_err());
    }
}
