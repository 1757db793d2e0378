//! Failure detection on paused tokio time: a node that stops heartbeating is
//! declared dead after the timeout and not before, its children get new
//! parents in their next heartbeat answer, and after a restart nobody is
//! declared dead before one full timeout.
//!
//! Requests go through the real router in-process (`tower::ServiceExt`), so
//! no socket lets the paused clock jump on its own.

#![allow(missing_docs, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use virtman_coordinator::api::{HeartbeatResponse, JoinResponse, NodeState, TreeView};
use virtman_coordinator::{Coordinator, CoordinatorConfig, Options, Token};

const TOKEN: &str = "paused-time-token-0123456789";

async fn call(
    router: &Router,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("authorization", format!("Bearer {TOKEN}"));
    let body = match body {
        Some(v) => {
            req = req.header("content-type", "application/json");
            Body::from(v.to_string())
        }
        None => Body::empty(),
    };
    let resp = router
        .clone()
        .oneshot(req.body(body).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 24)
        .await
        .unwrap();
    let value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    (status, value)
}

async fn ok<T: DeserializeOwned>(
    router: &Router,
    method: &str,
    path: &str,
    body: Option<impl Serialize>,
) -> T {
    let (status, v) = call(
        router,
        method,
        path,
        body.map(|b| serde_json::to_value(b).unwrap()),
    )
    .await;
    assert!(status.is_success(), "{method} {path}: {status} {v}");
    serde_json::from_value(v).unwrap()
}

fn open(dir: &Path) -> (Coordinator, CancellationToken) {
    let shutdown = CancellationToken::new();
    let options = Options {
        config: CoordinatorConfig {
            fanout: 2,
            parents: 2,
            stripes: 1,
            heartbeat_interval_ms: 1_000,
            heartbeat_timeout_ms: 4_000,
            tick_ms: 250,
            ..CoordinatorConfig::default()
        },
        token: Token::new(TOKEN).unwrap(),
        tls: None,
        data_dir: dir.to_owned(),
    };
    (
        Coordinator::open(options, shutdown.clone()).unwrap(),
        shutdown,
    )
}

async fn heartbeat(router: &Router, node: &str, epoch: u64) -> (StatusCode, Value) {
    let body = json!({"node": node, "sessions": [{"image": "img", "progress": 0.5, "known_epoch": epoch}]});
    call(router, "POST", "/v1/heartbeat", Some(body)).await
}

async fn tree(router: &Router) -> TreeView {
    ok(router, "GET", "/v1/sessions/img", None::<()>).await
}

/// Advances paused time in 250 ms steps (one tick each), letting the state
/// task run after each step.
async fn advance(ms: u64) {
    for _ in 0..ms / 250 {
        tokio::time::advance(Duration::from_millis(250)).await;
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_silent_node_dies_after_the_timeout_not_before_and_its_children_move() {
    let dir = tempfile::tempdir().unwrap();
    let (coord, _shutdown) = open(dir.path());
    let r = coord.router();
    let image = json!({"name": "img", "size": 1024, "manifest_digest": "ab".repeat(32), "origins": ["o:1"]});
    let (status, _) = call(&r, "POST", "/v1/images", Some(image)).await;
    assert_eq!(status, StatusCode::CREATED);
    let mut epochs = BTreeMap::new();
    for i in 0..6 {
        let n = format!("n{i}");
        let j: JoinResponse = ok(
            &r,
            "POST",
            "/v1/sessions/img/join",
            Some(json!({"node": n, "addr": format!("{n}:1")})),
        )
        .await;
        epochs.insert(n, j.assignment.epoch);
    }
    let t = tree(&r).await;
    let victim = t
        .nodes
        .iter()
        .find(|n| !n.origin && n.children > 0)
        .unwrap()
        .node
        .clone();
    let kids: Vec<String> = t
        .nodes
        .iter()
        .filter(|n| n.parents.first() == Some(&victim))
        .map(|n| n.node.clone())
        .collect();
    assert!(!kids.is_empty());

    // Everyone but the victim heartbeats every second. At 4.0 s the victim
    // has been silent exactly the timeout: still alive.
    for _ in 0..4 {
        advance(1_000).await;
        for n in epochs.keys().filter(|n| **n != victim) {
            let (status, v) = heartbeat(&r, n, epochs[n]).await;
            assert_eq!(status, StatusCode::OK, "{n}: {v}");
            let hb: HeartbeatResponse = serde_json::from_value(v).unwrap();
            assert!(
                hb.changed.is_empty(),
                "{n} told of a change while the victim lives"
            );
        }
    }
    let t = tree(&r).await;
    assert!(
        t.nodes.iter().any(|n| n.node == victim),
        "declared dead before the timeout"
    );
    assert_eq!(t.stats.deaths, 0);

    // One tick later it is dead and nobody lists it.
    advance(250).await;
    let t = tree(&r).await;
    assert!(
        t.nodes
            .iter()
            .all(|n| n.node != victim && !n.parents.contains(&victim))
    );
    assert_eq!(t.stats.deaths, 1);
    let state: NodeState = ok(&r, "GET", &format!("/v1/nodes/{victim}"), None::<()>).await;
    assert_eq!(state.dead_in, vec!["img".to_owned()]);

    // Its children learn their new parents in the next heartbeat answer.
    for kid in &kids {
        let (status, v) = heartbeat(&r, kid, epochs[kid]).await;
        assert_eq!(status, StatusCode::OK);
        let hb: HeartbeatResponse = serde_json::from_value(v).unwrap();
        assert_eq!(hb.changed.len(), 1, "{kid} gets new parents");
        assert!(!hb.changed[0].parents.is_empty());
        assert!(hb.changed[0].parents.iter().all(|p| p.node != victim));
    }
    // The victim itself is told to join again.
    let (status, v) = heartbeat(&r, &victim, epochs[&victim]).await;
    assert_eq!(status, StatusCode::GONE);
    assert_eq!(v["error"], "dead");
    coord.stop().await;
}

#[tokio::test(start_paused = true)]
async fn after_a_restart_nobody_dies_before_one_timeout() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (coord, _shutdown) = open(dir.path());
        let r = coord.router();
        let image = json!({"name": "img", "size": 1024, "manifest_digest": "ab".repeat(32), "origins": ["o:1"]});
        call(&r, "POST", "/v1/images", Some(image)).await;
        for i in 0..4 {
            let n = format!("n{i}");
            let _: JoinResponse = ok(
                &r,
                "POST",
                "/v1/sessions/img/join",
                Some(json!({"node": n, "addr": "a:1"})),
            )
            .await;
        }
        coord.stop().await;
    }
    // Long after the last heartbeat, the coordinator comes back.
    advance(60_000).await;
    let (coord, _shutdown) = open(dir.path());
    let r = coord.router();
    advance(4_000).await;
    assert_eq!(
        tree(&r).await.nodes.len(),
        5,
        "nobody dead within one timeout of the restart"
    );
    // n0 heartbeats, the rest stay silent: they die, n0 does not.
    let (status, _) = heartbeat(&r, "n0", 0).await;
    assert_eq!(status, StatusCode::OK);
    advance(500).await;
    let names: Vec<String> = tree(&r).await.nodes.into_iter().map(|n| n.node).collect();
    assert_eq!(names, vec!["origin:0".to_owned(), "n0".to_owned()]);
    coord.stop().await;
}
