//! The status of a host, as the control API returns it: each image's role,
//! progress, parents and what it fetched or sent, its prefetch; the VMs; the
//! cache's usage and what was served. Also the counters the metrics read,
//! and read-only views of one image (its cached volume, what an origin sent).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use virtman_cache::CachedVolume;

use super::{Agent, ImageEntry, Role, VmInfo, lock};
use crate::origin::SendCounts;
use crate::prefetch::PrefetchStatus;

/// One image as the agent reports it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ImageStatus {
    /// Image name.
    pub name: String,
    /// `origin` or `member`.
    pub role: String,
    /// Size in bytes.
    pub size: u64,
    /// Fraction of chunks held (1 for an origin).
    pub progress: f64,
    /// Parent names, in order of preference (members).
    pub parents: Vec<String>,
    /// Origin names, asked after the parents (members; with no parent, the
    /// host's only sources).
    #[serde(default)]
    pub origins: Vec<String>,
    /// Bytes fetched from each source (name, is origin, bytes).
    pub fetched: Vec<(String, bool, u64)>,
    /// With a striped image: chunks fetched from each source in each stripe
    /// (name, stripe, chunks); empty for one tree.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fetched_by_stripe: Vec<(String, u32, u64)>,
    /// Chunks fetched from origins (members).
    pub from_origins: u64,
    /// Fetches that moved to another source.
    pub failovers: u64,
    /// What an origin sent.
    pub sent: Option<OriginSent>,
    /// Prefetch of a member image (boot profile, pin).
    #[serde(default)]
    pub prefetch: Option<PrefetchStatus>,
    /// A member restored at start that still fetches from the parents and
    /// origins saved before the restart: the coordinator has not answered
    /// its join yet.
    #[serde(default)]
    pub on_saved_parents: bool,
}

/// What an origin sent (see [`SendCounts`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OriginSent {
    /// Bytes sent.
    pub bytes: u64,
    /// Chunks sent at least once.
    pub chunks_sent: u64,
    /// The most times one chunk was sent.
    pub max_per_chunk: u32,
}

/// Bytes served over a host's exports (see [`Agent::served`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Served {
    /// To child hosts.
    pub children: u64,
    /// To other readers of the base exports.
    pub others: u64,
    /// To VMs.
    pub vms: u64,
}

/// The whole status of a host.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Status {
    /// Node name.
    pub node: String,
    /// The coordinator's URL the agent uses (operator commands on this host
    /// find it here).
    #[serde(default)]
    pub coordinator: String,
    /// Address children use.
    pub advertise: String,
    /// Images.
    pub images: Vec<ImageStatus>,
    /// VMs.
    pub vms: Vec<VmInfo>,
    /// Cache bytes used.
    pub cache_used: u64,
    /// Cache capacity.
    pub cache_capacity: u64,
    /// Bytes served to children (hosts fetching from this one).
    pub served_to_children: u64,
    /// Bytes other readers of the base exports took (an `nbdcopy`, say).
    #[serde(default)]
    pub served_to_others: u64,
    /// Bytes served to VMs.
    pub served_to_vms: u64,
    /// Whether the last coordinator call succeeded.
    pub coordinator_ok: bool,
}

/// Counters of one member image.
#[derive(Debug)]
pub struct MemberStats {
    /// The image.
    pub image: String,
    /// Bytes per source (name, is origin, bytes).
    pub by_source: Vec<(String, bool, u64)>,
    /// Failovers.
    pub failovers: u64,
    /// Fetches that also went to the next source after the hedge delay.
    pub hedges: u64,
    /// Of those, the ones the next source answered first.
    pub hedge_wins: u64,
    /// Wrong chunks received.
    pub lies: u64,
    /// Local reads.
    pub hits: u64,
    /// Reads that needed a fetch.
    pub misses: u64,
    /// Chunks evicted.
    pub evicted: u64,
    /// Failed reads, writes and syncs of the cache's disk for this image.
    pub disk_errors: u64,
    /// Chunks fetched by prefetch (profile, pin, hints).
    pub prefetched_chunks: u64,
    /// Bytes of those.
    pub prefetched_bytes: u64,
    /// Chunks held (see [`virtman_cache::CachedVolume::held_chunks`]).
    pub held_chunks: u64,
    /// The image's chunks.
    pub chunks: u64,
    /// Fetch latency.
    pub latency: prometheus_client::metrics::histogram::Histogram,
}

impl Agent {
    /// The cached volume of an image this host is a member for.
    pub fn volume(&self, image: &str) -> Option<Arc<CachedVolume>> {
        match lock(&self.images).get(image).map(|e| &e.role) {
            Some(Role::Member { volume, .. }) => Some(Arc::clone(volume)),
            _ => None,
        }
    }

    /// What an origin image sent so far.
    pub fn origin_counts(&self, image: &str) -> Option<SendCounts> {
        match lock(&self.images).get(image).map(|e| &e.role) {
            Some(Role::Origin { export }) => Some(export.counts()),
            _ => None,
        }
    }

