//! Prefetch: fetching chunks before the VMs ask for them, behind demand reads.
//!
//! ```text
//!  ensure_image ─► task: profile/IMAGE from parents … origins (absent: done)
//!                          │ BootProfile (checked against the manifest)
//!                          ▼
//!                  fetch_in_stripes: fetch_in_order(chunks in boot order),
//!                    one lane per stripe of a striped image
//!                    skip present / all-zero chunks
//!                    skip chunks being fetched (ahead of the readers)
//!                    wait while demand reads wait on chunks not in the profile
//!                    at most `in_flight` chunks at once (shared by the lanes)
//!                    CachedVolume::prefetch (single flight with demand reads)
//!  pin_image ────► task: every missing chunk (in stripe lanes), pass after pass, until complete
//! ```
//!
//! Each host publishes the profile it recorded (or, until its VMs have
//! touched anything, the one it fetched) as the read-only NBD export
//! `profile/IMAGE` on its base server, so the profile travels down the tree
//! like the manifest does.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;
use virtman_cache::{BootProfile, CachedVolume, FetchClass};
use virtman_image::Manifest;

use virtman_nbd::ClientTls;

use crate::small_export::read_small_export;

/// The profile export's name for an image.
pub fn profile_export(image: &str) -> String {
    format!("profile/{image}")
}

/// Tunables of background prefetch.
#[derive(Clone, Debug)]
pub struct PrefetchConfig {
    /// Chunks a background prefetch has in flight at once, in all its
    /// lanes (small, so that the links stay free for demand misses).
    pub in_flight: usize,
    /// How often a paused prefetch looks whether demand reads still wait.
    pub poll: Duration,
    /// Pause between passes of a pin whose last pass had failures.
    pub retry: Duration,
    /// Whether joining an image fetches and replays its boot profile.
    pub profile: bool,
    /// How many times a joining host looks for a profile (`retry` apart)
    /// before giving up: in a storm, the first hosts' VMs record theirs
    /// while the others are joining.
    pub profile_attempts: u32,
}

impl Default for PrefetchConfig {
    /// Four chunks in flight, shared by the stripes' lanes (a 256 KiB chunk
    /// takes ~2 ms at 1 Gbit/s; the replay no longer pauses for reads of
    /// the profile's own chunks, so these keep a link busy ahead of the
    /// VMs; more queued past the request timeout at 100 Mbit/s), a 5 ms
    /// poll, a 1 s retry, 5 looks for a profile.
    fn default() -> Self {
        PrefetchConfig {
            in_flight: 4,
            poll: Duration::from_millis(5),
            retry: Duration::from_secs(1),
            profile: true,
            profile_attempts: 5,
        }
    }
}

/// Prefetch state of one member image.
#[derive(Debug, Default)]
pub struct ImagePrefetch {
    /// Stops this image's prefetch tasks (eviction, shutdown).
    pub(crate) cancel: CancellationToken,
    /// Stops the profile replay and the pin only (a cancelled preheat); a
    /// child of `cancel`, replaced once used.
    background: Mutex<Option<CancellationToken>>,
    /// Its tasks, awaited before the volume is removed.
    pub(crate) tasks: TaskTracker,
    /// The profile fetched from a parent or origin, if any.
    inherited: Mutex<Option<Arc<BootProfile>>>,
    /// What `profile/IMAGE` currently holds: (own recording?, entries).
    published: Mutex<Option<(bool, u64)>>,
    /// Chunks in the fetched profile.
    profile_chunks: AtomicU64,
    /// The profile replay finished (or there was none).
    profile_done: AtomicBool,
    /// A pin was requested.
    pinned: AtomicBool,
    /// The pin finished: every chunk is present.
    pin_done: AtomicBool,
    /// A preheat runs: the replay and the pin fetch as preheat.
    preheat: AtomicBool,
}

