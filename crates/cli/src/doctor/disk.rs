//! Checks of the data directory's file system: what the cache group needs
//! (writes, sparse files, punch-hole to give evicted chunks' space back)
//! and room for `--cache-size`.
//!
//! The checks write one scratch file (`.virtman-doctor-*`, at most 1 MiB of
//! data) in the data directory, or in its nearest existing parent when the
//! agent has not made it yet, and remove it.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::Check;
use crate::units::human;

/// Bytes the scratch file writes.
const PROBE: u64 = 1 << 20;

/// Every data dir check, in order; after a failure to write at all, the
/// rest are left out.
pub fn checks(data_dir: &Path, cache_size: u64) -> Vec<Check> {
    let (dir, note) = match nearest_existing(data_dir) {
        Some(d) if d == data_dir => (d, String::new()),
        Some(d) => (
            d.clone(),
            format!(
                " (does not exist yet; checked on {}, where the agent will make it)",
                d.display()
            ),
        ),
        None => {
            return vec![Check::fail(
                "data dir",
                format!("no part of {} exists", data_dir.display()),
                "give an absolute --data-dir (data_dir in the config)",
            )];
        }
    };
    let shown = data_dir.display();
    let mut out = Vec::new();
    let file = match scratch(&dir) {
        Ok(f) => f,
        Err(e) => {
            out.push(write_failure(&shown.to_string(), &e));
            out.push(space(data_dir, &dir, cache_size));
            return out;
        }
    };
    out.push(Check::ok(
        "data dir",
        format!("{shown} is writable ({}){note}", fs_name(&dir)),
    ));
    out.push(sparse(file.as_file()));
    out.push(punch(file.as_file()));
    out.push(direct(file.path()));
    out.push(space(data_dir, &dir, cache_size));
    out
}

/// `path` or its nearest parent that exists.
fn nearest_existing(path: &Path) -> Option<PathBuf> {
    path.ancestors()
        .find(|p| !p.as_os_str().is_empty() && p.is_dir())
        .map(Path::to_owned)
        .or_else(|| path.is_relative().then(|| PathBuf::from(".")))
}

/// Creates the scratch file and writes [`PROBE`] bytes to it, synced.
fn scratch(dir: &Path) -> std::io::Result<tempfile::NamedTempFile> {
    let mut f = tempfile::Builder::new()
        .prefix(".virtman-doctor-")
        .tempfile_in(dir)?;
    let block = vec![0xa5u8; 64 << 10];
    for _ in 0..PROBE / block.len() as u64 {
        f.write_all(&block)?;
    }
    f.as_file().sync_all()?;
    Ok(f)
}

fn write_failure(dir: &str, e: &std::io::Error) -> Check {
    use std::io::ErrorKind;
    // By kind: tempfile's errors carry the path, not the raw errno.
    let (what, fix) = match e.kind() {
        ErrorKind::ReadOnlyFilesystem => (
            "is on a read-only file system",
            "mount it read-write, or choose another --data-dir (data_dir in the config)",
        ),
        ErrorKind::StorageFull | ErrorKind::QuotaExceeded => (
            "is full (no space left on the device)",
            "free space there, or choose another --data-dir",
        ),
        ErrorKind::PermissionDenied => (
            "is not writable by this user",
            "run the agent as the directory's owner, or chown it",
        ),
        _ => (
            "cannot be written",
            "check the directory and its file system",
        ),
    };
    Check::fail("data dir", format!("{dir} {what}: {e}"), fix)
}

/// Whether a file can have holes: 64 MiB long with 1 MiB written must not
/// take 64 MiB. The cache group's files are as long as the images they
/// cache.
fn sparse(file: &std::fs::File) -> Check {
    let result = file
        .set_len(64 << 20)
        .and_then(|()| file.sync_all())
        .and_then(|()| file.metadata());
    match result {
        Ok(m) if m.blocks() * 512 <= 2 * PROBE => Check::ok(
            "sparse",
            format!(
                "a 64 MiB file with 1 MiB written takes {}",
                human(m.blocks() * 512)
            ),
        ),
        Ok(m) => Check::warn(
            "sparse",
            format!(
                "no sparse files: a 64 MiB file with 1 MiB written takes {}",
                human(m.blocks() * 512)
            ),
            "the cache takes its whole size at once: use ext4, xfs or btrfs",
        ),
        Err(e) => Check::fail(
            "sparse",
            format!("growing a file: {e}"),
            "check the file system",
        ),
    }
}

