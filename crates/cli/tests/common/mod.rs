//! Helpers shared by the CLI's integration tests.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtman_testkit::ChildGuard;

/// A running `virtman serve FILE` as export `disk`, on 127.0.0.1 (a free
/// port, read from its log) and a unix socket; stopped when dropped.
pub struct Served {
    guard: ChildGuard,
    /// `127.0.0.1:PORT`.
    pub tcp: String,
    /// The unix socket.
    pub socket: PathBuf,
    /// Everything it logged.
    pub log: Arc<Mutex<String>>,
}

impl Served {
    /// Starts the server with `extra` arguments and waits until it listens.
    pub fn start(file: &Path, dir: &Path, extra: &[&str]) -> Served {
        let socket = dir.join("nbd.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_virtman"))
            .arg("serve")
            .arg(file)
            .args(["--listen", "127.0.0.1:0", "--name", "disk", "--socket"])
            .arg(&socket)
            .args(extra)
            .env("VIRTMAN_LOG", "info")
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut guard = ChildGuard::new(child);
        let stderr = guard.child_mut().stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("serving on ").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap_or("").to_owned();
                    if !addr.starts_with("unix:") {
                        let _ = tx.send(addr);
                    }
                }
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let tcp = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("virtman serve did not start: {}", log.lock().unwrap()));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "unix socket never appeared");
            std::thread::sleep(Duration::from_millis(20));
        }
        Served {
            guard,
            tcp,
            socket,
            log,
        }
    }

    /// `nbd+unix:///disk?socket=...`.
    pub fn unix_uri(&self) -> String {
        format!("nbd+unix:///disk?socket={}", self.socket.display())
    }

    /// `nbd://127.0.0.1:PORT/disk`.
    pub fn tcp_uri(&self) -> String {
        format!("nbd://{}/disk", self.tcp)
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.guard.id()
    }

    /// Waits up to 10 s for `text` in the log.
    pub fn wait_for_log(&self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.log.lock().unwrap().contains(text) {
            assert!(
                Instant::now() < deadline,
                "no {text:?} in the log: {}",
                self.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM (SIGKILL after the grace period) and the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        self.guard
            .stop()
            .unwrap()
            .expect("virtman serve was already stopped")
    }
}

/// A Debian tool as a command (a missing one names its package), with a
/// PATH that keeps libnbd tools and qemu off a developer's Python or plugins.
pub fn tool(name: &str, package: &str) -> Command {
    let path = ["/usr/bin", "/usr/local/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("{name} not found: install the Debian package {package}"));
    let mut c = Command::new(path);
    c.env("PATH", "/usr/bin:/bin");
    c
}
