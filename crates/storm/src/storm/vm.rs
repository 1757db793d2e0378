//! One VM of a storm: its disk (an existing export, or a snapshot created
//! through its host's agent), then either a byte-checked replay of the trace
//! or a real guest booted under qemu until its console prints the marker.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtman_agent::control::ControlClient;
use virtman_nbd::{Client, ClientConfig, Endpoint};
use virtman_sim::Trace;

use super::{QemuBoot, StormError};
use crate::guest::Console;

/// The bytes each of `trace`'s reads must return, in trace order, read from
/// `image` once before the storm so that checking a VM's reads costs the
/// replayers a comparison, not a read of the image per VM.
pub(super) fn expected_reads(trace: &Trace, image: &File) -> Result<Vec<Vec<u8>>, StormError> {
    trace
        .reads
        .iter()
        .map(|r| {
            let len = usize::try_from(r.length)
                .map_err(|_| StormError::Config(format!("a read of {} bytes", r.length)))?;
            let mut want = vec![0u8; len];
            image.read_exact_at(&mut want, r.offset).map_err(|e| {
                StormError::Config(format!(
                    "reading the image at {} (+{}): {e}",
                    r.offset, r.length
                ))
            })?;
            Ok(want)
        })
        .collect()
}

/// What one VM's replay saw.
#[derive(Debug, Default)]
pub(super) struct Replayed {
    /// Seconds from the storm's start to its last read.
    pub secs: f64,
    /// Bytes read.
    pub bytes: u64,
    /// Bytes of reads whose data differed from the image (the replay goes
    /// on: every wrong byte is counted).
    pub wrong_bytes: u64,
    /// Each read's time, milliseconds.
    pub reads_ms: Vec<f32>,
}

/// The link a `direct` VM reads over: a delay per read and its host's cap
/// (shared by the host's VMs). Cached modes' VMs read locally: none.
#[derive(Clone, Debug, Default)]
pub(super) struct Link {
    pub(super) delay: Duration,
    pub(super) cap: Option<Arc<virtman_nbd::rate::TokenBucket>>,
}

/// Replays `trace` against one VM's export, checking every byte against
/// `expected` (from [`expected_reads`]). A read that fails ends it.
pub(super) async fn replay(
    endpoint: Endpoint,
    export: String,
    trace: Arc<Trace>,
    expected: Arc<Vec<Vec<u8>>>,
    back_to_back: bool,
    t0: Instant,
    link: Link,
) -> Result<Replayed, String> {
    let c = Client::connect(
        &endpoint,
        &ClientConfig {
            export,
            request_timeout: Duration::from_secs(120),
            ..ClientConfig::default()
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    let mut last_at = 0u64;
    let mut out = Replayed {
        reads_ms: Vec::with_capacity(trace.reads.len()),
        ..Replayed::default()
    };
    for (r, want) in trace.reads.iter().zip(expected.iter()) {
        if !back_to_back && r.at_us > last_at {
            tokio::time::sleep(Duration::from_micros(r.at_us - last_at)).await;
        }
        last_at = r.at_us;
        let started = Instant::now();
        if !link.delay.is_zero() {
            tokio::time::sleep(link.delay).await;
        }
        if let Some(cap) = &link.cap {
            cap.take(r.length, virtman_nbd::rate::Priority::Urgent)
                .await;
        }
        let got = c
            .read(r.offset, r.length)
            .await
            .map_err(|e| e.to_string())?;
        out.reads_ms.push(started.elapsed().as_secs_f32() * 1000.0);
        if got[..] != want[..] {
            tracing::error!(
                offset = r.offset,
                length = r.length,
                "a VM read wrong bytes"
            );
            out.wrong_bytes += r.length;
        }
        out.bytes += r.length;
    }
    let _ = c.disconnect().await;
    out.secs = t0.elapsed().as_secs_f64();
    Ok(out)
}

/// Where a VM's disk comes from.
pub(super) enum VmDisk {
    /// An export that already exists (the plain server of `direct` mode).
    Ready(Endpoint, String),
    /// A snapshot to create through the host's agent, named after the VM.
    Create(ControlClient),
}

impl VmDisk {
    /// The endpoint and export name of `vm`'s disk, creating it if needed.
    pub(super) async fn open(self, vm: &str) -> Result<(Endpoint, String), String> {
        match self {
            VmDisk::Ready(endpoint, export) => Ok((endpoint, export)),
            VmDisk::Create(ctl) => {
                let info = ctl
                    .create_vm(vm, "img")
                    .await
                    .map_err(|e| format!("creating the VM: {e}"))?;
                let sock = info.uri.split("socket=").nth(1).unwrap_or_default();
                Ok((Endpoint::Unix(sock.into()), vm.to_owned()))
            }
        }
    }
}

/// Boots one real guest from `endpoint`'s `export` and waits for the marker.
pub(super) async fn boot_guest(
    q: &QemuBoot,
    endpoint: &Endpoint,
    export: &str,
    overlay: bool,
    t0: Instant,
) -> Result<Replayed, String> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
    let uri = match endpoint {
        Endpoint::Unix(p) => format!("nbd+unix:///{export}?socket={}", p.display()),
        Endpoint::Tcp(a) => format!("nbd://{a}/{export}"),
    };
    let mut cmd =
        tokio::process::Command::from(q.guest.command(&uri, overlay, Console::Captured)?);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("starting {} (install qemu-system-x86): {e}", q.guest.qemu))?;
    let stdout = child.stdout.take().ok_or("no qemu stdout")?;
    let mut stderr = child.stderr.take().ok_or("no qemu stderr")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut tail: Vec<String> = Vec::new();
    let watch = async {
        while let Some(line) = lines.next_line().await.map_err(|e| e.to_string())? {
            if line.contains(&q.marker) {
                return Ok(t0.elapsed().as_secs_f64());
            }
            if tail.len() == 20 {
                tail.remove(0);
            }
            tail.push(line.trim_end().to_owned());
        }
        Err("qemu exited".to_owned())
    };
    let result = tokio::time::timeout(q.timeout, watch).await;
    // Booted or not, the guest is done with: stop it.
    let _ = child.start_kill();
    let _ = child.wait().await;
    match result {
        Ok(Ok(secs)) => Ok(Replayed {
            secs,
            ..Replayed::default()
        }),
        Ok(Err(why)) => {
            let mut err = String::new();
            let _ = stderr.read_to_string(&mut err).await;
            Err(format!(
                "{why} before the marker {:?}; last console lines:\n{}\nqemu: {}",
                q.marker,
                tail.join("\n"),
                err.trim()
            ))
        }
        Err(_) => Err(format!(
            "no marker {:?} within {:?}; last console lines:\n{}",
            q.marker,
            q.timeout,
            tail.join("\n")
        )),
    }
}
