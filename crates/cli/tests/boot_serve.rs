//! A real Linux guest boots under qemu from `virtman serve`: the test guest of
//! `virtman-testkit` (Debian cloud kernel, busybox initramfs, ext4 disk) reads
//! its marker file over NBD and appends a line that must land in the served
//! file. The same guest booting from the raw file is the control. Needs
//! qemu-system-x86, busybox-static, cpio, e2fsprogs and apt access for the
//! kernel .deb (installed by `.ci/run`).
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtman_testkit::ChildGuard;
use virtman_testkit::guest::{self, BOOTS_FILE, BootOptions, BootResult, Drive, MARKER};

/// A running `virtman serve` of one file, as export `disk`.
struct Served {
    guard: ChildGuard,
    /// `127.0.0.1:PORT`, from the server's log.
    tcp: String,
    socket: std::path::PathBuf,
    log: Arc<Mutex<String>>,
}

impl Served {
    fn start(file: &Path, dir: &Path) -> Served {
        let socket = dir.join("nbd.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_virtman"))
            .arg("serve")
            .arg(file)
            .args(["--listen", "127.0.0.1:0", "--name", "disk", "--socket"])
            .arg(&socket)
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

    fn unix_uri(&self) -> String {
        format!("nbd+unix:///disk?socket={}", self.socket.display())
    }

    fn tcp_uri(&self) -> String {
        format!("nbd://{}/disk", self.tcp)
    }

    /// SIGTERM; the server must exit cleanly (having flushed the guest's writes).
    fn stop(mut self) {
        let status = self.guard.stop().unwrap().unwrap();
        assert!(
            status.success(),
            "virtman serve exited with {status}:\n{}",
            self.log.lock().unwrap()
        );
    }
}

fn boot(drive: Drive, id: &str) -> BootResult {
    let assets = guest::assets().unwrap();
    let opts = BootOptions {
        boot_id: id.to_owned(),
        ..BootOptions::default()
    };
    let result = guest::boot(&drive, &assets, &opts).unwrap();
    assert_eq!(result.marker, MARKER, "console:\n{}", result.console);
    result
}

fn guest_disk(dir: &Path) -> std::path::PathBuf {
    let disk = dir.join("disk.raw");
    guest::assets().unwrap().copy_disk(&disk).unwrap();
    disk
}

#[test]
fn guest_boots_from_virtman_serve_over_a_unix_socket_and_its_write_lands() {
    let dir = tempfile::tempdir().unwrap();
    let disk = guest_disk(dir.path());
    let served = Served::start(&disk, dir.path());
    boot(Drive::Nbd(served.unix_uri()), "virtman-unix");
    served.stop();
    assert_eq!(
        guest::read_disk_file(&disk, BOOTS_FILE).unwrap(),
        "boot virtman-unix\n"
    );
}

#[test]
fn guest_boots_from_virtman_serve_over_tcp_twice_and_sees_its_first_write() {
    let dir = tempfile::tempdir().unwrap();
    let disk = guest_disk(dir.path());
    let served = Served::start(&disk, dir.path());
    boot(Drive::Nbd(served.tcp_uri()), "tcp-1");
    boot(Drive::Nbd(served.tcp_uri()), "tcp-2");
    served.stop();
    assert_eq!(
        guest::read_disk_file(&disk, BOOTS_FILE).unwrap(),
        "boot tcp-1\nboot tcp-2\n"
    );
}

#[test]
fn guest_from_virtman_serve_matches_the_guest_from_the_raw_file() {
    let dir = tempfile::tempdir().unwrap();
    let raw_dir = dir.path().join("raw");
    let nbd_dir = dir.path().join("nbd");
    std::fs::create_dir_all(&raw_dir).unwrap();
    std::fs::create_dir_all(&nbd_dir).unwrap();

    // Control: the harness alone, no NBD.
    let raw_disk = guest_disk(&raw_dir);
    let raw = boot(Drive::Raw(raw_disk.clone()), "same");

    let nbd_disk = guest_disk(&nbd_dir);
    let served = Served::start(&nbd_disk, &nbd_dir);
    let nbd = boot(Drive::Nbd(served.unix_uri()), "same");
    served.stop();

    assert_eq!(raw.marker, nbd.marker);
    assert_eq!(
        guest::read_disk_file(&raw_disk, BOOTS_FILE).unwrap(),
        guest::read_disk_file(&nbd_disk, BOOTS_FILE).unwrap()
    );
    // Both file systems are clean after the guests' umount.
    for disk in [&raw_disk, &nbd_disk] {
        let out = Command::new(virtman_testkit::tool("e2fsck", "e2fsprogs"))
            .args(["-fn"])
            .arg(disk)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "e2fsck {}: {}{}",
            disk.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
