//! A real Linux guest boots under qemu from `virtman serve`: the test guest of
//! `virtman-testkit` (Debian cloud kernel, busybox initramfs, ext4 disk) reads
//! its marker file over NBD and appends a line that must land in the served
//! file. The same guest booting from the raw file is the control. Needs
//! qemu-system-x86, busybox-static, cpio, e2fsprogs and apt access for the
//! kernel .deb (installed by `.ci/run`).
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;

use common::Served;
use virtman_testkit::guest::{self, BOOTS_FILE, BootOptions, BootResult, Drive, MARKER};

/// SIGTERM; the server must exit cleanly (having flushed the guest's writes).
fn stop(mut served: Served) {
    let status = served.stop();
    assert!(
        status.success(),
        "virtman serve exited with {status}:\n{}",
        served.log.lock().unwrap()
    );
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
    let served = Served::start(&disk, dir.path(), &[]);
    boot(Drive::Nbd(served.unix_uri()), "virtman-unix");
    stop(served);
    assert_eq!(
        guest::read_disk_file(&disk, BOOTS_FILE).unwrap(),
        "boot virtman-unix\n"
    );
}

#[test]
fn guest_boots_from_virtman_serve_over_tcp_twice_and_sees_its_first_write() {
    let dir = tempfile::tempdir().unwrap();
    let disk = guest_disk(dir.path());
    let served = Served::start(&disk, dir.path(), &[]);
    boot(Drive::Nbd(served.tcp_uri()), "tcp-1");
    boot(Drive::Nbd(served.tcp_uri()), "tcp-2");
    stop(served);
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
    let served = Served::start(&nbd_disk, &nbd_dir, &[]);
    let nbd = boot(Drive::Nbd(served.unix_uri()), "same");
    stop(served);

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
