//! `virtman`: the command-line entry point.
//!
//! Thin by design: it parses arguments, builds the configuration of the
//! component a subcommand runs, calls that component's library `run`, and maps
//! the error to an exit code. Each subcommand lives in its own module.

mod agent;
mod assets;
mod cluster;
mod config;
mod coordinator;
mod coordinator_status;
mod daemon;
mod doctor;
mod image;
mod libvirt;
mod node;
mod pki;
mod preheat;
mod remote;
mod serve;
mod sim;
mod storm;
mod tls;
mod trace;
mod tree;
mod units;
mod virsh;
mod vm;
mod vm_domain;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Boots many VMs of one image at once: a host cache shared by all images and VMs,
/// a copy-on-write snapshot per VM, and relay trees between hosts.
#[derive(Debug, Parser)]
#[command(name = "virtman", version, about, long_about = None)]
struct Cli {
    /// Log filter (tracing `EnvFilter` syntax), e.g. `info` or `virtman_nbd=debug`.
    /// rustls's warnings are left out by default: libnbd clients send an IP
    /// address as SNI, which rustls warns about on every connection.
    #[arg(
        long,
        global = true,
        env = "VIRTMAN_LOG",
        default_value = "info,rustls=error"
    )]
    log: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve a file over NBD (like qemu-nbd), until SIGINT or SIGTERM.
    Serve(serve::ServeArgs),
    /// Import, list and verify images in the image store.
    Image(image::ImageArgs),
    /// Run the coordinator: relay trees per image, heartbeats, repair (HTTP+JSON API).
    Coordinator(coordinator::CoordinatorArgs),
    /// Print an image's relay tree from the coordinator, as text or JSON.
    Tree(tree::TreeArgs),
    /// Show, ban or unban a node at the coordinator.
    Node(node::NodeArgs),
    /// Run the agent of this host: cache group, exports to children and VMs.
    Agent(agent::AgentArgs),
    /// Create, list, remove and boot VMs on this host's agent.
    Vm(vm::VmArgs),
    /// Show this host's images, parents, VMs and cache usage.
    Status(vm::StatusArgs),
    /// Start or stop a local cluster of separate processes on 127.0.0.1.
    Cluster(cluster::ClusterArgs),
    /// Boot a storm of VMs at once in each mode and compare (the main job, measured).
    Storm(storm::StormArgs),
    /// Simulate a boot storm of many hosts on virtual time (text, JSON, SVG chart).
    Sim(sim::SimArgs),
    /// The cluster's certificate authority: make it, issue node certificates, show them.
    Pki(pki::PkiArgs),
    /// Make boot traces: synthetic, or recorded from a real guest booting under qemu.
    Trace(trace::TraceArgs),
    /// Check this host for the agent: qemu, KVM, the data dir, the port, the coordinator.
    Doctor(doctor::DoctorArgs),
    /// Write the man pages and shell completions (for packaging).
    #[command(hide = true)]
    GenerateAssets(assets::AssetsArgs),
}

/// The runtime of a long-running server (`serve`, `agent`, `coordinator`):
/// one worker per core, and a blocking pool (file reads and writes, fsync)
/// of four threads per core, at least eight: enough to keep a disk and the
/// page cache busy, few enough that a burst of large requests does not start
/// hundreds of threads (tokio's default allows 512).
fn server_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    use anyhow::Context;
    tokio::runtime::Builder::new_multi_thread()
        .max_blocking_threads(blocking_threads())
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// The blocking pool's bound: four threads per core, at least eight.
fn blocking_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(2, std::num::NonZeroUsize::get)
        .saturating_mul(4)
        .max(8)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log);
    raise_open_file_limit();
    let result = match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Image(args) => image::run(args),
        Command::Coordinator(args) => match &args.action {
            Some(coordinator::CoordinatorAction::Status(a)) => coordinator_status::run(a),
            None => coordinator::run(args),
        },
        Command::Tree(args) => tree::run(args),
        Command::Node(args) => node::run(args),
        Command::Agent(args) => agent::run(args),
        Command::Vm(args) => vm::run(args),
        Command::Status(args) => vm::status(args),
        Command::Cluster(args) => cluster::run(args),
        Command::Storm(args) => storm::run(args),
        Command::Sim(args) => sim::run(args),
        Command::Trace(args) => trace::run(args),
        Command::Pki(args) => pki::run(args),
        Command::Doctor(args) => doctor::run(args),
        Command::GenerateAssets(args) => {
            assets::run(&args, <Cli as clap::CommandFactory>::command())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("virtman: error: {}", chain_once(&err));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each said once: many errors already put their
/// cause in their own message (`opening X: No such file`), so a cause whose
/// text is already there is not repeated.
fn chain_once(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// Raises the soft limit of open files to the hard one: an agent holds a few
/// files per VM, a server a socket per client, and Debian's soft default
/// (1024) is far below its hard one. The processes this one starts inherit it.
fn raise_open_file_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            tracing::debug!(error = %e, "cannot raise the open file limit");
        }
    }
}

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

#[cfg(test)]
mod tests {
    use super::chain_once;

    #[test]
    fn each_cause_is_said_once() {
        // As errors that put their source in their own message do.
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let text = io.to_string();
        let e = anyhow::Error::new(io)
            .context(format!(
                "cannot reach the agent at /x/agent.sock: {text} (is it running?)"
            ))
            .context("virtman status");
        let said = chain_once(&e);
        assert_eq!(said.matches(&text).count(), 1, "{said}");
        assert!(said.starts_with("virtman status: cannot reach"), "{said}");
        // A cause not yet said is kept.
        let e = anyhow::anyhow!("inner failure").context("outer");
        assert_eq!(chain_once(&e), "outer: inner failure");
    }
}
