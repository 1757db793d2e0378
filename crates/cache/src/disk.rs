//! The cache group's disk: one seam for its file I/O, so that tests can make
//! the disk fail.
//!
//! Every read, write, sync and hole punch of a volume's data file or a
//! snapshot's overlay goes through a `DiskFile`, and every replacement of a
//! presence map or snapshot map through `DiskFaults::record`. In service
//! the group's [`DiskFaults`] is empty and each call is the plain system call
//! (one branch more). A test opens the group with
//! [`crate::CacheGroup::open_with_faults`] and arms [`Fault`]s: EIO or ENOSPC
//! on a read, a write, a sync, a punch or a map write, or a short write (the
//! first half of the bytes written, then the error).
//!
//! What the group does when its disk fails (tested in `tests/disk_faults.rs`):
//!
//! | failure | cached volume | snapshot |
//! | --- | --- | --- |
//! | read | the chunks are dropped and fetched again from the upstream; EIO only if that fails too | EIO (the VM's own data has no other copy) |
//! | write, short write | the verified chunk is served from memory and stays absent | EIO; the blocks keep their allocation (a new block still reads from the base) |
//! | sync | the batch is dropped (absent, fetched again), never marked durable: after a failed `fdatasync` the kernel may have dropped the pages, and a second sync would wrongly succeed | EIO, and every later flush fails too (the writes since the last good flush may be lost); the map on disk stays at the last good flush |
//! | map write | the commit fails and is retried; the old map stays | the flush fails and the next one retries |

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rustix::io::Errno;
use virtman_image::checked::CheckedFileError;

/// Which files a [`Fault`] hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A cached volume's data file and presence map.
    Volume,
    /// A snapshot's overlay and allocation map.
    Snapshot,
}

/// Which operation a [`Fault`] hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Io {
    /// Reading (`pread`).
    Read,
    /// Writing (`pwrite`).
    Write,
    /// `fdatasync`.
    Sync,
    /// Punching a hole (eviction, TRIM).
    Punch,
    /// Replacing a presence or allocation map file.
    Record,
}

/// One armed failure: the matching calls after the first `skip` fail with
/// `errno`, `times` of them (then it is spent).
#[derive(Clone, Copy, Debug)]
pub struct Fault {
    io: Io,
    role: Option<Role>,
    errno: Errno,
    short: bool,
    /// Not a failure: the call waits this long, then succeeds.
    stall: Option<std::time::Duration>,
    skip: u32,
    times: u32,
}

impl Fault {
    /// Every `io` call on any file fails with `errno`.
    pub fn new(io: Io, errno: Errno) -> Fault {
        Fault {
            io,
            role: None,
            errno,
            short: false,
            stall: None,
            skip: 0,
            times: u32::MAX,
        }
    }

    /// Every `io` call on any file waits `d`, then succeeds (a slow disk;
    /// what others do meanwhile is what a test looks at).
    pub fn stall(io: Io, d: std::time::Duration) -> Fault {
        Fault {
            stall: Some(d),
            ..Fault::new(io, Errno::IO)
        }
    }

    /// Only on files of `role`.
    #[must_use]
    pub fn on(mut self, role: Role) -> Fault {
        self.role = Some(role);
        self
    }

    /// The first `n` matching calls succeed.
    #[must_use]
    pub fn skip(mut self, n: u32) -> Fault {
        self.skip = n;
        self
    }

    /// Fails `n` calls, then is spent (default: every call).
    #[must_use]
    pub fn times(mut self, n: u32) -> Fault {
        self.times = n;
        self
    }

    /// A write that stores its first half before failing.
    #[must_use]
    pub fn short(mut self) -> Fault {
        self.short = true;
        self
    }

    fn matches(&self, role: Role, io: Io) -> bool {
        self.io == io && self.role.is_none_or(|r| r == role) && self.times > 0
    }
}

#[derive(Debug, Default)]
struct Plan {
    faults: Vec<Fault>,
    injected: u64,
}

