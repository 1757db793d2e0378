//! The event loop: hosts, VMs, cached volumes and chunk requests on virtual
//! time, with the real topology state machine deciding parents.
//!
//! ```text
//!   heap of (time ns, seq, event) ── pop the earliest ──► handle ──► push new events
//!
//!   VmStart, VmRead, a read served to its VM ............... vms.rs
//!   fetch, Arrive, serve, PairDone ─► Deliver, Timeout, Retry  fetch.rs
//!   PrefetchStart, PrefetchPoll ............................. prefetch.rs
//!   join, Heartbeat ......................................... control.rs
//!   Wave, Recover, OriginFail ............................... failures.rs
//!   Tick (coordinator, 250 ms) ─► Session::tick(now): deaths, repairs
//!   CpuWake (cpu.rs) ─► the jobs that finished go on (serve, deliver, read)
//! ```
//!
//! This module holds the [`Engine`], its setup (links, hosts, images, the
//! VMs placed and the first events pushed), the loop and the dispatch of
//! each event; the handlers live in the files above. `state.rs` holds what
//! the engine keeps per host and request, `slab.rs` the generation-checked
//! handles events carry.
//!
//! With zero CPU costs no job is made and every step goes on at once, so
//! the model is then exactly the one without a CPU.
//!
//! Everything is ordered: the heap breaks ties by insertion sequence, maps
//! that are iterated are sorted first, and every random choice comes from the
//! seeded [`Rng`], so a seed gives the same report byte for byte. The run
//! ends when every VM booted (or died with its host), or at `max_time`, when
//! the VMs that never booted are listed.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

use virtman_topology::{Forest, NodeId};

use crate::config::{Config, CpuCosts, Mode};
use crate::cpu::{Cpu, CpuWake};
use crate::net::{Completion, Net};
use crate::record::{ImageState, Raw, Vm};
use crate::report::Report;
use crate::rng::Rng;
use crate::{SimError, Trace};

mod control;
mod failures;
mod fetch;
mod prefetch;
mod slab;
mod state;
mod vms;

use slab::Slab;
use state::{Fetch, Host, Owner, Req, Volume};

/// What happens when a CPU job finishes.
#[derive(Debug, Clone, Copy)]
enum CpuJob {
    /// The source has prepared the reply: it goes on the wire.
    Serve { req: u32, gen_: u32 },
    /// The receiver has taken the reply in (and verified and stored a chunk).
    Deliver { req: u32, gen_: u32 },
    /// A VM's read, its chunks present, has been served to the VM.
    Read { vm: u32, gen_: u32 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    VmStart {
        vm: u32,
        gen_: u32,
    },
    VmRead {
        vm: u32,
        gen_: u32,
    },
    Arrive {
        req: u32,
        gen_: u32,
    },
    Timeout {
        req: u32,
        gen_: u32,
    },
    /// A hedged-around request's own timeout ends: it is reported then.
    LateReport {
        host: u32,
        parent: u32,
        image: u32,
    },
    Deliver {
        req: u32,
        gen_: u32,
    },
    PairDone {
        pair: u32,
        version: u32,
    },
    CpuWake {
        pool: u32,
        version: u32,
    },
    Heartbeat {
        host: u32,
        image: u32,
        gen_: u32,
    },
    Tick {
        image: u32,
    },
    Recompute,
    Retry {
        fetch: u32,
        gen_: u32,
    },
    Wave {
        index: u32,
    },
    Recover {
        host: u32,
    },
    OriginFail,
    PrefetchStart {
        host: u32,
        image: u32,
        gen_: u32,
    },
    Join {
        host: u32,
    },
    PrefetchPoll {
        host: u32,
        image: u32,
        gen_: u32,
    },
}

/// The running simulation.
pub(crate) struct Engine<'a> {
    cfg: &'a Config,
    trace: &'a Trace,
    now: u64,
    seq: u64,
    heap: BinaryHeap<Reverse<(u64, u64, Ev)>>,
    pub net: Net,
    hosts: Vec<Host>,
    pub images: Vec<ImageState>,
    pub vms: Vec<Vm>,
    fetches: Slab<Fetch>,
    reqs: Slab<Req>,
    out: Vec<Completion>,
    unfinished: u64,
    origin_alive: bool,
    chunk: u64,
    lat: u64,
    service: u64,
    cpu: Cpu,
    /// Any CPU cost at all (else the CPU model is skipped).
    cpu_on: bool,
    costs: CpuCosts,
    shared_cpu: bool,
    cpu_jobs: Slab<CpuJob>,
    cpu_out: Vec<CpuWake>,
    think_overhead: u64,
    /// The boot profile: chunks in first-touch order, split by stripe
    /// (empty: no prefetch).
    profile: Vec<Vec<u32>>,
    /// The profile's chunks as a bitmap (demand reads of these do not
    /// pause the replay).
    expected: Vec<u64>,
    rng: Rng,
    pub raw: Raw,
}

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn node_id(host: u32) -> NodeId {
    NodeId(u64::from(host) + 1)
}

