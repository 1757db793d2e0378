//! Boot-profile prefetch (virtman mode): each host replays the profile,
//! the chunks the boot touches in first-touch order, behind its demand reads
//! (the agent's `prefetch::fetch_in_order`).
//!
//! ```text
//!   PrefetchStart (a host joined, one round trip later: the profile read)
//!          ─► the profile's chunks in order, missing ones only: ≤ in_flight
//!             at once, none started while a demand read on the host waits
//!             (PrefetchPoll: look again after the poll), single flight
//! ```
//!
//! `PrefetchStart` and `PrefetchPoll` are dispatched by the event loop
//! (`mod.rs`); a join (`control.rs`) schedules the start.

use super::state::{Lane, Volume, Waiter};
use super::{Engine, Ev, ns};
use crate::Trace;

impl Engine<'_> {
    /// A read that waited on a fetch of this host has all its chunks.
    pub(super) fn undemand(&mut self, host: u32, image: u32) {
        let vol = &mut self.hosts[host as usize].vols[image as usize];
        vol.demand = vol.demand.saturating_sub(1);
    }

    /// One turn of `fetch_in_order`'s loop in every lane (one per stripe):
    /// take the lane's next missing chunk; wait while its set is full (for
    /// a task) or a demand read waits (a poll later); else spawn its
    /// prefetch, and go on.
    pub(super) fn replay_step(&mut self, host: u32, image: u32) {
        for lane in 0..self.profile.len() {
            if !self.lane_step(host, image, lane) {
                return;
            }
        }
    }

    /// Steps one lane; false when the whole replay must wait (a demand read
    /// waits, or it stopped).
    fn lane_step(&mut self, host: u32, image: u32, lane: usize) -> bool {
        let lanes = self.profile.len();
        // `prefetch::lane_in_flight`: the host's share, at least one a lane.
        let in_flight =
            (self.cfg.prefetch.in_flight / u32::try_from(lanes).unwrap_or(1).max(1)).max(1);
        loop {
            let Volume {
                replay: r,
                present,
                inflight,
                demand,
                ..
            } = &mut self.hosts[host as usize].vols[image as usize];
            let has = |c: u32| {
                present
                    .get((c / 64) as usize)
                    .is_some_and(|w| w & (1 << (c % 64)) != 0)
            };
            if !r.active {
                return false;
            }
            if r.lanes.len() < lanes {
                r.lanes.resize(lanes, Lane::default());
            }
            let gen_ = r.gen_;
            let ln = &mut r.lanes[lane];
            if ln.done {
                return true;
            }
            let chunk = match ln.next {
                Some(c) => c,
                None => {
                    let mut found = None;
                    while let Some(&c) = self.profile[lane].get(ln.pos) {
                        ln.pos += 1;
                        if !has(c) {
                            found = Some(c);
                            break;
                        }
                    }
                    let Some(c) = found else {
                        // Past the end: the tasks in flight just finish.
                        ln.done = true;
                        r.active = r.lanes.iter().any(|l| !l.done);
                        return true;
                    };
                    ln.next = Some(c);
                    c
                }
            };
            if ln.tasks >= in_flight {
                ln.joining = true;
                return true;
            }
            if *demand > 0 {
                let at = self.now + self.think(ns(self.cfg.prefetch.poll));
                self.push(at, Ev::PrefetchPoll { host, image, gen_ });
                return false;
            }
            ln.next = None;
            // Present by now, or already being fetched (for a demand read or
            // a child): skipped, the lane moves ahead of the readers.
            if has(chunk) || inflight.contains_key(&chunk) {
                continue;
            }
            ln.tasks += 1;
            let w = Waiter::Prefetch {
                gen_,
                lane: u32::try_from(lane).unwrap_or(u32::MAX),
            };
            self.raw.prefetch_fetches += 1;
            self.start_fetch(host, image, chunk, w);
        }
    }

    /// A prefetch task of `lane` finished (its chunk arrived or was given up).
    pub(super) fn task_done(&mut self, host: u32, image: u32, gen_: u32, lane: u32) {
        let r = &mut self.hosts[host as usize].vols[image as usize].replay;
        if r.gen_ != gen_ {
            return;
        }
        let Some(ln) = r.lanes.get_mut(lane as usize) else {
            return;
        };
        ln.tasks = ln.tasks.saturating_sub(1);
        if ln.joining {
            ln.joining = false;
            self.replay_step(host, image);
        }
    }
}

/// The profile's chunks split by stripe (chunk i in stripe i mod S), each
/// in the profile's order.
pub(super) fn by_stripe(profile: &[u32], stripes: u32) -> Vec<Vec<u32>> {
    let mut out = vec![Vec::new(); stripes.max(1) as usize];
    for &c in profile {
        out[virtman_topology::stripe_of(u64::from(c), stripes) as usize].push(c);
    }
    out
}

/// The chunks `trace` touches, in first-touch order, those of an image of
/// `chunks` chunks only (`BootProfile::from_reads`).
pub(super) fn first_touch(trace: &Trace, chunk: u64, chunks: u32) -> Vec<u32> {
    let mut seen = vec![false; chunks as usize];
    let mut out = Vec::new();
    for r in &trace.reads {
        if r.length == 0 {
            continue;
        }
        for c in r.offset / chunk..=(r.offset + r.length - 1) / chunk {
            if let Ok(c) = u32::try_from(c)
                && let Some(s) = seen.get_mut(c as usize)
                && !*s
            {
                *s = true;
                out.push(c);
            }
        }
    }
    out
}
