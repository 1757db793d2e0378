//! A tiny Linux test guest, and booting it under qemu from any disk source.
//!
//! ```text
//! assets()  target/guest-assets/           built once by guest/build.sh, under a
//!             vmlinuz                      lock file; rebuilt when build.sh changes
//!             initrd.cpio   (busybox /init)
//!             disk.raw      (16 MiB ext4: marker.txt, boots.txt)
//!
//! boot(drive) qemu-system-x86_64 (TCG) ─ virtio-blk ─► NBD URI or raw file
//!             serial console ─► lines:  VIRTMAN-MARKER: <marker.txt>
//!                                       VIRTMAN-DONE      (after appending
//!                                       "boot <id>" to boots.txt, sync, umount)
//! ```
//!
//! A boot takes a few seconds under TCG. [`boot`] returns the console text and
//! the times to the marker and to the done line; on a timeout it kills qemu
//! and returns the console text in the error. [`read_disk_file`] reads a file
//! back from an ext4 image with `debugfs`, so a test can check where the
//! guest's writes landed.

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use crate::process::{ChildGuard, tool};

/// The line prefix the guest prints before the marker file's content.
pub const MARKER_PREFIX: &str = "VIRTMAN-MARKER: ";
/// The line the guest prints after its write is synced and the disk unmounted.
pub const DONE_LINE: &str = "VIRTMAN-DONE";
/// The line prefix the guest prints when a step of its /init fails.
pub const ERROR_PREFIX: &str = "VIRTMAN-ERROR: ";
/// The content of `/marker.txt` on the guest disk.
pub const MARKER: &str = "virtman test guest disk";
/// The file on the guest disk that every boot appends `boot <id>` to.
pub const BOOTS_FILE: &str = "/boots.txt";

/// The build script, run by [`assets`]; its text is also the cache stamp.
const BUILD_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/guest/build.sh");
const BUILD_SCRIPT_TEXT: &str = include_str!("../guest/build.sh");

/// What went wrong building or booting the guest.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// A file or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// `guest/build.sh` failed.
    #[error("guest build script {script} failed ({status}):\n{output}")]
    Build {
        /// The script's path.
        script: String,
        /// Its exit status.
        status: ExitStatus,
        /// Its stdout and stderr.
        output: String,
    },
    /// The guest did not print the done line within the timeout; qemu was killed.
    #[error(
        "guest did not finish within {timeout:?}; qemu killed. console:\n{console}\nqemu stderr:\n{stderr}"
    )]
    Timeout {
        /// The timeout that passed.
        timeout: Duration,
        /// The serial console so far.
        console: String,
        /// qemu's stderr.
        stderr: String,
    },
    /// qemu exited without the guest printing the marker and the done line,
    /// or exited with an error.
    #[error("guest boot failed (qemu {status}). console:\n{console}\nqemu stderr:\n{stderr}")]
    Failed {
        /// qemu's exit status.
        status: ExitStatus,
        /// The serial console.
        console: String,
        /// qemu's stderr.
        stderr: String,
    },
    /// `debugfs` could not read a file from a disk image.
    #[error("reading {path} from {disk} with debugfs failed: {stderr}")]
    ReadDisk {
        /// The disk image.
        disk: String,
        /// The file inside it.
        path: String,
        /// debugfs's stderr.
        stderr: String,
    },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> GuestError {
    let context = context.into();
    move |source| GuestError::Io { context, source }
}

/// The built guest: files under the workspace's `target/guest-assets/`.
///
/// Never boot from `disk_template` itself (guests write to their disk): copy
/// it first with [`GuestAssets::copy_disk`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestAssets {
    /// The guest kernel (Debian cloud kernel, bzImage).
    pub kernel: PathBuf,
    /// The initramfs (uncompressed newc cpio, busybox /init).
    pub initrd: PathBuf,
    /// A 16 MiB ext4 image holding `/marker.txt` and an empty `/boots.txt`.
    pub disk_template: PathBuf,
}

impl GuestAssets {
    /// Copies the disk template to `dest`, for one guest to boot from.
    ///
    /// # Errors
    /// If the copy fails.
    pub fn copy_disk(&self, dest: &Path) -> Result<(), GuestError> {
        std::fs::copy(&self.disk_template, dest)
            .map(|_| ())
            .map_err(io(format!("copying the guest disk to {}", dest.display())))
    }
}

/// Serialises builds within one process; the lock file serialises processes.
static BUILD_LOCK: Mutex<()> = Mutex::new(());

