//! `virtman trace`: boot traces (the reads of one boot, with their times) in
//! the simulator's format (`virtman_sim::trace`), made synthetically or
//! recorded from a real guest booting under qemu.
//!
//! ```text
//!  record:  DISK ──copy──► TMP/disk.raw ◄── FileExport ◄── RecordingExport ◄── NBD server
//!                                                             │ (unix socket TMP/nbd.sock)
//!           qemu -kernel K -initrd I -drive nbd+unix:///disk ──┘
//!           every READ: (time since the first request, offset, length) ──► Trace
//!  synth:   SyntheticSpec + seed ──► Trace::synthetic
//! ```
//!
//! The guest boots from a copy of the disk, so its writes never reach DISK.
//! Time 0 is the guest's first request of any kind, so qemu's own start-up
//! (firmware, kernel decompression) is not counted as think time.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_trait::async_trait;
use bytes::Bytes;
use clap::{Args, Subcommand};
use tokio_util::sync::CancellationToken;
use virtman_nbd::{
    Capabilities, Export, ExportError, Extent, FileExport, Listener, ReadChunk, Server,
    ServerConfig,
};
use virtman_sim::config::parse_duration;
use virtman_sim::{Read, SyntheticSpec, Trace};
use virtman_storm::guest::{Accel, Console, Guest};

use crate::units::parse_size;

/// Arguments of `virtman trace`.
#[derive(Debug, Args)]
pub struct TraceArgs {
    #[command(subcommand)]
    pub command: TraceCommand,
}

/// `virtman trace` subcommands.
#[derive(Debug, Subcommand)]
pub enum TraceCommand {
    /// Write a synthetic boot trace: a seeded working set of chunk runs read
    /// in a shuffled order, with think time between reads.
    #[command(after_help = "\
Example:
  virtman trace synth --image-size 4G --working-set 64M --seed 1 -o boot.trace")]
    Synth {
        /// Size of the image the trace reads.
        #[arg(long, value_parser = parse_size)]
        image_size: u64,
        /// Bytes of distinct chunks the boot touches.
        #[arg(long, value_parser = parse_size)]
        working_set: u64,
        /// Chunk size the working set is counted in.
        #[arg(long, value_parser = parse_size, default_value = "256K")]
        chunk_size: u64,
        /// Size of each read.
        #[arg(long, value_parser = parse_size, default_value = "128K")]
        read_size: u64,
        /// Think time of the whole boot, spread over its reads.
        #[arg(long, value_parser = parse_duration, default_value = "10s")]
        think: Duration,
        /// Seed (the same seed gives the same trace).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Output file (default: standard output).
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Write the JSON form instead of the text form.
        #[arg(long)]
        json: bool,
    },
    /// Boot a real guest under qemu from a copy of DISK served over NBD, and
    /// save the trace of its reads. qemu must exit by itself (the guest
    /// powers off); after --timeout it is killed and the command fails.
    #[command(after_help = "\
Example:
  virtman trace record --kernel vmlinuz --initrd initrd.img --disk root.raw \\
      --append 'root=/dev/vda ro init=/sbin/poweroff-after-boot' -o boot.trace")]
    Record {
        /// Guest kernel.
        #[arg(long, value_name = "FILE")]
        kernel: PathBuf,
        /// Guest initramfs.
        #[arg(long, value_name = "FILE")]
        initrd: Option<PathBuf>,
        /// The raw disk image the guest boots from (copied first; never written).
        #[arg(long, value_name = "FILE")]
        disk: PathBuf,
        /// Kernel command line (after `console=ttyS0 panic=-1`).
        #[arg(long, default_value = "")]
        append: String,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 256)]
        memory: u32,
        /// The qemu binary.
        #[arg(long, default_value = "qemu-system-x86_64")]
        qemu: String,
        /// qemu accelerator: `tcg` (works everywhere), `kvm` (faster boots,
        /// think times closer to a real host's; needs a working /dev/kvm).
        #[arg(long, default_value = "tcg", value_parser = ["tcg", "kvm"])]
        accel: String,
        /// More arguments for qemu (repeat).
        #[arg(long = "qemu-arg", value_name = "ARG", allow_hyphen_values = true)]
        qemu_args: Vec<String>,
        /// How long the boot may take before qemu is killed.
        #[arg(long, value_parser = parse_duration, default_value = "300s")]
        timeout: Duration,
        /// Also write the guest's serial console to this file.
        #[arg(long, value_name = "FILE")]
        console: Option<PathBuf>,
        /// Output file (default: standard output).
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Write the JSON form instead of the text form.
        #[arg(long)]
        json: bool,
    },
}

