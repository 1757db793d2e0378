//! `virtman serve`: serve a file over NBD, like `qemu-nbd`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Args;
use tokio_util::sync::CancellationToken;
use virtman_nbd::{FileExport, Listener, Server, ServerConfig};
use virtman_pki::PeerVerification;

use crate::tls::NodeTlsHandles;

/// Arguments of `virtman serve`.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  virtman serve disk.raw                          # TCP 127.0.0.1:10809, export \"disk\"
  virtman serve disk.raw --socket /run/disk.sock --read-only
  qemu-img info nbd://127.0.0.1:10809/disk
  nbdinfo --list nbd://127.0.0.1:10809

  virtman serve disk.raw --tls /etc/virtman/tls --tls-verify-peer
  qemu-img info --object tls-creds-x509,id=tls0,dir=/etc/virtman/tls,endpoint=client \
      --image-opts driver=nbd,host=127.0.0.1,port=10809,export=disk,tls-creds=tls0
  nbdinfo 'nbds://127.0.0.1:10809/disk?tls-certificates=/etc/virtman/tls'

With --tls, clients must upgrade with NBD_OPT_STARTTLS before anything else (no plaintext
is served). NODEDIR is a node directory of `virtman pki issue` (or any directory in qemu's
tls-creds-x509 layout: ca-cert.pem, server-cert.pem, server-key.pem). SIGHUP reloads it.")]
pub struct ServeArgs {
    /// The file (or block device) to serve.
    pub file: PathBuf,

    /// TCP address to listen on. Defaults to 127.0.0.1:10809 unless --socket is
    /// given; with both, the server listens on both.
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<String>,

    /// Unix socket to listen on (created; a stale socket file is replaced).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,

    /// Export name. Defaults to the file name without its extension. Clients
    /// that ask for the empty (default) name get this export too.
    #[arg(long)]
    pub name: Option<String>,

    /// Serve read-only: writes, trims and zeroing fail with EPERM.
    #[arg(long)]
    pub read_only: bool,

    /// Description shown by `nbdinfo --list`.
    #[arg(long)]
    pub description: Option<String>,

    /// Serve TLS only, with the certificate and key of this node directory.
    #[arg(long, value_name = "NODEDIR")]
    pub tls: Option<PathBuf>,

    /// With --tls: clients must present a certificate of the directory's CA.
    #[arg(long, requires = "tls")]
    pub tls_verify_peer: bool,

    /// Cap on the data sent, all clients together, as a link of this rate
    /// would (bits a second unless in bytes: 1G, 100mbit, 60MB/s), like
    /// nbdkit's rate filter. Default: no cap.
    #[arg(long, value_name = "RATE", value_parser = crate::units::parse_rate_bytes)]
    pub rate: Option<u64>,
}

/// Runs the server until SIGINT or SIGTERM.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let runtime = crate::server_runtime()?;
    runtime.block_on(serve(args))
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let name = match &args.name {
        Some(n) => n.clone(),
        None => args
            .file
            .file_stem()
            .and_then(|s| s.to_str())
            .map(str::to_owned)
            .unwrap_or_else(|| "disk".to_owned()),
    };
    if name.len() > 4096 {
        bail!("export name is longer than 4096 bytes");
    }
    let mut export = FileExport::open(&args.file, args.read_only)
        .with_context(|| format!("opening {}", args.file.display()))?;
    if let Some(d) = &args.description {
        export = export.with_description(d.clone());
    }
    let verify = if args.tls_verify_peer {
        PeerVerification::Required
    } else {
        PeerVerification::None
    };
    let tls = match &args.tls {
        Some(dir) => Some(NodeTlsHandles::load(dir, verify, true, false)?),
        None => None,
    };
    let upload = args.rate.map(|bytes_per_sec| {
        Arc::new(virtman_nbd::rate::TokenBucket::new(Some(
            virtman_nbd::rate::Rate {
                bytes_per_sec,
                burst: virtman_agent::caps::BURST,
            },
        )))
    });
    let server = Server::new(ServerConfig {
        tls: tls.as_ref().and_then(|t| t.server.clone()),
        upload,
        ..ServerConfig::default()
    });
    server.add_export(name.clone(), Arc::new(export));

    let mut listeners = Vec::new();
    let tcp = match (&args.listen, &args.socket) {
        (Some(a), _) => Some(a.clone()),
        (None, None) => Some("127.0.0.1:10809".to_owned()),
        (None, Some(_)) => None,
    };
    if let Some(addr) = tcp {
        let l = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        listeners.push(Listener::Tcp(l));
    }
    if let Some(path) = &args.socket {
        let l = Listener::bind_unix(path.clone())
            .with_context(|| format!("listening on unix socket {}", path.display()))?;
        listeners.push(l);
    }
    for l in &listeners {
        tracing::info!(export = %name, file = %args.file.display(), read_only = args.read_only,
            tls = tls.is_some(), rate = ?args.rate, "serving on {}", l.describe());
    }
    if let Some(tls) = tls {
        tokio::spawn(tls.reload_on_hangup());
    }

    let shutdown = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    for l in listeners {
        tasks.spawn(Arc::clone(&server).serve(l, shutdown.clone()));
    }
    wait_for_signal().await?;
    tracing::info!("signal received; finishing requests in flight");
    shutdown.cancel();
    while let Some(r) = tasks.join_next().await {
        r.context("server task panicked")?
            .context("server failed")?;
    }
    Ok(())
}

/// Waits for SIGINT or SIGTERM.
pub async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