/// Returns the guest assets, building them first if they are missing or were
/// built by a different version of `guest/build.sh`.
///
/// The build (about 30 MB of kernel .deb from apt on the first run, then a few
/// seconds) happens once per target dir: parallel test processes wait on
/// `target/guest-assets/.lock`. It needs the Debian packages `busybox-static`,
/// `cpio` and `e2fsprogs` and a working `apt-get download`.
///
/// # Errors
/// If the build script fails (its output is in the error) or a file
/// operation fails.
pub fn assets() -> Result<GuestAssets, GuestError> {
    assets_in(&target_dir().join("guest-assets"))
}

/// Like [`assets`], with the assets kept in `dir`.
///
/// # Errors
/// As [`assets`].
pub fn assets_in(dir: &Path) -> Result<GuestAssets, GuestError> {
    let found = GuestAssets {
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.cpio"),
        disk_template: dir.join("disk.raw"),
    };
    let _in_process = BUILD_LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    let lock_path = dir.join(".lock");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io(format!("opening {}", lock_path.display())))?;
    lock.lock()
        .map_err(io(format!("locking {}", lock_path.display())))?;
    let result = if is_current(dir, &found) {
        Ok(found)
    } else {
        build(dir).map(|()| found)
    };
    // Closing the file releases the lock; unlock explicitly for clarity.
    let _ = lock.unlock();
    result
}

fn is_current(dir: &Path, assets: &GuestAssets) -> bool {
    let stamp = std::fs::read_to_string(dir.join("build.sh.stamp")).unwrap_or_default();
    stamp == BUILD_SCRIPT_TEXT
        && [&assets.kernel, &assets.initrd, &assets.disk_template]
            .iter()
            .all(|p| p.is_file())
}

fn build(dir: &Path) -> Result<(), GuestError> {
    let output = Command::new("bash")
        .arg(BUILD_SCRIPT)
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .map_err(io(format!("running {BUILD_SCRIPT}")))?;
    if output.status.success() {
        return Ok(());
    }
    Err(GuestError::Build {
        script: BUILD_SCRIPT.to_owned(),
        status: output.status,
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    })
}

/// The cargo target dir this test binary was built in (the ancestor of the
/// executable that holds cargo's `CACHEDIR.TAG`), or the workspace's
/// `target/` if that cannot be found.
#[must_use]
pub fn target_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| {
            exe.ancestors()
                .find(|d| d.join("CACHEDIR.TAG").is_file())
                .map(Path::to_path_buf)
        })
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"))
}

/// Where the guest's disk comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Drive {
    /// An NBD URI in qemu's syntax, e.g. `nbd+unix:///disk?socket=/tmp/s` or
    /// `nbd://127.0.0.1:10809/disk`; attached with `cache=none`.
    Nbd(String),
    /// A local raw image; attached with `cache=writeback` (O_DIRECT fails on
    /// tmpfs, where test dirs often are).
    Raw(PathBuf),
}

impl Drive {
    /// The value of qemu's `-drive` option.
    fn qemu_arg(&self) -> String {
        // qemu's option syntax escapes a comma in a value by doubling it.
        let (file, cache) = match self {
            Drive::Nbd(uri) => (uri.replace(',', ",,"), "none"),
            Drive::Raw(path) => (path.display().to_string().replace(',', ",,"), "writeback"),
        };
        format!("file={file},format=raw,if=virtio,cache={cache}")
    }
}

/// Settings of one boot.
#[derive(Debug, Clone)]
pub struct BootOptions {
    /// How long the guest gets to print the done line before qemu is killed.
    pub timeout: Duration,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Written by the guest to [`BOOTS_FILE`] as `boot <id>` (one word: no
    /// spaces), so a test can tell its boot's write from others.
    pub boot_id: String,
    /// More kernel command line words.
    pub extra_append: Vec<String>,
    /// More qemu arguments.
    pub qemu_args: Vec<String>,
}

impl Default for BootOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(60),
            memory_mib: 256,
            boot_id: "none".to_owned(),
            extra_append: Vec::new(),
            qemu_args: Vec::new(),
        }
    }
}

/// A finished boot.
#[derive(Debug, Clone)]
pub struct BootResult {
    /// The serial console, lines joined with `\n` (carriage returns removed).
    pub console: String,
    /// What the guest printed after [`MARKER_PREFIX`]: the marker file.
    pub marker: String,
    /// From starting qemu to the marker line.
    pub time_to_marker: Duration,
    /// From starting qemu to the done line.
    pub time_to_done: Duration,
    /// qemu's exit status (success after the guest's poweroff).
    pub status: ExitStatus,
}

