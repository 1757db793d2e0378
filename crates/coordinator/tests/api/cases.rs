use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use virtman_coordinator::api::{
    HeartbeatRequest, JoinRequest, LeaveRequest, RegisterImage, ReportRequest, SessionBeat,
    TreeView,
};
use virtman_coordinator::{
    Client, ClientError, Coordinator, CoordinatorConfig, CoordinatorError, EtcdOptions, Options,
    Token, openapi_json,
};
use virtman_testkit::etcd::Etcd;

const TOKEN: &str = "test-token-0123456789abcdef";

struct Running {
    addr: SocketAddr,
    client: Client,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), CoordinatorError>>,
    /// With `ETCD`: the one-member etcd holding the state, in `dir/etcd`
    /// (stopped after the coordinator).
    _etcd: Option<Etcd>,
}

impl Running {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

async fn start(dir: &Path, config: CoordinatorConfig) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let (coordinator, etcd) = if ETCD {
        let etcd = Etcd::start(&dir.join("etcd"), 1);
        let options = EtcdOptions {
            endpoints: etcd.endpoints(),
            prefix: "/virtman-test".into(),
            lease_ttl: std::time::Duration::from_secs(2),
            name: format!("c-{addr}"),
            advertise: format!("http://{addr}"),
            tls: None,
        };
        let c = Coordinator::open_etcd(options_for(dir, config), options, shutdown.clone())
            .await
            .unwrap();
        (c, Some(etcd))
    } else {
        let c = Coordinator::open(options_for(dir, config), shutdown.clone()).unwrap();
        (c, None)
    };
    let task = tokio::spawn(coordinator.serve(listener));
    let client = Client::new(&format!("http://{addr}"), Some(TOKEN.into())).unwrap();
    if ETCD {
        // It leads once its campaign is won (at once: it is alone).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while client.coordinator_status().await.unwrap().role != "leader" {
            assert!(std::time::Instant::now() < deadline, "never led");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    Running {
        addr,
        client,
        shutdown,
        task,
        _etcd: etcd,
    }
}

fn options_for(dir: &Path, config: CoordinatorConfig) -> Options {
    Options {
        config,
        token: Token::new(TOKEN).unwrap(),
        tls: None,
        data_dir: dir.to_owned(),
    }
}

fn image(name: &str) -> RegisterImage {
    RegisterImage {
        name: name.into(),
        size: 4 << 30,
        manifest_digest: "0f".repeat(32),
        origins: vec!["10.0.0.1:10809".into()],
        fanout: Some(2),
        parents: Some(2),
        // One tree: these cases check a tree's shapes (forests are asked
        // for where they are meant).
        stripes: Some(1),
    }
}

fn join_req(node: &str, rack: &str) -> JoinRequest {
    JoinRequest {
        node: node.into(),
        addr: format!("{node}.example:10809"),
        labels: BTreeMap::from([("rack".into(), rack.into())]),
    }
}

fn beat(node: &str, image: &str, known_epoch: u64) -> HeartbeatRequest {
    HeartbeatRequest {
        node: node.into(),
        sessions: vec![SessionBeat {
            image: image.into(),
            progress: 0.25,
            complete: false,
            known_epoch,
        }],
        ..Default::default()
    }
}

/// Names, parents, depths and epochs: what must not change behind our back.
fn shape(t: &TreeView) -> Vec<(String, Vec<String>, u32, u64, bool)> {
    t.nodes
        .iter()
        .map(|n| {
            (
                n.node.clone(),
                n.parents.clone(),
                n.depth,
                n.epoch,
                n.complete,
            )
        })
        .collect()
}

fn api_code(e: &ClientError) -> (u16, String) {
    match e {
        ClientError::Api { status, code, .. } => (*status, code.clone()),
        other => panic!("not an API error: {other}"),
    }
}

#[tokio::test]
async fn the_whole_life_of_a_session() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path(), CoordinatorConfig::default()).await;
    let cl = &c.client;

    let info = cl.register_image(&image("debian")).await.unwrap();
    assert_eq!((info.fanout, info.parents, info.members), (2, 2, 0));
    // The same record again is fine; another record under the name is not.
    cl.register_image(&image("debian")).await.unwrap();
    let mut other = image("debian");
    other.size += 1;
    let err = cl.register_image(&other).await.unwrap_err();
    assert_eq!(api_code(&err), (409, "conflict".into()));

    let mut epochs = BTreeMap::new();
    for i in 0..10 {
        let name = format!("n{i}");
        let r = cl
            .join("debian", &join_req(&name, &format!("r{}", i % 2)))
            .await
            .unwrap();
        assert!(!r.assignment.parents.is_empty(), "{name} got parents");
        assert_eq!(r.assignment.origins, vec!["10.0.0.1:10809".to_owned()]);
        assert_eq!(r.heartbeat_interval_ms, 1_000);
        epochs.insert(name, r.assignment.epoch);
    }
    let first = cl.join("debian", &join_req("n10", "r0")).await.unwrap();
    epochs.insert("n10".into(), first.assignment.epoch);

    let tree = cl.tree("debian").await.unwrap();
    assert_eq!(tree.nodes.len(), 12, "one origin and eleven members");
    assert_eq!(tree.nodes[0].node, "origin:0");
    assert!(tree.max_depth <= tree.depth_bound);
    for n in &tree.nodes {
        assert!(n.children <= 2, "fan-out 2: {n:?}");
    }

    // Heartbeats with the known epochs change nothing; epoch 0 gets the list.
    let r = cl
        .heartbeat(&beat("n3", "debian", epochs["n3"]))
        .await
        .unwrap();
    assert!(r.changed.is_empty());
    let r = cl.heartbeat(&beat("n3", "debian", 0)).await.unwrap();
    assert_eq!(r.changed.len(), 1);
    assert_eq!(r.changed[0].epoch, epochs["n3"]);

    // A report moves the reporter off the parent it could not reach.
    let n9 = tree.nodes.iter().find(|n| n.node == "n9").unwrap();
    let bad = n9.parents[0].clone();
    let a = cl
        .report(
            "debian",
            &ReportRequest {
                node: "n9".into(),
                parent: bad.clone(),
            },
        )
        .await
        .unwrap();
    assert!(a.parents.iter().all(|p| p.node != bad) || bad.starts_with("origin:"));
    epochs.insert("n9".into(), a.epoch);

    // A node with children leaves: its children learn new parents at their
    // next heartbeat, and nobody lists it any more.
    let tree = cl.tree("debian").await.unwrap();
    let leaver = tree
        .nodes
        .iter()
        .find(|n| !n.origin && n.children > 0)
        .unwrap()
        .node
        .clone();
    let kids: Vec<String> = tree
        .nodes
        .iter()
        .filter(|n| n.parents.first() == Some(&leaver))
        .map(|n| n.node.clone())
        .collect();
    assert!(!kids.is_empty());
    cl.leave(
        "debian",
        &LeaveRequest {
            node: leaver.clone(),
        },
    )
    .await
    .unwrap();
    for kid in &kids {
        let known = tree.nodes.iter().find(|n| &n.node == kid).unwrap().epoch;
        let r = cl.heartbeat(&beat(kid, "debian", known)).await.unwrap();
        assert_eq!(r.changed.len(), 1, "{kid} is told its new parents");
        assert!(r.changed[0].parents.iter().all(|p| p.node != leaver));
    }
    let tree = cl.tree("debian").await.unwrap();
    assert!(
        tree.nodes
            .iter()
            .all(|n| n.node != leaver && !n.parents.contains(&leaver))
    );
    assert_eq!(tree.stats.leaves, 1);

    // Completing the image makes a node a root.
    let finisher = kids[0].clone();
    let done = HeartbeatRequest {
        node: finisher.clone(),
        sessions: vec![SessionBeat {
            image: "debian".into(),
            progress: 1.0,
            complete: true,
            known_epoch: 0,
        }],
        ..Default::default()
    };
    let r = cl.heartbeat(&done).await.unwrap();
    assert!(r.changed[0].parents.is_empty());
    let state = cl.node(&finisher).await.unwrap();
    assert!(state.sessions[0].view.complete);
    assert_eq!(state.sessions[0].view.depth, 0);

    // Metrics and the OpenAPI document are served.
    let http = reqwest::Client::new();
    let metrics = http
        .get(c.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("virtman_coordinator_joins_total 11"),
        "{metrics}"
    );
    assert!(
        metrics.contains("virtman_coordinator_leaves_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("virtman_coordinator_nodes 10"),
        "{metrics}"
    );
    assert!(
        metrics.contains("virtman_coordinator_sessions 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("virtman_coordinator_heartbeat_seconds_count 5"),
        "{metrics}"
    );
    let doc = http
        .get(c.url("/v1/openapi.json"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(doc, openapi_json());
    c.stop().await;
}

#[tokio::test]
async fn state_changing_calls_need_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path(), CoordinatorConfig::default()).await;
    c.client.register_image(&image("img")).await.unwrap();
    let http = reqwest::Client::new();
    let body = json!({"node": "x", "addr": "x:1"});
    let cases: Vec<(&str, Option<String>)> = vec![
        ("no header", None),
        ("wrong token", Some("Bearer not-the-token-at-all".into())),
        ("token prefix", Some(format!("Bearer {}", &TOKEN[..20]))),
        ("basic scheme", Some(format!("Basic {TOKEN}"))),
        ("empty bearer", Some("Bearer ".into())),
    ];
    for (what, header) in cases {
        for path in ["/v1/sessions/img/join", "/v1/images", "/v1/heartbeat"] {
            let mut req = http.post(c.url(path)).json(&body);
            if let Some(h) = &header {
                req = req.header("authorization", h);
            }
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status(), 401, "{what} on {path}");
            let e: Value = resp.json().await.unwrap();
            assert_eq!(e["error"], "unauthorized", "{what}");
        }
    }
    // Nothing joined; reads need no token.
    let anon = Client::new(&c.url(""), None).unwrap();
    let tree = anon.tree("img").await.unwrap();
    assert_eq!(tree.nodes.len(), 1);
    let err = anon.join("img", &join_req("x", "r")).await.unwrap_err();
    assert_eq!(api_code(&err), (401, "unauthorized".into()));
    // The right token works, whatever the scheme's case.
    let resp = http
        .post(c.url("/v1/sessions/img/join"))
        .header("authorization", format!("bearer {TOKEN}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    c.client.join("img", &join_req("y", "r")).await.unwrap();
    c.stop().await;
}

#[tokio::test]
async fn an_image_without_its_own_counts_is_a_forest_of_the_fanouts_stripes() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path(), CoordinatorConfig::default()).await;
    let plain = RegisterImage {
        fanout: None,
        parents: None,
        stripes: None,
        ..image("plain")
    };
    let info = c.client.register_image(&plain).await.unwrap();
    assert_eq!((info.fanout, info.parents, info.stripes), (4, 2, 4));
    // Four members: each relays its own stripe and follows the others.
    for i in 0..4 {
        c.client
            .join("plain", &join_req(&format!("n{i}"), "r"))
            .await
            .unwrap();
    }
    let t = c.client.tree("plain").await.unwrap();
    let mut homes: Vec<u32> = t.nodes.iter().filter(|n| !n.origin).map(|n| n.home).collect();
    homes.sort_unstable();
    assert_eq!(homes, vec![0, 1, 2, 3], "{t:?}");
    // With its own fan-out and no stripe count: a forest of that fan-out.
    let two = RegisterImage {
        fanout: Some(2),
        stripes: None,
        ..image("two")
    };
    let info = c.client.register_image(&two).await.unwrap();
    assert_eq!((info.fanout, info.stripes), (2, 2));
    // A fan-out above the most stripes there can be: the most.
    let wide = RegisterImage {
        fanout: Some(100),
        stripes: None,
        ..image("wide")
    };
    let info = c.client.register_image(&wide).await.unwrap();
    assert_eq!((info.fanout, info.stripes), (100, virtman_topology::MAX_STRIPES));
    c.stop().await;
    // A coordinator of trees keeps one tree whatever the image's fan-out.
    let dir = tempfile::tempdir().unwrap();
    let trees = CoordinatorConfig {
        stripes: 1,
        ..CoordinatorConfig::default()
    };
    let c = start(dir.path(), trees).await;
    let info = c.client.register_image(&two).await.unwrap();
    assert_eq!((info.fanout, info.stripes), (2, 1));
    c.stop().await;
}