/// Whether punch-hole works: evicting a chunk gives its space back.
fn punch(file: &std::fs::File) -> Check {
    use rustix::fs::FallocateFlags;
    let before = file.metadata().map(|m| m.blocks()).unwrap_or(0);
    let result = rustix::fs::fallocate(
        file,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        0,
        PROBE,
    );
    match result {
        Ok(()) => {
            let after = file.metadata().map(|m| m.blocks()).unwrap_or(before);
            Check::ok(
                "punch-hole",
                format!(
                    "fallocate(PUNCH_HOLE) freed {}",
                    human(before.saturating_sub(after) * 512)
                ),
            )
        }
        Err(e) => Check::warn(
            "punch-hole",
            format!("fallocate(PUNCH_HOLE) fails ({e}): evicted chunks keep their space"),
            "use a file system with punch-hole (ext4, xfs, btrfs, tmpfs)",
        ),
    }
}

/// Whether files open with O_DIRECT (qemu's `cache=none` on local files
/// needs it; the agent itself uses the page cache).
fn direct(path: &Path) -> Check {
    let flags = i32::try_from(rustix::fs::OFlags::DIRECT.bits()).unwrap_or(0);
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)
    {
        Ok(_) => Check::ok("O_DIRECT", "files open with O_DIRECT"),
        Err(e) => Check::warn(
            "O_DIRECT",
            format!("opening with O_DIRECT fails ({e})"),
            "qemu disks with cache=none cannot live here; the agent does not need it",
        ),
    }
}

/// Free space against the cache's capacity, counting what the cache
/// already holds in the data dir.
fn space(data_dir: &Path, probe_dir: &Path, cache_size: u64) -> Check {
    let stat = match rustix::fs::statvfs(probe_dir) {
        Ok(s) => s,
        Err(e) => {
            return Check::fail(
                "space",
                format!("statvfs {}: {e}", probe_dir.display()),
                "check the mount",
            );
        }
    };
    let free = stat.f_bavail.saturating_mul(stat.f_frsize);
    let used = allocated(data_dir);
    let needed = cache_size.saturating_sub(used);
    let have = format!(
        "{} free for a cache of {} ({} already in {})",
        human(free),
        human(cache_size),
        human(used),
        data_dir.display()
    );
    if free >= needed {
        Check::ok("space", have)
    } else {
        Check::fail(
            "space",
            format!("not enough space: {have}"),
            format!(
                "lower --cache-size (cache_size in the config) to at most {}, or free space",
                human(free.saturating_add(used))
            ),
        )
    }
}

/// Bytes allocated to the files under `dir` (0 if it does not exist).
fn allocated(dir: &Path) -> u64 {
    let mut total = 0u64;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(m) = entry.metadata() else { continue };
            if m.is_dir() {
                stack.push(entry.path());
            } else if m.is_file() {
                total = total.saturating_add(m.blocks().saturating_mul(512));
            }
        }
    }
    total
}

/// The file system's name, from its magic number.
fn fs_name(dir: &Path) -> String {
    let Ok(s) = rustix::fs::statfs(dir) else {
        return "file system unknown".to_owned();
    };
    #[allow(clippy::cast_sign_loss)]
    let magic = s.f_type as u64;
    let name = match magic {
        0xef53 => "ext4",
        0x5846_5342 => "xfs",
        0x9123_683e => "btrfs",
        0x0102_1994 => "tmpfs",
        0x794c_7630 => "overlayfs",
        0x2fc1_2fc1 => "zfs",
        0x6969 => "nfs",
        0xff53_4d42 => "cifs",
        _ => return format!("file system 0x{magic:x}"),
    };
    name.to_owned()
}

#[cfg(test)]
mod tests {
    use super::super::Level;
    use super::*;

    #[test]
    fn a_good_dir_passes_and_a_huge_cache_does_not_fit() {
        let dir = tempfile::tempdir().unwrap();
        let checks = checks(dir.path(), 1 << 20);
        let names: Vec<_> = checks.iter().map(|c| c.name).collect();
        assert_eq!(
            names,
            ["data dir", "sparse", "punch-hole", "O_DIRECT", "space"]
        );
        for c in &checks {
            assert_ne!(c.level, Level::Fail, "{}", c.line());
        }
        let scratch_left = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(scratch_left, 0, "the scratch file is removed");
        let huge = checks_space(dir.path(), u64::MAX / 2);
        assert_eq!(huge.level, Level::Fail, "{}", huge.line());
        assert!(huge.detail.contains("not enough space"), "{}", huge.line());
    }

    fn checks_space(dir: &Path, size: u64) -> Check {
        space(dir, dir, size)
    }

    #[test]
    fn a_dir_not_made_yet_is_checked_on_its_parent() {
        let dir = tempfile::tempdir().unwrap();
        let checks = checks(&dir.path().join("a/b"), 1 << 20);
        assert_eq!(checks[0].level, Level::Ok, "{}", checks[0].line());
        assert!(
            checks[0].detail.contains("does not exist yet"),
            "{}",
            checks[0].line()
        );
    }
}
