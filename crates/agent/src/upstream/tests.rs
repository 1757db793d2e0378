use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use virtman_cache::{ChunkRequest, Upstream};
use virtman_image::Manifest;
use virtman_nbd::{
    Capabilities, Export, ExportError, Listener, MemExport, ReadChunk, Server, ServerConfig,
};

use super::*;

/// Fetching without hedges: each source is waited on until it answers or
/// fails, so which source served what is deterministic; and without retries,
/// so a fetch that every source fails fails at once.
fn unhedged() -> FetchConfig {
    FetchConfig {
        hedge: None,
        retry_pauses: Vec::new(),
        ..FetchConfig::default()
    }
}

const CHUNK: u32 = 64 * 1024;

fn image() -> Vec<u8> {
    (0..(1u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

async fn serve(data: Vec<u8>, stop: &CancellationToken) -> String {
    serve_export(Arc::new(MemExport::new(data).read_only()), stop).await
}

async fn serve_export(e: Arc<dyn Export>, stop: &CancellationToken) -> String {
    let s = Server::new(ServerConfig::default());
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
        class: virtman_cache::FetchClass::Demand,
    }
}

fn source(name: &str, addr: &str) -> Source {
    Source {
        name: name.into(),
        addr: addr.into(),
    }
}

/// Fetching with hedges after exactly `d`.
fn hedged_after(d: Duration) -> FetchConfig {
    FetchConfig {
        hedge: Some(Hedge {
            floor: d,
            ceiling: d,
        }),
        ..FetchConfig::default()
    }
}

/// Starts fetches of `chunks` (modulo the image's count), `spacing` apart,
/// so that they overlap.
async fn start_fetches(
    p: &Arc<Parents>,
    m: &Manifest,
    chunks: std::ops::Range<u64>,
    spacing: Duration,
) -> tokio::task::JoinSet<bytes::Bytes> {
    let mut set = tokio::task::JoinSet::new();
    for i in chunks {
        let (p, r) = (Arc::clone(p), req(m, i % m.chunks()));
        set.spawn(async move { p.fetch(r).await.unwrap() });
        tokio::time::sleep(spacing).await;
    }
    set
}

/// Waits for every fetch of `set`.
async fn finish(mut set: tokio::task::JoinSet<bytes::Bytes>) {
    while let Some(r) = set.join_next().await {
        r.unwrap();
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
        unhedged(),
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
async fn bytes_from_a_parent_that_left_stay_counted() {
    let stop = CancellationToken::new();
    let data = image();
    let m = Arc::new(Manifest::of_bytes(&data, CHUNK).unwrap());
    let a = serve(data.clone(), &stop).await;
    let b = serve(data.clone(), &stop).await;
    let (tx, _rx) = mpsc::unbounded_channel();
    let p = Parents::new("img", Arc::clone(&m), vec![], unhedged(), tx);
    let total = |p: &Parents| p.bytes_by_source().iter().map(|x| x.2).sum::<u64>();
    p.set(vec![source("a", &a)]);
    p.fetch(req(&m, 0)).await.unwrap();
    let after_a = total(&p);
    assert_eq!(after_a, u64::from(m.chunk_len(0)));
    // a leaves, b comes: a's bytes stay in the sums.
    p.set(vec![source("b", &b)]);
    p.fetch(req(&m, 1)).await.unwrap();
    let by: Vec<(String, u64)> = p
        .bytes_by_source()
        .into_iter()
        .map(|x| (x.0, x.2))
        .collect();
    assert_eq!(
        by,
        vec![
            ("a".to_string(), u64::from(m.chunk_len(0))),
            ("b".to_string(), u64::from(m.chunk_len(1)))
        ]
    );
    // a back: its counter goes on from where it was.
    p.set(vec![source("a", &a)]);
    p.fetch(req(&m, 2)).await.unwrap();
    assert!(total(&p) > after_a + u64::from(m.chunk_len(1)));
    assert_eq!(p.bytes_by_source().len(), 2);
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
        unhedged(),
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
    let p = Parents::new("img", Arc::clone(&m), vec![], unhedged(), tx);
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

/// An export whose reads take `delay` each (a hung or slow parent), those
/// of the first chunk `first` (a parent whose queue holds one read long
/// while it answers the others).
struct Slow {
    inner: MemExport,
    delay: Duration,
    first: Duration,
}

#[async_trait]
impl Export for Slow {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadChunk>, ExportError> {
        let wait = if offset < u64::from(CHUNK) {
            self.first
        } else {
            self.delay
        };
        tokio::time::sleep(wait).await;
        self.inner.read(offset, len).await
    }
}

async fn slow_parent(data: Vec<u8>, delay: Duration, stop: &CancellationToken) -> String {
    let e = Slow {
        inner: MemExport::new(data).read_only(),
        delay,
        first: delay,
    };
    serve_export(Arc::new(e), stop).await
}

#[tokio::test]
async fn a_hung_parent_is_hedged_around_and_then_skipped() {
    let stop = CancellationToken::new();
    let data = image();
    let m = Arc::new(Manifest::of_bytes(&data, CHUNK).unwrap());
    let hung = slow_parent(data.clone(), Duration::from_secs(3600), &stop).await;
    let good = serve(data.clone(), &stop).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let config = FetchConfig {
        // Long enough that only a hedge explains a quick answer.
        request_timeout: Duration::from_secs(30),
        ..FetchConfig::default()
    };
    let ceiling = config.hedge.unwrap().ceiling;
    let p = Parents::new("img", Arc::clone(&m), vec![], config, tx);
    p.set(vec![source("hung", &hung), source("good", &good)]);
    let started = Instant::now();
    let got = p.fetch(req(&m, 0)).await.unwrap();
    let first = started.elapsed();
    assert!(m.verify_chunk(0, &got));
    // The ceiling (no latency known yet) plus connecting: far below a timeout.
    assert!(first < ceiling + Duration::from_millis(700), "{first:?}");
    assert_eq!(p.stats().hedges.load(Ordering::Relaxed), 1);
    assert_eq!(p.stats().hedge_wins.load(Ordering::Relaxed), 1);
    // Then the hung parent goes last: the next fetches do not wait on it.
    let started = Instant::now();
    for i in 1..8 {
        p.fetch(req(&m, i)).await.unwrap();
    }
    assert!(started.elapsed() < ceiling, "{:?}", started.elapsed());
    assert_eq!(p.stats().hedges.load(Ordering::Relaxed), 1);
    // Being slow is not a fault: nothing was reported.
    assert!(rx.try_recv().is_err());
    stop.cancel();
}

/// Parents of the test image: one parent answering every read `delay_ms`
/// late, then an origin answering at once; hedges after exactly `hedge_ms`.
async fn behind_a_slow_parent(
    delay_ms: u64,
    hedge_ms: u64,
    stop: &CancellationToken,
) -> (Arc<Parents>, Arc<Manifest>) {
    let data = image();
    let m = Arc::new(Manifest::of_bytes(&data, CHUNK).unwrap());
    let slow = slow_parent(data.clone(), Duration::from_millis(delay_ms), stop).await;
    let origin = serve(data, stop).await;
    let (tx, _rx) = mpsc::unbounded_channel();
    let p = Arc::new(Parents::new(
        "img",
        Arc::clone(&m),
        vec![source("origin", &origin)],
        hedged_after(Duration::from_millis(hedge_ms)),
        tx,
    ));
    p.set(vec![source("slow", &slow)]);
    (p, m)
}

#[tokio::test]
async fn hedges_stay_a_small_share_of_fetches_from_a_slow_parent() {
    let stop = CancellationToken::new();
    // Answers every read, 40 ms late; the origin answers at once.
    let (p, m) = behind_a_slow_parent(40, 5, &stop).await;
    let fetches = 100;
    for i in 0..fetches {
        let got = p.fetch(req(&m, i % m.chunks())).await.unwrap();
        assert!(m.verify_chunk(i % m.chunks(), &got));
    }
    let hedges = p.stats().hedges.load(Ordering::Relaxed);
    // The burst (20), then a tenth of a hedge per fetch.
    assert!(
        (20..=31).contains(&hedges),
        "{hedges} hedges in {fetches} fetches"
    );
    stop.cancel();
}

#[tokio::test]
async fn without_hedging_a_hung_parent_holds_the_fetch_until_its_timeout() {
    let stop = CancellationToken::new();
    let data = image();
    let m = Arc::new(Manifest::of_bytes(&data, CHUNK).unwrap());
    let hung = slow_parent(data.clone(), Duration::from_secs(3600), &stop).await;
    let good = serve(data.clone(), &stop).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let config = FetchConfig {
        request_timeout: Duration::from_millis(600),
        ..unhedged()
    };
    let p = Parents::new("img", Arc::clone(&m), vec![], config, tx);
    p.set(vec![source("hung", &hung), source("good", &good)]);
    let started = Instant::now();
    p.fetch(req(&m, 0)).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(600));
    // A timeout is a fault: reported, and the parent cools down.
    assert_eq!(rx.recv().await.unwrap().parent.name, "hung");
    stop.cancel();
}

#[tokio::test]
async fn a_fetch_every_source_fails_is_tried_again_before_it_fails() {
    let stop = CancellationToken::new();
    let data = image();
    let m = Arc::new(Manifest::of_bytes(&data, CHUNK).unwrap());
    // The origin's port, free for now: it comes up while the fetch retries.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = port.local_addr().unwrap().to_string();
    drop(port);
    let (tx, _rx) = mpsc::unbounded_channel();
    let config = FetchConfig {
        retry_pauses: vec![Duration::from_millis(300); 5],
        ..unhedged()
    };
    let p = Arc::new(Parents::new(
        "img",
        Arc::clone(&m),
        vec![source("origin", &addr)],
        config,
        tx,
    ));
    let fetch = tokio::spawn({
        let p = Arc::clone(&p);
        let r = req(&m, 2);
        async move { p.fetch(r).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let s = Server::new(ServerConfig::default());
    s.add_export(
        "img",
        Arc::new(MemExport::new(data.clone()).read_only()) as Arc<dyn Export>,
    );
    let l = tokio::net::TcpListener::bind(&addr).await.unwrap();
    tokio::spawn(s.serve(Listener::Tcp(l), stop.clone()));
    let got = fetch.await.unwrap().unwrap();
    assert!(m.verify_chunk(2, &got));
    stop.cancel();
}

#[tokio::test]
async fn with_stripes_a_chunk_comes_from_its_stripes_parents_only() {
    let stop = CancellationToken::new();
    let data = image();
    let m = Arc::new(Manifest::of_bytes(&data, CHUNK).unwrap());
    let a = serve(data.clone(), &stop).await;
    let b = serve(data.clone(), &stop).await;
    let origin = serve(data.clone(), &stop).await;
    let (tx, _rx) = mpsc::unbounded_channel();
    let p = Parents::new(
        "img",
        Arc::clone(&m),
        vec![source("origin:0", &origin)],
        unhedged(),
        tx,
    );
    // a relays even chunks, b odd ones.
    p.set_striped(
        vec![source("a", &a), source("b", &b)],
        vec![vec![source("a", &a)], vec![source("b", &b)]],
    );
    assert_eq!(p.stripe_count(), 2);
    for i in 0..8 {
        p.fetch(req(&m, i)).await.unwrap();
    }
    let by = |name: &str| {
        p.bytes_by_source()
            .into_iter()
            .find(|x| x.0 == name)
            .map_or(0, |x| x.2)
    };
    let even: u64 = (0..8).step_by(2).map(|i| u64::from(m.chunk_len(i))).sum();
    let odd: u64 = (1..8).step_by(2).map(|i| u64::from(m.chunk_len(i))).sum();
    assert_eq!((by("a"), by("b"), by("origin:0")), (even, odd, 0));
    assert_eq!(
        p.chunks_by_stripe(),
        vec![("a".to_string(), 0, 4), ("b".to_string(), 1, 4)]
    );
    // A stripe with no parent left goes to the origins, never to the other
    // stripe's parents.
    p.set_striped(
        vec![source("a", &a)],
        vec![vec![source("a", &a)], Vec::new()],
    );
    p.fetch(req(&m, 9)).await.unwrap();
    assert_eq!(by("b"), odd);
    assert_eq!(by("origin:0"), u64::from(m.chunk_len(9)));
    // A plain list is one tree again: every chunk from the parents.
    p.set(vec![source("b", &b)]);
    assert_eq!(p.stripe_count(), 1);
    p.fetch(req(&m, 10)).await.unwrap();
    assert_eq!(by("b"), odd + u64::from(m.chunk_len(10)));
    stop.cancel();
}

/// Chunks each source served, by name, after fetching `n` chunks that
/// overlap (each started 20 ms after the last, every source answering
/// 300 ms late), with `busy_at`.
async fn overlapping_fetches(n: u64, busy_at: usize) -> Vec<(String, u64)> {
    let stop = CancellationToken::new();
    let data = image();
    let m = Arc::new(Manifest::of_bytes(&data, CHUNK).unwrap());
    let first = slow_parent(data.clone(), Duration::from_millis(300), &stop).await;
    let second = slow_parent(data.clone(), Duration::from_millis(300), &stop).await;
    let (tx, _rx) = mpsc::unbounded_channel();
    let config = FetchConfig {
        busy_at,
        ..unhedged()
    };
    let p = Arc::new(Parents::new("img", Arc::clone(&m), vec![], config, tx));
    p.set(vec![source("first", &first), source("second", &second)]);
    finish(start_fetches(&p, &m, 0..n, Duration::from_millis(20)).await).await;
    stop.cancel();
    let chunk = u64::from(m.chunk_len(0));
    p.bytes_by_source()
        .into_iter()
        .filter(|s| s.2 > 0)
        .map(|(name, _, bytes)| (name, bytes / chunk))
        .collect()
}

#[tokio::test]
async fn the_first_parent_takes_fetches_until_it_is_busy() {
    // Below busy_at the coordinator's order holds: the first parent (the
    // primary) takes them all, the second (a secondary) none.
    let got = overlapping_fetches(4, 4).await;
    assert_eq!(got, vec![("first".to_string(), 4)], "{got:?}");
    // Busy at 2: the third and fourth go to the second parent.
    let got = overlapping_fetches(4, 2).await;
    assert_eq!(
        got,
        vec![("first".to_string(), 2), ("second".to_string(), 2)],
        "{got:?}"
    );
}

#[tokio::test]
async fn a_busy_parent_is_not_hedged_to_the_origin() {
    let stop = CancellationToken::new();
    // Answers every read 60 ms late, many at once: once fetches overlap, it
    // answers one every few ms. The origin answers at once.
    let (p, m) = behind_a_slow_parent(60, 20, &stop).await;
    finish(start_fetches(&p, &m, 0..80, Duration::from_millis(5)).await).await;
    // Only the fetches of the first 60 ms (nothing answered yet: the parent
    // may be hung) went to the origin too; the budget would have allowed
    // 28 (a burst of 20 and a tenth per fetch).
    let from_origins = p.stats().from_origins.load(Ordering::Relaxed);
    let hedges = p.stats().hedges.load(Ordering::Relaxed);
    assert!(
        hedges <= 14,
        "{hedges} hedges, {from_origins} from the origin"
    );
    assert!(hedges > 0, "the first fetches are hedged");
    stop.cancel();
}

/// Fetches chunk 0 from a parent that takes `stuck` over it (20 ms over
/// any other), with the origin behind, while other chunks are fetched one
/// after another from the same parent when `busy`. Returns how long chunk
/// 0 took, whether it came from the origin, and the parents reported.
async fn fetch_stuck_chunk(
    stuck: Duration,
    config: FetchConfig,
    busy: bool,
) -> (Duration, bool, Vec<String>) {
    let stop = CancellationToken::new();
    let data = image();
    let m = Arc::new(Manifest::of_bytes(&data, CHUNK).unwrap());
    let e = Slow {
        inner: MemExport::new(data.clone()).read_only(),
        delay: Duration::from_millis(20),
        first: stuck,
    };
    let parent = serve_export(Arc::new(e), &stop).await;
    let origin = serve(data, &stop).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let p = Arc::new(Parents::new(
        "img",
        Arc::clone(&m),
        vec![source("origin", &origin)],
        config,
        tx,
    ));
    p.set(vec![source("parent", &parent)]);
    let started = Instant::now();
    let first = tokio::spawn({
        let (p, r) = (Arc::clone(&p), req(&m, 0));
        async move { p.fetch(r).await.unwrap() }
    });
    let mut i = 1;
    while busy && !first.is_finished() {
        p.fetch(req(&m, i)).await.unwrap();
        i = i % (m.chunks() - 1) + 1;
    }
    let got = first.await.unwrap();
    let took = started.elapsed();
    assert!(m.verify_chunk(0, &got));
    let from_origin = p.stats().from_origins.load(Ordering::Relaxed) > 0;
    let mut reported = Vec::new();
    while let Ok(r) = rx.try_recv() {
        reported.push(r.parent.name);
    }
    stop.cancel();
    (took, from_origin, reported)
}

#[tokio::test]
async fn a_parent_busy_answering_others_is_waited_on_past_the_request_timeout() {
    let config = || FetchConfig {
        request_timeout: Duration::from_millis(400),
        ..unhedged()
    };
    let stuck = Duration::from_millis(1500);
    // It answers the other reads meanwhile: busy, so the read waits for it.
    let (took, from_origin, reported) = fetch_stuck_chunk(stuck, config(), true).await;
    assert!(took >= stuck, "{took:?}");
    assert!(!from_origin, "a busy parent is not failed over");
    assert!(reported.is_empty(), "{reported:?}");
    // Silent meanwhile (nothing else asked): hung, failed over at the timeout.
    let (took, from_origin, reported) = fetch_stuck_chunk(stuck, config(), false).await;
    assert!(took < stuck, "{took:?}");
    assert!(from_origin);
    assert_eq!(reported, ["parent"]);
}

#[tokio::test]
async fn a_parent_answering_all_but_one_read_fails_it_at_the_deadline() {
    let config = FetchConfig {
        request_timeout: Duration::from_millis(300),
        request_deadline: Duration::from_millis(1200),
        ..unhedged()
    };
    let (took, from_origin, reported) =
        fetch_stuck_chunk(Duration::from_secs(3600), config, true).await;
    assert!(took >= Duration::from_millis(1200), "{took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert!(from_origin);
    assert_eq!(reported, ["parent"]);
}

#[tokio::test]
async fn hedges_to_the_origin_wait_while_it_has_this_hosts_requests() {
    let stop = CancellationToken::new();
    let data = image();
    let m = Arc::new(Manifest::of_bytes(&data, CHUNK).unwrap());
    // A parent silent for 400 ms (as a relay whose own parents are still
    // filling the pipeline), and an origin 100 ms away.
    let parent = slow_parent(data.clone(), Duration::from_millis(400), &stop).await;
    let origin = slow_parent(data, Duration::from_millis(100), &stop).await;
    let (tx, _rx) = mpsc::unbounded_channel();
    let config = hedged_after(Duration::from_millis(20));
    let limit = config.origin_hedges as u64;
    let p = Arc::new(Parents::new(
        "img",
        Arc::clone(&m),
        vec![source("origin", &origin)],
        config,
        tx,
    ));
    p.set(vec![source("parent", &parent)]);
    finish(start_fetches(&p, &m, 0..m.chunks(), Duration::ZERO).await).await;
    // The budget alone allowed a burst of 20: at most `limit` at a time,
    // 100 ms each, go to the origin in the parent's 400 ms.
    let hedges = p.stats().hedges.load(Ordering::Relaxed);
    assert!(hedges > 0, "a silent parent is hedged around");
    assert!(hedges <= limit * 5, "{hedges} hedges to the origin");
    stop.cancel();
}

#[tokio::test]
async fn a_busy_parent_is_still_hedged_to_another_parent() {
    let stop = CancellationToken::new();
    let data = image();
    let m = Arc::new(Manifest::of_bytes(&data, CHUNK).unwrap());
    // The first parent answers every read 60 ms late, many at once; the
    // second parent and the origin at once.
    let slow = slow_parent(data.clone(), Duration::from_millis(60), &stop).await;
    let other = serve(data.clone(), &stop).await;
    let origin = serve(data, &stop).await;
    let (tx, _rx) = mpsc::unbounded_channel();
    let config = FetchConfig {
        // The first parent stays first however many reads it holds.
        busy_at: usize::MAX,
        ..hedged_after(Duration::from_millis(20))
    };
    // No other source at first: nothing to hedge to, so the parent is
    // not put behind others for losing a hedge.
    let p = Arc::new(Parents::new("img", Arc::clone(&m), vec![], config, tx));
    let spaced = Duration::from_millis(5);
    // Alone, it gets busy: answering one read every few ms.
    p.set(vec![source("slow", &slow)]);
    let first = start_fetches(&p, &m, 0..20, spaced).await;
    let (hedges, from_origins) = (
        p.stats().hedges.load(Ordering::Relaxed),
        p.stats().from_origins.load(Ordering::Relaxed),
    );
    // A second parent and the origin come while it is busy: fetches are
    // hedged to the parent (and win), never to the origin.
    p.set_origins(vec![source("origin", &origin)]);
    p.set(vec![source("slow", &slow), source("other", &other)]);
    let second = start_fetches(&p, &m, 20..40, spaced).await;
    finish(first).await;
    finish(second).await;
    assert!(p.stats().hedges.load(Ordering::Relaxed) > hedges);
    assert!(p.stats().hedge_wins.load(Ordering::Relaxed) > 0);
    // (A third ask, of the origin, is possible only in a moment when the
    // busy parent answered nothing for a hedge delay: rare, and under load.)
    let extra = p.stats().from_origins.load(Ordering::Relaxed) - from_origins;
    assert!(extra <= 2, "{extra} chunks from the origin");
    stop.cancel();
}