    /// Counters of every member image, for metrics.
    pub fn member_stats(&self) -> Vec<MemberStats> {
        let entries: Vec<(String, Arc<ImageEntry>)> = lock(&self.images)
            .iter()
            .map(|(n, e)| (n.clone(), Arc::clone(e)))
            .collect();
        entries
            .into_iter()
            .filter_map(|(image, e)| match &e.role {
                Role::Member {
                    volume, parents, ..
                } => {
                    let v = volume.stats();
                    let f = parents.stats();
                    Some(MemberStats {
                        image,
                        by_source: parents.bytes_by_source(),
                        failovers: f.failovers.load(Ordering::Relaxed),
                        hedges: f.hedges.load(Ordering::Relaxed),
                        hedge_wins: f.hedge_wins.load(Ordering::Relaxed),
                        lies: f.lies.load(Ordering::Relaxed),
                        hits: v.hits.load(Ordering::Relaxed),
                        misses: v.misses.load(Ordering::Relaxed),
                        evicted: v.evicted_chunks.load(Ordering::Relaxed),
                        disk_errors: v.disk_errors.load(Ordering::Relaxed),
                        prefetched_chunks: v.prefetched_chunks.load(Ordering::Relaxed),
                        prefetched_bytes: v.prefetched_bytes.load(Ordering::Relaxed),
                        held_chunks: volume.held_chunks(),
                        chunks: e.manifest.chunks(),
                        latency: f.latency.clone(),
                    })
                }
                Role::Origin { .. } => None,
            })
            .collect()
    }

    /// What every origin image sent, for metrics.
    pub fn origin_stats(&self) -> Vec<(String, SendCounts)> {
        lock(&self.images)
            .iter()
            .filter_map(|(n, e)| match &e.role {
                Role::Origin { export } => Some((n.clone(), export.counts())),
                Role::Member { .. } => None,
            })
            .collect()
    }

    /// The cache group's usage.
    pub fn cache_usage(&self) -> virtman_cache::Usage {
        self.group.usage()
    }

    /// What the exports served: to children (readers that said so, see
    /// `ServerConfig::tag_context`), to other readers of the base exports,
    /// and to VMs.
    pub fn served(&self) -> Served {
        let base = self.base.stats();
        let children = base.bytes_read_tagged.load(Ordering::Relaxed);
        Served {
            children,
            others: base
                .bytes_read
                .load(Ordering::Relaxed)
                .saturating_sub(children),
            vms: self.vms.stats().bytes_read.load(Ordering::Relaxed),
        }
    }

    /// The host's status.
    pub fn status(&self) -> Status {
        let entries: Vec<(String, Arc<ImageEntry>)> = lock(&self.images)
            .iter()
            .map(|(n, e)| (n.clone(), Arc::clone(e)))
            .collect();
        let images = entries
            .into_iter()
            .map(|(name, e)| match &e.role {
                Role::Origin { export } => {
                    let c = export.counts();
                    ImageStatus {
                        name,
                        role: "origin".into(),
                        size: e.manifest.size(),
                        progress: 1.0,
                        parents: Vec::new(),
                        origins: Vec::new(),
                        fetched: Vec::new(),
                        fetched_by_stripe: Vec::new(),
                        from_origins: 0,
                        failovers: 0,
                        sent: Some(OriginSent {
                            bytes: c.bytes,
                            chunks_sent: c.chunks_sent,
                            max_per_chunk: c.max_per_chunk,
                        }),
                        prefetch: None,
                        on_saved_parents: false,
                    }
                }
                Role::Member {
                    volume,
                    parents,
                    prefetch,
                    joined,
                    ..
                } => ImageStatus {
                    name,
                    role: "member".into(),
                    size: e.manifest.size(),
                    progress: volume.held_fraction(),
                    parents: parents.current().into_iter().map(|s| s.name).collect(),
                    origins: parents.origins().into_iter().map(|s| s.name).collect(),
                    fetched: parents.bytes_by_source(),
                    fetched_by_stripe: parents.chunks_by_stripe(),
                    from_origins: parents.stats().from_origins.load(Ordering::Relaxed),
                    failovers: parents.stats().failovers.load(Ordering::Relaxed),
                    sent: None,
                    prefetch: Some(prefetch.status(volume)),
                    on_saved_parents: !joined.load(Ordering::Relaxed),
                },
            })
            .collect();
        let usage = self.group.usage();
        let served = self.served();
        Status {
            node: self.config.name.clone(),
            coordinator: self.config.coordinator.clone(),
            advertise: self.config.advertise.clone(),
            images,
            vms: self.list_vms(),
            cache_used: usage.used,
            cache_capacity: usage.capacity,
            served_to_children: served.children,
            served_to_others: served.others,
            served_to_vms: served.vms,
            coordinator_ok: self.coordinator_ok.load(Ordering::Relaxed),
        }
    }
}