/// The failures armed on a cache group's disk (for tests). The default has
/// none and costs one branch per call.
#[derive(Clone, Debug, Default)]
pub struct DiskFaults(Option<Arc<Mutex<Plan>>>);

impl DiskFaults {
    /// A disk that fails when told to (no fault armed yet).
    pub fn armed() -> DiskFaults {
        DiskFaults(Some(Arc::default()))
    }

    fn plan(&self) -> Option<std::sync::MutexGuard<'_, Plan>> {
        self.0
            .as_ref()
            .map(|p| p.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Arms `fault` (on a default `DiskFaults`, does nothing).
    pub fn add(&self, fault: Fault) {
        if let Some(mut p) = self.plan() {
            p.faults.push(fault);
        }
    }

    /// Disarms every fault.
    pub fn clear(&self) {
        if let Some(mut p) = self.plan() {
            p.faults.clear();
        }
    }

    /// Calls failed (or stalled) so far.
    pub fn injected(&self) -> u64 {
        self.plan().map_or(0, |p| p.injected)
    }

    /// Whether a call of `io` on a `role` file would fail now (without
    /// counting it).
    fn would_fail(&self, role: Role, io: Io) -> bool {
        self.plan().is_some_and(|p| {
            p.faults
                .iter()
                .any(|f| f.stall.is_none() && f.matches(role, io))
        })
    }

    /// The failure of this call, if one is armed: (errno, short).
    fn take(&self, role: Role, io: Io) -> Option<(Errno, bool)> {
        let mut p = self.plan()?;
        let f = p.faults.iter_mut().find(|f| f.matches(role, io))?;
        if f.skip > 0 {
            f.skip -= 1;
            return None;
        }
        f.times -= 1;
        if let Some(d) = f.stall {
            p.injected += 1;
            drop(p);
            std::thread::sleep(d);
            return None;
        }
        let hit = (f.errno, f.short);
        p.injected += 1;
        Some(hit)
    }

    /// Replaces the map file `path` of a `role` object by running `save`,
    /// unless a [`Io::Record`] fault fails it first (the old file stays, as
    /// when the atomic replacement fails for real).
    pub(crate) fn record(
        &self,
        role: Role,
        path: &Path,
        save: impl FnOnce() -> Result<(), CheckedFileError>,
    ) -> Result<(), CheckedFileError> {
        if let Some((errno, _)) = self.take(role, Io::Record) {
            return Err(CheckedFileError::Io {
                path: path.to_path_buf(),
                source: errno.into(),
            });
        }
        save()
    }
}

/// A volume's data file or a snapshot's overlay, with its I/O through the
/// group's [`DiskFaults`].
#[derive(Debug)]
pub(crate) struct DiskFile {
    file: File,
    role: Role,
    faults: DiskFaults,
}

impl DiskFile {
    pub(crate) fn new(file: File, role: Role, faults: DiskFaults) -> DiskFile {
        DiskFile { file, role, faults }
    }

    /// The faults of the group the file belongs to.
    pub(crate) fn faults(&self) -> &DiskFaults {
        &self.faults
    }

    fn fail(&self, io: Io) -> Option<(Errno, bool)> {
        self.faults.take(self.role, io)
    }

    /// Fills `buf` from `offset`.
    pub(crate) fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if let Some((errno, _)) = self.fail(Io::Read) {
            return Err(errno.into());
        }
        self.file.read_exact_at(buf, offset)
    }

    /// Fills `buf` from `offset` if it is all in the page cache
    /// (`RWF_NOWAIT`); false if it is not, if the kernel cannot tell, or if
    /// a read fault is armed (the caller then reads with
    /// [`DiskFile::read_exact_at`], which meets it).
    pub(crate) fn read_cached(&self, buf: &mut [u8], offset: u64) -> bool {
        if self.faults.would_fail(self.role, Io::Read) {
            return false;
        }
        let want = buf.len();
        let mut slices = [io::IoSliceMut::new(buf)];
        let flags = rustix::io::ReadWriteFlags::NOWAIT;
        matches!(rustix::io::preadv2(&self.file, &mut slices, offset, flags), Ok(n) if n == want)
    }

