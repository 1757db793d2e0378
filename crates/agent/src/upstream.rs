//! Fetching chunks from parents: the agent's [`Upstream`] for a cached volume.
//!
//! ```text
//!  cached volume miss ─► Parents::fetch(chunk)
//!                          candidates: healthy parents in the coordinator's order,
//!                                      busy ones (`busy_at` requests out) after,
//!                                      then the origins (parents of last resort)
//!                          an attempt (its own task): NBD read (timeout) ─► verify BLAKE3
//!                                      ok ─► the first one wins  (the volume verifies again)
//!                                      error/timeout (silent) ─► cool down, report, next at once
//!                                      wrong bytes   ─► drop for this image, report, next
//!                          no answer within the hedge delay ─► the next source too
//! ```
//!
//! The reader never sees a parent's failure while any source is up, and never
//! waits on a hung one for longer than the hedge delay (see `fetch.rs`).
//! With a striped image ([`Parents::set_striped`]) chunk i is fetched from
//! stripe i mod S's parents only, then the origins: never from another
//! stripe's parents, so no chunk's requests go round a cycle.
//! Parent lists from the coordinator are applied live with [`Parents::set`]:
//! fetches in flight keep the connection they hold; new fetches use the new
//! list. Every failure is sent to a channel the agent drains to tell the
//! coordinator.
//!
//! Parts: `conn.rs` (one source and its client), `fetch.rs` (one fetch:
//! attempts, hedges, the delay estimate and the hedge budget).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tokio::sync::mpsc;
use virtman_cache::{ChunkRequest, Upstream, UpstreamError};
use virtman_image::{ImageId, Manifest};
use virtman_nbd::ClientTls;

use conn::Conn;

/// Tunables of fetching from parents; the defaults suit a LAN.
#[derive(Clone, Debug)]
pub struct FetchConfig {
    /// Time one chunk read from one source may go unanswered, while the
    /// source answers none of this image's other requests either, before
    /// it fails over (a hung or dead source). A source that keeps
    /// answering others is busy, not hung: the read waits on, up to
    /// `request_deadline`.
    pub request_timeout: Duration,
    /// The longest one chunk read from one source may take, however busy
    /// the source (queues of many seconds on a slow link are a busy source;
    /// one that answers all but this read is not).
    pub request_deadline: Duration,
    /// Time to connect to a parent and finish the NBD handshake.
    pub connect_timeout: Duration,
    /// NBD connections per parent.
    pub connections: usize,
    /// A parent with this many of this host's requests outstanding is
    /// busy: new fetches go to the next parent in the coordinator's order
    /// first (1: always the least loaded). Spreading every fetch over all
    /// parents looks balanced but, in a storm where every relay's upload is
    /// already full with its own children, steals the upload of the
    /// secondaries (shallower relays) from their children: the simulator
    /// showed forests 40 % slower that way.
    pub busy_at: usize,
    /// Hedges go to an origin only while this host has fewer requests than
    /// this outstanding there. Every host of a storm shares the origin's
    /// link, and at a storm's start every relay is silent while its own
    /// parents fill the pipeline: a burst of hedges from each host queued
    /// seconds deep at the origin (a 100 Mbit/s storm of 16 hosts in 4
    /// stripes sent 2.3x the working set from it, with timeouts).
    /// Failovers (a source failed or is known to be failing) are not
    /// limited.
    pub origin_hedges: usize,
    /// How long a parent that failed is skipped (it may be restarting).
    pub cool_down: Duration,
    /// Latency added to every request to a parent, for local benchmarks where
    /// the kernel cannot add it (no netem); zero in production.
    pub link_delay: Duration,
    /// TLS to parents and origins (each verified by the address dialled);
    /// every fetch, manifest and profile read goes over it.
    pub tls: Option<ClientTls>,
    /// Hedged fetches; `None` waits on each source until it answers or
    /// fails (the request timeout).
    pub hedge: Option<Hedge>,
    /// Pauses before fetching again when every source failed, in order; a
    /// read fails only after the last.
    pub retry_pauses: Vec<Duration>,
    /// The host's caps: every attempt waits for its bytes on the download
    /// cap (demand before prefetch). The agent sets its own; none: no cap.
    pub caps: Option<Arc<crate::caps::Caps>>,
}

