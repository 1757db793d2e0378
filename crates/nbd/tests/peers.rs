//! The virtman client against the servers users already run: qemu-nbd and
//! nbdkit. Needs `qemu-nbd` (Debian qemu-utils) and `nbdkit`, which `.ci/run`
//! installs; a missing tool fails the test with a message naming the package.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use common::pattern;
use virtman_nbd::{Client, ClientConfig, ClientTls, Endpoint};
use virtman_pki::{Ca, IssueRequest, NodeTls, Role, write_node_dir};

const SIZE: usize = 8 << 20;

/// A server process, killed on drop.
struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tool(name: &str, package: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/sbin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} not found: install the Debian package {package} (see README)");
}

async fn wait_for_socket(p: &Path) {
    for _ in 0..200 {
        // Connectable, not only there: the file appears at bind(), before
        // the server listens (a connect in between is refused).
        if std::os::unix::net::UnixStream::connect(p).is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{} never appeared", p.display());
}

/// A sparse image: data in some places, holes in others.
fn image(dir: &Path) -> (PathBuf, Vec<u8>) {
    let mut data = pattern(SIZE, 7);
    data[SIZE / 2..SIZE / 2 + (1 << 20)].fill(0);
    let path = dir.join("img.raw");
    std::fs::write(&path, &data).unwrap();
    // Punch a real hole where the zeroes are.
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    rustix::fs::fallocate(
        &f,
        rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
        (SIZE / 2) as u64,
        1 << 20,
    )
    .unwrap();
    (path, data)
}

async fn read_all_and_compare(endpoint: &Endpoint, export: &str, want: &[u8]) {
    read_all_and_compare_tls(endpoint, export, want, None).await;
}

async fn read_all_and_compare_tls(
    endpoint: &Endpoint,
    export: &str,
    want: &[u8],
    tls: Option<ClientTls>,
) {
    let c = Client::connect(
        endpoint,
        &ClientConfig {
            export: export.into(),
            connections: 4,
            tls,
            ..ClientConfig::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(c.size(), want.len() as u64);
    assert!(c.info().structured, "structured replies negotiated");
    // Whole image in one call (split into parallel requests) ...
    assert!(c.read(0, want.len() as u64).await.unwrap()[..] == *want);
    // ... and odd-sized reads in flight together, some over the hole.
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..64u64 {
        let c = c.clone();
        let off = (k * 131_071) % (want.len() as u64 - 300_000);
        let len = 1 + (k * 4099) % 262_144;
        let w = want[off as usize..(off + len) as usize].to_vec();
        tasks.spawn(async move { assert_eq!(c.read(off, len).await.unwrap()[..], w[..]) });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    // base:allocation reports the punched hole.
    let conn = c.pick();
    let ext = conn.block_status((SIZE / 2) as u64, 1 << 20).await.unwrap();
    assert!(ext[0].zero, "hole reported as zero: {ext:?}");
    c.disconnect().await.unwrap();
}

#[tokio::test]
async fn client_reads_from_qemu_nbd() {
    let qemu_nbd = tool("qemu-nbd", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let (path, data) = image(dir.path());
    let sock = dir.path().join("q.sock");
    let _peer = Peer(
        Command::new(qemu_nbd)
            .args(["-r", "-t", "-e", "64", "-f", "raw", "-x", "img", "-k"])
            .arg(&sock)
            .arg(&path)
            .spawn()
            .unwrap(),
    );
    wait_for_socket(&sock).await;
    read_all_and_compare(&Endpoint::Unix(sock), "img", &data).await;
}

#[tokio::test]
async fn client_reads_from_nbdkit() {
    let nbdkit = tool("nbdkit", "nbdkit");
    let dir = tempfile::tempdir().unwrap();
    let (path, data) = image(dir.path());
    let sock = dir.path().join("k.sock");
    let _peer = Peer(
        Command::new(nbdkit)
            .args(["-f", "-r", "-e", "img", "-U"])
            .arg(&sock)
            .arg("file")
            .arg(format!("file={}", path.display()))
            .spawn()
            .unwrap(),
    );
    wait_for_socket(&sock).await;
    read_all_and_compare(&Endpoint::Unix(sock), "img", &data).await;
}

/// A server and a client node directory of one CA: (server dir, client TLS
/// verifying the server as `server1`).
fn tls_dirs(dir: &Path) -> (PathBuf, ClientTls) {
    let ca = Ca::init(&dir.join("ca"), 30).unwrap();
    for name in ["server1", "client1"] {
        let issued = ca
            .issue(&IssueRequest {
                name: name.into(),
                role: Role::Node,
                ips: vec![],
                dns: vec![],
                days: 1,
            })
            .unwrap();
        write_node_dir(&dir.join(name), ca.cert_pem(), &issued).unwrap();
    }
    let client = NodeTls::load(&dir.join("client1")).unwrap();
    let tls = ClientTls::new(client.client_config().unwrap()).with_server_name("server1");
    (dir.join("server1"), tls)
}

#[tokio::test]
async fn client_reads_from_qemu_nbd_over_tls_with_a_verified_client_certificate() {
    let qemu_nbd = tool("qemu-nbd", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let (path, data) = image(dir.path());
    let (server_dir, tls) = tls_dirs(dir.path());
    let sock = dir.path().join("q.sock");
    let _peer = Peer(
        Command::new(qemu_nbd)
            .args(["-r", "-t", "-e", "64", "-f", "raw", "-x", "img", "-k"])
            .arg(&sock)
            .arg("--object")
            .arg(format!(
                "tls-creds-x509,id=tls0,endpoint=server,verify-peer=on,dir={}",
                server_dir.display()
            ))
            .args(["--tls-creds", "tls0"])
            .arg(&path)
            .spawn()
            .unwrap(),
    );
    wait_for_socket(&sock).await;
    read_all_and_compare_tls(&Endpoint::Unix(sock.clone()), "img", &data, Some(tls)).await;
    // Plaintext is refused by qemu-nbd, and our client says so.
    let e = Client::connect(
        &Endpoint::Unix(sock),
        &ClientConfig {
            export: "img".into(),
            ..ClientConfig::default()
        },
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("NBD_REP_ERR_TLS_REQD"), "{e}");
}

#[tokio::test]
async fn client_reads_from_nbdkit_over_tls_with_a_verified_client_certificate() {
    let nbdkit = tool("nbdkit", "nbdkit");
    let dir = tempfile::tempdir().unwrap();
    let (path, data) = image(dir.path());
    let (server_dir, tls) = tls_dirs(dir.path());
    let sock = dir.path().join("k.sock");
    let _peer = Peer(
        Command::new(nbdkit)
            .args([
                "-f",
                "-r",
                "-e",
                "img",
                "--tls=require",
                "--tls-verify-peer",
            ])
            .arg(format!("--tls-certificates={}", server_dir.display()))
            .arg("-U")
            .arg(&sock)
            .arg("file")
            .arg(format!("file={}", path.display()))
            .spawn()
            .unwrap(),
    );
    wait_for_socket(&sock).await;
    read_all_and_compare_tls(&Endpoint::Unix(sock), "img", &data, Some(tls)).await;
}