/// Runs one storm to its end and reports it.
pub fn run(cfg: &Config) -> Result<Report, SimError> {
    cfg.validate()?;
    cfg.trace.validate()?;
    if let Some(p) = &cfg.prefetch.profile {
        p.validate()?;
    }
    let mut e = Engine::new(cfg)?;
    e.start();
    e.run_loop();
    Ok(e.finish())
}

impl<'a> Engine<'a> {
    fn new(cfg: &'a Config) -> Result<Self, SimError> {
        let trace: &Trace = &cfg.trace;
        let hosts = cfg.hosts;
        let n_images: u32 = if cfg.second_image.is_some() { 2 } else { 1 };
        let chunk = u64::from(cfg.chunk_size);
        let chunks = u32::try_from(trace.image_size.div_ceil(chunk))
            .map_err(|_| SimError::ImageTooLarge(trace.image_size))?;
        let mut rng = Rng::new(cfg.seed, 1);
        // Links: slow hosts chosen with the seed; origins after the hosts.
        let mut up = vec![cfg.link_rate; hosts as usize];
        let slow = count_of(cfg.slow_fraction, hosts);
        if slow > 0 {
            let mut ids: Vec<u32> = (0..hosts).collect();
            rng.shuffle(&mut ids);
            for &h in ids.iter().take(slow as usize) {
                up[h as usize] = cfg.slow_rate;
            }
        }
        let mut down = up.clone();
        for _ in 0..n_images {
            up.push(cfg.origin_rate);
            down.push(cfg.origin_rate);
        }
        let mut net = Net::new(&up, &down, ns(cfg.rate_interval));
        net.set_burst(cfg.link_burst);
        let words = (chunks as usize).div_ceil(64);
        let hosts_v = (0..hosts)
            .map(|_| Host {
                alive: true,
                vols: (0..n_images)
                    .map(|_| Volume {
                        present: vec![0; if cfg.mode == Mode::Direct { 0 } else { words }],
                        ..Volume::default()
                    })
                    .collect(),
                vms: Vec::new(),
                recovering: false,
            })
            .collect();
        let mut images = Vec::new();
        for i in 0..n_images {
            let session = if cfg.mode == Mode::Virtman {
                Some(Forest::new(cfg.topology, cfg.stripes, &[NodeId(0)])?)
            } else {
                None
            };
            images.push(ImageState {
                session,
                origin: hosts + i,
                chunks,
            });
        }
        let profile = if cfg.prefetching() {
            let t = cfg.prefetch.profile.as_deref().unwrap_or(trace);
            prefetch::first_touch(t, chunk, chunks)
        } else {
            Vec::new()
        };
        let mut expected = vec![0u64; if profile.is_empty() { 0 } else { words }];
        for &c in &profile {
            expected[(c / 64) as usize] |= 1 << (c % 64);
        }
        let by_stripe = if cfg.prefetching() {
            prefetch::by_stripe(&profile, cfg.stripes)
        } else {
            Vec::new()
        };
        Ok(Self {
            cfg,
            trace,
            now: 0,
            seq: 0,
            heap: BinaryHeap::new(),
            net,
            hosts: hosts_v,
            images,
            vms: Vec::new(),
            fetches: Slab::new(),
            reqs: Slab::new(),
            out: Vec::new(),
            unfinished: 0,
            origin_alive: true,
            chunk,
            lat: ns(cfg.hop_latency),
            service: ns(cfg.chunk_service),
            cpu: match cfg.cpu.shared_cores {
                Some(c) => Cpu::new(1, c),
                None => Cpu::new(hosts as usize + n_images as usize, cfg.cpu.host_cores),
            },
            cpu_on: !cfg.cpu.costs.is_zero(),
            costs: cfg.cpu.costs,
            shared_cpu: cfg.cpu.shared_cores.is_some(),
            cpu_jobs: Slab::new(),
            cpu_out: Vec::new(),
            think_overhead: ns(cfg.think_overhead),
            profile: by_stripe,
            expected,
            rng,
            raw: Raw::default(),
        })
    }

