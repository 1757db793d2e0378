//! `virtman coordinator` and `virtman tree` as real processes: start the
//! coordinator on 127.0.0.1:0, join nodes through the API, print the tree as
//! JSON and text, stop it with SIGTERM, start it again on the same data
//! directory and find the same tree; absurd settings exit with an error; with
//! --tls, operators ban with `virtman node` and SIGHUP loads new certificates.

#![allow(missing_docs, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use virtman_coordinator::Client;
use virtman_coordinator::api::{JoinRequest, RegisterImage, TreeView};

const TOKEN: &str = "cli-test-token-0123456789abcdef";
const BIN: &str = env!("CARGO_BIN_EXE_virtman");

/// A coordinator process, killed if the test fails before stopping it.
struct Proc {
    child: Option<Child>,
    url: String,
}

impl Proc {
    fn start(data: &Path, token_file: &Path) -> Self {
        Self::start_with(data, token_file, &[])
    }

    fn start_with(data: &Path, token_file: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(BIN)
            .args([
                "coordinator",
                "--listen",
                "127.0.0.1:0",
                "--fanout",
                "2",
                "--parents",
                "2",
            ])
            .arg("--data-dir")
            .arg(data)
            .arg("--token-file")
            .arg(token_file)
            .args(["--heartbeat-interval", "1s", "--heartbeat-timeout", "60s"])
            .args(extra)
            .env("VIRTMAN_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        assert!(
            url.starts_with("http://127.0.0.1:") || url.starts_with("https://127.0.0.1:"),
            "{url}"
        );
        Self {
            child: Some(child),
            url,
        }
    }