/// When a fetch that has not been answered goes to the next source too. The
/// delay is the recent fetch latency plus four deviations (as TCP sets its
/// retransmission timeout), kept between a floor and a ceiling; hedges are
/// at most about a tenth of fetches (with a burst), except that a fetch
/// waiting on a source already known to be failing moves on without
/// counting as one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hedge {
    /// The shortest delay.
    pub floor: Duration,
    /// The longest delay: the longest a read waits on a hung source before
    /// another parent is asked too (an origin that already holds one of
    /// this host's requests is asked once that is answered, at the latest
    /// when the hung source's request times out).
    pub ceiling: Duration,
}

impl Default for Hedge {
    fn default() -> Self {
        Hedge {
            floor: Duration::from_millis(50),
            ceiling: Duration::from_millis(250),
        }
    }
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            // Below the coordinator's default heartbeat timeout (4 s), so a
            // child's report of a hung parent can act before the coordinator
            // notices the silence (the simulator showed 5 s never did).
            request_timeout: Duration::from_secs(2),
            // A 100 Mbit/s link drains about 1,000 chunks of 256 KiB in
            // 20 s: deeper queues than any storm builds.
            request_deadline: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(2),
            connections: 2,
            busy_at: 4,
            origin_hedges: 1,
            cool_down: Duration::from_secs(3),
            link_delay: Duration::ZERO,
            tls: None,
            hedge: Some(Hedge::default()),
            // About 6 s in all: a coordinator or a parent restarting.
            retry_pauses: [200, 400, 800, 1600, 3200]
                .map(Duration::from_millis)
                .to_vec(),
            caps: None,
        }
    }
}

/// One source of chunks as the coordinator names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    /// The node's name (reported back to the coordinator).
    pub name: String,
    /// Where its base export listens (`host:port`).
    pub addr: String,
}

/// Why a parent was given up on for a fetch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// It could not be reached, failed the read, or timed out.
    Unreachable(String),
    /// It sent bytes that do not match the manifest.
    Lied,
}

/// A parent that failed, for the agent to report to the coordinator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadParent {
    /// The image (and NBD export) it was serving.
    pub image: String,
    /// The parent.
    pub parent: Source,
    /// What it did.
    pub fault: Fault,
}

/// Counters of one volume's fetching, for metrics and tests.
#[derive(Debug)]
pub struct FetchStats {
    /// Chunks fetched from parents that are not origins.
    pub from_parents: AtomicU64,
    /// Chunks fetched from origins.
    pub from_origins: AtomicU64,
    /// Bytes fetched, all sources.
    pub bytes: AtomicU64,
    /// Times a fetch moved on to another source after one failed.
    pub failovers: AtomicU64,
    /// Times a fetch also went to the next source because the one asked had
    /// not answered within the hedge delay.
    pub hedges: AtomicU64,
    /// Hedges whose source answered first.
    pub hedge_wins: AtomicU64,
    /// Chunks a source sent wrong.
    pub lies: AtomicU64,
    /// Seconds per fetch, every attempt included.
    pub latency: Histogram,
}

impl Default for FetchStats {
    fn default() -> Self {
        FetchStats {
            from_parents: AtomicU64::new(0),
            from_origins: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            failovers: AtomicU64::new(0),
            hedges: AtomicU64::new(0),
            hedge_wins: AtomicU64::new(0),
            lies: AtomicU64::new(0),
            // 100 µs to about 13 s.
            latency: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
        }
    }
}

/// What every attempt of every fetch of one volume shares.
struct Shared {
    image: String,
    manifest: Arc<Manifest>,
    config: FetchConfig,
    reports: mpsc::UnboundedSender<BadParent>,
    stats: Arc<FetchStats>,
    hedging: fetch::Hedging,
}

