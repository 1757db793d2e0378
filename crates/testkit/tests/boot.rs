//! The test guest boots, under qemu (TCG), from a local raw file and from
//! `qemu-nbd`: this checks the harness itself, independently of virtman's NBD
//! server. Needs qemu-system-x86, qemu-utils, busybox-static, cpio, e2fsprogs
//! and apt access for the kernel .deb (all installed by `.ci/run`).
#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use virtman_testkit::guest::{self, BOOTS_FILE, BootOptions, Drive, MARKER};
use virtman_testkit::{ChildGuard, tool};

fn opts(id: &str) -> BootOptions {
    BootOptions {
        boot_id: id.to_owned(),
        ..BootOptions::default()
    }
}

#[test]
fn guest_boots_from_a_raw_file_and_writes_to_it() {
    let assets = guest::assets().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    assets.copy_disk(&disk).unwrap();

    let result = guest::boot(&Drive::Raw(disk.clone()), &assets, &opts("raw-1")).unwrap();
    assert_eq!(result.marker, MARKER, "console:\n{}", result.console);
    assert!(result.time_to_marker <= result.time_to_done);
    assert_eq!(
        guest::read_disk_file(&disk, BOOTS_FILE).unwrap(),
        "boot raw-1\n"
    );
    // The template is untouched.
    assert_eq!(
        guest::read_disk_file(&assets.disk_template, BOOTS_FILE).unwrap(),
        ""
    );

    // A second boot of the same disk sees the first one's write and appends.
    guest::boot(&Drive::Raw(disk.clone()), &assets, &opts("raw-2")).unwrap();
    assert_eq!(
        guest::read_disk_file(&disk, BOOTS_FILE).unwrap(),
        "boot raw-1\nboot raw-2\n"
    );
}

#[test]
fn guest_boots_from_qemu_nbd() {
    let assets = guest::assets().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    assets.copy_disk(&disk).unwrap();
    let socket = dir.path().join("nbd.sock");

    let child = Command::new(tool("qemu-nbd", "qemu-utils"))
        .args([
            "--format=raw",
            "--persistent",
            "--export-name=disk",
            "--shared=4",
            "--socket",
        ])
        .arg(&socket)
        .arg(&disk)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut server = ChildGuard::new(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "qemu-nbd socket never appeared");
        std::thread::sleep(Duration::from_millis(20));
    }

    let uri = format!("nbd+unix:///disk?socket={}", socket.display());
    let result = guest::boot(&Drive::Nbd(uri), &assets, &opts("qemu-nbd")).unwrap();
    assert_eq!(result.marker, MARKER, "console:\n{}", result.console);
    server.stop().unwrap();
    assert_eq!(
        guest::read_disk_file(&disk, BOOTS_FILE).unwrap(),
        "boot qemu-nbd\n"
    );
}

#[test]
fn a_disk_without_ext4_fails_with_the_console_text() {
    let assets = guest::assets().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // A disk without an ext4 file system: the guest's mount fails and it says so.
    let disk = dir.path().join("zero.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let err = guest::boot(&Drive::Raw(disk), &assets, &opts("bad")).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("VIRTMAN-ERROR: mount /dev/vda"), "{text}");
}

#[test]
fn a_boot_past_its_timeout_fails_and_qemu_is_killed() {
    let assets = guest::assets().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    assets.copy_disk(&disk).unwrap();
    let opts = BootOptions {
        timeout: Duration::from_millis(300),
        ..opts("timeout")
    };
    let start = Instant::now();
    let err = guest::boot(&Drive::Raw(disk), &assets, &opts).unwrap_err();
    assert!(matches!(err, guest::GuestError::Timeout { .. }), "{err}");
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[test]
fn an_unreachable_nbd_server_fails_with_qemus_error() {
    let assets = guest::assets().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let uri = format!(
        "nbd+unix:///disk?socket={}",
        dir.path().join("nobody.sock").display()
    );
    let start = Instant::now();
    let err = guest::boot(&Drive::Nbd(uri), &assets, &opts("unreachable")).unwrap_err();
    assert!(matches!(err, guest::GuestError::Failed { .. }), "{err}");
    assert!(err.to_string().contains("nobody.sock"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(30));
}
