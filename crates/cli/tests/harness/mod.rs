//! The loopback cluster the end-to-end tests run on: a coordinator, an
//! origin agent and member agents as real `virtman` processes with a cluster
//! PKI, VMs made with `virtman vm create`, and reads through their exports.
#![allow(dead_code, clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtman_agent::control::ControlClient;
use virtman_nbd::{Client, ClientConfig, Endpoint};
use virtman_pki::{Ca, Role};
use virtman_testkit::pattern;

pub const BIN: &str = env!("CARGO_BIN_EXE_virtman");
pub const CHUNK: usize = 256 * 1024;

/// A child process, killed on drop; its output is kept for failure messages.
pub struct Proc {
    pub child: Child,
    pub log: Arc<Mutex<String>>,
}

impl Proc {
    /// Starts `virtman ARGS` and waits for `listening on ADDR` on its stdout.
    pub fn start(args: &[&str]) -> (Proc, String) {
        let mut child = Command::new(BIN)
            .args(args)
            .env("VIRTMAN_LOG", "info,virtman_agent=debug")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let l1 = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(a) = line.strip_prefix("listening on ") {
                    let a = a
                        .trim_start_matches("https://")
                        .trim_start_matches("http://");
                    let _ = tx.send(a.to_owned());
                }
                l1.lock().unwrap().push_str(&format!("{line}\n"));
            }
        });
        let l2 = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                l2.lock().unwrap().push_str(&format!("{line}\n"));
            }
        });
        // Owned by a Proc first, so a start that fails still kills the child.
        let p = Proc { child, log };
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("{args:?} did not start: {}", p.log.lock().unwrap()));
        (p, addr)
    }

    pub fn signal(&self, sig: &str) {
        Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
    }

    /// Reaps a process that was killed.
    pub fn stop_killed(mut self) {
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(mut self) {
        self.signal("-TERM");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                assert!(s.success(), "exit {s}: {}", self.log.lock().unwrap());
                return;
            }
            assert!(
                Instant::now() < deadline,
                "did not stop: {}",
                self.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub coordinator: Option<Proc>,
    pub url: String,
    pub _origin: Proc,
    pub agents: Vec<Option<Proc>>,
    pub image: Vec<u8>,
    /// Arguments every member agent gets besides the usual ones.
    pub extra: Vec<String>,
}

impl Cluster {
    /// A coordinator (fan-out 2, fast heartbeats), an origin holding a random
    /// image `img`, and `n` member agents a1..an.
    pub fn start(n: usize, size: usize) -> Cluster {
        Cluster::with_image(n, pattern(size, 11))
    }

    /// The same, with the origin serving `image`.
    pub fn with_image(n: usize, image: Vec<u8>) -> Cluster {
        Cluster::with_image_args(n, image, &[])
    }

    /// The same, with `extra` arguments for every member agent (e.g.
    /// `--no-hedge` to see what a test guards against).
    pub fn with_image_args(n: usize, image: Vec<u8>, extra: &[&str]) -> Cluster {
        Cluster::with_args(n, image, extra, &[])
    }

    /// The same, with `coordinator` arguments for the coordinator too (e.g.
    /// `--stripes 2`).
    pub fn with_args(n: usize, image: Vec<u8>, extra: &[&str], coordinator: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "cluster-test-token-0123456789\n").unwrap();
        let raw = dir.path().join("img.raw");
        std::fs::write(&raw, &image).unwrap();
        let store = dir.path().join("origin/images");
        let out = Command::new(BIN)
            .args(["image", "import"])
            .arg(&raw)
            .args(["--name", "img", "--store"])
            .arg(&store)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );

        Ca::init(&dir.path().join("pki").join("ca"), 1).unwrap();
        let coordinator_tls = node_dir(dir.path(), "coordinator", Role::Node);
        let coord_dir = dir.path().join("coord");
        let mut coordinator_args = vec![
            "coordinator",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            coord_dir.to_str().unwrap(),
            "--token-file",
            token.to_str().unwrap(),
            "--fanout",
            "2",
            "--parents",
            "2",
            "--heartbeat-interval",
            "200ms",
            "--heartbeat-timeout",
            // Not 1 s: with other tests beside it on two cores, a host can
            // miss that many beats and be declared dead for nothing.
            "3s",
            "--tls",
            coordinator_tls.to_str().unwrap(),
        ];
        // One tree unless asked: these tests check a tree's shapes (the
        // coordinator's default is a forest of 4 stripes).
        if !coordinator.contains(&"--stripes") {
            coordinator_args.extend_from_slice(&["--stripes", "1"]);
        }
        coordinator_args.extend_from_slice(coordinator);
        let (coordinator, addr) = Proc::start(&coordinator_args);
        let url = format!("https://{addr}");
        let args = Self::tls_agent_args(dir.path(), &url, "origin");
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (origin, _) = Proc::start(&args);
        let mut c = Cluster {
            dir,
            coordinator: Some(coordinator),
            url,
            _origin: origin,
            agents: Vec::new(),
            image,
            extra: extra.iter().map(|a| (*a).to_owned()).collect(),
        };
        // Let the origin register the image.
        c.wait_for(|c| c.tree().is_some(), "the image to be registered");
        for i in 1..=n {
            let p = c.start_agent(i);
            c.agents.push(Some(p));
        }
        c
    }

    pub fn agent_args(dir: &Path, url: &str, name: &str) -> Vec<String> {
        vec![
            "agent".into(),
            "--coordinator".into(),
            url.into(),
            "--token-file".into(),
            dir.join("token").to_str().unwrap().into(),
            "--data-dir".into(),
            dir.join(name).to_str().unwrap().into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--name".into(),
            name.into(),
            "--cache-size".into(),
            "256M".into(),
        ]
    }

    /// [`Cluster::agent_args`] with the node's own TLS directory.
    pub fn tls_agent_args(dir: &Path, url: &str, name: &str) -> Vec<String> {
        let mut args = Self::agent_args(dir, url, name);
        let tls = node_dir(dir, name, Role::Node);
        args.extend(["--tls".into(), tls.to_str().unwrap().into()]);
        args
    }

    pub fn start_agent(&self, i: usize) -> Proc {
        let mut args = Self::tls_agent_args(self.dir.path(), &self.url, &format!("a{i}"));
        args.extend(self.extra.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Proc::start(&args).0
    }

    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("a{i}"))
    }

    pub fn control(&self, name: &str) -> ControlClient {
        ControlClient::new(self.dir.path().join(name).join("agent.sock"))
    }

    /// `virtman vm create` on agent `i`; returns the VM's unix socket.
    pub fn vm_create(&self, i: usize, vm: &str) -> PathBuf {
        let out = Command::new(BIN)
            .args(["vm", "create", vm, "--image", "img", "--data-dir"])
            .arg(self.data_dir(i))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "vm create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let uri = String::from_utf8(out.stdout).unwrap();
        let sock = uri.trim().split("socket=").nth(1).unwrap();
        PathBuf::from(sock)
    }

    /// The session's tree as JSON, once the image is registered.
    pub fn tree(&self) -> Option<serde_json::Value> {
        let out = Command::new(BIN)
            .args(["tree", "img", "--json", "--coordinator", &self.url, "--tls"])
            .arg(node_dir(self.dir.path(), "operator", Role::Operator))
            .output()
            .unwrap();
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    pub fn wait_for(&self, mut ok: impl FnMut(&Cluster) -> bool, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ok(self) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; coordinator log:\n{}",
                self.coordinator
                    .as_ref()
                    .map(|p| p.log.lock().unwrap().clone())
                    .unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// `DIR/pki/NAME`, issued by the cluster CA in `DIR/pki/ca` the first time.
pub fn node_dir(dir: &Path, name: &str, role: Role) -> PathBuf {
    let out = dir.join("pki").join(name);
    if !out.exists() {
        let ca = Ca::load(&dir.join("pki").join("ca")).unwrap();
        virtman_testkit::pki::issue(&ca, &out, name, role);
    }
    out
}

impl Cluster {
    /// Reads VM `vm{i}` whole at `socks[i - 1]` on every host but `victim`,
    /// SIGKILLs agent `victim` once `after` bytes were read in all, and
    /// checks that every read returned the image.
    pub async fn kill_mid_read(&mut self, socks: &[PathBuf], victim: usize, after: u64) {
        let mut reads = tokio::task::JoinSet::new();
        let progress: Arc<AtomicU64> = Arc::default();
        for i in (1..=socks.len()).filter(|&i| i != victim) {
            let (size, export) = (self.image.len(), format!("vm{i}"));
            reads.spawn(read_vm(
                socks[i - 1].clone(),
                export,
                size,
                Arc::clone(&progress),
            ));
        }
        let started = Instant::now();
        while progress.load(Ordering::Relaxed) < after {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "reads do not progress"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.agents[victim - 1].take().unwrap().signal("-KILL");
        while let Some(r) = reads.join_next().await {
            assert!(
                r.unwrap() == self.image,
                "a read returned wrong bytes after the kill"
            );
        }
    }
}

/// Reads the whole export at `sock` chunk by chunk, adding to `progress`.
pub async fn read_vm(
    sock: PathBuf,
    export: String,
    size: usize,
    progress: Arc<AtomicU64>,
) -> Vec<u8> {
    let c = Client::connect(
        &Endpoint::Unix(sock),
        &ClientConfig {
            export,
            request_timeout: Duration::from_secs(60),
            ..ClientConfig::default()
        },
    )
    .await
    .unwrap();
    let mut out = Vec::with_capacity(size);
    let mut off = 0;
    while off < size {
        let n = CHUNK.min(size - off);
        out.extend_from_slice(&c.read(off as u64, n as u64).await.unwrap());
        off += n;
        progress.fetch_add(n as u64, Ordering::Relaxed);
    }
    out
}

pub fn metric(text: &str, name: &str, labels: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(name) && l.contains(labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or(0)
}