/// What the status shows of an image's prefetch.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PrefetchStatus {
    /// Chunks in the boot profile fetched at join (0: none found).
    pub profile_chunks: u64,
    /// Whether the profile replay has finished.
    pub profile_done: bool,
    /// Chunks recorded in this host's own boot profile.
    pub recorded_chunks: u64,
    /// Chunks fetched by prefetch (profile, pin, CMD_CACHE hints).
    pub prefetched_chunks: u64,
    /// Bytes of those.
    pub prefetched_bytes: u64,
    /// Whether `image pin` was asked for.
    pub pinned: bool,
    /// Whether the pin is complete (the host no longer needs its parents).
    pub pin_done: bool,
}

impl ImagePrefetch {
    /// The status of this image's prefetch over `volume`.
    pub fn status(&self, volume: &CachedVolume) -> PrefetchStatus {
        let s = volume.stats();
        PrefetchStatus {
            profile_chunks: self.profile_chunks.load(Ordering::Relaxed),
            profile_done: self.profile_done.load(Ordering::Relaxed),
            recorded_chunks: volume.boot_profile_len(),
            prefetched_chunks: s.prefetched_chunks.load(Ordering::Relaxed),
            prefetched_bytes: s.prefetched_bytes.load(Ordering::Relaxed),
            pinned: self.pinned.load(Ordering::Relaxed),
            pin_done: self.pin_done.load(Ordering::Relaxed),
        }
    }

    /// The profile to publish, if it changed since the last call: the own
    /// recording once it has entries, else the inherited one.
    pub(crate) fn to_publish(&self, volume: &CachedVolume) -> Option<BootProfile> {
        let own = volume.boot_profile_len();
        let inherited = self
            .inherited
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let (key, profile) = if own > 0 {
            ((true, own), None)
        } else {
            match inherited {
                Some(p) => ((false, p.entries.len() as u64), Some(p)),
                None => return None,
            }
        };
        let mut published = self.published.lock().unwrap_or_else(|p| p.into_inner());
        if *published == Some(key) {
            return None;
        }
        *published = Some(key);
        Some(match profile {
            Some(p) => (*p).clone(),
            None => volume.boot_profile(),
        })
    }

    /// Whether the replay and the pin fetch for a preheat.
    pub(crate) fn set_preheat(&self, on: bool) {
        self.preheat.store(on, Ordering::Relaxed);
    }

    /// What the replay and the pin fetch as.
    fn class(&self) -> FetchClass {
        if self.preheat.load(Ordering::Relaxed) {
            FetchClass::Preheat
        } else {
            FetchClass::Prefetch
        }
    }

    /// The token the profile replay and the pin stop on.
    pub(crate) fn background(&self) -> CancellationToken {
        self.background
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(|| self.cancel.child_token())
            .clone()
    }