impl Shared {
    /// Waits for `req`'s bytes on the host's download cap, if any.
    async fn pay(&self, req: ChunkRequest) {
        if let Some(caps) = &self.config.caps {
            caps.download(u64::from(req.len), req.class).await;
        }
    }

    fn report(&self, conn: &Conn, fault: Fault) {
        let _ = self.reports.send(BadParent {
            image: self.image.clone(),
            parent: conn.source.clone(),
            fault,
        });
    }
}

/// The parents and origins of one cached volume.
pub struct Parents {
    shared: Arc<Shared>,
    parents: RwLock<Vec<Arc<Conn>>>,
    /// With stripes: each stripe's parents (connections shared with
    /// `parents`); empty for one tree.
    stripes: RwLock<Vec<Vec<Arc<Conn>>>>,
    origins: RwLock<Vec<Arc<Conn>>>,
    /// Bytes fetched per source (name, origin) since the start, kept when a
    /// source leaves the lists: counters never go down.
    totals: Totals,
    /// With stripes: chunks fetched per (source, stripe).
    by_stripe: Mutex<BTreeMap<(String, u32), u64>>,
}

#[derive(Default)]
struct Totals(Mutex<BTreeMap<(String, bool), Arc<AtomicU64>>>);

impl Totals {
    /// A connection to `source`, counting into its total.
    fn conn(&self, source: Source, origin: bool) -> Arc<Conn> {
        let bytes = Arc::clone(
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry((source.name.clone(), origin))
                .or_default(),
        );
        Conn::new(source, origin, bytes)
    }
}

/// How [`Parents`] orders parents with `outstanding` requests: 0 (the
/// coordinator's order) below `busy_at`, else by load after those.
fn busy_key(outstanding: usize, busy_at: usize) -> usize {
    if outstanding < busy_at {
        0
    } else {
        outstanding
    }
}

/// The stripe of chunk `index` among `stripes` (at least one), as an index.
fn stripe_index(stripes: usize, index: u64) -> usize {
    let s = u32::try_from(stripes).unwrap_or(u32::MAX);
    virtman_topology::stripe_of(index, s) as usize
}

impl std::fmt::Debug for Parents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parents")
            .field("image", &self.shared.image)
            .field("parents", &self.current())
            .finish()
    }
}

impl Parents {
    /// Sources for `image`: `origins` serve it whole and are tried last.
    pub fn new(
        image: impl Into<String>,
        manifest: Arc<Manifest>,
        origins: Vec<Source>,
        config: FetchConfig,
        reports: mpsc::UnboundedSender<BadParent>,
    ) -> Parents {
        let totals = Totals::default();
        let origins = origins.into_iter().map(|s| totals.conn(s, true)).collect();
        Parents {
            totals,
            shared: Arc::new(Shared {
                image: image.into(),
                manifest,
                hedging: fetch::Hedging::new(config.hedge),
                config,
                reports,
                stats: Arc::new(FetchStats::default()),
            }),
            parents: RwLock::new(Vec::new()),
            stripes: RwLock::new(Vec::new()),
            by_stripe: Mutex::new(BTreeMap::new()),
            origins: RwLock::new(origins),
        }
    }

    /// Replaces the parent list (ordered by preference) of one tree.
    /// Connections to parents that stay are kept; fetches in flight finish
    /// on the connection they hold.
    pub fn set(&self, list: Vec<Source>) {
        self.set_striped(list, Vec::new());
    }

