//! The control path: a host joins the image's tree (the real
//! `Session`), heartbeats with its progress, and takes the parents the
//! session gives it.
//!
//! ```text
//!   join (a host's first VM, a join lead, or prejoin) ─► Session::join
//!          ─► parents; Heartbeat scheduled; PrefetchStart one round trip later
//!   Heartbeat (each host: 100, 200, 400 ms after the join, then every
//!              1 s) ─► Session::heartbeat ─► new parents
//!          (declared dead meanwhile: the agent joins again)
//! ```
//!
//! The coordinator's `Tick` (`Session::tick`, every 250 ms: deaths,
//! repairs) is dispatched by the event loop (`mod.rs`).

use std::time::Duration;

use virtman_topology::{Progress, TopologyError};

use super::state::Replay;
use super::{Engine, Ev, node_id, ns};

impl Engine<'_> {
    pub(super) fn join(&mut self, host: u32, image: u32) {
        let now = Duration::from_nanos(self.now);
        if let Some(s) = self.images[image as usize].session.as_mut() {
            match s.join(node_id(host), None, now) {
                Ok(_) | Err(TopologyError::AlreadyMember(_)) => {}
                Err(_) => return,
            }
        }
        let vol = &mut self.hosts[host as usize].vols[image as usize];
        vol.joined = true;
        vol.hb_gen = vol.hb_gen.wrapping_add(1);
        vol.hb_sent = 0;
        let gen_ = vol.hb_gen;
        self.refresh_parents(host, image);
        if self.images[image as usize].session.is_some() {
            let at = self.now + self.next_heartbeat(0);
            self.push(at, Ev::Heartbeat { host, image, gen_ });
        }
        if !self.profile.is_empty() {
            // `ensure_image` starts the replay; the profile is read from a
            // source first (one request and its reply).
            let r = &mut self.hosts[host as usize].vols[image as usize].replay;
            let gen_ = r.gen_.wrapping_add(1);
            *r = Replay {
                gen_,
                ..Replay::default()
            };
            let at = self.now + 2 * self.lat;
            self.push(at, Ev::PrefetchStart { host, image, gen_ });
        }
    }

    fn refresh_parents(&mut self, host: u32, image: u32) {
        let list = self.images[image as usize]
            .session
            .as_ref()
            .and_then(|s| s.parents(node_id(host)))
            .unwrap_or_default();
        let parents: Vec<Vec<u32>> = list
            .into_iter()
            .map(|stripe| {
                stripe
                    .into_iter()
                    .filter(|p| p.0 != 0)
                    .filter_map(|p| u32::try_from(p.0 - 1).ok())
                    .collect()
            })
            .collect();
        self.hosts[host as usize].vols[image as usize].parents = parents;
    }

    pub(super) fn heartbeat(&mut self, host: u32, image: u32, gen_: u32) {
        let h = &self.hosts[host as usize];
        let vol = &h.vols[image as usize];
        if !h.alive || vol.hb_gen != gen_ {
            return;
        }
        let chunks = self.images[image as usize].chunks;
        let progress = Progress {
            fraction: f64::from(vol.count) / f64::from(chunks.max(1)),
            complete: vol.count >= chunks,
        };
        let now = Duration::from_nanos(self.now);
        if let Some(s) = self.images[image as usize].session.as_mut() {
            self.raw.heartbeats += 1;
            if s.heartbeat(node_id(host), now, progress).is_err() {
                // Declared dead (or unknown): the agent joins again.
                let _ = s.join(node_id(host), None, now);
            }
        }
        self.refresh_parents(host, image);
        let vol = &mut self.hosts[host as usize].vols[image as usize];
        vol.hb_sent = vol.hb_sent.saturating_add(1);
        let sent = vol.hb_sent;
        let at = self.now + self.next_heartbeat(sent);
        self.push(at, Ev::Heartbeat { host, image, gen_ });
    }

    /// The delay before the next heartbeat when `sent` were sent since the
    /// join: the settling ones first, then the interval.
    fn next_heartbeat(&self, sent: u32) -> u64 {
        let interval = self.cfg.heartbeat_interval;
        ns(self
            .cfg
            .settle_heartbeats
            .get(sent as usize)
            .map_or(interval, |&d| d.min(interval)))
    }
}
