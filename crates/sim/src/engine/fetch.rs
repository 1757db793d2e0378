//! Fetches and requests: a chunk a host lacks is fetched once (single
//! flight), from its parents in the coordinator's order (a busy one after
//! the others), the origin last, with failover on timeout; a source that lacks it fetches it in turn.
//!
//! ```text
//!   fetch ──► candidates: parents in order, busy ones by load, cooling ones, origin last
//!          ──► Arrive at the source (one hop later)
//!   Arrive ─► source has it: queue a transfer on the pair source→requester
//!          ─► source fetching it: wait on that fetch (cut-through: the
//!             child's miss became the parent's miss)
//!          ─► source absent: start the source's own fetch, wait on it
//!          ─► source dead: Timeout at sent + request timeout
//!   serve: the source's CPU prepares the reply (cpu.rs) ─► queued on its pair
//!   PairDone (net.rs) ─► Deliver one hop later ─► the receiver's CPU takes
//!             it in (receive, verify, store) ─► chunk present, waiters served
//!   Timeout ─► cool the source, report it (Session::report_unreachable),
//!              next candidate
//!   every candidate failed ─► prefetches give up, reads Retry after the cool-down
//! ```
//!
//! `PairDone` and `Retry` are dispatched by the event loop (`mod.rs`).

use std::time::Duration;

use super::state::{Fetch, Owner, Req, Waiter};
use super::{CpuJob, Engine, Ev, node_id, ns};
use crate::config::Mode;
use crate::net::Transfer;

/// The agent's sort key for a parent with `load` requests outstanding
/// (`upstream::busy_key`): 0 while not busy, else the load.
fn busy_key(load: u32, busy_at: u32) -> u32 {
    if load < busy_at { 0 } else { load }
}

