//! `virtman serve` against the real tools of the field: qemu-img, qemu-io,
//! nbdinfo and nbdcopy talk to it unchanged. Needs qemu-utils and libnbd-bin
//! (installed by `.ci/run`); a missing tool fails with the package to install.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use common::{Served, tool};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use virtman_testkit::pattern;

const MIB: usize = 1 << 20;

fn run(mut c: Command) -> Output {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{c:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A 64 MiB image: random data in the first 16 MiB, a hole after it.
fn sparse_image(dir: &Path) -> (PathBuf, Vec<u8>) {
    let path = dir.join("disk.raw");
    let mut data = pattern(16 * MIB, 3);
    std::fs::write(&path, &data).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(64 * MIB as u64).unwrap();
    data.resize(64 * MIB, 0);
    (path, data)
}

#[test]
fn qemu_img_info_and_map() {
    let dir = tempfile::tempdir().unwrap();
    let (file, _) = sparse_image(dir.path());
    let _s = Served::start(&file, dir.path(), &[]);
    let mut info = tool("qemu-img", "qemu-utils");
    info.args(["info", "--output=json", &_s.tcp_uri()]);
    let v: serde_json::Value = serde_json::from_slice(&run(info).stdout).unwrap();
    assert_eq!(v["virtual-size"], 64 * MIB);

    let mut map = tool("qemu-img", "qemu-utils");
    map.args(["map", "--output=json", &_s.unix_uri()]);
    let v: serde_json::Value = serde_json::from_slice(&run(map).stdout).unwrap();
    let extents = v.as_array().unwrap();
    let (mut data, mut zero) = (0u64, 0u64);
    for e in extents {
        let len = e["length"].as_u64().unwrap();
        if e["data"].as_bool().unwrap() {
            data += len;
            assert!(e["start"].as_u64().unwrap() < 16 * MIB as u64, "{e}");
        } else {
            assert!(e["zero"].as_bool().unwrap(), "{e}");
            zero += len;
        }
    }
    assert_eq!((data, zero), (16 * MIB as u64, 48 * MIB as u64));
}

#[test]
fn qemu_io_reads_and_writes_patterns() {
    let dir = tempfile::tempdir().unwrap();
    let (file, _) = sparse_image(dir.path());
    let s = Served::start(&file, dir.path(), &[]);
    let mut io = tool("qemu-io", "qemu-utils");
    io.args(["-f", "raw"])
        .args(["-c", "write -P 0xa5 1M 192k"])
        .args(["-c", "write -P 0x3c 20M 64k"])
        .args(["-c", "write -z 2M 512k"])
        .args(["-c", "discard 30M 1M"])
        .args(["-c", "flush"])
        .args(["-c", "read -P 0xa5 1M 192k"])
        .args(["-c", "read -P 0x3c 20M 64k"])
        .args(["-c", "read -P 0 2M 512k"])
        .arg(s.unix_uri());
    let out = String::from_utf8(run(io).stdout).unwrap();
    assert!(!out.contains("failed"), "{out}");
    // A second client over TCP sees the same bytes, and so does the file.
    let mut check = tool("qemu-io", "qemu-utils");
    check
        .args(["-f", "raw", "-r"])
        .args(["-c", "read -P 0xa5 1M 192k", "-c", "read -P 0x3c 20M 64k"])
        .arg(s.tcp_uri());
    let out = String::from_utf8(run(check).stdout).unwrap();
    assert!(!out.contains("failed"), "{out}");
    let on_disk = std::fs::read(&file).unwrap();
    assert!(on_disk[MIB..MIB + 192 * 1024].iter().all(|&b| b == 0xa5));
    assert!(
        on_disk[2 * MIB..2 * MIB + 512 * 1024]
            .iter()
            .all(|&b| b == 0)
    );
    // A pattern check that must fail does fail: the check above can see errors.
    let mut wrong = tool("qemu-io", "qemu-utils");
    wrong
        .args(["-f", "raw", "-r", "-c", "read -P 0x11 1M 4k"])
        .arg(s.tcp_uri());
    let out = wrong.output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("failed"), "{text}");
}

#[test]
fn qemu_img_convert_reproduces_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (file, data) = sparse_image(dir.path());
    let s = Served::start(&file, dir.path(), &["--read-only"]);
    let out = dir.path().join("copy.raw");
    let mut c = tool("qemu-img", "qemu-utils");
    c.args(["convert", "-f", "raw", "-O", "raw", &s.tcp_uri()])
        .arg(&out);
    run(c);
    assert!(std::fs::read(&out).unwrap() == data);
}

