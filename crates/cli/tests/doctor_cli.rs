//! `virtman doctor` through the real binary: on a good data dir with a real
//! coordinator every check passes (KVM a warning where the CPU has none),
//! and each broken case FAILs naming the problem: a read-only data dir, a
//! full one, a cache larger than the free space, a port in use, a
//! coordinator that is down, one that refuses the token.

#![allow(missing_docs, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use virtman_testkit::ChildGuard;

const BIN: &str = env!("CARGO_BIN_EXE_virtman");
const TOKEN: &str = "doctor-test-token-0123456789abcdef";

/// A coordinator on 127.0.0.1:0 with `TOKEN`; its URL.
fn coordinator(dir: &Path) -> (ChildGuard, String) {
    let token = dir.join("coordinator-token");
    std::fs::write(&token, TOKEN).unwrap();
    let child = Command::new(BIN)
        .args(["coordinator", "--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.join("coordinator"))
        .arg("--token-file")
        .arg(&token)
        .env("VIRTMAN_LOG", "warn")
        .env("VIRTMAN_CONFIG_DIR", dir)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut guard = ChildGuard::new(child);
    let mut line = String::new();
    BufReader::new(guard.child_mut().stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    (guard, url)
}

/// A URL where nothing listens.
fn nowhere() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}", l.local_addr().unwrap())
}

/// The doctor's command with `args`, no config file from the host.
fn doctor(config_dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.arg("doctor")
        .args(args)
        .env("VIRTMAN_CONFIG_DIR", config_dir)
        .env("VIRTMAN_LOG", "warn")
        .env_remove("VIRTMAN_DATA_DIR");
    c
}

fn report(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// The report's line for `check`.
fn line<'a>(report: &'a str, check: &str) -> &'a str {
    report
        .lines()
        .find(|l| l.get(6..).is_some_and(|rest| rest.starts_with(check)))
        .unwrap_or_else(|| panic!("no {check} line in\n{report}"))
}

fn cpu_has_virtualization() -> bool {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

#[test]
fn a_good_host_passes() {
    let dir = tempfile::tempdir().unwrap();
    let (mut coord, url) = coordinator(dir.path());
    let token = dir.path().join("agent-token");
    std::fs::write(&token, TOKEN).unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let out = doctor(
        dir.path(),
        &["--listen", "127.0.0.1:0", "--cache-size", "64M"],
    )
    .args(["--coordinator", &url, "--name", "doctor-host"])
    .arg("--data-dir")
    .arg(&data)
    .arg("--token-file")
    .arg(&token)
    .output()
    .unwrap();
    let text = report(&out);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for check in [
        "data dir",
        "sparse",
        "punch-hole",
        "space",
        "listen",
        "coordinator",
        "credentials",
        "clock",
    ] {
        assert!(line(&text, check).starts_with("ok "), "{check}: {text}");
    }
    assert!(
        line(&text, "credentials").contains("accepts the token"),
        "{text}"
    );
    let kvm = line(&text, "kvm");
    if cpu_has_virtualization() {
        assert!(!kvm.starts_with("FAIL"), "{kvm}");
    } else {
        // No vmx/svm here: VMs run under TCG, which works; a warning.
        assert!(kvm.starts_with("warn") && kvm.contains("TCG"), "{kvm}");
    }
    // A line per check, and nothing FAILed.
    assert!(!text.contains("FAIL"), "{text}");
    coord.stop().unwrap();
}

#[test]
fn a_token_the_coordinator_refuses_fails() {
    let dir = tempfile::tempdir().unwrap();
    let (mut coord, url) = coordinator(dir.path());
    let token = dir.path().join("wrong-token");
    std::fs::write(&token, "not-the-coordinators-token-at-all").unwrap();
    let out = doctor(
        dir.path(),
        &["--listen", "127.0.0.1:0", "--cache-size", "1M"],
    )
    .args(["--coordinator", &url, "--name", "doctor-host"])
    .arg("--data-dir")
    .arg(dir.path())
    .arg("--token-file")
    .arg(&token)
    .output()
    .unwrap();
    let text = report(&out);
    assert!(!out.status.success(), "{text}");
    assert!(line(&text, "coordinator").starts_with("ok "), "{text}");
    let cred = line(&text, "credentials");
    assert!(
        cred.starts_with("FAIL") && cred.contains("refuses the token"),
        "{cred}"
    );
    assert!(cred.contains("--token-file"), "says what to do: {cred}");
    coord.stop().unwrap();
}

#[test]
fn a_coordinator_that_is_down_fails() {
    let dir = tempfile::tempdir().unwrap();
    let url = nowhere();
    let out = doctor(
        dir.path(),
        &[
            "--listen",
            "127.0.0.1:0",
            "--cache-size",
            "1M",
            "--coordinator",
            &url,
        ],
    )
    .arg("--data-dir")
    .arg(dir.path())
    .output()
    .unwrap();
    let text = report(&out);
    assert!(!out.status.success(), "{text}");
    let c = line(&text, "coordinator");
    assert!(
        c.starts_with("FAIL") && c.contains("cannot be reached") && c.contains(&url),
        "{c}"
    );
    // The rest still passes.
    assert!(line(&text, "data dir").starts_with("ok "), "{text}");
}

#[test]
fn a_port_in_use_fails() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = doctor(
        dir.path(),
        &[
            "--listen",
            &addr,
            "--cache-size",
            "1M",
            "--coordinator",
            &nowhere(),
        ],
    )
    .arg("--data-dir")
    .arg(dir.path())
    .output()
    .unwrap();
    let text = report(&out);
    assert!(!out.status.success(), "{text}");
    let l = line(&text, "listen");
    assert!(
        l.starts_with("FAIL") && l.contains(&addr) && l.contains("in use"),
        "{l}"
    );
}

