//! External programs: finding them ([`tool`]) and stopping them ([`ChildGuard`]).
//!
//! ```text
//! drop(guard) ─► exited? ──yes──► done (reaped)
//!                  │ no
//!                  ▼
//!               SIGTERM ─► wait up to `grace` ─► exited? ─no─► SIGKILL ─► wait
//! ```

use std::path::PathBuf;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process};

/// Directories searched after `PATH`: sbin tools such as `mkfs.ext4` or
/// `debugfs` are often outside a non-root user's `PATH`.
const EXTRA_DIRS: [&str; 4] = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"];

/// Returns the path of the program `name`, searching `PATH` and the sbin
/// directories.
///
/// # Panics
/// If the program is not found, with a message naming `debian_package`, the
/// package to install. Meant for tests: a missing tool is a setup error.
#[must_use]
pub fn tool(name: &str, debian_package: &str) -> PathBuf {
    find_tool(name).unwrap_or_else(|| {
        panic!(
            "{name} not found in PATH or {EXTRA_DIRS:?}: install the Debian package \
             `{debian_package}` (apt-get install {debian_package})"
        )
    })
}

/// Like [`tool`], but returns `None` instead of panicking.
#[must_use]
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(EXTRA_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A child process that is stopped and reaped when dropped.
///
/// On drop, a child still running gets SIGTERM, then SIGKILL if it has not
/// exited after the grace period (5 s unless set with
/// [`ChildGuard::with_grace`]); either way it is waited for, so no zombie or
/// stray process outlives the test.
#[derive(Debug)]
pub struct ChildGuard {
    /// `None` once the child has been reaped by [`ChildGuard::stop`].
    child: Option<Child>,
    /// How long a SIGTERM gets before SIGKILL.
    grace: Duration,
}

impl ChildGuard {
    /// Guards `child` with a 5 s grace period.
    #[must_use]
    pub fn new(child: Child) -> Self {
        Self {
            child: Some(child),
            grace: Duration::from_secs(5),
        }
    }

    /// Sets how long the child gets to exit after SIGTERM before SIGKILL.
    #[must_use]
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// The process id (0 once [`ChildGuard::stop`] has reaped the child).
    #[must_use]
    pub fn id(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The guarded child, to take its pipes or poll it.
    ///
    /// # Panics
    /// After [`ChildGuard::stop`] (the child is gone).
    #[allow(clippy::expect_used)]
    pub fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("ChildGuard used after stop()")
    }

    /// Returns the exit status if the child has exited, without blocking.
    ///
    /// # Errors
    /// If waiting fails.
    pub fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => c.try_wait(),
            None => Ok(None),
        }
    }

    /// Waits up to `timeout` for the child to exit by itself.
    ///
    /// # Errors
    /// If waiting fails.
    pub fn wait_timeout(&mut self, timeout: Duration) -> std::io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends SIGTERM, waits up to the grace period, then SIGKILLs, and reaps
    /// the child. Returns its exit status (`None` if it was already reaped).
    ///
    /// # Errors
    /// If signalling or waiting fails.
    pub fn stop(&mut self) -> std::io::Result<Option<ExitStatus>> {
        let Some(mut child) = self.child.take() else {
            return Ok(None);
        };
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        signal(&child, Signal::TERM);
        let deadline = Instant::now() + self.grace;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                return Ok(Some(status));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // Child::kill sends SIGKILL; it only fails if the child is gone.
        let _ = child.kill();
        child.wait().map(Some)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // Nothing to report to from a destructor; the child is reaped or the
        // wait failed, and either way nothing more can be done.
        let _ = self.stop();
    }
}

/// Sends `sig` to `child`, ignoring a child that has already gone.
fn signal(child: &Child, sig: Signal) {
    let pid = i32::try_from(child.id()).ok().and_then(Pid::from_raw);
    if let Some(pid) = pid {
        let _ = kill_process(pid, sig);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::process::Command;

    #[test]
    fn tool_finds_sh_and_names_the_package_when_missing() {
        assert!(tool("sh", "dash").is_absolute());
        let err =
            std::panic::catch_unwind(|| tool("virtman-no-such-tool", "some-pkg")).unwrap_err();
        let msg = err.downcast_ref::<String>().unwrap();
        assert!(msg.contains("some-pkg"), "{msg}");
    }

    #[test]
    fn drop_stops_a_running_child() {
        let child = Command::new("sleep").arg("1000").spawn().unwrap();
        let pid = child.id();
        drop(ChildGuard::new(child));
        // Reaped: the pid no longer names our child.
        let proc_status = std::fs::read_to_string(format!("/proc/{pid}/status"));
        assert!(proc_status.is_err() || !proc_status.unwrap().contains("sleep"));
    }

    #[test]
    fn stop_escalates_to_sigkill_when_sigterm_is_ignored() {
        let child = Command::new("sh")
            .args(["-c", "trap '' TERM; while :; do sleep 0.05; done"])
            .spawn()
            .unwrap();
        let mut guard = ChildGuard::new(child).with_grace(Duration::from_millis(200));
        std::thread::sleep(Duration::from_millis(100));
        let start = Instant::now();
        let status = guard.stop().unwrap().unwrap();
        assert!(!status.success());
        assert!(start.elapsed() < Duration::from_secs(5));
    }
}