    /// Stops the profile replay and the pin running now (demand reads and
    /// hints go on; a later pin starts afresh).
    pub(crate) fn stop_background(&self) {
        if let Some(t) = self
            .background
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            t.cancel();
        }
        if !self.pin_done.load(Ordering::Relaxed) {
            self.pinned.store(false, Ordering::Release);
        }
        self.profile_done.store(true, Ordering::Relaxed);
    }

    /// Marks a pin as asked for; returns whether it was not already.
    pub(crate) fn start_pin(&self) -> bool {
        !self.pinned.swap(true, Ordering::AcqRel)
    }

    /// Stops the tasks and waits for them.
    pub(crate) async fn stop(&self) {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// Reads `profile/IMAGE` from the first source that has a valid one.
/// Sources without one (or unreachable) are skipped: no profile is normal.
pub async fn fetch_profile(
    image: &str,
    manifest: &Manifest,
    sources: &[String],
    tls: Option<&ClientTls>,
) -> Option<BootProfile> {
    for addr in sources {
        let got = async {
            let (path, bytes) = read_small_export(addr, &profile_export(image), tls).await?;
            BootProfile::decode(&path, &bytes, manifest).map_err(|e| e.to_string())
        }
        .await;
        match got {
            Ok(p) if !p.is_empty() => return Some(p),
            Ok(_) => debug!(image, %addr, "empty boot profile"),
            Err(e) => debug!(image, %addr, error = %e, "no boot profile"),
        }
    }
    None
}

/// Fetches the missing chunks among `chunks`, in order, at most
/// `cfg.in_flight` at once, pausing while demand reads wait on chunks not
/// expected ([`CachedVolume::expect`]; all of them when nothing is), and
/// passing over chunks being fetched already. Returns the chunks whose
/// fetch (by this call) failed; stops early (returning nothing more) when
/// `cancel` fires.
pub async fn fetch_in_order(
    volume: &Arc<CachedVolume>,
    chunks: impl IntoIterator<Item = u64>,
    cfg: &PrefetchConfig,
    cancel: &CancellationToken,
    class: FetchClass,
) -> Vec<u64> {
    let m = volume.manifest();
    let mut set = tokio::task::JoinSet::new();
    let mut failed = Vec::new();
    let reap = |r: Result<(u64, bool), tokio::task::JoinError>, failed: &mut Vec<u64>| {
        if let Ok((i, false)) = r {
            failed.push(i);
        }
    };
    for i in chunks {
        // Present, all zero, or being fetched already (for a VM's read or a
        // child): the replay moves on ahead of the readers.
        if i >= m.chunks() || volume.is_present(i) || m.is_zero_chunk(i) || volume.is_fetching(i) {
            continue;
        }
        while volume.demand_unexpected() > 0 || set.len() >= cfg.in_flight.max(1) {
            if cancel.is_cancelled() {
                set.abort_all();
                return failed;
            }
            if set.len() >= cfg.in_flight.max(1) {
                if let Some(r) = set.join_next().await {
                    reap(r, &mut failed);
                }
            } else {
                tokio::select! {
                    () = cancel.cancelled() => {}
                    () = tokio::time::sleep(cfg.poll) => {}
                }
            }
        }
        if cancel.is_cancelled() {
            break;
        }
        let v = Arc::clone(volume);
        let (offset, len) = (m.chunk_offset(i), u64::from(m.chunk_len(i)));
        set.spawn(async move {
            match v.prefetch_as(offset, len, class).await {
                Ok(()) => (i, true),
                Err(e) => {
                    debug!(volume = v.name(), chunk = i, error = %e, "prefetch failed");
                    (i, false)
                }
            }
        });
    }
    while let Some(r) = set.join_next().await {
        reap(r, &mut failed);
    }
    failed
}

/// Chunks in flight in each of `stripes` lanes: the host's `in_flight`
/// shared out, at least one each.
pub fn lane_in_flight(in_flight: usize, stripes: u32) -> usize {
    (in_flight / stripes.max(1) as usize).max(1)
}

/// [`fetch_in_order`] in one lane per stripe of a striped image (chunk i in
/// stripe i mod S), each lane its stripe's chunks in order with its share
/// of `in_flight` ([`lane_in_flight`]): a stripe whose relay is slow does
/// not hold the others back, and a relay's own stripe, which its children
/// wait on, does not wait on the stripes it only receives; the host's
/// requests stay about as many as with one lane (on a 100 Mbit/s storm of
/// 4 stripes, two per lane queued past the request timeout). One stripe is
/// [`fetch_in_order`].
pub async fn fetch_in_stripes(
    volume: &Arc<CachedVolume>,
    chunks: impl IntoIterator<Item = u64>,
    stripes: u32,
    cfg: &PrefetchConfig,
    cancel: &CancellationToken,
    class: FetchClass,
) -> Vec<u64> {
    if stripes <= 1 {
        return fetch_in_order(volume, chunks, cfg, cancel, class).await;
    }
    let mut lanes = vec![Vec::new(); stripes as usize];
    for i in chunks {
        lanes[virtman_topology::stripe_of(i, stripes) as usize].push(i);
    }
    let cfg = PrefetchConfig {
        in_flight: lane_in_flight(cfg.in_flight, stripes),
        ..cfg.clone()
    };
    let mut set = tokio::task::JoinSet::new();
    for lane in lanes {
        let (v, cfg, cancel) = (Arc::clone(volume), cfg.clone(), cancel.clone());
        set.spawn(async move { fetch_in_order(&v, lane, &cfg, &cancel, class).await });
    }
    let mut failed = Vec::new();
    while let Some(r) = set.join_next().await {
        failed.extend(r.unwrap_or_default());
    }
    failed.sort_unstable();
    failed
}

/// Where to look for a profile: the parents, then a few other members of
/// the session (shallowest first: a host at depth 1 has only the origin as
/// parent, which records no boots), then the origins.
pub(crate) struct ProfileSources {
    /// Parent addresses, in the coordinator's order.
    pub parents: Vec<String>,
    /// Origin addresses.
    pub origins: Vec<String>,
    /// This node's name (not asked).
    pub me: String,
    /// For the session's member list.
    pub coord: virtman_coordinator::Client,
    /// TLS to the sources.
    pub tls: Option<ClientTls>,
}

/// How many other members are asked for a profile.
const OTHER_MEMBERS: usize = 4;

impl ProfileSources {
    async fn list(&self, image: &str) -> Vec<String> {
        let mut out = self.parents.clone();
        if let Ok(tree) = self.coord.tree(image).await {
            let mut others: Vec<_> = tree
                .nodes
                .into_iter()
                .filter(|n| !n.origin && n.node != self.me && !out.contains(&n.addr))
                .collect();
            others.sort_by_key(|n| n.depth);
            out.extend(others.into_iter().take(OTHER_MEMBERS).map(|n| n.addr));
        }
        out.extend(self.origins.iter().cloned());
        out
    }
}

/// Replays the image's boot profile: fetches it from `sources`, then its
/// chunks in order. Runs as a background task of `ensure_image`.
pub(crate) async fn replay_profile(
    image: String,
    volume: Arc<CachedVolume>,
    state: Arc<ImagePrefetch>,
    sources: ProfileSources,
    cfg: PrefetchConfig,
    stripes: u32,
) {
    let look = async {
        for attempt in 1..=cfg.profile_attempts.max(1) {
            let list = sources.list(&image).await;
            if let Some(p) =
                fetch_profile(&image, volume.manifest(), &list, sources.tls.as_ref()).await
            {
                return Some(p);
            }
            // The host's own VMs are booting or it is complete: too late.
            if attempt == cfg.profile_attempts.max(1)
                || volume.boot_profile_len() > 0
                || volume.present_chunks() >= volume.manifest().chunks()
            {
                break;
            }
            tokio::time::sleep(cfg.retry).await;
        }
        None
    };
    let cancel = state.background();
    let profile = tokio::select! {
        p = look => p,
        () = cancel.cancelled() => None,
    };
    if let Some(p) = profile {
        let p = Arc::new(p);
        state
            .profile_chunks
            .store(p.entries.len() as u64, Ordering::Relaxed);
        *state.inherited.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::clone(&p));
        debug!(
            image,
            chunks = p.entries.len(),
            "replaying the boot profile"
        );
        // The VMs' and children's reads of these do not pause the replay.
        let _expecting = volume.expect(p.chunks());
        let failed =
            fetch_in_stripes(&volume, p.chunks(), stripes, &cfg, &cancel, state.class()).await;
        if !failed.is_empty() {
            debug!(
                image,
                failed = failed.len(),
                "some profile chunks were not prefetched"
            );
        }
    }
    state.profile_done.store(true, Ordering::Relaxed);
}

