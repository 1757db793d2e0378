//! Failures: hosts die silently in waves (and may come back), and the
//! origins can die.
//!
//! ```text
//!   Wave ─► a fraction of the hosts, chosen with the seed among the live
//!           ones, dies: its VMs are lost (or wait for the recovery), its
//!           fetches die, and the requests waiting on it time out at their
//!           senders
//!   Recover ─► the host is back, its cache kept: its VMs start over
//!   OriginFail (dispatched in `mod.rs`) ─► the origins die: their
//!           transfers are cut, requests to them time out
//! ```

use super::state::{Replay, Waiter};
use super::{Engine, Ev, count_of, ns};

impl Engine<'_> {
    pub(super) fn wave(&mut self, index: u32) {
        let Some(w) = self.cfg.failures.get(index as usize).copied() else {
            return;
        };
        let mut alive: Vec<u32> = (0..self.cfg.hosts)
            .filter(|&h| self.hosts[h as usize].alive)
            .collect();
        let n = count_of(w.fraction, self.cfg.hosts).min(u32::try_from(alive.len()).unwrap_or(0));
        self.rng.shuffle(&mut alive);
        let mut victims: Vec<u32> = alive.into_iter().take(n as usize).collect();
        victims.sort_unstable();
        for &h in &victims {
            self.kill(h, w.recover_after.is_some());
        }
        if let Some(after) = w.recover_after {
            let at = self.now + ns(after);
            for &host in &victims {
                self.push(at, Ev::Recover { host });
            }
        }
        self.raw.killed += u64::from(n);
    }

    fn kill(&mut self, host: u32, will_recover: bool) {
        let h = &mut self.hosts[host as usize];
        if !h.alive {
            return;
        }
        h.alive = false;
        h.recovering = will_recover;
        let vms = h.vms.clone();
        for vm in vms {
            let v = &mut self.vms[vm as usize];
            v.gen_ = v.gen_.wrapping_add(1);
            if v.boot.is_none() && !v.lost && !will_recover {
                v.lost = true;
                self.unfinished -= 1;
            }
        }
        // Its fetches die; the children waiting on them time out.
        for image in 0..self.images.len() {
            let vol = &mut self.hosts[host as usize].vols[image];
            let mut inflight: Vec<(u32, (u32, u32))> = vol.inflight.drain().collect();
            inflight.sort_unstable();
            vol.joined = false;
            vol.outstanding.clear();
            vol.cooling.clear();
            vol.hb_gen = vol.hb_gen.wrapping_add(1);
            vol.demand = 0;
            vol.replay = Replay {
                gen_: vol.replay.gen_.wrapping_add(1),
                ..Replay::default()
            };
            for (_, (fid, fgen)) in inflight {
                if let Some(f) = self.fetches.remove(fid, fgen) {
                    for w in f.waiters {
                        if let Waiter::Req { req, gen_ } = w {
                            self.doom(req, gen_);
                        }
                    }
                }
            }
        }
        self.abort_node(host);
    }

    pub(super) fn abort_node(&mut self, node: u32) {
        for (t, src, _) in self.net.abort_node(node, self.now) {
            if src == node {
                self.doom(t.req, t.req_gen);
            } else {
                self.reqs.remove(t.req, t.req_gen);
            }
        }
    }

    pub(super) fn recover(&mut self, host: u32) {
        let h = &mut self.hosts[host as usize];
        if h.alive {
            return;
        }
        h.alive = true;
        h.recovering = false;
        let vms = h.vms.clone();
        for vm in vms {
            let v = &mut self.vms[vm as usize];
            if v.boot.is_none() && !v.lost {
                // Its VMs start over (the cache kept its chunks).
                v.gen_ = v.gen_.wrapping_add(1);
                v.bytes_read = 0;
                let gen_ = v.gen_;
                let at = self.now.max(v.start);
                self.push(at, Ev::VmStart { vm, gen_ });
            }
        }
        self.raw.recovered += 1;
    }
}
