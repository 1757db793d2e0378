//! VMs replay the boot trace: each read waits for the chunks it needs, then
//! the VM thinks, until its last read (the VM booted).
//!
//! ```text
//!   VmStart ─► (first VM of a host: Session::join) ─► VmRead
//!   VmRead ──► chunks present? ── all ──► read done ─► think ─► VmRead … boot done
//!                 │ absent: join the chunk's fetch (single flight) or start one
//!   read's chunks all present ─► the host's CPU serves it to the VM ─► done
//! ```
//!
//! In direct mode a read is a request to the origin itself, on the VM's own
//! connection.

use super::state::{Owner, Waiter};
use super::{CpuJob, Engine, Ev, node_id};
use crate::config::Mode;

impl Engine<'_> {
    pub(super) fn vm_start(&mut self, vm: u32, gen_: u32) {
        let Some(v) = self.vms.get(vm as usize) else {
            return;
        };
        if v.gen_ != gen_ || !self.hosts[v.host as usize].alive {
            return;
        }
        let (host, image) = (v.host, v.image);
        if self.cfg.mode != Mode::Direct && !self.hosts[host as usize].vols[image as usize].joined {
            self.join(host, image);
        }
        let first = self.trace.reads.first().map_or(0, |r| r.at_us);
        if let Some(v) = self.vms.get_mut(vm as usize) {
            v.next = 0;
        }
        let at = self.now + self.think(first * 1000);
        self.push(at, Ev::VmRead { vm, gen_ });
    }

    pub(super) fn issue_read(&mut self, vm: u32, gen_: u32) {
        let Some(v) = self.vms.get_mut(vm as usize) else {
            return;
        };
        if v.gen_ != gen_ {
            return;
        }
        let Some(read) = self.trace.reads.get(v.next as usize).copied() else {
            return;
        };
        v.issued = self.now;
        let (host, image) = (v.host, v.image);
        if self.cfg.mode == Mode::Direct {
            v.pending = 1;
            let origin = self.images[image as usize].origin;
            let tag = 2 + vm;
            self.send_req(
                Owner::Vm { vm, gen_ },
                origin,
                host,
                image,
                0,
                read.length,
                tag,
            );
            return;
        }
        let first = u32::try_from(read.offset / self.chunk).unwrap_or(u32::MAX);
        let last = u32::try_from((read.offset + read.length - 1) / self.chunk).unwrap_or(u32::MAX);
        let mut pending = 0;
        let mut unexpected = false;
        for c in first..=last {
            let expected = self.expected(c);
            let vol = &mut self.hosts[host as usize].vols[image as usize];
            if vol.has(c) {
                continue;
            }
            pending += 1;
            unexpected |= !expected;
            let w = Waiter::Vm { vm, gen_ };
            if let Some(&(fid, fgen)) = vol.inflight.get(&c)
                && let Some(f) = self.fetches.get_mut(fid, fgen)
            {
                f.waiters.push(w);
                continue;
            }
            self.start_fetch(host, image, c, w);
        }
        if let Some(v) = self.vms.get_mut(vm as usize) {
            v.pending = pending;
            v.unexpected = unexpected;
        }
        if pending == 0 {
            self.read_ready(vm);
        } else if unexpected {
            self.hosts[host as usize].vols[image as usize].demand += 1;
        }
    }

    /// A think time (ns) as the replayer waits it: with the timer's
    /// overshoot when it waits at all.
    pub(super) fn think(&self, gap: u64) -> u64 {
        if gap > 0 {
            gap + self.think_overhead
        } else {
            0
        }
    }

    /// Every chunk of a VM's read is present: the host serves it to the VM
    /// (CPU), then the read is done.
    pub(super) fn read_ready(&mut self, vm: u32) {
        let Some(v) = self.vms.get(vm as usize) else {
            return;
        };
        let Some(read) = self.trace.reads.get(v.next as usize) else {
            return;
        };
        let cost =
            self.costs.vm_serve.seconds(read.length) + self.costs.vm_client.seconds(read.length);
        let (host, gen_) = (v.host, v.gen_);
        if !self.on_cpu(host, cost, CpuJob::Read { vm, gen_ }) {
            self.read_done(vm);
        }
    }

    pub(super) fn read_done(&mut self, vm: u32) {
        let now = self.now;
        let Some(v) = self.vms.get_mut(vm as usize) else {
            return;
        };
        let idx = v.next as usize;
        let Some(read) = self.trace.reads.get(idx) else {
            return;
        };
        v.max_wait = v.max_wait.max(now - v.issued);
        v.bytes_read += read.length;
        v.next += 1;
        let gen_ = v.gen_;
        match self.trace.reads.get(idx + 1) {
            Some(next) => {
                let think = self.think(next.at_us.saturating_sub(read.at_us) * 1000);
                self.push(now + think, Ev::VmRead { vm, gen_ });
            }
            None => {
                let (host, image) = (v.host, v.image);
                v.boot = Some(now);
                self.unfinished -= 1;
                let depth = match &self.images[image as usize].session {
                    // Its depth in the stripe it relays.
                    Some(s) => s
                        .home(node_id(host))
                        .and_then(|h| s.stripe(h)?.node(node_id(host)))
                        .map_or(0, |n| n.depth),
                    None => 1,
                };
                if let Some(v) = self.vms.get_mut(vm as usize) {
                    v.depth = depth;
                }
            }
        }
    }
}
