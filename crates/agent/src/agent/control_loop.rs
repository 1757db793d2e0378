//! The control loop: how the agent follows the coordinator. It registers
//! the origin images, re-joins the volumes a restart left, heartbeats each
//! member session (applying the parent lists that changed; sooner just
//! after a join, while the tree settles), reports bad
//! parents as the upstream finds them, and publishes boot profiles. A
//! coordinator that is down is retried; meanwhile the agent serves with the
//! parents it has.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use virtman_cache::CachedVolume;
use virtman_coordinator::api::{
    Assignment, HeartbeatRequest, RegisterImage, ReportRequest, SessionBeat,
};
use virtman_image::Manifest;
use virtman_nbd::MemExport;

use super::{Agent, AgentError, ImageEntry, Role, lock};
use crate::known;
use crate::prefetch::{ImagePrefetch, profile_export};
use crate::upstream::{BadParent, Source};

/// The first heartbeats after a join, each this long after the one before
/// (never longer than the interval), then every interval. Hosts that join
/// after this one may displace it in the tree (a relay takes a follower's
/// place): with a heartbeat a second apart it would go on fetching from its
/// old parents, or the origin, for that second. The simulator showed a
/// 64 MiB storm on 40 hosts 1.7x faster with these.
pub(crate) const SETTLE_HEARTBEATS: [Duration; 3] = [
    Duration::from_millis(100),
    Duration::from_millis(200),
    Duration::from_millis(400),
];

impl Agent {
    /// Registers the origin images; returns how many (0: the coordinator was
    /// not contacted).
    async fn register_origins(&self) -> Result<usize, AgentError> {
        let origins: Vec<(String, Arc<Manifest>)> = lock(&self.images)
            .iter()
            .filter(|(_, e)| matches!(e.role, Role::Origin { .. }))
            .map(|(n, e)| (n.clone(), Arc::clone(&e.manifest)))
            .collect();
        let n = origins.len();
        for (name, m) in origins {
            let req = RegisterImage {
                name: name.clone(),
                size: m.size(),
                manifest_digest: m.id().to_hex(),
                origins: vec![self.config.advertise.clone()],
                fanout: None,
                parents: None,
                stripes: None,
            };
            self.coord
                .register_image(&req)
                .await
                .map_err(|e| AgentError::Coordinator(e.to_string()))?;
        }
        Ok(n)
    }

