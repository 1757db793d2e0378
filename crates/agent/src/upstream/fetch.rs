//! One fetch: attempts at sources in order, a failure moving on at once, a
//! source that has not answered within the hedge delay joined by the next.
//!
//! ```text
//!   candidates ─► attempt 1 (task) ──────── answer ─► verified? first wins
//!                  │ hedge delay, no answer         failed? ─► next source at once
//!                  └► attempt 2 (task) ── ...
//!   losers finish on their own (cooled down meanwhile: new fetches skip them)
//! ```
//!
//! Each attempt runs in its own task: a winner never cancels a request half
//! written on another connection, and a loser that times out still cools its
//! source down and reports it. The delay adapts to the fetch latency seen
//! (`srtt + 4 rttvar`, between [`Hedge::floor`] and [`Hedge::ceiling`]; the
//! ceiling until a first answer, when connections are still being made).
//! Hedges spend a budget earned at a tenth of a hedge per fetch (burst 20),
//! so a slow tree does not double its load; a fetch whose sources are all
//! known to be failing (cooling down) moves on without spending it. A
//! source that answered other requests since it was asked (and within the
//! last hedge delay) is busy, not hung: a hedge around it goes to another
//! parent, never to an origin (a storm on the machine sent 3x the working
//! set from the origin so). Nor does a hedge go to an origin that already
//! has [`super::FetchConfig::origin_hedges`] of this host's requests.
//! A source is failed when it answers none of this image's requests for
//! the request timeout; one that answers others is waited on, up to the
//! request deadline.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;
use virtman_cache::{ChunkRequest, Upstream, UpstreamError};
use virtman_nbd::ClientError;
use virtman_nbd::client::RequestFailure;
use virtman_nbd::proto::Errno;

use super::conn::Conn;
use super::{Fault, Hedge, Parents, Shared};

/// Hedges earned per fetch.
const EARN: f64 = 0.1;
/// Hedges that can be saved up.
const BURST: f64 = 20.0;
/// How long a source that lost to a hedge is put behind the others.
const SLOW_COOL_DOWN: Duration = Duration::from_secs(1);
/// The most sources one fetch asks at once.
const MAX_ASKED: usize = 3;

/// The hedge delay estimate and budget of one volume.
pub(super) struct Hedging {
    hedge: Option<Hedge>,
    state: Mutex<Estimate>,
}

struct Estimate {
    /// Smoothed latency and its mean deviation, seconds (none yet: no answer).
    srtt: Option<f64>,
    rttvar: f64,
    tokens: f64,
}