#[tokio::test]
async fn an_image_keeps_the_stripe_count_it_was_registered_with() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path(), CoordinatorConfig::default()).await;
    let plain = RegisterImage {
        fanout: None,
        stripes: None,
        ..image("plain")
    };
    let info = c.client.register_image(&plain).await.unwrap();
    assert_eq!(info.stripes, 4);
    c.stop().await;
    // Another default after a restart reshapes nothing already registered;
    // asking again without a count is the same registration, with another
    // count a conflict.
    let config = CoordinatorConfig {
        stripes: 2,
        ..CoordinatorConfig::default()
    };
    let c = start(dir.path(), config).await;
    let info = c.client.register_image(&plain).await.unwrap();
    assert_eq!(info.stripes, 4);
    let other = RegisterImage {
        stripes: Some(2),
        ..plain
    };
    let err = c.client.register_image(&other).await.unwrap_err();
    assert_eq!(api_code(&err), (409, "conflict".into()));
    c.stop().await;
}

#[tokio::test]
async fn bad_input_gets_a_json_4xx_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = CoordinatorConfig {
        max_body_bytes: 4096,
        fanout: 2,
        parents: 1,
        ..CoordinatorConfig::default()
    };
    let c = start(dir.path(), config).await;
    let cl = &c.client;
    cl.register_image(&image("img")).await.unwrap();
    for i in 0..6 {
        cl.join("img", &join_req(&format!("n{i}"), "r"))
            .await
            .unwrap();
    }
    let before = shape(&cl.tree("img").await.unwrap());
    let http = reqwest::Client::new();
    let auth = format!("Bearer {TOKEN}");

    let raw = |method: reqwest::Method, path: &str, body: Option<(String, &str)>| {
        let mut req = http
            .request(method, c.url(path))
            .header("authorization", &auth);
        if let Some((b, ct)) = body {
            req = req.header("content-type", ct).body(b);
        }
        req.send()
    };
    let json_ct = "application/json";
    let long_name = "x".repeat(200);
    let cases: Vec<(&str, reqwest::Method, String, Option<(String, &str)>, u16, &str)> = vec![
        ("malformed JSON", reqwest::Method::POST, "/v1/sessions/img/join".into(),
            Some(("{\"node\": ".into(), json_ct)), 400, "bad_request"),
        ("unknown field", reqwest::Method::POST, "/v1/sessions/img/join".into(),
            Some((json!({"node": "z", "addr": "z:1", "colour": "red"}).to_string(), json_ct)), 422, "bad_request"),
        ("missing field", reqwest::Method::POST, "/v1/sessions/img/join".into(),
            Some((json!({"node": "z"}).to_string(), json_ct)), 422, "bad_request"),
        ("wrong type", reqwest::Method::POST, "/v1/heartbeat".into(),
            Some((json!({"node": "n1", "sessions": "all"}).to_string(), json_ct)), 422, "bad_request"),
        ("no content type", reqwest::Method::POST, "/v1/sessions/img/join".into(),
            Some((json!({"node": "z", "addr": "z:1"}).to_string(), "text/plain")), 415, "unsupported_media_type"),
        ("oversized body", reqwest::Method::POST, "/v1/sessions/img/join".into(),
            Some((json!({"node": "z", "addr": "z".repeat(8000)}).to_string(), json_ct)), 413, "payload_too_large"),
        ("unknown image", reqwest::Method::POST, "/v1/sessions/nope/join".into(),
            Some((json!({"node": "z", "addr": "z:1"}).to_string(), json_ct)), 404, "unknown_image"),
        ("duplicate join", reqwest::Method::POST, "/v1/sessions/img/join".into(),
            Some((json!({"node": "n1", "addr": "n1:1"}).to_string(), json_ct)), 409, "already_joined"),
        ("bad node name", reqwest::Method::POST, "/v1/sessions/img/join".into(),
            Some((json!({"node": "a b", "addr": "z:1"}).to_string(), json_ct)), 400, "bad_request"),
        ("long node name", reqwest::Method::POST, "/v1/sessions/img/join".into(),
            Some((json!({"node": long_name, "addr": "z:1"}).to_string(), json_ct)), 400, "bad_request"),
        ("heartbeat from a stranger", reqwest::Method::POST, "/v1/heartbeat".into(),
            Some((json!({"node": "stranger", "sessions": [{"image": "img", "progress": 0.1}]}).to_string(), json_ct)), 404, "unknown_node"),
        ("heartbeat for an unknown image", reqwest::Method::POST, "/v1/heartbeat".into(),
            Some((json!({"node": "n1", "sessions": [{"image": "nope", "progress": 0.1}]}).to_string(), json_ct)), 404, "unknown_image"),
        ("progress above 1", reqwest::Method::POST, "/v1/heartbeat".into(),
            Some((json!({"node": "n1", "sessions": [{"image": "img", "progress": 1.5}]}).to_string(), json_ct)), 400, "bad_request"),
        ("image twice in a heartbeat", reqwest::Method::POST, "/v1/heartbeat".into(),
            Some((json!({"node": "n1", "sessions": [{"image": "img", "progress": 0.1}, {"image": "img", "progress": 0.2}]}).to_string(), json_ct)), 400, "bad_request"),
        ("leave of a stranger", reqwest::Method::POST, "/v1/sessions/img/leave".into(),
            Some((json!({"node": "stranger"}).to_string(), json_ct)), 404, "unknown_node"),
        ("report of an unknown parent", reqwest::Method::POST, "/v1/sessions/img/report".into(),
            Some((json!({"node": "n1", "parent": "ghost"}).to_string(), json_ct)), 404, "unknown_node"),
        ("fan-out 0", reqwest::Method::POST, "/v1/images".into(),
            Some((json!({"name": "other", "size": 1, "manifest_digest": "0f".repeat(32), "origins": ["o:1"], "fanout": 0}).to_string(), json_ct)), 400, "bad_request"),
        ("stripes 0", reqwest::Method::POST, "/v1/images".into(),
            Some((json!({"name": "other", "size": 1, "manifest_digest": "0f".repeat(32), "origins": ["o:1"], "stripes": 0}).to_string(), json_ct)), 400, "bad_request"),
        ("stripes 65", reqwest::Method::POST, "/v1/images".into(),
            Some((json!({"name": "other", "size": 1, "manifest_digest": "0f".repeat(32), "origins": ["o:1"], "stripes": 65}).to_string(), json_ct)), 400, "bad_request"),
        ("parents 0", reqwest::Method::POST, "/v1/images".into(),
            Some((json!({"name": "other", "size": 1, "manifest_digest": "0f".repeat(32), "origins": ["o:1"], "parents": 0}).to_string(), json_ct)), 400, "bad_request"),
        ("bad digest", reqwest::Method::POST, "/v1/images".into(),
            Some((json!({"name": "other", "size": 1, "manifest_digest": "xyz", "origins": ["o:1"]}).to_string(), json_ct)), 400, "bad_request"),
        ("no origins", reqwest::Method::POST, "/v1/images".into(),
            Some((json!({"name": "other", "size": 1, "manifest_digest": "0f".repeat(32), "origins": []}).to_string(), json_ct)), 400, "bad_request"),
        ("size 0", reqwest::Method::POST, "/v1/images".into(),
            Some((json!({"name": "other", "size": 0, "manifest_digest": "0f".repeat(32), "origins": ["o:1"]}).to_string(), json_ct)), 400, "bad_request"),
        ("unknown route", reqwest::Method::GET, "/v2/whatever".into(), None, 404, "not_found"),
        ("wrong method", reqwest::Method::GET, "/v1/heartbeat".into(), None, 405, "method_not_allowed"),
        ("tree of an unknown image", reqwest::Method::GET, "/v1/sessions/nope".into(), None, 404, "unknown_image"),
        ("state of an unknown node", reqwest::Method::GET, "/v1/nodes/ghost".into(), None, 404, "unknown_node"),
    ];
    for (what, method, path, body, status, code) in cases {
        let resp = raw(method, &path, body).await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{what}");
        let text = resp.text().await.unwrap();
        let e: Value =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("{what}: not JSON: {text}"));
        assert_eq!(e["error"], code, "{what}: {text}");
        assert!(
            e["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}"
        );
    }
    assert_eq!(
        shape(&cl.tree("img").await.unwrap()),
        before,
        "bad input changed state"
    );
    assert_eq!(cl.images().await.unwrap().len(), 1);

    // A node declared dead (two children report it) must join again.
    let tree = cl.tree("img").await.unwrap();
    let parent = tree
        .nodes
        .iter()
        .find(|n| !n.origin && n.children == 2)
        .unwrap()
        .node
        .clone();
    let kids: Vec<String> = tree
        .nodes
        .iter()
        .filter(|n| n.parents.first() == Some(&parent))
        .map(|n| n.node.clone())
        .collect();
    for kid in &kids {
        cl.report(
            "img",
            &ReportRequest {
                node: kid.clone(),
                parent: parent.clone(),
            },
        )
        .await
        .unwrap();
    }
    let err = cl.heartbeat(&beat(&parent, "img", 0)).await.unwrap_err();
    assert_eq!(api_code(&err), (410, "dead".into()));
    let err = cl
        .leave(
            "img",
            &LeaveRequest {
                node: parent.clone(),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(api_code(&err), (410, "dead".into()));
    assert_eq!(
        cl.node(&parent).await.unwrap().dead_in,
        vec!["img".to_owned()]
    );
    cl.join("img", &join_req(&parent, "r")).await.unwrap();
    cl.heartbeat(&beat(&parent, "img", 0)).await.unwrap();
    c.stop().await;
}

#[tokio::test]
async fn absurd_settings_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    for config in [
        CoordinatorConfig {
            fanout: 0,
            ..CoordinatorConfig::default()
        },
        CoordinatorConfig {
            parents: 0,
            ..CoordinatorConfig::default()
        },
        CoordinatorConfig {
            heartbeat_timeout_ms: 500,
            ..CoordinatorConfig::default()
        },
    ] {
        let options = Options {
            config,
            token: Token::new(TOKEN).unwrap(),
            tls: None,
            data_dir: dir.path().to_owned(),
        };
        let err = Coordinator::open(options, CancellationToken::new()).unwrap_err();
        assert!(matches!(err, CoordinatorError::Config(_)), "{err}");
    }
    assert!(Token::new("short").is_err());
}