    /// Writes all of `data` at `offset`.
    pub(crate) fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        if let Some((errno, short)) = self.fail(Io::Write) {
            if short {
                self.file.write_all_at(&data[..data.len() / 2], offset)?;
            }
            return Err(errno.into());
        }
        self.file.write_all_at(data, offset)
    }

    /// `fdatasync`.
    pub(crate) fn sync_data(&self) -> io::Result<()> {
        if let Some((errno, _)) = self.fail(Io::Sync) {
            return Err(errno.into());
        }
        rustix::fs::fdatasync(&self.file).map_err(io::Error::from)
    }

    /// Punches a hole. `Ok(false)` if the file system cannot (the bytes
    /// stay).
    pub(crate) fn punch(&self, offset: u64, len: u64) -> io::Result<bool> {
        use rustix::fs::FallocateFlags;
        if let Some((errno, _)) = self.fail(Io::Punch) {
            return Err(errno.into());
        }
        match rustix::fs::fallocate(
            &self.file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => Ok(true),
            Err(Errno::OPNOTSUPP | Errno::NOSYS) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn file(faults: &DiskFaults) -> (tempfile::NamedTempFile, DiskFile) {
        let t = tempfile::NamedTempFile::new().unwrap();
        let f = File::options()
            .read(true)
            .write(true)
            .open(t.path())
            .unwrap();
        f.set_len(8192).unwrap();
        (t, DiskFile::new(f, Role::Volume, faults.clone()))
    }

    #[test]
    fn faults_match_role_and_operation_skip_and_run_out() {
        let faults = DiskFaults::armed();
        let (_t, d) = file(&faults);
        faults.add(Fault::new(Io::Write, Errno::IO).on(Role::Snapshot));
        faults.add(
            Fault::new(Io::Read, Errno::IO)
                .on(Role::Volume)
                .skip(1)
                .times(2),
        );
        d.write_all_at(b"abcd", 0).unwrap();
        let mut buf = [0u8; 4];
        d.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"abcd");
        assert!(
            !d.read_cached(&mut buf, 0),
            "an armed read fault skips the page cache"
        );
        for _ in 0..2 {
            let e = d.read_exact_at(&mut buf, 0).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(Errno::IO.raw_os_error()));
        }
        d.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(faults.injected(), 2);
        d.sync_data().unwrap();
    }

    #[test]
    fn a_short_write_stores_half_then_fails() {
        let faults = DiskFaults::armed();
        let (_t, d) = file(&faults);
        faults.add(Fault::new(Io::Write, Errno::NOSPC).short().times(1));
        let e = d.write_all_at(&[7u8; 1000], 100).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(Errno::NOSPC.raw_os_error()));
        let mut buf = [0u8; 1000];
        d.read_exact_at(&mut buf, 100).unwrap();
        assert!(buf[..500].iter().all(|&b| b == 7));
        assert!(buf[500..].iter().all(|&b| b == 0));
        faults.clear();
        d.write_all_at(&[8u8; 10], 0).unwrap();
    }

    #[test]
    fn a_default_disk_never_fails_and_records() {
        let faults = DiskFaults::default();
        faults.add(Fault::new(Io::Sync, Errno::IO));
        let (_t, d) = file(&faults);
        d.sync_data().unwrap();
        let mut called = false;
        faults
            .record(Role::Volume, Path::new("x"), || {
                called = true;
                Ok(())
            })
            .unwrap();
        assert!(called);
        let armed = DiskFaults::armed();
        armed.add(Fault::new(Io::Record, Errno::NOSPC).times(1));
        let e = armed
            .record(Role::Snapshot, Path::new("x"), || panic!("not called"))
            .unwrap_err();
        assert!(matches!(e, CheckedFileError::Io { .. }));
        assert_eq!(armed.injected(), 1);
    }
}
