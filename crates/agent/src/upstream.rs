//! Fetching chunks from parents: the agent's [`Upstream`] for a cached volume.
//!
//! ```text
//!  cached volume miss ─► Parents::fetch(chunk)
//!                          candidates: healthy parents, least outstanding first,
//!                                      then the origins (parents of last resort)
//!                          for each: NBD read (timeout) ─► verify BLAKE3 vs manifest
//!                                      ok ─► return        (the volume verifies again)
//!                                      error/timeout ─► cool down, report, next
//!                                      wrong bytes   ─► drop for this image, report, next
//! ```
//!
//! The reader never sees a parent's failure while any source is up. Parent
//! lists from the coordinator are applied live with [`Parents::set`]: fetches
//! in flight keep the connection they hold; new fetches use the new list.
//! Every failure is sent to a channel the agent drains to tell the coordinator.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tokio::sync::mpsc;
use virtman_cache::{ChunkRequest, Upstream, UpstreamError};
use virtman_image::{ImageId, Manifest};
use virtman_nbd::{Client, ClientConfig, ClientTls, Endpoint};

/// Tunables of fetching from parents; the defaults suit a LAN.
#[derive(Clone, Debug)]
pub struct FetchConfig {
    /// Time one chunk read from one parent may take before failing over.
    pub request_timeout: Duration,
    /// Time to connect to a parent and finish the NBD handshake.
    pub connect_timeout: Duration,
    /// NBD connections per parent.
    pub connections: usize,
    /// How long a parent that failed is skipped (it may be restarting).
    pub cool_down: Duration,
    /// Latency added to every request to a parent, for local benchmarks where
    /// the kernel cannot add it (no netem); zero in production.
    pub link_delay: Duration,
    /// TLS to parents and origins (each verified by the address dialled);
    /// every fetch, manifest and profile read goes over it.
    pub tls: Option<ClientTls>,
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            // Below the coordinator's default heartbeat timeout (4 s), so a
            // child's report of a hung parent can act before the coordinator
            // notices the silence (the simulator showed 5 s never did).
            request_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
            connections: 2,
            cool_down: Duration::from_secs(3),
            link_delay: Duration::ZERO,
            tls: None,
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
    /// Times a fetch moved on to another source.
    pub failovers: AtomicU64,
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
            lies: AtomicU64::new(0),
            // 100 µs to about 13 s.
            latency: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
        }
    }
}

struct Conn {
    source: Source,
    origin: bool,
    client: tokio::sync::Mutex<Option<Client>>,
    outstanding: AtomicUsize,
    /// Skip until this instant (a recent failure).
    cool_until: Mutex<Option<Instant>>,
    /// Sent a wrong chunk: never used again for this image.
    liar: std::sync::atomic::AtomicBool,
    /// Bytes fetched from this source.
    bytes: AtomicU64,
}

impl Conn {
    fn new(source: Source, origin: bool) -> Arc<Conn> {
        Arc::new(Conn {
            source,
            origin,
            client: tokio::sync::Mutex::new(None),
            outstanding: AtomicUsize::new(0),
            cool_until: Mutex::new(None),
            liar: std::sync::atomic::AtomicBool::new(false),
            bytes: AtomicU64::new(0),
        })
    }

    fn cooling(&self, now: Instant) -> bool {
        let g = self.cool_until.lock().unwrap_or_else(|p| p.into_inner());
        g.is_some_and(|t| now < t)
    }

    fn cool(&self, d: Duration) {
        *self.cool_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + d);
    }

    /// The connected client, connecting first if needed.
    async fn client(&self, image: &str, config: &FetchConfig) -> Result<Client, String> {
        let mut g = self.client.lock().await;
        if let Some(c) = g.as_ref() {
            return Ok(c.clone());
        }
        let cc = ClientConfig {
            export: image.to_owned(),
            connections: config.connections,
            request_timeout: config.request_timeout,
            connect_timeout: config.connect_timeout,
            tls: config.tls.clone(),
        };
        let c = Client::connect(&Endpoint::Tcp(self.source.addr.clone()), &cc)
            .await
            .map_err(|e| e.to_string())?;
        *g = Some(c.clone());
        Ok(c)
    }

    async fn forget_client(&self) {
        *self.client.lock().await = None;
    }
}