impl Hedging {
    pub(super) fn new(hedge: Option<Hedge>) -> Hedging {
        Hedging {
            hedge,
            state: Mutex::new(Estimate {
                srtt: None,
                rttvar: 0.0,
                tokens: BURST,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Estimate> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long to wait on a source before asking the next one too; `None`
    /// without hedging.
    pub(super) fn delay(&self) -> Option<Duration> {
        let h = self.hedge?;
        let s = self.state();
        let Some(srtt) = s.srtt else {
            return Some(h.ceiling);
        };
        let d = Duration::try_from_secs_f64(srtt + 4.0 * s.rttvar).unwrap_or(h.ceiling);
        Some(d.clamp(h.floor, h.ceiling))
    }

    /// An answer took `took`.
    fn observe(&self, took: Duration) {
        let r = took.as_secs_f64();
        let mut s = self.state();
        match s.srtt {
            None => {
                s.srtt = Some(r);
                s.rttvar = r / 2.0;
            }
            Some(srtt) => {
                s.rttvar = 0.75 * s.rttvar + 0.25 * (srtt - r).abs();
                s.srtt = Some(0.875 * srtt + 0.125 * r);
            }
        }
    }

    fn earn(&self) {
        let mut s = self.state();
        s.tokens = (s.tokens + EARN).min(BURST);
    }

    fn spend(&self) -> bool {
        let mut s = self.state();
        if s.tokens >= 1.0 {
            s.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// How one attempt ended (its bookkeeping done).
enum Outcome {
    Data(Bytes),
    Failed(String),
    Lied,
    /// The source does not hold the chunk and would have asked this host
    /// for it ([`crate::loop_guard`]): not a fault, ask the next one.
    NotHere,
}

/// Whether `e` is a source's "not here" ([`crate::loop_guard::NOT_HERE`]).
fn not_here(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Request {
            failure: RequestFailure::Server {
                errno: Errno::NotSup,
                ..
            },
            ..
        }
    )
}

/// One request counted in its source's `outstanding` while this lives:
/// from when its attempt is launched (before it is paid for and before
/// connecting, so fetches deciding at the same instant see each other)
/// until answered, failed or dropped (a hedge won).
struct Outstanding(Arc<Conn>);

impl Outstanding {
    fn count(conn: &Arc<Conn>) -> Self {
        conn.outstanding.fetch_add(1, Ordering::Relaxed);
        Outstanding(Arc::clone(conn))
    }
}

impl Drop for Outstanding {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Reads the chunk from `conn` and checks it; on a failure cools the source
/// down, on a lie drops it, and reports either. Unless `paid`, first waits
/// for the chunk's bytes on the download cap.
async fn attempt(shared: Arc<Shared>, out: Outstanding, req: ChunkRequest, paid: bool) -> Outcome {
    let conn = Arc::clone(&out.0);
    if !paid {
        shared.pay(req).await;
    }
    let started = Instant::now();
    let result = async {
        let client = conn.client(&shared.image, &shared.config).await?;
        if !shared.config.link_delay.is_zero() {
            tokio::time::sleep(shared.config.link_delay).await;
        }
        let res = patiently(
            &conn,
            client.read(req.offset, u64::from(req.len)),
            shared.config.request_timeout,
            shared.config.request_deadline,
        )
        .await?;
        if res.as_ref().is_ok() || res.as_ref().is_err_and(not_here) {
            conn.mark_answered();
        }
        match res {
            Err(e) if not_here(&e) => Ok(None),
            r => r.map(Some).map_err(|e| e.to_string()),
        }
    }
    .await;
    // Answered or failed: no longer this source's load (the bookkeeping
    // below may wait on its connection lock).
    drop(out);
    match result {
        Ok(None) => Outcome::NotHere,
        Ok(Some(data)) if shared.manifest.verify_chunk(req.index, &data) => {
            shared.hedging.observe(started.elapsed());
            Outcome::Data(data)
        }
        Ok(Some(_)) => {
            tracing::warn!(image = %shared.image, parent = %conn.source.name,
                chunk = req.index, "parent sent a chunk that does not match the manifest; dropping it");
            shared.stats.lies.fetch_add(1, Ordering::Relaxed);
            if !conn.origin {
                conn.liar.store(true, Ordering::Relaxed);
            }
            conn.forget_client().await;
            shared.report(&conn, Fault::Lied);
            Outcome::Lied
        }
        Err(e) => {
            tracing::info!(image = %shared.image, parent = %conn.source.name,
                chunk = req.index, error = %e, "fetch failed; trying the next source");
            conn.cool(shared.config.cool_down);
            conn.forget_client().await;
            shared.report(&conn, Fault::Unreachable(e.clone()));
            Outcome::Failed(e)
        }
    }
}

/// Waits for `read`, failing it after `timeout` in which `conn` answered
/// nothing at all; each window in which it answered other requests (busy,
/// not hung: on a slow link a relay's queue can hold seconds of chunks)
/// extends the wait by another, up to `deadline` in all. (The client's own
/// request timeout, the deadline too, starts only once the request is
/// written, and `conn`'s answers may come on another of its connections.)
async fn patiently<T>(
    conn: &Conn,
    read: impl std::future::Future<Output = T>,
    timeout: Duration,
    deadline: Duration,
) -> Result<T, String> {
    tokio::pin!(read);
    let started = Instant::now();
    let hard = started + deadline.max(timeout);
    let mut window = started;
    loop {
        let until = (window + timeout).min(hard);
        match tokio::time::timeout_at(until.into(), &mut read).await {
            Ok(r) => return Ok(r),
            Err(_) if !conn.answered_since(window) => {
                return Err(format!(
                    "no answer to this or any other request within {timeout:?}"
                ));
            }
            Err(_) if until >= hard => {
                return Err(format!(
                    "no answer within the request deadline ({deadline:?}), though the source answered others"
                ));
            }
            Err(_) => window = Instant::now(),
        }
    }
}

impl Parents {
    /// Fetches one chunk: the first verified answer of any source.
    pub(super) async fn fetch_any(&self, req: ChunkRequest) -> Result<Bytes, UpstreamError> {
        let shared = &self.shared;
        let stats = &shared.stats;
        shared.hedging.earn();
        let mut next = self.candidates(req.index).into_iter().peekable();
        let (tx, mut rx) = mpsc::unbounded_channel::<(Arc<Conn>, bool, Outcome)>();
        let launch = |conn: &Arc<Conn>, hedge: bool, paid: bool| {
            let (shared, out, tx) = (Arc::clone(shared), Outstanding::count(conn), tx.clone());
            let conn = Arc::clone(conn);
            tokio::spawn(async move {
                let outcome = attempt(shared, out, req, paid).await;
                // The fetch may be over: a loser's answer goes nowhere.
                let _ = tx.send((conn, hedge, outcome));
            });
        };
        // The sources asked, and when.
        let mut running: Vec<(Arc<Conn>, Instant)> = Vec::new();
        let mut failures = Vec::new();
        if let Some(first) = next.next() {
            // Under a download cap, the hedge delay runs from when the
            // bytes may be asked for, not from the wait for them.
            shared.pay(req).await;
            launch(&first, false, true);
            running.push((first, Instant::now()));
        }
        let mut hedge_at = shared.hedging.delay().map(|d| Instant::now() + d);
        while !running.is_empty() {
            let timer = async {
                match hedge_at {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            let start = tokio::select! {
                Some((conn, hedged, outcome)) = rx.recv() => {
                    running.retain(|(c, _)| !Arc::ptr_eq(c, &conn));
                    match outcome {
                        Outcome::Data(data) => {
                            let n = data.len() as u64;
                            conn.bytes.fetch_add(n, Ordering::Relaxed);
                            stats.bytes.fetch_add(n, Ordering::Relaxed);
                            self.count_stripe(&conn.source.name, req.index);
                            let counter = match conn.origin {
                                true => &stats.from_origins,
                                false => &stats.from_parents,
                            };
                            counter.fetch_add(1, Ordering::Relaxed);
                            if hedged {
                                stats.hedge_wins.fetch_add(1, Ordering::Relaxed);
                            }
                            // Those still asked were slower: new fetches try
                            // others first for a while.
                            for (slow, _) in &running {
                                slow.mark_slow(SLOW_COOL_DOWN);
                            }
                            return Ok(data);
                        }
                        Outcome::Failed(e) => failures.push(format!("{}: {e}", conn.source.name)),
                        Outcome::Lied => failures.push(format!("{}: wrong bytes", conn.source.name)),
                        Outcome::NotHere => {
                            failures.push(format!("{}: not held there", conn.source.name));
                        }
                    }
                    // A failure moves on at once.
                    let c = next.next();
                    if c.is_some() {
                        stats.failovers.fetch_add(1, Ordering::Relaxed);
                    }
                    c.map(|c| (c, false))
                }
                () = timer => {
                    // Waiting on sources already known to be failing moves on
                    // without spending the budget.
                    let now = Instant::now();
                    let known_bad = running.iter().all(|(c, _)| c.cooling(now));
                    // A source that answered others since it was asked,
                    // within the last hedge delay, is busy, not hung: the
                    // origin is not asked around it (in a storm every host
                    // would pile onto the origin, which feeds them all),
                    // only other parents.
                    let recent = shared
                        .hedging
                        .delay()
                        .and_then(|d| now.checked_sub(d))
                        .unwrap_or(now);
                    let busy = running
                        .iter()
                        .any(|(c, at)| c.answered_since((*at).max(recent)));
                    let to_origin = next.peek().is_some_and(|c| c.origin);
                    let origin_full = next.peek().is_some_and(|c| {
                        c.outstanding.load(Ordering::Relaxed) >= shared.config.origin_hedges
                    });
                    let hedge = running.len() < MAX_ASKED
                        && next.len() > 0
                        && !(to_origin && (busy || origin_full) && !known_bad)
                        && (known_bad || shared.hedging.spend());
                    let c = hedge.then(|| next.next()).flatten();
                    if c.is_some() {
                        stats.hedges.fetch_add(1, Ordering::Relaxed);
                    }
                    c.map(|c| (c, true))
                }
            };
            let fired = hedge_at.is_some_and(|at| at <= Instant::now());
            let started = start.is_some();
            if let Some((conn, hedged)) = start {
                launch(&conn, hedged, false);
                running.push((conn, Instant::now()));
            }
            // The next hedge, if any source is left: a full delay after the
            // last attempt started, or after a hedge the budget refused.
            if next.len() == 0 {
                hedge_at = None;
            } else if started || fired {
                hedge_at = shared.hedging.delay().map(|d| Instant::now() + d);
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
