//! Helpers for virtman's integration tests, shared by every crate.
//!
//! - [`tool`]: find an external program, or panic with the Debian package that
//!   provides it, so a missing tool fails a test with the fix in the message.
//! - [`ChildGuard`]: a child process that is stopped (SIGTERM, then SIGKILL)
//!   and reaped when the guard is dropped, so a failing test leaves nothing
//!   running.
//! - [`pattern`]: deterministic test data.
//! - [`etcd`]: a real etcd cluster on loopback ports.
//! - [`pki`]: a node's or operator's certificate directory from a test CA.
//! - [`guest`]: a tiny Linux guest (Debian cloud kernel, busybox initramfs,
//!   small ext4 disk) built once per target dir, and a qemu boot of it from any
//!   NBD URI or raw file, with the serial console captured.
//!
//! Booting the guest from an NBD export in a test (add `virtman-testkit` to
//! the crate's `[dev-dependencies]`):
//!
//! ```no_run
//! use virtman_testkit::guest::{self, BOOTS_FILE, BootOptions, Drive, MARKER};
//!
//! let assets = guest::assets().unwrap(); // built once, cached in target/
//! let disk = std::path::Path::new("/tmp/t/disk.raw");
//! assets.copy_disk(disk).unwrap(); // never boot the template itself
//! // ... serve `disk` over NBD at /tmp/t/nbd.sock, export "disk" ...
//! let opts = BootOptions { boot_id: "vm1".into(), ..BootOptions::default() };
//! let uri = "nbd+unix:///disk?socket=/tmp/t/nbd.sock".to_owned();
//! let booted = guest::boot(&Drive::Nbd(uri), &assets, &opts).unwrap();
//! assert_eq!(booted.marker, MARKER);
//! // ... stop the server, then check where the guest's write went:
//! assert_eq!(guest::read_disk_file(disk, BOOTS_FILE).unwrap(), "boot vm1\n");
//! ```

pub mod etcd;
pub mod guest;
pub mod pki;
mod process;

pub use process::{ChildGuard, tool};

/// Deterministic pseudo-random bytes (xorshift), so a test's data differs in
/// every byte position and between seeds, and a wrong offset shows.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_be_bytes()[4]
        })
        .collect()
}