    /// SIGTERM, then the exit status must be success.
    fn stop(mut self) {
        let child = self.child.take().unwrap();
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "coordinator exited with {}",
            out.status
        );
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn tree_cmd(url: &str, json: bool) -> String {
    let mut cmd = Command::new(BIN);
    cmd.args(["tree", "img", "--coordinator", url]);
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn coordinator_and_tree_as_processes_with_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("state");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();

    let proc = Proc::start(&data, &token_file);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = Client::new(&proc.url, Some(TOKEN.into())).unwrap();
    rt.block_on(async {
        client
            .register_image(&RegisterImage {
                name: "img".into(),
                size: 1 << 20,
                manifest_digest: "cd".repeat(32),
                origins: vec!["10.0.0.1:10809".into()],
                fanout: None,
                parents: None,
                stripes: None,
            })
            .await
            .unwrap();
        for i in 0..7 {
            let req = JoinRequest {
                node: format!("host{i}"),
                addr: format!("10.0.1.{i}:10809"),
                labels: BTreeMap::new(),
            };
            client.join("img", &req).await.unwrap();
        }
    });

    let json: TreeView = serde_json::from_str(&tree_cmd(&proc.url, true)).unwrap();
    assert_eq!(json.nodes.len(), 8);
    assert_eq!(json.fanout, 2);
    assert!(json.max_depth <= json.depth_bound);
    let text = tree_cmd(&proc.url, false);
    // A forest of the coordinator's default 4 stripes: each node's line
    // names its stripe and where it receives the others.
    assert!(
        text.starts_with("img: 8 nodes (7 members), 4 stripes, fan-out 2"),
        "{text}"
    );
    for i in 0..7 {
        let line = text
            .lines()
            .find(|l| l.contains(&format!("host{i}  10.0.1.{i}:10809  stripe ")))
            .unwrap_or_else(|| panic!("host{i} in {text}"));
        assert!(
            line.contains("  depth ") && line.contains("  receives "),
            "{line}"
        );
    }
    proc.stop();

    // The same data directory after a restart: the same tree.
    let proc = Proc::start(&data, &token_file);
    let again: TreeView = serde_json::from_str(&tree_cmd(&proc.url, true)).unwrap();
    let shape = |t: &TreeView| -> Vec<(String, Vec<String>, u32)> {
        t.nodes
            .iter()
            .map(|n| (n.node.clone(), n.parents.clone(), n.depth))
            .collect()
    };
    assert_eq!(shape(&again), shape(&json));
    proc.stop();
}

#[test]
fn absurd_settings_and_unknown_images_exit_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, TOKEN).unwrap();
    for bad in [
        vec!["--fanout", "0"],
        vec!["--parents", "0"],
        vec!["--heartbeat-interval", "2s", "--heartbeat-timeout", "1s"],
        vec!["--heartbeat-interval", "soon"],
        vec!["--origin-fanout", "0"],
        vec!["--fanout", "4", "--origin-fanout", "5"],
        // etcd options: TLS and https endpoints go together, the others
        // need --etcd, and the lease counts whole seconds.
        vec!["--etcd", "https://127.0.0.1:1"],
        vec!["--etcd", "http://127.0.0.1:1", "--etcd-tls", "/nonexistent"],
        vec!["--etcd-prefix", "/x"],
        vec!["--etcd", "http://127.0.0.1:1", "--lease-ttl", "500ms"],
    ] {
        let out = Command::new(BIN)
            .args(["coordinator", "--listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir.path().join("d"))
            .arg("--token-file")
            .arg(&token_file)
            .args(&bad)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{bad:?} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("error"), "{bad:?}: {err}");
    }
    // A short token is refused too.
    std::fs::write(&token_file, "short").unwrap();
    let out = Command::new(BIN)
        .args(["coordinator", "--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path().join("d"))
        .arg("--token-file")
        .arg(&token_file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 16"));

    // `tree` of an unknown image, against a live coordinator, fails cleanly.
    std::fs::write(&token_file, TOKEN).unwrap();
    let proc = Proc::start(&dir.path().join("d"), &token_file);
    let out = Command::new(BIN)
        .args(["tree", "nope", "--coordinator", &proc.url])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown_image"));
    proc.stop();
}

/// Runs `virtman node ARGS --coordinator URL` with `creds`.
fn node_cmd(url: &str, args: &[&str], creds: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("node")
        .args(args)
        .args(["--coordinator", url])
        .args(creds)
        .output()
        .unwrap()
}

#[test]
fn over_https_operators_ban_with_the_cli_and_sighup_loads_new_certificates() {
    use virtman_pki::{Ca, Role};
    use virtman_testkit::pki::issue;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let ca1 = Ca::init(&dir.path().join("ca1"), 1).unwrap();
    let ca2 = Ca::init(&dir.path().join("ca2"), 1).unwrap();
    let coord = dir.path().join("coord");
    issue(&ca1, &coord, "coordinator", Role::Node);
    let (op1, op2, node1) = (
        dir.path().join("op1"),
        dir.path().join("op2"),
        dir.path().join("n1"),
    );
    issue(&ca1, &op1, "alice", Role::Operator);
    issue(&ca2, &op2, "bob", Role::Operator);
    issue(&ca1, &node1, "n1", Role::Node);
    let proc = Proc::start_with(
        &dir.path().join("state"),
        &token_file,
        &["--tls", coord.to_str().unwrap()],
    );
    let url = proc.url.clone();
    assert!(url.starts_with("https://"), "{url}");
    let tls = |d: &Path| vec!["--tls".to_owned(), d.to_str().unwrap().to_owned()];
    let run = |args: &[&str], creds: Vec<String>| {
        let creds: Vec<&str> = creds.iter().map(String::as_str).collect();
        node_cmd(&url, args, &creds)
    };

    let out = run(&["ban", "n2"], tls(&op1));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "banned n2\n");
    let out = run(&["show", "n2", "--json"], tls(&op1));
    let state: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(state["banned"], true, "{state}");
    // A node may not ban; nobody may without credentials.
    let out = run(&["ban", "n3"], tls(&node1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("403 forbidden"),
        "{err}"
    );
    // Trusting the CA but presenting nothing: 401, with what is needed.
    let out = run(&["ban", "n3"], tls(&dir.path().join("ca1")));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("401 unauthorized") && err.contains("certificate"),
        "{err}"
    );
    // The token is the operator's too.
    let token = vec!["--token-file".to_owned(), token_file.display().to_string()];
    let out = run(&["unban", "n2"], [tls(&op1), token].concat());
    assert!(out.status.success(), "{out:?}");

    // Another CA's operator is refused until the coordinator's directory
    // holds that CA and SIGHUP loads it.
    let out = run(&["ban", "n4"], tls(&op2));
    assert!(!out.status.success(), "{out:?}");
    let renewed = dir.path().join("renewed");
    issue(&ca2, &renewed, "coordinator", Role::Node);
    for f in std::fs::read_dir(&renewed).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), coord.join(f.file_name())).unwrap();
    }
    let pid = proc.child.as_ref().unwrap().id().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let out = run(&["ban", "n4"], tls(&op2));
        if out.status.success() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{out:?}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // The old CA's certificates are no longer accepted.
    let out = run(&["show", "n4"], tls(&op1));
    assert!(!out.status.success(), "{out:?}");
    let out = run(&["show", "n4", "--json"], tls(&op2));
    let state: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(state["banned"], true, "{state}");
    proc.stop();
}