impl Engine<'_> {
    fn chunk_bytes(&self, chunk: u32) -> u64 {
        let start = u64::from(chunk) * self.chunk;
        (start + self.chunk).min(self.trace.image_size) - start
    }

    pub(super) fn start_fetch(&mut self, host: u32, image: u32, chunk: u32, w: Waiter) {
        let cands = self.candidates(host, image, chunk);
        let (id, gen_) = self.fetches.insert(Fetch {
            host,
            image,
            chunk,
            waiters: vec![w],
            cands,
            next: 0,
        });
        self.hosts[host as usize].vols[image as usize]
            .inflight
            .insert(chunk, (id, gen_));
        self.raw.fetches += 1;
        self.send_attempt(id, gen_);
    }

    /// The agent's order: healthy parents of the chunk's stripe in the
    /// coordinator's order, those busy (`parent_busy_at` requests
    /// outstanding) after the others by load, parents cooling down, then
    /// the origin.
    pub(super) fn candidates(&self, host: u32, image: u32, chunk: u32) -> Vec<u32> {
        let vol = &self.hosts[host as usize].vols[image as usize];
        let stripe = virtman_topology::stripe_of(u64::from(chunk), self.cfg.stripes) as usize;
        let parents = vol.parents.get(stripe).map_or(&[][..], Vec::as_slice);
        let mut healthy: Vec<(u32, usize, u32)> = Vec::new();
        let mut cooling = Vec::new();
        for (i, &p) in parents.iter().enumerate() {
            let cool = vol
                .cooling
                .iter()
                .any(|&(n, until)| n == p && until > self.now);
            if cool {
                cooling.push(p);
            } else {
                healthy.push((busy_key(vol.load(p), self.cfg.parent_busy_at), i, p));
            }
        }
        healthy.sort_unstable();
        let mut c: Vec<u32> = healthy.into_iter().map(|(_, _, p)| p).collect();
        c.extend(cooling);
        c.push(self.images[image as usize].origin);
        c
    }

    pub(super) fn send_attempt(&mut self, fid: u32, fgen: u32) {
        let Some(f) = self.fetches.get_mut(fid, fgen) else {
            return;
        };
        let Some(&src) = f.cands.get(f.next) else {
            // Every source failed: a prefetch gives its chunk up (the
            // replay goes on); the guest retries the read after a cool-down.
            let (host, image, chunk) = (f.host, f.image, f.chunk);
            let mut given_up = Vec::new();
            f.waiters.retain(|w| match *w {
                Waiter::Prefetch { gen_, lane } => {
                    given_up.push((gen_, lane));
                    false
                }
                _ => true,
            });
            if f.waiters.is_empty() {
                self.fetches.remove(fid, fgen);
                self.hosts[host as usize].vols[image as usize]
                    .inflight
                    .remove(&chunk);
            }
            for (g, lane) in given_up {
                self.task_done(host, image, g, lane);
            }
            if self.fetches.get(fid, fgen).is_none() {
                return;
            }
            let at = self.now + ns(self.cfg.cool_down);
            self.push(
                at,
                Ev::Retry {
                    fetch: fid,
                    gen_: fgen,
                },
            );
            return;
        };
        f.next += 1;
        let (host, image, chunk) = (f.host, f.image, f.chunk);
        self.hosts[host as usize].vols[image as usize].bump(src, true);
        let bytes = self.chunk_bytes(chunk);
        self.send_req(
            Owner::Fetch {
                id: fid,
                gen_: fgen,
            },
            src,
            host,
            image,
            chunk,
            bytes,
            image,
        );
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn send_req(
        &mut self,
        owner: Owner,
        src: u32,
        dst: u32,
        image: u32,
        chunk: u32,
        bytes: u64,
        tag: u32,
    ) {
        let (req, gen_) = self.reqs.insert(Req {
            owner,
            src,
            dst,
            image,
            chunk,
            bytes,
            sent: self.now,
            tag,
            timeout_set: false,
            taken_in: false,
        });
        self.raw.requests += 1;
        let at = self.now + self.lat;
        self.push(at, Ev::Arrive { req, gen_ });
    }

    fn is_origin(&self, node: u32) -> bool {
        node >= self.cfg.hosts
    }

    fn alive(&self, node: u32) -> bool {
        if self.is_origin(node) {
            self.origin_alive
        } else {
            self.hosts[node as usize].alive
        }
    }

    pub(super) fn arrive(&mut self, req: u32, gen_: u32) {
        let Some(r) = self.reqs.get(req, gen_) else {
            return;
        };
        let (src, image, chunk) = (r.src, r.image, r.chunk);
        if !self.alive(src) {
            self.doom(req, gen_);
            return;
        }
        if self.is_origin(src) {
            self.serve(req, gen_);
            return;
        }
        let vol = &mut self.hosts[src as usize].vols[image as usize];
        if vol.has(chunk) {
            self.serve(req, gen_);
            return;
        }
        let w = Waiter::Req { req, gen_ };
        // A child's read waits on this host's fetch: demand here too
        // (pausing the replay if the replay does not expect the chunk).
        let unexpected = !self.expected(chunk);
        let vol = &mut self.hosts[src as usize].vols[image as usize];
        vol.demand += u32::from(unexpected);
        if let Some(&(fid, fgen)) = vol.inflight.get(&chunk)
            && let Some(f) = self.fetches.get_mut(fid, fgen)
        {
            f.waiters.push(w);
            return;
        }
        self.start_fetch(src, image, chunk, w);
    }

    /// The request will never be answered: its sender moves on after the
    /// hedge delay (or times out without hedging).
    pub(super) fn doom(&mut self, req: u32, gen_: u32) {
        let (hedged, plain) = (ns(self.cfg.give_up_time()), ns(self.cfg.request_timeout));
        let Some(r) = self.reqs.get_mut(req, gen_) else {
            return;
        };
        // A VM's own client (direct mode) does not hedge.
        let timeout = match r.owner {
            Owner::Fetch { .. } => hedged,
            Owner::Vm { .. } => plain,
        };
        if r.timeout_set {
            return;
        }
        r.timeout_set = true;
        let at = (r.sent + timeout).max(self.now);
        self.push(at, Ev::Timeout { req, gen_ });
    }

    /// The source answers a request: its CPU prepares the reply, then it
    /// goes on the wire.
    fn serve(&mut self, req: u32, gen_: u32) {
        let Some(r) = self.reqs.get(req, gen_) else {
            return;
        };
        let cost = if self.cfg.mode == Mode::Direct {
            self.costs.plain_serve
        } else if self.is_origin(r.src) {
            self.costs.origin_serve
        } else {
            self.costs.serve_chunk
        };
        let (src, secs) = (r.src, cost.seconds(r.bytes));
        if !self.on_cpu(src, secs, CpuJob::Serve { req, gen_ }) {
            self.serve_now(req, gen_);
        }
    }

    pub(super) fn serve_now(&mut self, req: u32, gen_: u32) {
        let Some(r) = self.reqs.get(req, gen_) else {
            return;
        };
        if !self.alive(r.src) {
            // It died while preparing the reply.
            self.doom(req, gen_);
            return;
        }
        if !self.hosts[r.dst as usize].alive {
            self.reqs.remove(req, gen_);
            return;
        }
        let pair = self.net.pair(r.src, r.dst, r.tag);
        let t = Transfer {
            req,
            req_gen: gen_,
            bytes: r.bytes,
        };
        self.net.enqueue(pair, t, self.now, &mut self.out);
    }

    pub(super) fn deliver(&mut self, req: u32, gen_: u32) {
        // The receiver's CPU first takes the reply in: a chunk is received,
        // verified and stored; a direct read goes to the VM's client.
        if self.cpu_on
            && let Some(r) = self.reqs.get_mut(req, gen_)
            && !r.taken_in
        {
            r.taken_in = true;
            let (dst, bytes) = (r.dst, r.bytes);
            let secs = match r.owner {
                Owner::Vm { .. } => self.costs.plain_client.seconds(bytes),
                Owner::Fetch { .. } => {
                    #[allow(clippy::cast_precision_loss)]
                    let b = bytes as f64;
                    self.costs.receive_chunk.seconds(bytes) + self.costs.hash_per_byte_s * b
                }
            };
            if self.on_cpu(dst, secs, CpuJob::Deliver { req, gen_ }) {
                return;
            }
        }
        let Some(r) = self.reqs.remove(req, gen_) else {
            return;
        };
        match r.owner {
            Owner::Vm { vm, gen_ } => {
                if self.vms.get(vm as usize).is_some_and(|v| v.gen_ == gen_) {
                    self.read_done(vm);
                }
            }
            Owner::Fetch { id, gen_: fgen } => {
                let Some(f) = self.fetches.remove(id, fgen) else {
                    return;
                };
                let vol = &mut self.hosts[f.host as usize].vols[f.image as usize];
                vol.bump(r.src, false);
                vol.set(f.chunk);
                vol.inflight.remove(&f.chunk);
                for w in f.waiters {
                    match w {
                        Waiter::Vm { vm, gen_ } => {
                            let Some(v) = self.vms.get_mut(vm as usize) else {
                                continue;
                            };
                            if v.gen_ != gen_ {
                                continue;
                            }
                            v.pending = v.pending.saturating_sub(1);
                            if v.pending == 0 {
                                if v.unexpected {
                                    self.undemand(f.host, f.image);
                                }
                                self.read_ready(vm);
                            }
                        }
                        Waiter::Req { req, gen_ } => {
                            if !self.expected(f.chunk) {
                                self.undemand(f.host, f.image);
                            }
                            self.serve(req, gen_);
                        }
                        Waiter::Prefetch { gen_, lane } => {
                            self.task_done(f.host, f.image, gen_, lane);
                        }
                    }
                }
            }
        }
    }

    /// `host` tells the coordinator that `parent` did not answer.
    pub(super) fn report_unreachable(&mut self, host: u32, parent: u32, image: u32) {
        if self.is_origin(parent) || !self.alive(host) {
            return;
        }
        if let Some(s) = self.images[image as usize].session.as_mut() {
            let _ = s.report_unreachable(
                node_id(host),
                node_id(parent),
                Duration::from_nanos(self.now),
            );
        }
    }

    pub(super) fn timeout(&mut self, req: u32, gen_: u32) {
        let Some(r) = self.reqs.remove(req, gen_) else {
            return;
        };
        self.raw.timeouts += 1;
        match r.owner {
            Owner::Vm { vm, gen_ } => {
                // Direct mode: the VM's NBD client reconnects and retries.
                if let Some(v) = self.vms.get(vm as usize)
                    && v.gen_ == gen_
                {
                    self.send_req(r.owner, r.src, r.dst, r.image, r.chunk, r.bytes, r.tag);
                }
            }
            Owner::Fetch { id, gen_: fgen } => {
                if self.fetches.get(id, fgen).is_none() {
                    return;
                }
                let until = self.now + ns(self.cfg.cool_down);
                let vol = &mut self.hosts[r.dst as usize].vols[r.image as usize];
                vol.bump(r.src, false);
                vol.cooling.retain(|&(n, t)| n != r.src && t > self.now);
                vol.cooling.push((r.src, until));
                self.raw.failovers += 1;
                // Hedged around: the agent reports the source only when the
                // request's own timeout ends.
                let report_at = (r.sent + ns(self.cfg.request_timeout)).max(self.now);
                self.push(
                    report_at,
                    Ev::LateReport {
                        host: r.dst,
                        parent: r.src,
                        image: r.image,
                    },
                );
                self.send_attempt(id, fgen);
            }
        }
    }
}
