//! `virtman image`: import, list and verify images in the image store; evict
//! an image's cached volume from this host's agent, or pin it (fetch it whole
//! in the background); preheat it across the cluster (`preheat.rs`).

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use virtman_cache::BootProfile;
use virtman_image::store::PROFILE_FILE;
use virtman_image::{DEFAULT_CHUNK_SIZE, ImageStore};

use crate::units::{human, parse_size};

/// Arguments of `virtman image`.
#[derive(Debug, Args)]
pub struct ImageArgs {
    /// The image store directory.
    #[arg(
        long,
        global = true,
        env = "VIRTMAN_STORE",
        default_value = "/var/lib/virtman/images"
    )]
    pub store: PathBuf,

    #[command(subcommand)]
    pub command: ImageCommand,
}

/// `virtman image` subcommands.
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Import a raw or qcow2 file into the store, computing its manifest.
    #[command(after_help = "\
Examples:
  virtman image import debian-12.qcow2 --name debian-12
  virtman image import disk.raw --name disk --chunk-size 1M --store ./images")]
    Import {
        /// The file to import (raw, or qcow2 converted with qemu-img).
        file: PathBuf,
        /// The image's name in the store.
        #[arg(long)]
        name: String,
        /// Chunk size: a power of two from 4K to 16M (suffixes K, M).
        #[arg(long, value_parser = parse_size, default_value_t = u64::from(DEFAULT_CHUNK_SIZE))]
        chunk_size: u64,
    },
    /// List the images in the store.
    Ls,
    /// Store a boot profile with an image, made from a boot trace (`virtman
    /// trace record` or `synth`): the chunks the boot touched, in order. An
    /// origin serving the image publishes it, and every host that joins the
    /// image prefetches those chunks in that order ahead of its VMs. Takes
    /// effect when the origin's agent (re)starts.
    #[command(after_help = "\
Examples:
  virtman image profile debian-12 --trace debian-12.trace
  virtman image profile debian-12 --remove")]
    Profile {
        /// The image's name.
        name: String,
        /// The boot trace to make the profile from.
        #[arg(long, required_unless_present = "remove")]
        trace: Option<PathBuf>,
        /// Remove the image's profile instead.
        #[arg(long, conflicts_with = "trace")]
        remove: bool,
    },
    /// Warm an image on the cluster's hosts before its VMs start: the
    /// coordinator has each matching host join the image and fetch its boot
    /// profile (or every chunk) through the tree.
    Preheat(crate::preheat::PreheatArgs),
    /// Re-read an image and check every chunk against its manifest.
    Verify {
        /// The image's name.
        name: String,
    },
    /// Drop an image's cached volume on this host's agent and leave its relay
    /// tree (refused while VMs use it). The last VM of an image leaving does
    /// not drop the cache; this does.
    Evict {
        /// The image's name.
        name: String,
        /// The agent's data directory (its control socket is DATA_DIR/agent.sock).
        #[arg(long, value_name = "DIR", default_value = crate::agent::DEFAULT_DATA_DIR, env = "VIRTMAN_DATA_DIR")]
        data_dir: PathBuf,
    },
    /// Fetch the whole image onto this host's agent in the background (joining
    /// it first if needed), so the host no longer needs its parents. Demand
    /// reads of its VMs go first; progress shows in `virtman status`.
    Pin {
        /// The image's name.
        name: String,
        /// The agent's data directory (its control socket is DATA_DIR/agent.sock).
        #[arg(long, value_name = "DIR", default_value = crate::agent::DEFAULT_DATA_DIR, env = "VIRTMAN_DATA_DIR")]
        data_dir: PathBuf,
    },
}