/// The parents and origins of one cached volume.
pub struct Parents {
    image: String,
    manifest: Arc<Manifest>,
    config: FetchConfig,
    parents: RwLock<Vec<Arc<Conn>>>,
    origins: RwLock<Vec<Arc<Conn>>>,
    reports: mpsc::UnboundedSender<BadParent>,
    stats: Arc<FetchStats>,
}

impl std::fmt::Debug for Parents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parents")
            .field("image", &self.image)
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
        Parents {
            image: image.into(),
            manifest,
            config,
            parents: RwLock::new(Vec::new()),
            origins: RwLock::new(origins.into_iter().map(|s| Conn::new(s, true)).collect()),
            reports,
            stats: Arc::new(FetchStats::default()),
        }
    }

    /// Replaces the parent list (ordered by preference). Connections to parents
    /// that stay are kept; fetches in flight finish on the connection they hold.
    pub fn set(&self, list: Vec<Source>) {
        let origins = self.origins.read().unwrap_or_else(|p| p.into_inner());
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
                .unwrap_or_else(|| Conn::new(s, false));
            g.push(keep);
        }
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
                .unwrap_or_else(|| Conn::new(s, true));
            g.push(keep);
        }
        let mut p = self.parents.write().unwrap_or_else(|p| p.into_inner());
        p.retain(|c| !g.iter().any(|o| o.source.addr == c.source.addr));
    }

    /// The origins, in order.
    pub fn origins(&self) -> Vec<Source> {
        let g = self.origins.read().unwrap_or_else(|p| p.into_inner());
        g.iter().map(|c| c.source.clone()).collect()
    }

    /// The current parents (not counting origins), in order.
    pub fn current(&self) -> Vec<Source> {
        let g = self.parents.read().unwrap_or_else(|p| p.into_inner());
        g.iter().map(|c| c.source.clone()).collect()
    }

    /// Fetch counters.
    pub fn stats(&self) -> &Arc<FetchStats> {
        &self.stats
    }

    /// Bytes fetched from each source so far, by name (origins included).
    pub fn bytes_by_source(&self) -> Vec<(String, bool, u64)> {
        // Origins first, then parents: the order every method locks in.
        let o = self.origins.read().unwrap_or_else(|p| p.into_inner());
        let g = self.parents.read().unwrap_or_else(|p| p.into_inner());
        g.iter()
            .chain(o.iter())
            .map(|c| {
                (
                    c.source.name.clone(),
                    c.origin,
                    c.bytes.load(Ordering::Relaxed),
                )
            })
            .collect()
    }

    /// The order to try sources in: healthy parents by load, then parents that
    /// are cooling down, then origins.
    fn candidates(&self) -> Vec<Arc<Conn>> {
        let now = Instant::now();
        let origins = self
            .origins
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let g = self.parents.read().unwrap_or_else(|p| p.into_inner());
        let mut healthy: Vec<Arc<Conn>> = Vec::new();
        let mut cooling: Vec<Arc<Conn>> = Vec::new();
        for c in g.iter().filter(|c| !c.liar.load(Ordering::Relaxed)) {
            if c.cooling(now) {
                cooling.push(Arc::clone(c));
            } else {
                healthy.push(Arc::clone(c));
            }
        }
        // Stable sort: equal load keeps the coordinator's order of preference.
        healthy.sort_by_key(|c| c.outstanding.load(Ordering::Relaxed));
        healthy.into_iter().chain(cooling).chain(origins).collect()
    }

    fn report(&self, conn: &Conn, fault: Fault) {
        let _ = self.reports.send(BadParent {
            image: self.image.clone(),
            parent: conn.source.clone(),
            fault,
        });
    }

    async fn fetch_from(&self, conn: &Conn, req: &ChunkRequest) -> Result<Bytes, String> {
        let client = conn.client(&self.image, &self.config).await?;
        conn.outstanding.fetch_add(1, Ordering::Relaxed);
        if !self.config.link_delay.is_zero() {
            tokio::time::sleep(self.config.link_delay).await;
        }
        let res = client.read(req.offset, u64::from(req.len)).await;
        conn.outstanding.fetch_sub(1, Ordering::Relaxed);
        res.map_err(|e| e.to_string())
    }
}

