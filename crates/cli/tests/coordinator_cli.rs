//! `virtman coordinator` and `virtman tree` as real processes: start the
//! coordinator on 127.0.0.1:0, join nodes through the API, print the tree as
//! JSON and text, stop it with SIGTERM, start it again on the same data
//! directory and find the same tree; absurd settings exit with an error.

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
        assert!(url.starts_with("http://127.0.0.1:"), "{url}");
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
    assert!(
        text.starts_with("img: 8 nodes (7 members), fan-out 2"),
        "{text}"
    );
    for i in 0..7 {
        assert!(
            text.contains(&format!("host{i}  10.0.1.{i}:10809  depth ")),
            "{text}"
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
