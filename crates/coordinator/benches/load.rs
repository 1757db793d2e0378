//! Joins and heartbeats per second the coordinator sustains, with its state
//! in redb and in etcd (a one-member etcd on loopback, started here), side
//! by side in one run.
//!
//! A benchmark, not a test: it prints figures and asserts nothing about time.
//! The coordinator runs on a current-thread runtime (one core); the load
//! comes from another runtime over loopback HTTP with `CONCURRENCY` requests
//! in flight, as 10,000 agents would send them. etcd shares the machine's
//! two cores with both.
//! Run with `cargo bench -p virtman-coordinator --bench load`.

#![allow(missing_docs, clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use virtman_coordinator::api::{HeartbeatRequest, JoinRequest, RegisterImage, SessionBeat};
use virtman_coordinator::{Client, Coordinator, CoordinatorConfig, EtcdOptions, Options, Token};
use virtman_testkit::etcd::Etcd;

const NODES: usize = 10_000;
const CONCURRENCY: usize = 64;
const TOKEN: &str = "bench-token-0123456789abcdef";

async fn fan_out<F, Fut>(n: usize, f: F) -> Duration
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let sem = Arc::new(Semaphore::new(CONCURRENCY));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let permit = Arc::clone(&sem).acquire_owned().await.unwrap();
        let fut = f(i);
        tasks.push(tokio::spawn(async move {
            fut.await;
            drop(permit);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    started.elapsed()
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    run("redb", dir.path(), None);
    let etcd = Etcd::start(&dir.path().join("etcd"), 1);
    run("etcd", &dir.path().join("c-etcd"), Some(etcd.endpoints()));
}

fn run(store: &'static str, dir: &std::path::Path, etcd: Option<Vec<String>>) {
    let shutdown = CancellationToken::new();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let server_shutdown = shutdown.clone();
    let data_dir = dir.to_owned();
    let server = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let options = Options {
                config: CoordinatorConfig {
                    heartbeat_timeout_ms: 60_000,
                    ..CoordinatorConfig::default()
                },
                token: Token::new(TOKEN).unwrap(),
                tls: None,
                data_dir,
            };
            let coordinator = match etcd {
                None => Coordinator::open(options, server_shutdown).unwrap(),
                Some(endpoints) => {
                    let etcd = EtcdOptions {
                        endpoints,
                        prefix: "/bench".into(),
                        lease_ttl: Duration::from_secs(2),
                        name: "bench".into(),
                        advertise: format!("http://{addr}"),
                        tls: None,
                    };
                    Coordinator::open_etcd(options, etcd, server_shutdown)
                        .await
                        .unwrap()
                }
            };
            addr_tx.send(addr).unwrap();
            coordinator.serve(listener).await.unwrap();
        });
    });
    let addr = addr_rx.recv().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let client = Client::new(&format!("http://{addr}"), Some(TOKEN.into())).unwrap();
        while client.coordinator_status().await.unwrap().role == "candidate" {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        client
            .register_image(&RegisterImage {
                name: "img".into(),
                size: 1 << 32,
                manifest_digest: "ab".repeat(32),
                origins: vec!["10.0.0.1:10809".into()],
                fanout: None,
                parents: None,
                stripes: None,
            })
            .await
            .unwrap();
        let c = client.clone();
        let took = fan_out(NODES, move |i| {
            let c = c.clone();
            async move {
                let req = JoinRequest {
                    node: format!("n{i}"),
                    addr: format!("10.1.{}.{}:10809", i / 250, i % 250),
                    labels: BTreeMap::from([("rack".into(), format!("r{}", i % 40))]),
                };
                c.join("img", &req).await.unwrap();
            }
        })
        .await;
        println!(
            "{store}: joins:      {NODES} in {:.2} s = {:>8.0} /s (each committed to {store} before the answer)",
            took.as_secs_f64(),
            NODES as f64 / took.as_secs_f64()
        );
        for round in 0..3 {
            let c = client.clone();
            let took = fan_out(NODES, move |i| {
                let c = c.clone();
                async move {
                    let req = HeartbeatRequest {
                        node: format!("n{i}"),
                        sessions: vec![SessionBeat {
                            image: "img".into(),
                            progress: 0.5,
                            complete: false,
                            known_epoch: u64::from(round > 0),
                        }],
                        ..Default::default()
                    };
                    c.heartbeat(&req).await.unwrap();
                }
            })
            .await;
            println!(
                "{store}: heartbeats: {NODES} in {:.2} s = {:>8.0} /s (round {round})",
                took.as_secs_f64(),
                NODES as f64 / took.as_secs_f64()
            );
        }
        let tree = client.tree("img").await.unwrap();
        println!(
            "{store}: tree: {} nodes, max depth {} (bound {})",
            tree.nodes.len(),
            tree.max_depth,
            tree.depth_bound
        );
    });
    shutdown.cancel();
    server.join().unwrap();
}