    /// Replaces the parent list (every stripe's parents, in order of
    /// preference) and the per-stripe lists together, so no fetch sees one
    /// without the other: chunk i is then fetched from `lists[i mod S]`'s
    /// parents, then the origins. An empty `lists` (or one list) is one
    /// tree; a stripe's parent missing from `list` is left out.
    pub fn set_striped(&self, list: Vec<Source>, lists: Vec<Vec<Source>>) {
        let origins = self.origins.read().unwrap_or_else(|p| p.into_inner());
        // Stripes before parents, as `with_chunk_parents` reads them.
        let mut stripes = self.stripes.write().unwrap_or_else(|p| p.into_inner());
        let mut g = self.parents.write().unwrap_or_else(|p| p.into_inner());
        let old = std::mem::take(&mut *g);
        for s in list {
            if origins.iter().any(|o| o.source.addr == s.addr) {
                continue; // origins are always tried, last
            }
            let keep = old
                .iter()
                .find(|c| c.source == s)
                .cloned()
                .unwrap_or_else(|| self.totals.conn(s, false));
            g.push(keep);
        }
        *stripes = if lists.len() > 1 {
            lists
                .into_iter()
                .map(|l| {
                    l.iter()
                        .filter_map(|s| g.iter().find(|c| c.source == *s).cloned())
                        .collect()
                })
                .collect()
        } else {
            Vec::new()
        };
    }

    /// The stripe count (1: one tree).
    pub fn stripe_count(&self) -> u32 {
        let n = self.stripes.read().unwrap_or_else(|p| p.into_inner()).len();
        u32::try_from(n).unwrap_or(u32::MAX).max(1)
    }

    /// Replaces the origins (the coordinator may know other addresses than
    /// the ones saved before a restart). Connections to origins that stay are
    /// kept; parents that are now origins are dropped from the parent list.
    pub fn set_origins(&self, list: Vec<Source>) {
        let mut g = self.origins.write().unwrap_or_else(|p| p.into_inner());
        if g.iter().map(|c| &c.source).eq(list.iter()) {
            return;
        }
        let old = std::mem::take(&mut *g);
        for s in list {
            let keep = old
                .iter()
                .find(|c| c.source == s)
                .cloned()
                .unwrap_or_else(|| self.totals.conn(s, true));
            g.push(keep);
        }
        let mut p = self.parents.write().unwrap_or_else(|p| p.into_inner());
        p.retain(|c| !g.iter().any(|o| o.source.addr == c.source.addr));
        for list in self
            .stripes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .iter_mut()
        {
            list.retain(|c| !g.iter().any(|o| o.source.addr == c.source.addr));
        }
    }

    /// The origins, in order.
    pub fn origins(&self) -> Vec<Source> {
        let g = self.origins.read().unwrap_or_else(|p| p.into_inner());
        g.iter().map(|c| c.source.clone()).collect()
    }

    /// With stripes, chunks fetched from each source in each stripe (name,
    /// stripe, chunks); empty for one tree.
    pub fn chunks_by_stripe(&self) -> Vec<(String, u32, u64)> {
        let g = self.by_stripe.lock().unwrap_or_else(|p| p.into_inner());
        g.iter().map(|((n, s), c)| (n.clone(), *s, *c)).collect()
    }

    /// Counts chunk `index` as fetched from `source`, by stripe.
    fn count_stripe(&self, source: &str, index: u64) {
        let stripes = self.stripe_count();
        if stripes > 1 {
            let stripe = virtman_topology::stripe_of(index, stripes);
            let mut g = self.by_stripe.lock().unwrap_or_else(|p| p.into_inner());
            *g.entry((source.to_owned(), stripe)).or_default() += 1;
        }
    }

    /// Runs `f` on the parents chunk `index` is fetched from: its stripe's
    /// with stripes, else all of them (origins not included).
    fn with_chunk_parents<R>(&self, index: u64, f: impl FnOnce(&[Arc<Conn>]) -> R) -> R {
        let striped = self.stripes.read().unwrap_or_else(|p| p.into_inner());
        if striped.len() > 1 {
            f(&striped[stripe_index(striped.len(), index)])
        } else {
            drop(striped);
            f(&self.parents.read().unwrap_or_else(|p| p.into_inner()))
        }
    }

    /// Whether chunk `index` would be fetched from the parent named `name`
    /// (with stripes: one of the chunk's stripe's parents).
    pub fn fetches_from(&self, name: &str, index: u64) -> bool {
        self.with_chunk_parents(index, |list| list.iter().any(|c| c.source.name == name))
    }

