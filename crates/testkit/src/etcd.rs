//! A real etcd cluster on loopback for tests (Debian's `etcd-server`): N
//! members on free ports, each a [`ChildGuard`], their data in a directory
//! of the test's.
//!
//! ```no_run
//! let dir = tempfile::tempdir().unwrap();
//! let mut etcd = virtman_testkit::etcd::Etcd::start(dir.path(), 3);
//! let endpoints = etcd.endpoints(); // ["http://127.0.0.1:PORT", ...]
//! etcd.kill(0); // SIGKILL one member; `restart(0)` brings it back
//! ```

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{ChildGuard, tool};

/// A running etcd cluster; dropping it stops every member.
#[derive(Debug)]
pub struct Etcd {
    bin: PathBuf,
    tls: bool,
    dir: PathBuf,
    args: Vec<Vec<String>>,
    members: Vec<Option<ChildGuard>>,
    endpoints: Vec<String>,
}

/// Whether the etcd at `addr` answers `GET /health` with `"health":"true"`.
fn healthy(addr: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer.contains("\"health\":\"true\"")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl Etcd {
    /// Starts `n` members in `dir/etcdI` and waits until they serve. A
    /// directory that held a cluster before gets it back, on the same ports
    /// (kept in `dir/ports`), with its data.
    pub fn start(dir: &Path, n: usize) -> Etcd {
        Self::start_with(dir, n, None)
    }

    /// Like [`start`](Self::start), serving clients over TLS only, with
    /// client certificates required: `server_dir` is a node directory of a
    /// test PKI (`server-cert.pem` for 127.0.0.1, `server-key.pem`,
    /// `ca-cert.pem`, which must have signed the clients' certificates).
    /// The endpoints are then `https://`.
    pub fn start_tls(dir: &Path, n: usize, server_dir: &Path) -> Etcd {
        Self::start_with(dir, n, Some(server_dir))
    }

    fn start_with(dir: &Path, n: usize, tls: Option<&Path>) -> Etcd {
        let bin = tool("etcd", "etcd-server");
        std::fs::create_dir_all(dir).expect("etcd directory");
        let saved = dir.join("ports");
        let ports: Vec<(u16, u16)> = match std::fs::read_to_string(&saved) {
            Ok(text) => text
                .lines()
                .filter_map(|l| {
                    let (a, b) = l.split_once(' ')?;
                    Some((a.parse().ok()?, b.parse().ok()?))
                })
                .collect(),
            Err(_) => {
                let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
                let text: String = ports.iter().map(|(a, b)| format!("{a} {b}\n")).collect();
                std::fs::write(&saved, text).expect("writing the etcd ports");
                ports
            }
        };
        assert_eq!(ports.len(), n, "{} holds another cluster", dir.display());
        let cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("etcd{}=http://127.0.0.1:{peer}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        // One token for the whole cluster (it seeds the cluster's ID).
        let token = format!("test-{}", ports.first().map_or(0, |p| p.0));
        let mut args = Vec::new();
        let mut endpoints = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let name = format!("etcd{}", i + 1);
            let scheme = if tls.is_some() { "https" } else { "http" };
            let client_url = format!("{scheme}://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let mut member = vec![
                format!("--name={name}"),
                format!("--data-dir={}", dir.join(&name).display()),
                format!("--listen-client-urls={client_url}"),
                format!("--advertise-client-urls={client_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster={cluster}"),
                "--initial-cluster-state=new".to_owned(),
                format!("--initial-cluster-token={token}"),
                "--logger=zap".to_owned(),
            ];
            if let Some(d) = tls {
                member.extend([
                    format!("--cert-file={}", d.join("server-cert.pem").display()),
                    format!("--key-file={}", d.join("server-key.pem").display()),
                    format!("--trusted-ca-file={}", d.join("ca-cert.pem").display()),
                    "--client-cert-auth".to_owned(),
                ]);
            }
            args.push(member);
            endpoints.push(client_url);
        }
        let mut etcd = Etcd {
            bin,
            tls: tls.is_some(),
            dir: dir.to_owned(),
            args,
            members: (0..n).map(|_| None).collect(),
            endpoints,
        };
        for i in 0..n {
            etcd.spawn(i);
        }
        for i in 0..n {
            etcd.wait_ready(i);
        }
        etcd
    }

    fn log(&self, i: usize) -> PathBuf {
        self.dir.join(format!("etcd{}.log", i + 1))
    }

    fn spawn(&mut self, i: usize) {
        let log = std::fs::File::create(self.log(i)).expect("etcd log");
        let child = Command::new(&self.bin)
            .args(&self.args[i])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("etcd log"))
            .stderr(log)
            .spawn()
            .expect("starting etcd");
        self.members[i] = Some(ChildGuard::new(child).with_grace(Duration::from_secs(2)));
    }

    /// Waits until member `i` answers `/health` with true (with TLS: says
    /// it serves clients securely), 30 s at most.
    pub fn wait_ready(&self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = self.endpoints[i].trim_start_matches("http://").to_owned();
        loop {
            let text = std::fs::read_to_string(self.log(i)).unwrap_or_default();
            let ready = if self.tls {
                text.contains("serving client traffic securely")
            } else {
                healthy(&addr)
            };
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd member {} did not become ready:\n{text}",
                i + 1
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The client URLs, one per member.
    pub fn endpoints(&self) -> Vec<String> {
        self.endpoints.clone()
    }

    /// SIGKILLs member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut m) = self.members[i].take() {
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_raw(i32::try_from(m.id()).unwrap_or(0)).expect("a pid"),
                rustix::process::Signal::KILL,
            );
            let _ = m.wait_timeout(Duration::from_secs(5));
        }
    }

    /// Starts member `i` again on its data directory and waits for it.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        // The log is started anew so that readiness is this run's.
        self.spawn(i);
        self.wait_ready(i);
    }
}

impl Etcd {
    /// SIGKILLs every member.
    pub fn kill_all(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }

    /// Starts every stopped member again and waits until all serve (a
    /// member alone cannot serve without a quorum).
    pub fn restart_all(&mut self) {
        for i in 0..self.members.len() {
            if self.members[i].is_none() {
                self.spawn(i);
            }
        }
        for i in 0..self.members.len() {
            self.wait_ready(i);
        }
    }
}
