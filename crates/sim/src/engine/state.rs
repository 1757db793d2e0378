//! What the engine keeps per host and per request: a host's cached volumes
//! (present chunks, fetches in flight, parents and their load, sources
//! cooling down, the boot-profile replay), the requests on the way and the
//! fetches with their waiters (VM reads, children's requests, prefetch
//! tasks).

use std::collections::HashMap;

#[derive(Debug, Clone, Copy)]
pub(super) enum Waiter {
    Vm {
        vm: u32,
        gen_: u32,
    },
    Req {
        req: u32,
        gen_: u32,
    },
    /// A prefetch task of the fetch's host (its replay's generation and lane).
    Prefetch {
        gen_: u32,
        lane: u32,
    },
}

#[derive(Debug, Clone, Copy)]
pub(super) enum Owner {
    Fetch { id: u32, gen_: u32 },
    Vm { vm: u32, gen_: u32 },
}

#[derive(Debug)]
pub(super) struct Req {
    pub(super) owner: Owner,
    /// Net node asked.
    pub(super) src: u32,
    /// Requesting host.
    pub(super) dst: u32,
    pub(super) image: u32,
    pub(super) chunk: u32,
    pub(super) bytes: u64,
    pub(super) sent: u64,
    /// Pair tag (image, or a VM's own connection in direct mode).
    pub(super) tag: u32,
    pub(super) timeout_set: bool,
    /// The receiver's CPU work on the reply is done.
    pub(super) taken_in: bool,
}

#[derive(Debug)]
pub(super) struct Fetch {
    pub(super) host: u32,
    pub(super) image: u32,
    pub(super) chunk: u32,
    pub(super) waiters: Vec<Waiter>,
    pub(super) cands: Vec<u32>,
    pub(super) next: usize,
}

/// A host's replay of the boot profile (`prefetch::fetch_in_order`), one
/// lane per stripe, each in order with its own chunks in flight.
#[derive(Debug, Default)]
pub(super) struct Replay {
    /// The loop runs (started and some lane not past its profile's end).
    pub(super) active: bool,
    /// Bumped at every (re)start and death: stale events and tasks are ignored.
    pub(super) gen_: u32,
    /// One per stripe (made at the first step).
    pub(super) lanes: Vec<Lane>,
}

/// One stripe's part of the replay.
#[derive(Debug, Default, Clone)]
pub(super) struct Lane {
    /// Next position in the stripe's profile.
    pub(super) pos: usize,
    /// The chunk taken from the profile (missing when taken), not yet spawned.
    pub(super) next: Option<u32>,
    /// Prefetch tasks in flight (the `JoinSet`).
    pub(super) tasks: u32,
    /// The loop waits for a task to finish (`join_next`).
    pub(super) joining: bool,
    /// Past the end of the stripe's profile.
    pub(super) done: bool,
}

#[derive(Debug, Default)]
pub(super) struct Volume {
    pub(super) joined: bool,
    /// Reads waiting on fetches of chunks outside the boot profile now: the
    /// host's VMs' reads and its children's requests
    /// (`CachedVolume::demand_unexpected`).
    pub(super) demand: u32,
    pub(super) replay: Replay,
    pub(super) present: Vec<u64>,
    pub(super) count: u32,
    pub(super) inflight: HashMap<u32, (u32, u32)>,
    /// Parents as net nodes, one list per stripe, origins excluded (they
    /// are always tried last).
    pub(super) parents: Vec<Vec<u32>>,
    pub(super) outstanding: Vec<(u32, u32)>,
    pub(super) cooling: Vec<(u32, u64)>,
    pub(super) hb_gen: u32,
    /// Heartbeats sent since the join (the first ones come sooner).
    pub(super) hb_sent: u32,
}

impl Volume {
    pub(super) fn has(&self, chunk: u32) -> bool {
        self.present
            .get((chunk / 64) as usize)
            .is_some_and(|w| w & (1 << (chunk % 64)) != 0)
    }
    pub(super) fn set(&mut self, chunk: u32) {
        if let Some(w) = self.present.get_mut((chunk / 64) as usize) {
            let bit = 1 << (chunk % 64);
            if *w & bit == 0 {
                *w |= bit;
                self.count += 1;
            }
        }
    }
    pub(super) fn bump(&mut self, node: u32, up: bool) {
        match self.outstanding.iter_mut().find(|(n, _)| *n == node) {
            Some((_, c)) => {
                *c = if up { *c + 1 } else { c.saturating_sub(1) };
            }
            None if up => self.outstanding.push((node, 1)),
            None => {}
        }
    }
    pub(super) fn load(&self, node: u32) -> u32 {
        self.outstanding
            .iter()
            .find(|(n, _)| *n == node)
            .map_or(0, |(_, c)| *c)
    }
}

#[derive(Debug)]
pub(super) struct Host {
    pub(super) alive: bool,
    pub(super) vols: Vec<Volume>,
    pub(super) vms: Vec<u32>,
    pub(super) recovering: bool,
}