fn progress(len: u64, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    let style = ProgressStyle::with_template(
        "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    pb.set_style(style);
    pb.set_message(what.to_owned());
    pb
}

/// Runs `virtman image ...`.
pub fn run(args: ImageArgs) -> anyhow::Result<()> {
    let open = || {
        ImageStore::open(&args.store)
            .with_context(|| format!("opening the image store {}", args.store.display()))
    };
    match args.command {
        ImageCommand::Preheat(p) => return crate::preheat::run(p),
        ImageCommand::Evict { name, data_dir } => {
            let client = virtman_agent::control::ControlClient::new(data_dir.join("agent.sock"));
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?
                .block_on(client.evict(&name))?;
            println!("evicted {name}");
        }
        ImageCommand::Pin { name, data_dir } => {
            let client = virtman_agent::control::ControlClient::new(data_dir.join("agent.sock"));
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?
                .block_on(client.pin(&name))?;
            println!("pinning {name}: see `virtman status` for progress");
        }
        ImageCommand::Import {
            file,
            name,
            chunk_size,
        } => {
            let chunk = u32::try_from(chunk_size).context("chunk size too large")?;
            let len = std::fs::metadata(&file)
                .with_context(|| format!("opening {}", file.display()))?
                .len();
            let pb = progress(len, "importing");
            let store = open()?;
            let img = store.import(&file, &name, chunk, &mut |done, total| {
                pb.set_length(total);
                pb.set_position(done);
            })?;
            pb.finish_and_clear();
            let m = &img.manifest;
            println!(
                "imported {name}: {} bytes, {} chunks of {}, id {}",
                m.size(),
                m.chunks(),
                human(u64::from(m.chunk_size())),
                m.id()
            );
        }
        ImageCommand::Ls => {
            let store = open()?;
            let list = store.list().context("listing the image store")?;
            println!(
                "{:<24} {:>14} {:>8} {:>8}  ID",
                "NAME", "SIZE", "CHUNK", "CHUNKS"
            );
            for (name, img) in list {
                match img {
                    Ok(i) => println!(
                        "{:<24} {:>14} {:>8} {:>8}  {}",
                        name,
                        i.manifest.size(),
                        human(u64::from(i.manifest.chunk_size())),
                        i.manifest.chunks(),
                        i.manifest.id().short()
                    ),
                    Err(e) => println!("{name:<24} unusable: {e}"),
                }
            }
        }
        ImageCommand::Profile {
            name,
            trace,
            remove,
        } => {
            let store = open()?;
            let img = store.open_image(&name)?;
            let path = img.data_path.with_file_name(PROFILE_FILE);
            match trace {
                Some(t) if !remove => {
                    let text = std::fs::read_to_string(&t)
                        .with_context(|| format!("reading {}", t.display()))?;
                    let trace = virtman_sim::Trace::parse(&text)
                        .with_context(|| format!("trace {}", t.display()))?;
                    if trace.image_size > img.manifest.size() {
                        bail!(
                            "the trace was recorded on a {}-byte image, larger than {name:?} ({} bytes)",
                            trace.image_size,
                            img.manifest.size()
                        );
                    }
                    let reads = trace.reads.iter().map(|r| (r.offset, r.length, r.at_us));
                    let profile = BootProfile::from_reads(reads, &img.manifest);
                    profile
                        .store(&path, &img.manifest)
                        .with_context(|| format!("writing {}", path.display()))?;
                    println!(
                        "{name}: boot profile of {} chunks ({}) stored; origins publish it when they start",
                        profile.entries.len(),
                        human(profile.entries.len() as u64 * u64::from(img.manifest.chunk_size()))
                    );
                }
                _ => match std::fs::remove_file(&path) {
                    Ok(()) => println!("{name}: boot profile removed"),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        println!("{name}: has no boot profile")
                    }
                    Err(e) => return Err(e).context(format!("removing {}", path.display())),
                },
            }
        }
        ImageCommand::Verify { name } => {
            let store = open()?;
            let img = store.open_image(&name)?;
            let pb = progress(img.manifest.size(), "verifying");
            let report = store.verify(&name, &mut |done, _| pb.set_position(done))?;
            pb.finish_and_clear();
            if !report.bad_chunks.is_empty() {
                let shown: Vec<String> = report
                    .bad_chunks
                    .iter()
                    .take(20)
                    .map(u64::to_string)
                    .collect();
                bail!(
                    "image {name:?}: {} of {} chunks do not match the manifest: {}{}",
                    report.bad_chunks.len(),
                    report.chunks,
                    shown.join(", "),
                    if report.bad_chunks.len() > 20 {
                        ", ..."
                    } else {
                        ""
                    }
                );
            }
            println!(
                "{name}: all {} chunks match the manifest (id {})",
                report.chunks,
                img.manifest.id()
            );
        }
    }
    Ok(())
}