/// Boots the guest from `drive` under qemu (TCG, no KVM needed) and waits for
/// it to print the marker and the done line and power off.
///
/// # Errors
/// [`GuestError::Timeout`] if the done line does not come within
/// `opts.timeout` (qemu is killed), [`GuestError::Failed`] if qemu exits
/// without it or with an error; both carry the console text.
pub fn boot(
    drive: &Drive,
    assets: &GuestAssets,
    opts: &BootOptions,
) -> Result<BootResult, GuestError> {
    let qemu = tool("qemu-system-x86_64", "qemu-system-x86");
    let mut append = format!("console=ttyS0 panic=-1 quiet virtman.id={}", opts.boot_id);
    for word in &opts.extra_append {
        append.push(' ');
        append.push_str(word);
    }
    let mut cmd = Command::new(qemu);
    cmd.args(["-machine", "accel=tcg", "-m"])
        .arg(opts.memory_mib.to_string())
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-serial", "stdio", "-no-reboot", "-kernel"])
        .arg(&assets.kernel)
        .arg("-initrd")
        .arg(&assets.initrd)
        .arg("-append")
        .arg(append)
        .arg("-drive")
        .arg(drive.qemu_arg())
        .args(&opts.qemu_args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let child = cmd.spawn().map_err(io("starting qemu-system-x86_64"))?;
    let mut guard = ChildGuard::new(child).with_grace(Duration::from_secs(2));

    let (tx, rx) = mpsc::channel::<(Instant, String)>();
    let stdout = guard.child_mut().stdout.take();
    let stderr = guard.child_mut().stderr.take();
    let out_thread = std::thread::spawn(move || {
        let Some(stdout) = stdout else { return };
        let mut reader = BufReader::new(stdout);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf)
                        .trim_end_matches(['\r', '\n'])
                        .replace('\r', "");
                    if tx.send((Instant::now(), line)).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let err_thread = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut stderr) = stderr {
            let mut bytes = Vec::new();
            let _ = stderr.read_to_end(&mut bytes);
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
        text
    });

    let deadline = start + opts.timeout;
    let mut console = String::new();
    let mut marker = None;
    let mut done = None;
    let mut timed_out = false;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(remaining) {
            Ok((at, line)) => {
                if marker.is_none()
                    && let Some(rest) = line.split(MARKER_PREFIX).nth(1)
                {
                    marker = Some((rest.to_owned(), at - start));
                }
                if done.is_none() && line.contains(DONE_LINE) {
                    done = Some(at - start);
                }
                console.push_str(&line);
                console.push('\n');
            }
            Err(RecvTimeoutError::Timeout) => {
                timed_out = true;
                break;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    // stdout is closed (qemu is exiting) or the time is up: wait what remains
    // of the timeout, then stop qemu either way.
    let remaining = deadline.saturating_duration_since(Instant::now());
    let exited = if timed_out {
        None
    } else {
        guard
            .wait_timeout(remaining)
            .map_err(io("waiting for qemu"))?
    };
    let status = match exited {
        Some(status) => status,
        None => {
            timed_out = true;
            guard
                .stop()
                .map_err(io("stopping qemu"))?
                .unwrap_or_default()
        }
    };
    let _ = out_thread.join();
    let stderr = err_thread.join().unwrap_or_default();
    if timed_out {
        return Err(GuestError::Timeout {
            timeout: opts.timeout,
            console,
            stderr,
        });
    }
    match (marker, done) {
        (Some((marker, time_to_marker)), Some(time_to_done)) if status.success() => {
            Ok(BootResult {
                console,
                marker,
                time_to_marker,
                time_to_done,
                status,
            })
        }
        _ => Err(GuestError::Failed {
            status,
            console,
            stderr,
        }),
    }
}

/// Reads `path` (absolute, inside the ext4 image) from the disk image `disk`
/// with `debugfs` (Debian package e2fsprogs), without mounting it.
///
/// # Errors
/// If debugfs fails or the file does not exist.
pub fn read_disk_file(disk: &Path, path: &str) -> Result<String, GuestError> {
    let debugfs = tool("debugfs", "e2fsprogs");
    // Check the file exists first: `debugfs -R cat` prints nothing for a
    // missing file and still exits 0.
    let out = Command::new(&debugfs)
        .arg("-R")
        .arg(format!("stat {path}"))
        .arg(disk)
        .output()
        .map_err(io("running debugfs"))?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() || stderr.contains("File not found") {
        return Err(GuestError::ReadDisk {
            disk: disk.display().to_string(),
            path: path.to_owned(),
            stderr,
        });
    }
    let out = Command::new(&debugfs)
        .arg("-R")
        .arg(format!("cat {path}"))
        .arg(disk)
        .output()
        .map_err(io("running debugfs"))?;
    if !out.status.success() {
        return Err(GuestError::ReadDisk {
            disk: disk.display().to_string(),
            path: path.to_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