    /// Whether the boot-profile replay will fetch `chunk` (demand reads
    /// waiting on it do not pause the replay).
    fn expected(&self, chunk: u32) -> bool {
        self.expected
            .get((chunk / 64) as usize)
            .is_some_and(|w| w & (1 << (chunk % 64)) != 0)
    }

    fn push(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.heap.push(Reverse((at, self.seq, ev)));
    }

    fn start(&mut self) {
        let cfg = self.cfg;
        let spread = ns(cfg.start_spread);
        let place = |e: &mut Self, count: u32, image: u32, at: u64| {
            for i in 0..count {
                let host = i % cfg.hosts;
                let jitter = if spread > 0 {
                    e.rng.below(spread + 1)
                } else {
                    0
                };
                let vm = u32::try_from(e.vms.len()).unwrap_or(u32::MAX);
                e.vms.push(Vm {
                    host,
                    image,
                    start: at + jitter,
                    gen_: 0,
                    next: 0,
                    pending: 0,
                    unexpected: false,
                    issued: 0,
                    boot: None,
                    lost: false,
                    max_wait: 0,
                    bytes_read: 0,
                    depth: 0,
                });
                e.hosts[host as usize].vms.push(vm);
                e.push(at + jitter, Ev::VmStart { vm, gen_: 0 });
            }
        };
        if cfg.prejoin && cfg.mode != Mode::Direct {
            for host in (0..cfg.hosts).rev() {
                for image in 0..u32::try_from(self.images.len()).unwrap_or(0) {
                    self.join(host, image);
                }
            }
        }
        let epoch = ns(cfg.epoch());
        if let Some(l) = cfg.join_lead
            && cfg.mode != Mode::Direct
        {
            // Host h joins (first - last) * h / (hosts - 1) after host 0.
            let span = ns(l.first).saturating_sub(ns(l.last));
            let n = u64::from(cfg.hosts.saturating_sub(1)).max(1);
            for host in 0..cfg.hosts {
                let at = u64::try_from(u128::from(span) * u128::from(host) / u128::from(n))
                    .unwrap_or(u64::MAX);
                self.push(at, Ev::Join { host });
            }
        }
        place(self, cfg.vms, 0, epoch);
        if let Some(s) = cfg.second_image {
            place(self, s.vms, 1, epoch + ns(s.at));
        }
        self.unfinished = self.vms.len() as u64;
        if cfg.mode == Mode::Virtman {
            for image in 0..u32::try_from(self.images.len()).unwrap_or(0) {
                self.push(ns(cfg.tick_interval), Ev::Tick { image });
            }
        }
        for (i, w) in cfg.failures.iter().enumerate() {
            let index = u32::try_from(i).unwrap_or(u32::MAX);
            self.push(epoch + ns(w.at), Ev::Wave { index });
        }
        if let Some(t) = cfg.origin_fail_at {
            self.push(epoch + ns(t), Ev::OriginFail);
        }
    }

    fn run_loop(&mut self) {
        let end = ns(self.cfg.max_time);
        while self.unfinished > 0 {
            let Some(Reverse((t, _, ev))) = self.heap.pop() else {
                break;
            };
            if t > end {
                self.raw.timed_out = true;
                self.now = end;
                break;
            }
            self.now = t;
            self.raw.events += 1;
            self.handle(ev);
            self.flush_net();
        }
        if self.unfinished > 0 && !self.raw.timed_out {
            self.raw.timed_out = true;
        }
    }