#[test]
fn nbdinfo_list_and_map() {
    let dir = tempfile::tempdir().unwrap();
    let (file, _) = sparse_image(dir.path());
    let s = Served::start(&file, dir.path(), &["--description", "a test disk"]);
    let mut list = tool("nbdinfo", "libnbd-bin");
    list.args(["--list", "--json", &format!("nbd://{}", s.tcp)]);
    let v: serde_json::Value = serde_json::from_slice(&run(list).stdout).unwrap();
    let exports = v["exports"].as_array().unwrap();
    assert_eq!(exports.len(), 1);
    assert_eq!(exports[0]["export-name"], "disk");
    assert_eq!(exports[0]["description"], "a test disk");
    assert_eq!(exports[0]["export-size"], 64 * MIB);
    assert_eq!(exports[0]["can_multi_conn"], true);

    let mut map = tool("nbdinfo", "libnbd-bin");
    map.args(["--map", "--json", &s.tcp_uri()]);
    let v: serde_json::Value = serde_json::from_slice(&run(map).stdout).unwrap();
    let first = &v.as_array().unwrap()[0];
    assert_eq!(first["offset"], 0);
    assert_eq!(first["length"], 16 * MIB);
    assert_eq!(first["type"], 0);
    let rest: u64 = v.as_array().unwrap()[1..]
        .iter()
        .map(|e| {
            assert_eq!(e["type"], 3, "hole,zero: {e}");
            e["length"].as_u64().unwrap()
        })
        .sum();
    assert_eq!(rest, 48 * MIB as u64);
}

#[test]
fn nbdcopy_in_both_directions() {
    let dir = tempfile::tempdir().unwrap();
    let (file, data) = sparse_image(dir.path());
    let s = Served::start(&file, dir.path(), &[]);
    let out = dir.path().join("out.raw");
    let mut c = tool("nbdcopy", "libnbd-bin");
    c.arg(s.unix_uri()).arg(&out);
    run(c);
    assert!(std::fs::read(&out).unwrap() == data);

    let fresh = pattern(64 * MIB, 99);
    let src = dir.path().join("src.raw");
    std::fs::write(&src, &fresh).unwrap();
    let mut c = tool("nbdcopy", "libnbd-bin");
    c.arg(&src).arg(s.tcp_uri());
    run(c);
    assert!(std::fs::read(&file).unwrap() == fresh);
}

#[test]
fn read_only_refuses_writes_and_sigterm_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (file, data) = sparse_image(dir.path());
    let mut s = Served::start(&file, dir.path(), &["--read-only"]);
    let mut io = tool("qemu-io", "qemu-utils");
    io.args(["-f", "raw", "-c", "write -P 1 0 4k"])
        .arg(s.tcp_uri());
    let out = io.output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        // qemu sees NBD_FLAG_READ_ONLY and refuses to open the export for writing.
        text.contains("Permission denied") || text.contains("not permitted"),
        "{text}"
    );
    assert!(std::fs::read(&file).unwrap() == data);

    let status = s.stop();
    assert!(
        status.success(),
        "exit status {status}: {}",
        s.log.lock().unwrap()
    );
    assert!(!s.socket.exists(), "unix socket removed on exit");
    assert!(s.log.lock().unwrap().contains("NBD server stopped"));
}

#[test]
fn a_missing_file_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_virtman"))
        .args(["serve", "/nonexistent/disk.raw", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/disk.raw") && err.contains("No such file"),
        "{err}"
    );
}