/// Runs `virtman trace ...`.
pub fn run(args: TraceArgs) -> anyhow::Result<()> {
    match args.command {
        TraceCommand::Synth {
            image_size,
            working_set,
            chunk_size,
            read_size,
            think,
            seed,
            output,
            json,
        } => {
            let spec = SyntheticSpec {
                image_size,
                working_set,
                chunk_size: u32::try_from(chunk_size).context("chunk size too large")?,
                read_size,
                think,
            };
            let trace = Trace::synthetic(&spec, seed).context("making the synthetic trace")?;
            write_trace(&trace, output.as_deref(), json)
        }
        TraceCommand::Record {
            kernel,
            initrd,
            disk,
            append,
            memory,
            qemu,
            accel,
            qemu_args,
            timeout,
            console,
            output,
            json,
        } => {
            let boot = Boot {
                kernel,
                initrd,
                append,
                memory,
                qemu,
                accel,
                qemu_args,
                timeout,
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let (trace, console_text) = runtime.block_on(record(&boot, &disk))?;
            if let Some(path) = console {
                std::fs::write(&path, &console_text)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            tracing::info!(
                reads = trace.reads.len(),
                bytes = trace.bytes(),
                "recorded the boot"
            );
            write_trace(&trace, output.as_deref(), json)
        }
    }
}

fn write_trace(trace: &Trace, output: Option<&Path>, json: bool) -> anyhow::Result<()> {
    let text = if json {
        serde_json::to_string(trace).context("encoding the trace")? + "\n"
    } else {
        trace.to_text()
    };
    match output {
        Some(path) => {
            std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
        }
        None => {
            print!("{text}");
            Ok(())
        }
    }
}

/// How to boot the guest.
#[derive(Debug, Clone)]
struct Boot {
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    append: String,
    memory: u32,
    qemu: String,
    accel: String,
    qemu_args: Vec<String>,
    timeout: Duration,
}

/// Serves a copy of `disk` over NBD on a unix socket, boots the guest from
/// it, and returns the reads it saw and the console.
async fn record(boot: &Boot, disk: &Path) -> anyhow::Result<(Trace, String)> {
    let tmp = tempfile::tempdir().context("creating a temporary directory")?;
    let copy = tmp.path().join("disk.raw");
    std::fs::copy(disk, &copy)
        .with_context(|| format!("copying {} to {}", disk.display(), copy.display()))?;
    let file =
        FileExport::open(&copy, false).with_context(|| format!("opening {}", copy.display()))?;
    let export = Arc::new(RecordingExport::new(Arc::new(file)));
    let server = Server::new(ServerConfig::default());
    server.add_export("disk", Arc::clone(&export) as Arc<dyn Export>);
    let socket = tmp.path().join("nbd.sock");
    let listener = Listener::bind_unix(socket.clone())
        .with_context(|| format!("binding {}", socket.display()))?;
    let stop = CancellationToken::new();
    let serving = tokio::spawn(Arc::clone(&server).serve(listener, stop.clone()));

    let result = run_qemu(boot, &socket).await;
    stop.cancel();
    let _ = serving.await;
    let console = result?;
    let reads = export.take();
    if reads.is_empty() {
        bail!("the guest read nothing from its disk; console:\n{console}");
    }
    let trace = Trace {
        image_size: export.size(),
        reads,
    };
    trace.validate().context("the recorded trace")?;
    Ok((trace, console))
}

/// Runs qemu until it exits; returns the console, or fails with it.
async fn run_qemu(boot: &Boot, socket: &Path) -> anyhow::Result<String> {
    let boot = boot.clone();
    let socket = socket.to_path_buf();
    tokio::task::spawn_blocking(move || run_qemu_blocking(&boot, &socket))
        .await
        .context("the qemu task failed")?
}

fn run_qemu_blocking(boot: &Boot, socket: &Path) -> anyhow::Result<String> {
    use std::io::Read as _;
    let guest = Guest {
        qemu: boot.qemu.clone(),
        accel: match boot.accel.as_str() {
            "kvm" => Accel::Kvm,
            _ => Accel::Tcg,
        },
        memory_mib: boot.memory,
        kernel: Some(boot.kernel.clone()),
        initrd: boot.initrd.clone(),
        append: format!("console=ttyS0 panic=-1 {}", boot.append),
        extra_args: boot.qemu_args.clone(),
    };
    let uri = format!("nbd+unix:///disk?socket={}", socket.display());
    let mut cmd = guest
        .command(&uri, false, Console::Captured)
        .map_err(anyhow::Error::msg)?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {} (Debian package qemu-system-x86)", boot.qemu))?;
    let drain = |r: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).replace('\r', "")
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|o| Box::new(o) as Box<dyn std::io::Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|e| Box::new(e) as Box<dyn std::io::Read + Send>),
    );
    let deadline = Instant::now() + boot.timeout;
    let status = loop {
        if let Some(s) = child.try_wait().context("waiting for qemu")? {
            break Some(s);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let console = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    match status {
        Some(s) if s.success() => Ok(console),
        Some(s) => bail!(
            "{} exited with {s}: {}\nconsole:\n{console}",
            boot.qemu,
            stderr.trim()
        ),
        None => bail!(
            "the guest did not power off within {:?}; qemu was killed\nconsole:\n{console}",
            boot.timeout
        ),
    }
}

/// An export that records every read (time since the first request, offset,
/// length) and passes everything to the export it wraps.
pub struct RecordingExport {
    inner: Arc<dyn Export>,
    start: Mutex<Option<Instant>>,
    reads: Mutex<Vec<Read>>,
}

impl std::fmt::Debug for RecordingExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordingExport")
            .field("size", &self.inner.size())
            .finish_non_exhaustive()
    }
}