#[tokio::test]
async fn a_restart_recovers_images_and_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path(), CoordinatorConfig::default()).await;
    c.client.register_image(&image("a")).await.unwrap();
    let mut b = image("b");
    b.fanout = Some(3);
    b.origins.push("10.0.0.9:10809".into());
    c.client.register_image(&b).await.unwrap();
    // A forest of two stripes: each member gets a list per stripe and
    // relays one of them.
    let mut f = image("f");
    f.stripes = Some(2);
    f.fanout = Some(2);
    assert_eq!(c.client.register_image(&f).await.unwrap().stripes, 2);
    for i in 0..9 {
        let r = c.client.join("f", &join_req(&format!("h{i}"), "r0")).await.unwrap();
        assert_eq!(r.assignment.stripes.len(), 2, "{:?}", r.assignment);
    }
    for i in 0..9 {
        // Short lists are filled at a heartbeat (restore would fill them too).
        c.client.heartbeat(&beat(&format!("h{i}"), "f", 0)).await.unwrap();
    }
    for i in 0..25 {
        let n = format!("h{i}");
        c.client
            .join("a", &join_req(&n, &format!("r{}", i % 3)))
            .await
            .unwrap();
        if i % 2 == 0 {
            c.client.join("b", &join_req(&n, "r0")).await.unwrap();
        }
    }
    c.client
        .leave("a", &LeaveRequest { node: "h4".into() })
        .await
        .unwrap();
    let done = HeartbeatRequest {
        node: "h7".into(),
        sessions: vec![SessionBeat {
            image: "a".into(),
            progress: 1.0,
            complete: true,
            known_epoch: 0,
        }],
        ..Default::default()
    };
    c.client.heartbeat(&done).await.unwrap();
    // Every member heartbeats once more, as agents do each second: a member
    // short of secondaries takes the new root then (restore would too).
    for i in (0..25).filter(|&i| i != 4 && i != 7) {
        let beat = HeartbeatRequest {
            node: format!("h{i}"),
            sessions: vec![SessionBeat {
                image: "a".into(),
                progress: 0.5,
                complete: false,
                known_epoch: 0,
            }],
            ..Default::default()
        };
        c.client.heartbeat(&beat).await.unwrap();
    }
    let images = c.client.images().await.unwrap();
    let tree_a = c.client.tree("a").await.unwrap();
    let tree_b = c.client.tree("b").await.unwrap();
    let tree_f = c.client.tree("f").await.unwrap();
    let striped = |t: &TreeView| -> Vec<(String, u32, Vec<Vec<String>>, u64)> {
        t.nodes
            .iter()
            .filter(|n| !n.origin)
            .map(|n| (n.node.clone(), n.home, n.stripe_parents.clone(), n.epoch))
            .collect()
    };
    let homes: Vec<u32> = striped(&tree_f).iter().map(|n| n.1).collect();
    assert_eq!(homes.iter().filter(|&&h| h == 0).count(), 5, "{homes:?}");
    assert!(striped(&tree_f).iter().all(|n| n.2.len() == 2));
    c.stop().await;

    let c = start(dir.path(), CoordinatorConfig::default()).await;
    assert_eq!(c.client.images().await.unwrap(), images);
    assert_eq!(shape(&c.client.tree("a").await.unwrap()), shape(&tree_a));
    assert_eq!(shape(&c.client.tree("b").await.unwrap()), shape(&tree_b));
    assert_eq!(striped(&c.client.tree("f").await.unwrap()), striped(&tree_f));
    // Members carry on with the epochs they had: nothing to tell them.
    for n in tree_a.nodes.iter().filter(|n| !n.origin) {
        let r = c
            .client
            .heartbeat(&beat(&n.node, "a", n.epoch))
            .await
            .unwrap();
        assert!(
            r.changed.is_empty(),
            "{} told of a change after restart",
            n.node
        );
    }
    let err = c.client.join("a", &join_req("h1", "r1")).await.unwrap_err();
    assert_eq!(api_code(&err), (409, "already_joined".into()));
    c.stop().await;
}

