//! `virtman serve --tls` against the real tools: qemu-img and qemu-io with
//! qemu's `tls-creds-x509` object (by address and with `tls-hostname`),
//! nbdinfo over `nbds://` with libnbd's certificate directory; plaintext
//! clients and clients of another CA refused while the server goes on. The
//! certificates come from `virtman pki`, so this also checks that qemu's
//! GnuTLS accepts them.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{Served, tool};

const MIB: u64 = 1 << 20;

fn virtman(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_virtman"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "virtman {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A CA with a server (`server1`, 127.0.0.1) and a client (`client1`), and
/// a client of another CA: their node directories.
fn pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let p = |n: &str| dir.join(n).to_str().unwrap().to_owned();
    virtman(&["pki", "init", &p("ca")]);
    virtman(&["pki", "init", &p("other-ca")]);
    virtman(&[
        "pki",
        "issue",
        &p("ca"),
        "--name",
        "server1",
        "--ip",
        "127.0.0.1",
        "--out",
        &p("server"),
    ]);
    virtman(&[
        "pki",
        "issue",
        &p("ca"),
        "--name",
        "client1",
        "--out",
        &p("client"),
    ]);
    virtman(&[
        "pki",
        "issue",
        &p("other-ca"),
        "--name",
        "client1",
        "--out",
        &p("stranger"),
    ]);
    (dir.join("server"), dir.join("client"), dir.join("stranger"))
}

fn creds(dir: &Path) -> String {
    format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        dir.display()
    )
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn qemu_and_nbdinfo_read_and_write_over_tls_and_plaintext_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (server, client, stranger) = pki(dir.path());
    let file = dir.path().join("disk.raw");
    std::fs::write(&file, vec![0x5au8; 4 * MIB as usize]).unwrap();
    let s = Served::start(
        &file,
        dir.path(),
        &["--tls", server.to_str().unwrap(), "--tls-verify-peer"],
    );
    let (host, port) = s.tcp.rsplit_once(':').unwrap();
    let by_addr = format!("driver=nbd,host={host},port={port},export=disk,tls-creds=tls0");
    let by_name = format!(
        "driver=nbd,path={},export=disk,tls-creds=tls0,tls-hostname=server1",
        s.socket.display()
    );

    // qemu-img info, by the address in the certificate.
    let out = tool("qemu-img", "qemu-utils")
        .args([
            "info",
            "--output=json",
            "--object",
            &creds(&client),
            "--image-opts",
            &by_addr,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["virtual-size"], 4 * MIB);

    // qemu-io writes and reads patterns over the unix socket, verifying
    // the server by name (tls-hostname).
    let out = tool("qemu-io", "qemu-utils")
        .args(["--object", &creds(&client), "--image-opts"])
        .args(["-c", "write -P 0xa5 1M 192k", "-c", "flush"])
        .args(["-c", "read -P 0xa5 1M 192k", "-c", "read -P 0x5a 0 64k"])
        .arg(&by_name)
        .output()
        .unwrap();
    let t = text(&out);
    assert!(out.status.success() && !t.contains("failed"), "{t}");
    assert!(t.contains("read 196608/196608"), "{t}");
    let on_disk = std::fs::read(&file).unwrap();
    assert!(
        on_disk[MIB as usize..MIB as usize + 192 * 1024]
            .iter()
            .all(|&b| b == 0xa5)
    );

    // A pattern that is not there fails: the checks above can see failure.
    let out = tool("qemu-io", "qemu-utils")
        .args([
            "--object",
            &creds(&client),
            "--image-opts",
            "-r",
            "-c",
            "read -P 0x11 0 4k",
        ])
        .arg(&by_addr)
        .output()
        .unwrap();
    assert!(text(&out).contains("failed"), "{}", text(&out));

    // nbdinfo over nbds:// with libnbd's certificate directory.
    let out = tool("nbdinfo", "libnbd-bin")
        .arg("--size")
        .arg(format!(
            "nbds://{}/disk?tls-certificates={}",
            s.tcp,
            client.display()
        ))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        (4 * MIB).to_string()
    );

    // Plaintext clients are refused with a word about TLS.
    let out = tool("qemu-img", "qemu-utils")
        .args(["info", &format!("nbd://{}/disk", s.tcp)])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("TLS"), "{}", text(&out));
    let out = tool("nbdinfo", "libnbd-bin")
        .arg(format!("nbd://{}/disk", s.tcp))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).to_lowercase().contains("tls"), "{}", text(&out));

    // A client certificate of another CA is refused.
    let out = tool("qemu-img", "qemu-utils")
        .args([
            "info",
            "--object",
            &creds(&stranger),
            "--image-opts",
            &by_addr,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));

    // The server still serves its clients.
    let out = tool("qemu-io", "qemu-utils")
        .args([
            "--object",
            &creds(&client),
            "--image-opts",
            "-r",
            "-c",
            "read -P 0xa5 1M 4k",
        ])
        .arg(&by_addr)
        .output()
        .unwrap();
    let t = text(&out);
    assert!(out.status.success() && !t.contains("failed"), "{t}");
}

#[test]
fn tls_flags_are_checked_before_serving() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.raw");
    std::fs::write(&file, vec![0u8; 4096]).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_virtman"))
        .arg("serve")
        .arg(&file)
        .args(["--listen", "127.0.0.1:0", "--tls-verify-peer"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls"));
    let out = Command::new(env!("CARGO_BIN_EXE_virtman"))
        .arg("serve")
        .arg(&file)
        .args(["--listen", "127.0.0.1:0", "--tls"])
        .arg(dir.path().join("nowhere"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("loading the TLS directory") && e.contains("ca-cert.pem"),
        "{e}"
    );
}

#[test]
fn sighup_loads_renewed_certificates_and_a_bad_reload_keeps_the_old_ones() {
    use virtman_nbd::{Client, ClientConfig, ClientTls, Endpoint};
    use virtman_pki::NodeTls;

    let dir = tempfile::tempdir().unwrap();
    let (server, client, _) = pki(dir.path());
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
    virtman(&[
        "pki",
        "issue",
        &p("ca"),
        "--name",
        "server9",
        "--ip",
        "127.0.0.1",
        "--out",
        &p("renewed"),
    ]);
    let file = dir.path().join("disk.raw");
    std::fs::write(&file, vec![1u8; 1 << 20]).unwrap();
    let s = Served::start(&file, dir.path(), &["--tls", server.to_str().unwrap()]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tls = ClientTls::new(NodeTls::load(&client).unwrap().client_config().unwrap());
    let connect = |name: &str| {
        let cfg = ClientConfig {
            export: "disk".into(),
            tls: Some(tls.clone().with_server_name(name)),
            ..ClientConfig::default()
        };
        rt.block_on(Client::connect(&Endpoint::Tcp(s.tcp.clone()), &cfg))
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    connect("server1").unwrap();

    for f in ["server-cert.pem", "server-key.pem"] {
        std::fs::copy(dir.path().join("renewed").join(f), server.join(f)).unwrap();
    }
    let hup = |pid: u32| {
        let ok = Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    };
    let pid = s.pid();
    hup(pid);
    s.wait_for_log("TLS certificates reloaded");
    connect("server9").unwrap();
    let e = connect("server1").unwrap_err();
    assert!(e.contains("not valid for name"), "{e}");

    // A damaged file: the reload is refused and the served certificate stays.
    std::fs::write(server.join("server-cert.pem"), "not a certificate").unwrap();
    hup(pid);
    s.wait_for_log("TLS reload failed");
    connect("server9").unwrap();
}