    fn flush_net(&mut self) {
        for (t, pair, version) in std::mem::take(&mut self.out) {
            self.push(t, Ev::PairDone { pair, version });
        }
        for (t, pool, version) in std::mem::take(&mut self.cpu_out) {
            self.push(t, Ev::CpuWake { pool, version });
        }
        if let Some(at) = self.net.wants_recompute(self.now) {
            self.push(at, Ev::Recompute);
        }
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::VmStart { vm, gen_ } => self.vm_start(vm, gen_),
            Ev::VmRead { vm, gen_ } => self.issue_read(vm, gen_),
            Ev::Arrive { req, gen_ } => self.arrive(req, gen_),
            Ev::Timeout { req, gen_ } => self.timeout(req, gen_),
            Ev::LateReport {
                host,
                parent,
                image,
            } => self.report_unreachable(host, parent, image),
            Ev::Deliver { req, gen_ } => self.deliver(req, gen_),
            Ev::PairDone { pair, version } => {
                if let Some((t, _, _)) = self.net.complete(pair, version, self.now, &mut self.out) {
                    // A fetched chunk is verified and stored before it is present.
                    let service = match self.reqs.get(t.req, t.req_gen) {
                        Some(Req {
                            owner: Owner::Fetch { .. },
                            ..
                        }) => self.service,
                        _ => 0,
                    };
                    let at = self.now + self.lat + service;
                    self.push(
                        at,
                        Ev::Deliver {
                            req: t.req,
                            gen_: t.req_gen,
                        },
                    );
                }
            }
            Ev::CpuWake { pool, version } => {
                let mut done = Vec::new();
                if let Some(w) = self.cpu.wake(pool, version, self.now, &mut done) {
                    self.cpu_out.push(w);
                }
                for h in done {
                    match self.cpu_jobs.take(h) {
                        Some(CpuJob::Serve { req, gen_ }) => self.serve_now(req, gen_),
                        Some(CpuJob::Deliver { req, gen_ }) => self.deliver(req, gen_),
                        Some(CpuJob::Read { vm, gen_ })
                            if self.vms.get(vm as usize).is_some_and(|v| v.gen_ == gen_) =>
                        {
                            self.read_done(vm);
                        }
                        Some(CpuJob::Read { .. }) | None => {}
                    }
                }
            }
            Ev::Heartbeat { host, image, gen_ } => self.heartbeat(host, image, gen_),
            Ev::Tick { image } => {
                if let Some(s) = self.images[image as usize].session.as_mut() {
                    let _ = s.tick(Duration::from_nanos(self.now));
                }
                let at = self.now + ns(self.cfg.tick_interval);
                self.push(at, Ev::Tick { image });
            }
            Ev::Recompute => self.net.recompute(self.now, &mut self.out),
            Ev::Retry { fetch, gen_ } => {
                let Some(f) = self.fetches.get(fetch, gen_) else {
                    return;
                };
                let (host, image, chunk) = (f.host, f.image, f.chunk);
                let cands = self.candidates(host, image, chunk);
                if let Some(f) = self.fetches.get_mut(fetch, gen_) {
                    f.cands = cands;
                    f.next = 0;
                }
                self.send_attempt(fetch, gen_);
            }
            Ev::PrefetchStart { host, image, gen_ } => {
                let h = &mut self.hosts[host as usize];
                let r = &mut h.vols[image as usize].replay;
                if r.gen_ == gen_ && h.alive {
                    r.active = true;
                    self.replay_step(host, image);
                }
            }
            Ev::PrefetchPoll { host, image, gen_ } => {
                if self.hosts[host as usize].vols[image as usize].replay.gen_ == gen_ {
                    self.replay_step(host, image);
                }
            }
            Ev::Join { host } => {
                if self.hosts[host as usize].alive && !self.hosts[host as usize].vols[0].joined {
                    self.join(host, 0);
                }
            }
            Ev::Wave { index } => self.wave(index),
            Ev::Recover { host } => self.recover(host),
            Ev::OriginFail => {
                self.origin_alive = false;
                for i in 0..self.images.len() {
                    let origin = self.images[i].origin;
                    self.abort_node(origin);
                }
            }
        }
    }

    // ----- the CPU -----

    /// The CPU pool of a net node (a host or an origin).
    fn pool_of(&self, node: u32) -> u32 {
        if self.shared_cpu { 0 } else { node }
    }

    /// Runs `job` on `node`'s CPU for `seconds`; false if there is nothing
    /// to run (zero cost), and the caller goes on at once.
    fn on_cpu(&mut self, node: u32, seconds: f64, job: CpuJob) -> bool {
        if !self.cpu_on || seconds <= 0.0 {
            return false;
        }
        let work = seconds * 1e9;
        self.raw.cpu_jobs += 1;
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        {
            self.raw.cpu_us += (seconds * 1e6).round() as u64;
        }
        let (h, _) = self.cpu_jobs.insert(job);
        let pool = self.pool_of(node);
        if let Some(w) = self.cpu.submit(pool, work, h, self.now) {
            self.cpu_out.push(w);
        }
        true
    }

    // ----- the end -----

    fn finish(self) -> Report {
        crate::report::build(
            self.cfg,
            self.now,
            &self.vms,
            &self.images,
            &self.net,
            self.origin_nodes(),
            self.raw,
        )
    }

    fn origin_nodes(&self) -> Vec<u32> {
        self.images.iter().map(|i| i.origin).collect()
    }
}

/// `fraction` of `n`, rounded, at least 1 when the fraction is above zero.
fn count_of(fraction: f64, n: u32) -> u32 {
    if fraction <= 0.0 {
        return 0;
    }
    let c = (fraction * f64::from(n)).round();
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let c = c.clamp(1.0, f64::from(n)) as u32;
    c
}