    /// Registers origins, re-joins restored volumes, then heartbeats and
    /// applies parent changes and reports until shutdown. A coordinator that
    /// is down is retried; meanwhile the agent serves with what it has.
    pub(super) async fn control_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let mut reports = lock(&self.reports_rx).take();
        let mut registered = false;
        let mut rejoined = false;
        let mut down_logged = false;
        // Retries each second: the first failure in a row is a warning, the
        // rest only debug lines, so a long outage does not flood the log.
        let (mut register_failed, mut rejoin_failed) = (false, false);
        // The next of SETTLE_HEARTBEATS (past the end: settled).
        let mut settle = SETTLE_HEARTBEATS.len();
        loop {
            if !registered {
                match self.register_origins().await {
                    Ok(n) => {
                        registered = true;
                        if n > 0 {
                            self.coordinator_ok.store(true, Ordering::Relaxed);
                        }
                    }
                    Err(e) if register_failed => {
                        debug!(error = %e, "registering origin images failed again")
                    }
                    Err(e) => {
                        warn!(error = %e, "registering origin images failed; will retry");
                        register_failed = true;
                    }
                }
            }
            if !rejoined {
                rejoined = self.rejoin_restored(rejoin_failed).await;
                rejoin_failed = !rejoined;
            }
            self.publish_profiles().await;
            match self.heartbeat().await {
                Ok(()) => down_logged = false,
                Err(e) => {
                    self.coordinator_ok.store(false, Ordering::Relaxed);
                    if !down_logged {
                        warn!(error = %e, "coordinator unreachable; serving with the parents we have");
                        down_logged = true;
                    }
                }
            }
            self.save_all_known().await;
            let interval = Duration::from_millis(self.heartbeat_ms.load(Ordering::Relaxed));
            let period = match SETTLE_HEARTBEATS.get(settle) {
                Some(&d) => {
                    settle += 1;
                    d.min(interval)
                }
                None => interval,
            };
            let sleep = tokio::time::sleep(period);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = &mut sleep => break,
                    () = self.joined.notified() => {
                        // Joined: the settling heartbeats start over.
                        let d = SETTLE_HEARTBEATS[0].min(interval);
                        sleep.as_mut().reset(tokio::time::Instant::now() + d);
                        settle = 1;
                    }
                    Some(r) = async { match reports.as_mut() { Some(rx) => rx.recv().await, None => None } } => {
                        self.report(r).await;
                        self.save_all_known().await;
                    }
                }
            }
        }
    }

    /// Saves each member's recorded boot profile when it changed, and
    /// (re)publishes `profile/IMAGE` when what it should hold changed.
    async fn publish_profiles(&self) {
        let members: Vec<(String, Arc<CachedVolume>, Arc<ImagePrefetch>)> = lock(&self.images)
            .iter()
            .filter_map(|(n, e)| match &e.role {
                Role::Member {
                    volume, prefetch, ..
                } => Some((n.clone(), Arc::clone(volume), Arc::clone(prefetch))),
                Role::Origin { .. } => None,
            })
            .collect();
        for (image, volume, prefetch) in members {
            let Some(profile) = prefetch.to_publish(&volume) else {
                continue;
            };
            let v = Arc::clone(&volume);
            match tokio::task::spawn_blocking(move || v.save_profile()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(image, error = %e, "saving the boot profile failed"),
                Err(e) => warn!(image, error = %e, "saving the boot profile failed"),
            }
            let bytes = profile.encode(volume.manifest());
            self.base.add_export(
                profile_export(&image),
                Arc::new(MemExport::new(bytes).read_only()),
            );
        }
    }

    /// Joins again the sessions of volumes restored from disk. Returns whether
    /// every one succeeded; failures are warnings unless `quiet` (a retry).
    async fn rejoin_restored(self: &Arc<Self>, quiet: bool) -> bool {
        let mut ok = true;
        for v in self.group.volumes() {
            let name = v.name().to_owned();
            let restored = match lock(&self.images).get(&name).map(|e| &e.role) {
                Some(Role::Member { joined, .. }) => !joined.load(Ordering::Relaxed),
                Some(Role::Origin { .. }) => continue,
                None => false,
            };
            let res = if restored {
                self.confirm_restored(&name).await
            } else if lock(&self.images).contains_key(&name) {
                continue;
            } else {
                self.ensure_image(&name).await
            };
            match res {
                Ok(()) => self.coordinator_ok.store(true, Ordering::Relaxed),
                Err(e) => {
                    if matches!(e, AgentError::Coordinator(_)) {
                        self.coordinator_ok.store(false, Ordering::Relaxed);
                    }
                    if quiet {
                        debug!(image = %name, error = %e, "re-joining restored image failed again");
                    } else {
                        warn!(image = %name, error = %e, "re-joining restored image failed; will retry");
                    }
                    ok = false;
                }
            }
        }
        ok
    }

    async fn heartbeat(self: &Arc<Self>) -> Result<(), AgentError> {
        // Members still on a saved upstream have not joined yet.
        let members: Vec<(String, Arc<ImageEntry>)> = lock(&self.images)
            .iter()
            .filter(|(_, e)| {
                matches!(&e.role, Role::Member { joined, .. } if joined.load(Ordering::Relaxed))
            })
            .map(|(n, e)| (n.clone(), Arc::clone(e)))
            .collect();
        let sessions = members
            .iter()
            .filter_map(|(name, e)| match &e.role {
                Role::Member { volume, epoch, .. } => Some(SessionBeat {
                    image: name.clone(),
                    progress: volume.held_fraction(),
                    complete: volume.is_complete(),
                    known_epoch: epoch.load(Ordering::Relaxed),
                }),
                Role::Origin { .. } => None,
            })
            .collect();
        // A host in no session (an origin, or one with no VM yet) still
        // heartbeats: its answer is the ban list, and its status then says
        // whether the coordinator answers.
        let sessions: Vec<SessionBeat> = sessions;
        let req = HeartbeatRequest {
            node: self.config.name.clone(),
            sessions,
            labels: self.config.labels.clone(),
            preheats: self.preheat_reports(),
        };
        match self.coord.heartbeat(&req).await {
            Ok(resp) => {
                self.coordinator_ok.store(true, Ordering::Relaxed);
                self.heartbeat_ms
                    .store(resp.heartbeat_interval_ms.max(50), Ordering::Relaxed);
                for a in resp.changed {
                    self.apply(&a);
                }
                if let Some(access) = &self.access {
                    access.set_banned(resp.banned);
                }
                self.follow_preheats(resp.preheats);
                Ok(())
            }
            Err(e) if matches!(e.code(), Some("dead") | Some("unknown_node")) => {
                // Declared dead (or the coordinator forgot us): join again.
                info!(error = %e, "coordinator does not count us as live; joining again");
                self.coordinator_ok.store(true, Ordering::Relaxed);
                for (name, _) in members {
                    if let Err(e) = self.join(&name).await {
                        warn!(image = %name, error = %e, "re-join failed");
                    }
                }
                Ok(())
            }
            Err(e) => Err(AgentError::Coordinator(e.to_string())),
        }
    }

    /// The sources an assignment names, this host left out.
    pub(super) fn parent_sources(&self, a: &Assignment) -> Vec<Source> {
        a.parents
            .iter()
            .filter(|p| p.node != self.config.name)
            .map(|p| Source {
                name: p.node.clone(),
                addr: p.addr.clone(),
            })
            .collect()
    }

    /// Each stripe's sources an assignment names, this host left out (empty
    /// for one tree).
    pub(super) fn stripe_sources(&self, a: &Assignment) -> Vec<Vec<Source>> {
        a.stripes
            .iter()
            .map(|l| {
                l.iter()
                    .filter(|p| p.node != self.config.name)
                    .map(|p| Source {
                        name: p.node.clone(),
                        addr: p.addr.clone(),
                    })
                    .collect()
            })
            .collect()
    }

    /// Applies a parent list, as the coordinator's answers do (tests drive
    /// the tree with it too: a list the coordinator never gave is kept until
    /// its next answer with another epoch).
    pub fn apply(&self, a: &Assignment) {
        let entry = lock(&self.images).get(&a.image).cloned();
        let Some(entry) = entry else { return };
        if let Role::Member { parents, epoch, .. } = &entry.role {
            let list = self.parent_sources(a);
            let names = |p: &crate::upstream::Parents| -> Vec<String> {
                p.current().into_iter().map(|s| s.name).collect()
            };
            let old = names(parents);
            if !a.origins.is_empty() {
                parents.set_origins(known::origin_sources(&a.origins));
            }
            parents.set_striped(list, self.stripe_sources(a));
            let new = names(parents);
            if old == new {
                debug!(image = %a.image, epoch = a.epoch, parents = ?new, "parent list again");
            } else {
                info!(image = %a.image, epoch = a.epoch, ?old, ?new, "parents changed");
            }
            epoch.store(a.epoch, Ordering::Relaxed);
        }
    }

    async fn report(&self, r: BadParent) {
        if is_origin(&r.parent.name) {
            return; // origins are not tree members
        }
        let req = ReportRequest {
            node: self.config.name.clone(),
            parent: r.parent.name.clone(),
        };
        match self.coord.report(&r.image, &req).await {
            Ok(a) => self.apply(&a),
            Err(e) => {
                debug!(image = %r.image, parent = %r.parent.name, error = %e, "report failed")
            }
        }
    }
}

/// Whether a source is an origin: the coordinator (and the fallback list)
/// names origins `origin:N`, a name no node can take (node names have no
/// `:`), so a member named `origin-2` is still reported when it fails.
fn is_origin(name: &str) -> bool {
    name.starts_with("origin:")
}

#[cfg(test)]
mod tests {
    use super::is_origin;

    #[test]
    fn only_origin_colon_names_are_origins() {
        assert!(is_origin("origin:0"));
        assert!(is_origin("origin:12"));
        assert!(!is_origin("origin"));
        assert!(!is_origin("origin-2"));
        assert!(!is_origin("origins"));
    }
}
