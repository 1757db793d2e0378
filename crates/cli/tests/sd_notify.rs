//! Readiness for systemd's `Type=notify` (`dist/*.service`): the coordinator
//! and the agent send `READY=1` to `$NOTIFY_SOCKET` once their listeners
//! accept connections, and `STOPPING=1` on SIGTERM. The test plays the
//! service manager: it binds the datagram socket and reads what arrives.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use virtman_testkit::ChildGuard;

const BIN: &str = env!("CARGO_BIN_EXE_virtman");

/// The service manager's end: a datagram socket at `dir/notify`.
fn notify_socket(dir: &Path) -> UnixDatagram {
    let sock = UnixDatagram::bind(dir.join("notify")).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    sock
}

/// The next datagram, as text.
fn next_message(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).expect("no notification within 30 s");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Starts `virtman ARGS` with `NOTIFY_SOCKET` set (or not) and returns it
/// with the address from its `listening on` line.
fn start(args: &[&str], notify: Option<&Path>) -> (ChildGuard, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("VIRTMAN_LOG", "warn")
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(p) = notify {
        cmd.env("NOTIFY_SOCKET", p);
    }
    let mut child = ChildGuard::new(cmd.spawn().unwrap());
    let stdout = child.child_mut().stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .trim_start_matches("http://")
        .to_owned();
    (child, addr)
}

/// Asserts the one READY message and that the port accepts when it arrives.
fn expect_ready(sock: &UnixDatagram, addr: &str) {
    let msg = next_message(sock);
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg:?}");
    assert!(msg.contains("STATUS="), "{msg:?}");
    // Ready means a client connecting now is accepted.
    TcpStream::connect(addr).unwrap_or_else(|e| panic!("READY=1 but {addr} refuses: {e}"));
    // Nothing else until asked to stop.
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 64];
    assert!(sock.recv(&mut buf).is_err(), "a second notification");
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
}

/// Stops `child` with SIGTERM and asserts STOPPING=1 and a clean exit.
fn expect_stopping(sock: &UnixDatagram, child: &mut ChildGuard) {
    let status = child.stop().unwrap().unwrap();
    assert!(status.success(), "{status}");
    let msg = next_message(sock);
    assert_eq!(msg.trim(), "STOPPING=1");
}

#[test]
fn coordinator_is_ready_once_it_listens() {
    let dir = tempfile::tempdir().unwrap();
    let sock = notify_socket(dir.path());
    let data = dir.path().join("coord");
    let (mut child, addr) = start(
        &[
            "coordinator",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
        ],
        Some(&dir.path().join("notify")),
    );
    expect_ready(&sock, &addr);
    // `systemctl reload` (SIGHUP) without --tls: nothing to reload, and the
    // coordinator goes on serving (the signal's default action would end it).
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP ended the coordinator"
    );
    TcpStream::connect(&addr).unwrap();
    expect_stopping(&sock, &mut child);
}

#[test]
fn agent_is_ready_once_its_exports_listen() {
    let dir = tempfile::tempdir().unwrap();
    let sock = notify_socket(dir.path());
    let coord_dir = dir.path().join("coord");
    let (_coordinator, coord_addr) = start(
        &[
            "coordinator",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            coord_dir.to_str().unwrap(),
        ],
        None,
    );
    let token = coord_dir.join("token");
    let data = dir.path().join("host");
    let (mut agent, addr) = start(
        &[
            "agent",
            "--coordinator",
            &format!("http://{coord_addr}"),
            "--token-file",
            token.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--name",
            "host1",
            "--cache-size",
            "64M",
        ],
        Some(&dir.path().join("notify")),
    );
    expect_ready(&sock, &addr);
    // The control socket (the CLI's way in) is bound by then too.
    assert!(data.join("agent.sock").exists());
    expect_stopping(&sock, &mut agent);
}

#[test]
fn without_notify_socket_it_serves_and_a_stop_right_away_is_graceful() {
    // SIGTERM the moment the address is printed: the handlers are installed
    // before that line (and before READY=1), so the exit is a clean one, not
    // the signal's default action. Several rounds, as it is a race.
    for round in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("coord");
        let (mut child, addr) = start(
            &[
                "coordinator",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                data.to_str().unwrap(),
            ],
            None,
        );
        if round == 0 {
            TcpStream::connect(&addr).unwrap();
        }
        let status = child.stop().unwrap().unwrap();
        assert!(status.success(), "round {round}: {status}");
    }
}