#[test]
fn a_cache_larger_than_the_free_space_fails() {
    let dir = tempfile::tempdir().unwrap();
    let out = doctor(
        dir.path(),
        &[
            "--listen",
            "127.0.0.1:0",
            "--cache-size",
            "1000000T",
            "--coordinator",
            &nowhere(),
        ],
    )
    .arg("--data-dir")
    .arg(dir.path())
    .output()
    .unwrap();
    let text = report(&out);
    assert!(!out.status.success(), "{text}");
    let s = line(&text, "space");
    assert!(
        s.starts_with("FAIL") && s.contains("not enough space") && s.contains("--cache-size"),
        "{s}"
    );
}

/// Runs the doctor on a fresh tmpfs mounted at a temporary directory with
/// `mount_options`, filled up first if `fill`, in a private mount namespace
/// (the mount goes with the process). Needs root, as CI runs; elsewhere it
/// says so and returns `None`.
fn doctor_on_tmpfs(mount_options: &str, fill: bool) -> Option<String> {
    let probe = Command::new("unshare")
        .args(["-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("cannot mount a tmpfs in a private namespace here (not root?); skipping");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("data");
    std::fs::create_dir(&mnt).unwrap();
    let m = mnt.to_str().unwrap();
    let then = if fill {
        format!("{{ dd if=/dev/zero of={m}/fill bs=64k 2>/dev/null; true; }} &&")
    } else {
        String::new()
    };
    let script = format!(
        "mount -t tmpfs -o {mount_options} tmpfs {m} && {then} exec {BIN} doctor --data-dir {m} \
         --listen 127.0.0.1:0 --cache-size 64M --coordinator {}",
        nowhere()
    );
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .env("VIRTMAN_CONFIG_DIR", dir.path())
        .env("VIRTMAN_LOG", "warn")
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", report(&out));
    Some(report(&out))
}

#[test]
fn a_read_only_data_dir_fails() {
    let Some(text) = doctor_on_tmpfs("ro,size=16m", false) else {
        return;
    };
    let d = line(&text, "data dir");
    assert!(
        d.starts_with("FAIL") && d.contains("read-only file system"),
        "{text}"
    );
    assert!(d.contains("mount it read-write"), "says what to do: {d}");
}

#[test]
fn a_full_data_dir_fails() {
    let Some(text) = doctor_on_tmpfs("size=2m", true) else {
        return;
    };
    let d = line(&text, "data dir");
    assert!(d.starts_with("FAIL") && d.contains("is full"), "{text}");
    let s = line(&text, "space");
    assert!(
        s.starts_with("FAIL") && s.contains("not enough space"),
        "{text}"
    );
}