#[tokio::test]
async fn metrics_belong_to_one_coordinator() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let c1 = start(d1.path(), CoordinatorConfig::default()).await;
    let c2 = start(d2.path(), CoordinatorConfig::default()).await;
    c1.client.register_image(&image("x")).await.unwrap();
    c1.client.join("x", &join_req("n", "r")).await.unwrap();
    let http = reqwest::Client::new();
    let m1 = http
        .get(c1.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let m2 = http
        .get(c2.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(m1.contains("virtman_coordinator_joins_total 1"), "{m1}");
    assert!(m2.contains("virtman_coordinator_joins_total 0"), "{m2}");
    c1.stop().await;
    c2.stop().await;
}

#[test]
fn the_committed_openapi_document_matches_the_code() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi.json");
    let generated = openapi_json();
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "crates/coordinator/openapi.json is stale: run UPDATE_OPENAPI=1 cargo nextest run -p virtman-coordinator openapi"
    );
    let doc: Value = serde_json::from_str(&generated).unwrap();
    for path in [
        "/v1/images",
        "/v1/sessions/{image}/join",
        "/v1/heartbeat",
        "/metrics",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} documented");
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
}

#[tokio::test]
async fn a_client_of_several_coordinators_skips_one_that_does_not_answer() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path(), CoordinatorConfig::default()).await;
    // A port nobody listens on, first.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let urls = format!("{dead_url},{}", c.url(""));
    let cl = Client::new(&urls, Some(TOKEN.into())).unwrap();
    assert_eq!(cl.urls().len(), 2);
    cl.register_image(&image("several")).await.unwrap();
    // The one that answered is asked first from then on.
    assert_eq!(cl.current_url(), c.url(""));
    assert_eq!(cl.images().await.unwrap().len(), 1);
    // None answering: the last error, not a hang.
    let none = Client::new(&dead_url, None).unwrap();
    assert!(matches!(none.images().await, Err(ClientError::Http(_))));
    // A list with a URL that is not http(s) is refused, naming it.
    let err = Client::new(&format!("{},ftp://x", c.url("")), None).unwrap_err();
    assert!(err.to_string().contains("\"ftp://x\""), "{err}");
    let err = Client::new(&format!("{},", c.url("")), None).unwrap_err();
    assert!(matches!(err, ClientError::Url(_)), "{err}");
    c.stop().await;
}