#[async_trait]
impl Upstream for Parents {
    fn name(&self) -> String {
        let names: Vec<String> = self.current().into_iter().map(|s| s.name).collect();
        format!("parents [{}] of image {}", names.join(", "), self.image)
    }

    fn verifies(&self) -> Option<ImageId> {
        // `fetch_any` returns only chunks that match this manifest.
        Some(self.manifest.id())
    }

    async fn fetch(&self, req: ChunkRequest) -> Result<Bytes, UpstreamError> {
        let started = Instant::now();
        let res = self.fetch_any(req).await;
        self.stats.latency.observe(started.elapsed().as_secs_f64());
        res
    }
}

impl Parents {
    async fn fetch_any(&self, req: ChunkRequest) -> Result<Bytes, UpstreamError> {
        let mut failures = Vec::new();
        for (i, conn) in self.candidates().into_iter().enumerate() {
            if i > 0 {
                self.stats.failovers.fetch_add(1, Ordering::Relaxed);
            }
            match self.fetch_from(&conn, &req).await {
                Ok(data) if self.manifest.verify_chunk(req.index, &data) => {
                    let n = data.len() as u64;
                    conn.bytes.fetch_add(n, Ordering::Relaxed);
                    self.stats.bytes.fetch_add(n, Ordering::Relaxed);
                    let counter = if conn.origin {
                        &self.stats.from_origins
                    } else {
                        &self.stats.from_parents
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    return Ok(data);
                }
                Ok(_) => {
                    tracing::warn!(image = %self.image, parent = %conn.source.name,
                        chunk = req.index, "parent sent a chunk that does not match the manifest; dropping it");
                    self.stats.lies.fetch_add(1, Ordering::Relaxed);
                    if !conn.origin {
                        conn.liar.store(true, Ordering::Relaxed);
                    }
                    conn.forget_client().await;
                    self.report(&conn, Fault::Lied);
                    failures.push(format!("{}: wrong bytes", conn.source.name));
                }
                Err(e) => {
                    tracing::info!(image = %self.image, parent = %conn.source.name,
                        chunk = req.index, error = %e, "fetch failed; trying the next source");
                    conn.cool(self.config.cool_down);
                    conn.forget_client().await;
                    self.report(&conn, Fault::Unreachable(e.clone()));
                    failures.push(format!("{}: {e}", conn.source.name));
                }
            }
        }
        Err(UpstreamError {
            source_name: self.name(),
            message: format!(
                "chunk {} (offset {}, {} bytes): every source failed: {}",
                req.index,
                req.offset,
                req.len,
                failures.join("; ")
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_util::sync::CancellationToken;
    use virtman_nbd::{Export, Listener, MemExport, Server, ServerConfig};

    const CHUNK: u32 = 64 * 1024;

    fn image() -> Vec<u8> {
        (0..(1u32 << 20))
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect()
    }

    async fn serve(data: Vec<u8>, stop: &CancellationToken) -> String {
        let s = Server::new(ServerConfig::default());
        let e: Arc<dyn Export> = Arc::new(MemExport::new(data).read_only());
        s.add_export("img", e);
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(s.serve(Listener::Tcp(l), stop.clone()));
        addr
    }

    fn req(m: &Manifest, index: u64) -> ChunkRequest {
        ChunkRequest {
            image: m.id(),
            index,
            offset: m.chunk_offset(index),
            len: m.chunk_len(index),
        }
    }

    fn source(name: &str, addr: &str) -> Source {
        Source {
            name: name.into(),
            addr: addr.into(),
        }
    }

    #[tokio::test]
    async fn liars_and_dead_parents_are_skipped_and_reported() {
        let stop = CancellationToken::new();
        let data = image();
        let m = Arc::new(Manifest::of_bytes(&data, CHUNK).unwrap());
        let mut bad = data.clone();
        for b in bad.iter_mut().step_by(9973) {
            *b ^= 0x40;
        }
        let liar = serve(bad, &stop).await;
        let good = serve(data.clone(), &stop).await;
        let origin = serve(data.clone(), &stop).await;
        // A port nobody listens on.
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        let p = Parents::new(
            "img",
            Arc::clone(&m),
            vec![source("origin", &origin)],
            FetchConfig::default(),
            tx,
        );
        p.set(vec![
            source("dead", &dead),
            source("liar", &liar),
            source("good", &good),
        ]);
        for i in 0..m.chunks() {
            let got = p.fetch(req(&m, i)).await.unwrap();
            let start = m.chunk_offset(i) as usize;
            assert_eq!(&got[..], &data[start..start + got.len()], "chunk {i}");
        }
        let mut faults = Vec::new();
        while let Ok(r) = rx.try_recv() {
            faults.push((r.parent.name, r.fault == Fault::Lied));
        }
        assert!(faults.contains(&("dead".to_string(), false)), "{faults:?}");
        assert!(faults.contains(&("liar".to_string(), true)), "{faults:?}");
        // The liar was dropped after its first lie; the good parent served the rest.
        assert_eq!(faults.iter().filter(|f| f.0 == "liar").count(), 1);
        assert_eq!(p.stats().from_origins.load(Ordering::Relaxed), 0);
        assert_eq!(p.stats().from_parents.load(Ordering::Relaxed), m.chunks());
        stop.cancel();
    }

    #[tokio::test]
    async fn origin_is_the_last_resort_and_all_dead_is_a_clear_error() {
        let stop = CancellationToken::new();
        let data = image();
        let m = Arc::new(Manifest::of_bytes(&data, CHUNK).unwrap());
        let origin_stop = CancellationToken::new();
        let origin = serve(data.clone(), &origin_stop).await;
        let (tx, _rx) = mpsc::unbounded_channel();
        let p = Parents::new(
            "img",
            Arc::clone(&m),
            vec![source("origin", &origin)],
            FetchConfig::default(),
            tx,
        );
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        p.set(vec![source("gone", &dead)]);
        let got = p.fetch(req(&m, 3)).await.unwrap();
        assert!(m.verify_chunk(3, &got));
        assert_eq!(p.stats().from_origins.load(Ordering::Relaxed), 1);
        origin_stop.cancel();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let err = p.fetch(req(&m, 4)).await.unwrap_err().to_string();
        assert!(
            err.contains("every source failed") && err.contains("gone") && err.contains("origin"),
            "{err}"
        );
        stop.cancel();
    }

    #[tokio::test]
    async fn set_keeps_connections_of_parents_that_stay() {
        let stop = CancellationToken::new();
        let data = image();
        let m = Arc::new(Manifest::of_bytes(&data, CHUNK).unwrap());
        let a = serve(data.clone(), &stop).await;
        let b = serve(data.clone(), &stop).await;
        let (tx, _rx) = mpsc::unbounded_channel();
        let p = Parents::new("img", Arc::clone(&m), vec![], FetchConfig::default(), tx);
        p.set(vec![source("a", &a)]);
        p.fetch(req(&m, 0)).await.unwrap();
        p.set(vec![source("b", &b), source("a", &a)]);
        assert_eq!(p.current(), vec![source("b", &b), source("a", &a)]);
        p.fetch(req(&m, 1)).await.unwrap();
        let bytes: Vec<u64> = p.bytes_by_source().into_iter().map(|x| x.2).collect();
        // "a" kept its counter (same connection object); "b" served the new fetch.
        assert_eq!(bytes, vec![u64::from(CHUNK), u64::from(CHUNK)]);
        stop.cancel();
    }
}
