//! Whether this machine can hold a storm: open files per process and free
//! disk, checked before anything starts, with the reason when it cannot.

use std::path::Path;

use super::{StormConfig, StormError, StormMode};

/// Open files one VM costs the storm process (its connection, or a qemu's
/// pipes) and its host's agent (its connection, its snapshot's files), with
/// room for everything else.
const FILES_PER_VM: u64 = 4;
const FILES_BASE: u64 = 256;

/// Refuses a storm this machine cannot hold: more VMs than the open file
/// limit allows one process (the `virtman` binary raises its soft limit to
/// the hard one at start; the cluster's processes inherit it), or less free
/// disk than the origin's copy of the image and every host's cache of the
/// working set take.
pub(super) fn check_capacity(
    config: &StormConfig,
    mode: StormMode,
    image_size: u64,
    working_set: u64,
) -> Result<(), StormError> {
    let files = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX);
    std::fs::create_dir_all(&config.dir).map_err(|e| StormError::Config(e.to_string()))?;
    let free = rustix::fs::statvfs(&config.dir)
        .map_or(u64::MAX, |st| st.f_bavail.saturating_mul(st.f_frsize));
    let need = Needs::of(config.vms, config.hosts, mode, image_size, working_set);
    need.check(files, free, &config.dir)
        .map_err(StormError::Config)
}

/// What a storm takes of one machine.
#[derive(Debug, PartialEq, Eq)]
struct Needs {
    vms: usize,
    /// Open files of the busiest process (an agent, or the storm itself).
    files: u64,
    /// Disk bytes: the origin's copy of the image and the hosts' caches.
    disk: u64,
}

impl Needs {
    fn of(vms: usize, hosts: usize, mode: StormMode, image_size: u64, working_set: u64) -> Needs {
        // The storm process holds a connection (or a qemu's pipes) for every
        // VM, more than any agent holds for its own VMs.
        let busiest = vms as u64;
        let disk = if mode == StormMode::Direct {
            0
        } else {
            let cache = if working_set > 0 {
                working_set
            } else {
                image_size
            };
            image_size.saturating_add(cache.saturating_mul(hosts as u64))
        };
        Needs {
            vms,
            files: busiest
                .saturating_mul(FILES_PER_VM)
                .saturating_add(FILES_BASE),
            disk,
        }
    }

    fn check(&self, files: u64, free: u64, dir: &Path) -> Result<(), String> {
        if self.files > files {
            return Err(format!(
                "{} VMs need about {} open files in one process, but the limit is {files} \
                 (ulimit -n): use fewer VMs, or raise the hard limit",
                self.vms, self.files
            ));
        }
        if self.disk > free {
            return Err(format!(
                "the origin's copy of the image and the host caches need about {} MiB under {}, \
                 but only {} MiB are free: use fewer hosts, or another TMPDIR",
                self.disk >> 20,
                dir.display(),
                free >> 20
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storms_larger_than_the_machine_are_refused_with_the_reason() {
        let dir = Path::new("/tmp/x");
        // 8 hosts x 100 VMs: the storm process holds 800 connections.
        let n = Needs::of(800, 8, StormMode::Virtman, 1 << 30, 60 << 20);
        assert_eq!(n.files, 800 * FILES_PER_VM + FILES_BASE);
        assert_eq!(n.disk, (1 << 30) + 8 * (60 << 20));
        assert!(n.check(n.files, n.disk, dir).is_ok());
        let e = n.check(n.files - 1, u64::MAX, dir).unwrap_err();
        assert!(
            e.contains("800 VMs need about 3456 open files") && e.contains("ulimit -n"),
            "{e}"
        );
        let e = n.check(u64::MAX, n.disk - 1, dir).unwrap_err();
        assert!(
            e.contains("need about 1504 MiB under /tmp/x") && e.contains("TMPDIR"),
            "{e}"
        );
        // Direct mode caches nothing; real guests without a trace count the
        // whole image per host.
        assert_eq!(Needs::of(8, 2, StormMode::Direct, 1 << 30, 0).disk, 0);
        assert_eq!(
            Needs::of(8, 2, StormMode::CacheOnly, 1 << 20, 0).disk,
            3 << 20
        );
    }
}
