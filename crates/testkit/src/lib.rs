//! Helpers for virtman's integration tests, shared by every crate.
//!
//! - [`tool`]: find an external program, or panic with the Debian package that
//!   provides it, so a missing tool fails a test with the fix in the message.
//! - [`ChildGuard`]: a child process that is stopped (SIGTERM, then SIGKILL)
//!   and reaped when the guard is dropped, so a failing test leaves nothing
//!   running.
//! - [`guest`]: a tiny Linux guest (Debian cloud kernel, busybox initramfs,
//!   small ext4 disk) built once per target dir, and a qemu boot of it from any
//!   NBD URI or raw file, with the serial console captured.

pub mod guest;
mod process;

pub use process::{ChildGuard, tool};