impl RecordingExport {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Export>) -> RecordingExport {
        RecordingExport {
            inner,
            start: Mutex::new(None),
            reads: Mutex::new(Vec::new()),
        }
    }

    /// Microseconds since the first request.
    fn now_us(&self) -> u64 {
        let now = Instant::now();
        let mut start = self.start.lock().unwrap_or_else(|p| p.into_inner());
        let s = *start.get_or_insert(now);
        u64::try_from(now.duration_since(s).as_micros()).unwrap_or(u64::MAX)
    }

    /// The reads recorded so far, in the order they arrived.
    pub fn take(&self) -> Vec<Read> {
        std::mem::take(&mut *self.reads.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

#[async_trait]
impl Export for RecordingExport {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadChunk>, ExportError> {
        if len > 0 {
            // Record under the lock that orders them, so times never decrease.
            let mut reads = self.reads.lock().unwrap_or_else(|p| p.into_inner());
            let at_us = self.now_us().max(reads.last().map_or(0, |r| r.at_us));
            reads.push(Read {
                at_us,
                offset,
                length: u64::from(len),
            });
        }
        self.inner.read(offset, len).await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ExportError> {
        self.now_us();
        self.inner.write(offset, data, fua).await
    }

    async fn flush(&self) -> Result<(), ExportError> {
        self.inner.flush().await
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), ExportError> {
        self.inner.trim(offset, len, fua).await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
        may_trim: bool,
    ) -> Result<(), ExportError> {
        self.inner.write_zeroes(offset, len, fua, may_trim).await
    }

    async fn cache(&self, offset: u64, len: u32) -> Result<(), ExportError> {
        self.inner.cache(offset, len).await
    }

    async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<Extent>, ExportError> {
        self.inner.block_status(offset, len).await
    }
}