    /// The current parents of each stripe (empty for one tree).
    pub fn current_stripes(&self) -> Vec<Vec<Source>> {
        let g = self.stripes.read().unwrap_or_else(|p| p.into_inner());
        g.iter()
            .map(|l| l.iter().map(|c| c.source.clone()).collect())
            .collect()
    }

    /// The current parents (not counting origins), in order.
    pub fn current(&self) -> Vec<Source> {
        let g = self.parents.read().unwrap_or_else(|p| p.into_inner());
        g.iter().map(|c| c.source.clone()).collect()
    }

    /// Fetch counters.
    pub fn stats(&self) -> &Arc<FetchStats> {
        &self.shared.stats
    }

    /// Bytes fetched from each source so far, by name (origins included):
    /// every source ever used, parents that have since left too, so sums
    /// over sources never go down.
    pub fn bytes_by_source(&self) -> Vec<(String, bool, u64)> {
        let t = self.totals.0.lock().unwrap_or_else(|p| p.into_inner());
        t.iter()
            .map(|((name, origin), b)| (name.clone(), *origin, b.load(Ordering::Relaxed)))
            .collect()
    }

    /// The order to try sources in for chunk `index`: healthy parents (of
    /// its stripe) in the coordinator's order, busy ones after the others,
    /// then parents that lost to a hedge lately, then
    /// parents cooling down after a failure, then origins.
    fn candidates(&self, index: u64) -> Vec<Arc<Conn>> {
        let now = Instant::now();
        let origins = self
            .origins
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let g = self.with_chunk_parents(index, <[Arc<Conn>]>::to_vec);
        let mut healthy: Vec<Arc<Conn>> = Vec::new();
        let mut slow: Vec<Arc<Conn>> = Vec::new();
        let mut cooling: Vec<Arc<Conn>> = Vec::new();
        for c in g.iter().filter(|c| !c.liar.load(Ordering::Relaxed)) {
            if c.cooling(now) {
                cooling.push(Arc::clone(c));
            } else if c.slow(now) {
                slow.push(Arc::clone(c));
            } else {
                healthy.push(Arc::clone(c));
            }
        }
        // Stable sort: parents not busy keep the coordinator's order of
        // preference; busy ones follow by load.
        let busy_at = self.shared.config.busy_at;
        let key = |c: &Arc<Conn>| busy_key(c.outstanding.load(Ordering::Relaxed), busy_at);
        healthy.sort_by_key(key);
        slow.sort_by_key(key);
        healthy
            .into_iter()
            .chain(slow)
            .chain(cooling)
            .chain(origins)
            .collect()
    }
}

#[async_trait]
impl Upstream for Parents {
    fn name(&self) -> String {
        let names: Vec<String> = self.current().into_iter().map(|s| s.name).collect();
        format!(
            "parents [{}] of image {}",
            names.join(", "),
            self.shared.image
        )
    }

    fn verifies(&self) -> Option<ImageId> {
        // `fetch_any` returns only chunks that match this manifest.
        Some(self.shared.manifest.id())
    }

    async fn fetch(&self, req: ChunkRequest) -> Result<Bytes, UpstreamError> {
        let started = Instant::now();
        // Every source failing at once is most often a moment (parents
        // restarting, an origin unable to ask a restarting coordinator who
        // this host is): try again, with the lists as they are then, before
        // a VM sees an error.
        let mut res = self.fetch_any(req).await;
        for pause in self.shared.config.retry_pauses.iter().copied() {
            let Err(e) = &res else { break };
            tracing::warn!(image = %self.shared.image, chunk = req.index, error = %e.message,
                retry_in = ?pause, "every source failed; trying again");
            tokio::time::sleep(pause).await;
            res = self.fetch_any(req).await;
        }
        let stats = &self.shared.stats;
        stats.latency.observe(started.elapsed().as_secs_f64());
        res
    }
}

mod conn;
mod fetch;
#[cfg(test)]
mod tests;
