//! Cost per event of the topology state machine at 10,000 nodes.
//!
//! A benchmark, not a test: it prints figures and asserts nothing about time.
//! Run with `cargo bench -p virtman-topology --bench events`.

#![allow(missing_docs, clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use virtman_topology::{NodeId, Progress, Session, Settings};

const NODES: u64 = 10_000;

fn report(what: &str, n: usize, elapsed: Duration) {
    let per = elapsed.as_nanos() / (n.max(1) as u128);
    println!("{what:<36} {n:>7} events {per:>9} ns/event");
}

fn build(settings: Settings) -> Session {
    let mut s = Session::new(settings, &[NodeId(0)]).unwrap();
    for i in 1..=NODES {
        let rack = format!("r{}", i % 40);
        s.join(NodeId(i), Some(&rack), Duration::ZERO).unwrap();
    }
    s
}

fn heartbeat_all(s: &mut Session, now: Duration, skip: &[u64]) -> usize {
    let mut n = 0;
    for i in 1..=NODES {
        if !skip.contains(&i) && s.contains(NodeId(i)) {
            let p = Progress {
                fraction: 0.5,
                complete: false,
            };
            black_box(s.heartbeat(NodeId(i), now, p).unwrap());
            n += 1;
        }
    }
    n
}

fn run(settings: Settings) {
    println!(
        "--- fan-out {} parents {}",
        settings.fanout, settings.parents
    );
    let t = Instant::now();
    let mut s = build(settings);
    report("join (0 -> 10k)", NODES as usize, t.elapsed());
    println!("depth {} (bound {})", s.max_depth(), s.depth_bound());

    let now = Duration::from_secs(1);
    let t = Instant::now();
    let n = heartbeat_all(&mut s, now, &[]);
    report("heartbeat", n, t.elapsed());

    let churn = 2_000u64;
    let t = Instant::now();
    for i in 0..churn {
        let id = NodeId(1 + (i * 7919) % NODES);
        s.leave(id, now).unwrap();
        s.join(id, Some("r0"), now).unwrap();
    }
    report("leave + rejoin at 10k", (churn * 2) as usize, t.elapsed());

    // 1,000 members go silent; one tick declares them all dead.
    let silent: Vec<u64> = (0..1_000u64).map(|i| 1 + (i * 104_729) % NODES).collect();
    let later = Duration::from_secs(3);
    heartbeat_all(&mut s, later, &silent);
    let before = s.stats().parent_changes;
    let t = Instant::now();
    let out = s.tick(now + settings.heartbeat_timeout + Duration::from_millis(1));
    report("death (one tick, per death)", out.dead.len(), t.elapsed());
    let changes = s.stats().parent_changes - before;
    println!(
        "{} deaths: {changes} parent-list changes ({:.2} per death) among {} members",
        out.dead.len(),
        changes as f64 / out.dead.len().max(1) as f64,
        s.members(),
    );
    println!(
        "depth {} (bound {}) after deaths",
        s.max_depth(),
        s.depth_bound()
    );
    s.check_invariants().unwrap();

    let t = Instant::now();
    let mut n = 0;
    for i in 1..=NODES {
        if let Some(parents) = s.parents(NodeId(i))
            && let Some(&p) = parents.first()
            && p != NodeId(0)
        {
            black_box(s.report_unreachable(NodeId(i), p, later).unwrap());
            n += 1;
            if n == 1_000 {
                break;
            }
        }
    }
    report("report unreachable", n, t.elapsed());

    let t = Instant::now();
    for i in 1..=1_000u64 {
        if s.contains(NodeId(i)) {
            let p = Progress {
                fraction: 1.0,
                complete: true,
            };
            s.heartbeat(NodeId(i), later, p).unwrap();
        }
    }
    report("complete -> root", 1_000, t.elapsed());
    s.check_invariants().unwrap();
}

fn main() {
    run(Settings::default());
    run(Settings {
        fanout: 10,
        parents: 3,
        ..Settings::default()
    });
}