/// Fetches every missing chunk, pass after pass, until the volume is
/// complete or `cancel` fires; with `stripes` > 1 in one lane per stripe
/// ([`fetch_in_stripes`]), so a slow stripe does not hold up the others.
pub(crate) async fn pin(
    image: String,
    volume: Arc<CachedVolume>,
    state: Arc<ImagePrefetch>,
    cfg: PrefetchConfig,
    stripes: u32,
) {
    let cancel = state.background();
    loop {
        let m = volume.manifest();
        let missing: Vec<u64> = (0..m.chunks())
            .filter(|&i| !volume.is_present(i) && !m.is_zero_chunk(i))
            .collect();
        if missing.is_empty() {
            state.pin_done.store(true, Ordering::Relaxed);
            tracing::info!(image, "pinned: every chunk is on this host");
            return;
        }
        let failed =
            fetch_in_stripes(&volume, missing, stripes, &cfg, &cancel, state.class()).await;
        if cancel.is_cancelled() {
            return;
        }
        if failed.is_empty() && volume.is_complete() {
            continue;
        }
        // The next pass a `retry` later: for chunks whose fetch failed, and
        // for those passed over as being fetched by others (a pass every
        // poll would scan the whole image while such a fetch is slow).
        if !failed.is_empty() {
            debug!(
                image,
                failed = failed.len(),
                "pin pass incomplete; retrying"
            );
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(cfg.retry) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use async_trait::async_trait;
    use bytes::Bytes;
    use tokio::sync::Notify;
    use virtman_cache::{CacheGroup, ChunkRequest, GroupConfig, Upstream, UpstreamError};

    use super::*;

    const CHUNK: u32 = 64 * 1024;

    /// Serves even chunks at once and holds odd ones until `release`.
    struct OddsHeld {
        data: Vec<u8>,
        release: Notify,
    }

    #[async_trait]
    impl Upstream for OddsHeld {
        fn name(&self) -> String {
            "odds-held".into()
        }

        async fn fetch(&self, req: ChunkRequest) -> Result<Bytes, UpstreamError> {
            if req.index % 2 == 1 {
                self.release.notified().await;
            }
            let (o, n) = (req.offset as usize, req.len as usize);
            Ok(Bytes::copy_from_slice(&self.data[o..o + n]))
        }
    }

    /// A cache group and an image of 8 chunks (its bytes and manifest).
    fn eight_chunks() -> (tempfile::TempDir, CacheGroup, Vec<u8>, Manifest) {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..8 * CHUNK).map(|i| (i % 251 + 1) as u8).collect();
        let m = Manifest::of_bytes(&data, CHUNK).unwrap();
        let group = CacheGroup::open(dir.path(), GroupConfig::with_capacity(64 << 20)).unwrap();
        (dir, group, data, m)
    }

    /// Volume `name` of the image, its upstream an [`OddsHeld`].
    fn odds_held(
        group: &CacheGroup,
        name: &str,
        m: &Manifest,
        data: &[u8],
    ) -> (Arc<CachedVolume>, Arc<OddsHeld>) {
        let v = group.add_volume(name, m).unwrap();
        let up = Arc::new(OddsHeld {
            data: data.to_vec(),
            release: Notify::new(),
        });
        v.set_upstream(Some(Arc::clone(&up) as Arc<dyn Upstream>));
        (v, up)
    }

    fn present(v: &CachedVolume) -> BTreeSet<u64> {
        (0..v.manifest().chunks())
            .filter(|&i| v.is_present(i))
            .collect()
    }

    /// Lets held fetches of `up` go until `done`.
    async fn release_until(up: &OddsHeld, done: impl Fn() -> bool) {
        while !done() {
            up.release.notify_waiters();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits (10 s at most) until every chunk of `want` is present.
    async fn until_present(v: &CachedVolume, want: &BTreeSet<u64>) {
        for _ in 0..2000 {
            if want.is_subset(&present(v)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("chunks {want:?} not present 10 s on: {:?}", present(v));
    }

    #[tokio::test]
    async fn each_stripe_has_its_own_lane() {
        let (_dir, group, data, m) = eight_chunks();
        let cfg = PrefetchConfig {
            in_flight: 1,
            ..PrefetchConfig::default()
        };
        let cancel = CancellationToken::new();
        for (name, stripes) in [("one", 1u32), ("two", 2)] {
            let (v, up) = odds_held(&group, name, &m, &data);
            let run = {
                let (v, cfg, cancel) = (Arc::clone(&v), cfg.clone(), cancel.clone());
                tokio::spawn(async move {
                    fetch_in_stripes(&v, 0..8, stripes, &cfg, &cancel, FetchClass::Prefetch).await
                })
            };
            let even: BTreeSet<u64> = (0..8).step_by(2).collect();
            if stripes == 1 {
                // In one lane, chunk 1 held holds everything after it.
                until_present(&v, &BTreeSet::from([0])).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
                assert_eq!(present(&v), BTreeSet::from([0]));
            } else {
                // Stripe 0's lane went on while stripe 1's waited.
                until_present(&v, &even).await;
                assert_eq!(present(&v), even);
            }
            release_until(&up, || run.is_finished()).await;
            assert!(run.await.unwrap().is_empty());
            assert_eq!(present(&v).len(), 8);
        }
    }

    #[tokio::test]
    async fn a_pin_of_a_striped_image_has_a_lane_per_stripe() {
        let (_dir, group, data, m) = eight_chunks();
        let (v, up) = odds_held(&group, "pinned", &m, &data);
        let state = Arc::new(ImagePrefetch::default());
        let cfg = PrefetchConfig {
            in_flight: 1,
            ..PrefetchConfig::default()
        };
        let run = tokio::spawn(pin(
            "img".into(),
            Arc::clone(&v),
            Arc::clone(&state),
            cfg,
            2,
        ));
        // Stripe 0's lane goes on while stripe 1's waits on chunk 1.
        let even: BTreeSet<u64> = (0..8).step_by(2).collect();
        until_present(&v, &even).await;
        assert_eq!(present(&v), even);
        release_until(&up, || run.is_finished()).await;
        run.await.unwrap();
        assert_eq!(present(&v).len(), 8);
        assert!(state.pin_done.load(Ordering::Relaxed));
    }

    #[tokio::test]
    async fn readers_of_expected_chunks_do_not_pause_the_replay_others_do() {
        let (_dir, group, data, m) = eight_chunks();
        let cfg = PrefetchConfig {
            in_flight: 1,
            ..PrefetchConfig::default()
        };
        let cancel = CancellationToken::new();
        // (volume, the chunk a VM reads first (odd: held), the profile)
        for (name, read, profile) in [
            ("expected", 1u64, vec![1u64, 0, 2, 4, 6]),
            ("other", 3, vec![0, 2, 4, 6]),
        ] {
            let (v, up) = odds_held(&group, name, &m, &data);
            let reader = {
                let v = Arc::clone(&v);
                tokio::spawn(async move { v.read_bytes(read * u64::from(CHUNK), CHUNK).await })
            };
            while !v.is_fetching(read) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let expecting = v.expect(profile.iter().copied());
            let run = {
                let (v, cfg, cancel, p) =
                    (Arc::clone(&v), cfg.clone(), cancel.clone(), profile.clone());
                tokio::spawn(async move {
                    fetch_in_order(&v, p, &cfg, &cancel, FetchClass::Prefetch).await
                })
            };
            tokio::time::sleep(Duration::from_millis(300)).await;
            if name == "expected" {
                // The read waits on a profile chunk: the replay passed over
                // it (in flight) and went on.
                assert_eq!(v.demand_unexpected(), 0);
                assert_eq!(present(&v), BTreeSet::from([0, 2, 4, 6]));
            } else {
                // A read off the profile waits: the replay yields to it.
                assert_eq!(v.demand_unexpected(), 1);
                assert_eq!(present(&v), BTreeSet::new());
            }
            release_until(&up, || run.is_finished() && reader.is_finished()).await;
            assert!(run.await.unwrap().is_empty());
            reader.await.unwrap().unwrap();
            assert_eq!(present(&v), profile.iter().copied().chain([read]).collect());
            drop(expecting);
        }
    }
}
