//! `virtman agent`: the daemon on each host.
//!
//! ```text
//!   args ─► AgentConfig ─► Agent::open (cache group, image store)
//!        ─► bind --listen (base exports) ─► print "listening on ADDR"
//!        ─► Agent::run + control API on DATA_DIR/agent.sock ─► until a signal
//! ```

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Args;
use tokio_util::sync::CancellationToken;
use virtman_agent::upstream::FetchConfig;
use virtman_agent::{Agent, AgentConfig};
use virtman_cache::GroupConfig;
use virtman_pki::{Identity, PeerVerification};

use serde::{Deserialize, Serialize};

use crate::config::fields::{self, parse_listen};
use crate::config::{ConfigArgs, ConfigFile};
use crate::tls::NodeTlsHandles;

use crate::units::{Cap, human_rate, parse_cap, parse_rate_bytes, parse_size};

/// Where agents keep their data unless told otherwise.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/virtman/agent";

/// Arguments of `virtman agent`.
#[derive(Debug, Args)]
#[command(
    after_help = "\
The agent keeps this host's cache group (one capacity for every image), serves
each cached image read-only to child hosts over NBD (--listen), serves each
VM's copy-on-write snapshot on a local unix socket (DATA_DIR/vms.sock), and
follows the parent lists the coordinator gives it. Images in its image store
(`virtman image import --store DATA_DIR/images`) are registered with the
coordinator and served whole: this host is their origin.

The CLI talks to the agent on DATA_DIR/agent.sock: `virtman vm create`,
`virtman vm ls`, `virtman status`, ... Prometheus metrics are served there too
(`curl --unix-socket DATA_DIR/agent.sock http://agent/metrics`).

Rates (--upload-rate, --download-rate) are bits a second unless given in
bytes: 1G and 1gbit are 1 Gbit/s, 60MB/s is 60 megabytes a second. Change
them while the agent runs with `virtman agent set`.

Examples:
  virtman agent --coordinator http://10.0.0.1:7600 --data-dir /var/lib/virtman/agent \\
      --listen 0.0.0.0:10810 --advertise 10.0.0.5:10810 --cache-size 50G --labels rack=r1
  virtman agent --coordinator http://127.0.0.1:7600 --data-dir ./a1 --listen 127.0.0.1:0
  virtman agent set --upload-rate 500M --data-dir /var/lib/virtman/agent",
    args_conflicts_with_subcommands = true
)]
pub struct AgentArgs {
    #[command(subcommand)]
    pub command: Option<AgentCommand>,

    /// The agent's options (a config file holds the same).
    #[command(flatten)]
    pub options: AgentOptions,

    /// `--config`, `--print-config`, `--example-config`.
    #[command(flatten)]
    pub config: ConfigArgs,
}

/// The options of `virtman agent`: flags, and keys of its config file
/// (`/etc/virtman/agent.toml`; see [`crate::config`]).
#[derive(Debug, Clone, Args, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentOptions {
    /// Coordinator base URL, or several separated by commas (coordinators
    /// on etcd): requests go to one that answers, and move on when it stops.
    #[arg(
        long,
        value_name = "URL[,URL...]",
        default_value = "http://127.0.0.1:7600"
    )]
    pub coordinator: String,

    /// Directory for the cache group, sockets and the default image store.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_DATA_DIR, env = "VIRTMAN_DATA_DIR")]
    pub data_dir: PathBuf,

    /// Address the base exports listen on (children hosts connect here). Port
    /// 0 picks a free port; the address is printed as `listening on ADDR`.
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:10810", value_parser = parse_listen)]
    #[serde(deserialize_with = "fields::listen")]
    pub listen: String,

    /// Address children use to reach --listen, when it differs (needed with
    /// 0.0.0.0).
    #[arg(long, value_name = "HOST:PORT")]
    pub advertise: Option<String>,

    /// Capacity of the cache group (e.g. 512M, 50G).
    #[arg(long, value_name = "SIZE", default_value = "10G", value_parser = parse_size)]
    #[serde(with = "fields::size")]
    pub cache_size: u64,

    /// How long a fetched chunk may wait before it is synced and recorded
    /// as cached (0s: at once). A crash loses at most this much fetching,
    /// which is fetched again; a longer wait keeps the sync's disk writes
    /// out of a boot storm. At most 10m.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = crate::coordinator::parse_duration)]
    #[serde(with = "fields::duration")]
    pub commit_interval: std::time::Duration,

    /// File holding the coordinator's bearer token.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,

    /// Labels for the coordinator, e.g. `rack=r1` (repeat or separate with commas).
    #[arg(long, value_name = "KEY=VALUE", value_delimiter = ',')]
    pub labels: Vec<String>,

    /// This node's name in the cluster (default: the host name).
    #[arg(long)]
    pub name: Option<String>,

    /// Image store served as origin (default DATA_DIR/images).
    #[arg(long, value_name = "DIR")]
    pub image_store: Option<PathBuf>,

    /// Latency to add to every fetch from a parent (e.g. 0.2ms), for local
    /// benchmarks on links the kernel cannot delay (no netem).
    #[arg(long, value_name = "DURATION", value_parser = crate::coordinator::parse_duration)]
    #[serde(with = "fields::opt_duration", skip_serializing_if = "Option::is_none")]
    pub link_delay: Option<std::time::Duration>,

    /// The longest a chunk fetch waits on a parent that has not answered
    /// before it asks the next source too (a hedge; the delay adapts to the
    /// fetch latency seen, from 50 ms up to this). Hedges are at most about
    /// a tenth of fetches.
    #[arg(long, value_name = "DURATION", default_value = "250ms", value_parser = crate::coordinator::parse_duration)]
    #[serde(with = "fields::duration")]
    pub hedge_ceiling: std::time::Duration,

    /// Never hedge: wait on each source until it answers or its request
    /// times out (2 s). For comparisons.
    #[arg(long)]
    pub no_hedge: bool,

    /// Chunks the boot-profile replay (and a pin) keeps in flight at once,
    /// shared by a striped image's stripes (at least one each). More keeps
    /// a slow, long link full; fewer leaves more of it to VMs' misses.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    #[serde(deserialize_with = "fields::count_in::<_, 1, 64>")]
    pub prefetch_in_flight: u32,

    /// Cap on what this host sends to child hosts, all of them together
    /// (e.g. 500M: 500 Mbit/s; 60MB/s), with a burst of four chunks.
    /// Default: no cap.
    #[arg(long, value_name = "RATE", value_parser = parse_rate_bytes)]
    #[serde(with = "fields::opt_rate", skip_serializing_if = "Option::is_none")]
    pub upload_rate: Option<u64>,

    /// Cap on what this host fetches from parents and origins. VMs' reads
    /// go first; prefetch uses what they leave. Default: no cap.
    #[arg(long, value_name = "RATE", value_parser = parse_rate_bytes)]
    #[serde(with = "fields::opt_rate", skip_serializing_if = "Option::is_none")]
    pub download_rate: Option<u64>,

    /// TEST ONLY: serve children corrupted chunks, so that chaos storms
    /// (`virtman storm --chaos lie:N`) can check that liars are caught.
    #[arg(long, hide = true)]
    #[serde(skip)]
    pub test_lie: bool,

    /// TLS between hosts with this node directory (`virtman pki issue`): the
    /// base exports serve only TLS clients with a certificate of its CA, and
    /// fetches from parents and origins go over TLS, verifying each by the
    /// address dialled. The node's name defaults to the certificate's.
    /// SIGHUP loads the directory again (new connections use it).
    #[arg(long, value_name = "NODEDIR")]
    pub tls: Option<PathBuf>,

    /// A group (name or id) whose members may connect to the VM socket
    /// (DATA_DIR/vms.sock) and the control socket (DATA_DIR/agent.sock),
    /// e.g. the group libvirt's qemu runs as. Without it only the agent's
    /// user may (mode 0600; with it 0660).
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,
}

impl Default for AgentOptions {
    fn default() -> Self {
        crate::config::clap_defaults()
    }
}

impl ConfigFile for AgentOptions {
    const FILE_NAME: &'static str = "agent.toml";
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "host".to_owned())
}

/// The node's name: `--name`, else its certificate's, else the host name.
/// A `--name` that differs from the certificate's is refused: a node's
/// identity is the name its certificate carries.
pub(crate) fn node_name(flag: Option<&str>, cert: Option<&Identity>) -> anyhow::Result<String> {
    let cert = cert.map(|id| id.name.clone());
    match (flag, cert) {
        (Some(f), Some(c)) if f != c => bail!(
            "--name {f:?} differs from the name in the TLS certificate ({c:?}): a node acts only \
             as the node its certificate names"
        ),
        (Some(f), _) => Ok(f.to_owned()),
        (None, Some(c)) => Ok(c),
        (None, None) => Ok(host_name()),
    }
}

/// Reads a token file (trimmed); an empty file is an error.
pub fn read_token(path: &std::path::Path) -> anyhow::Result<String> {
    let t = std::fs::read_to_string(path)
        .with_context(|| format!("reading token file {}", path.display()))?;
    let t = t.trim().to_owned();
    if t.is_empty() {
        bail!("token file {} is empty", path.display());
    }
    Ok(t)
}

/// What `virtman agent` does besides running the agent.
#[derive(Debug, clap::Subcommand)]
pub enum AgentCommand {
    /// Change a running agent's bandwidth caps (without a rate: show them).
    #[command(after_help = "\
Rates are bits a second unless given in bytes (1G, 500mbit, 60MB/s); `off`
removes a cap. Transfers waiting for a cap see the new rate at once.

Examples:
  virtman agent set --upload-rate 500M
  virtman agent set --download-rate off --data-dir ./a1")]
    Set {
        /// The agent's data directory (its control socket is DATA_DIR/agent.sock).
        #[arg(long, value_name = "DIR", default_value = DEFAULT_DATA_DIR, env = "VIRTMAN_DATA_DIR")]
        data_dir: PathBuf,
        /// Cap on what the host sends to children, or `off`.
        #[arg(long, value_name = "RATE|off", value_parser = parse_cap)]
        upload_rate: Option<Cap>,
        /// Cap on what the host fetches from parents and origins, or `off`.
        #[arg(long, value_name = "RATE|off", value_parser = parse_cap)]
        download_rate: Option<Cap>,
    },
}

/// Runs the agent until SIGINT or SIGTERM, or one of its subcommands.
pub fn run(args: AgentArgs) -> anyhow::Result<()> {
    let runtime = crate::server_runtime()?;
    match args.command {
        Some(AgentCommand::Set {
            data_dir,
            upload_rate,
            download_rate,
        }) => runtime.block_on(set_caps(&data_dir, upload_rate, download_rate)),
        None => match crate::config::options_or_print(args.options, &args.config, "agent")? {
            Some(options) => runtime.block_on(agent(options)),
            None => Ok(()),
        },
    }
}

/// `virtman agent set`: reads the caps, changes the ones given, prints them.
async fn set_caps(
    data_dir: &std::path::Path,
    upload: Option<Cap>,
    download: Option<Cap>,
) -> anyhow::Result<()> {
    let client = virtman_agent::control::ControlClient::new(data_dir.join("agent.sock"));
    let mut rates = client.caps().await?;
    if upload.is_some() || download.is_some() {
        if let Some(Cap(u)) = upload {
            rates.upload = u;
        }
        if let Some(Cap(d)) = download {
            rates.download = d;
        }
        rates = client.set_caps(rates).await?;
    }
    let show = |r: Option<u64>| r.map_or_else(|| "no cap".to_owned(), human_rate);
    println!("upload   {}", show(rates.upload));
    println!("download {}", show(rates.download));
    Ok(())
}

async fn agent(args: AgentOptions) -> anyhow::Result<()> {
    let labels = crate::units::parse_labels(&args.labels)?;
    let token = match &args.token_file {
        Some(p) => Some(read_token(p)?),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let bound = listener.local_addr().context("reading the bound address")?;
    let advertise = virtman_agent::agent::advertise_for(bound, args.advertise.as_deref())?;
    let mut tls = match &args.tls {
        Some(dir) => Some(NodeTlsHandles::load(
            dir,
            PeerVerification::Required,
            true,
            true,
        )?),
        None => None,
    };
    let name = node_name(
        args.name.as_deref(),
        tls.as_ref().and_then(|t| t.identity.as_ref()),
    )?;
    let socket_group = match &args.socket_group {
        Some(g) => Some(virtman_agent::sockets::group_id(g).map_err(anyhow::Error::msg)?),
        None => None,
    };
    let (serve_tls, fetch_tls) = match &tls {
        Some(t) => (t.server.clone(), t.client.clone()),
        None => (None, None),
    };
    // HTTPS to the coordinator with the node's certificate when its URL is
    // https (and the node has a directory).
    let coordinator_tls = match &tls {
        Some(t) if args.coordinator.starts_with("https://") => Some(t.coordinator_config()?),
        _ => None,
    };
    let config = AgentConfig {
        name,
        data_dir: args.data_dir.clone(),
        image_store: args.image_store.clone(),
        coordinator: args.coordinator.clone(),
        token,
        coordinator_tls,
        advertise,
        cache: GroupConfig {
            commit_interval_ms: u64::try_from(args.commit_interval.as_millis()).unwrap_or(u64::MAX),
            ..GroupConfig::with_capacity(args.cache_size)
        },
        labels,
        fetch: FetchConfig {
            link_delay: args.link_delay.unwrap_or_default(),
            hedge: (!args.no_hedge).then(|| {
                let floor = virtman_agent::upstream::Hedge::default().floor;
                virtman_agent::upstream::Hedge {
                    floor: floor.min(args.hedge_ceiling),
                    ceiling: args.hedge_ceiling,
                }
            }),
            tls: fetch_tls,
            ..FetchConfig::default()
        },
        heartbeat_interval: std::time::Duration::from_secs(1),
        serve_tls,
        socket_group,
        caps: Arc::new(virtman_agent::caps::Caps::new(
            virtman_agent::caps::CapRates {
                upload: args.upload_rate,
                download: args.download_rate,
            },
        )),
        test_lie: args.test_lie,
    };
    let agent = Agent::open(config).context("starting the agent")?;
    agent.set_prefetch(virtman_agent::prefetch::PrefetchConfig {
        in_flight: args.prefetch_in_flight as usize,
        ..Default::default()
    });
    if let Some(t) = tls
        .as_mut()
        .filter(|_| args.coordinator.starts_with("https://"))
    {
        t.follow(agent.coordinator().clone());
    }
    let control_path = args.data_dir.join("agent.sock");
    let control_listener = virtman_agent::control::bind(&control_path, socket_group)
        .with_context(|| format!("listening on {}", control_path.display()))?;
    tracing::info!(node = agent.name(), %bound, data_dir = %args.data_dir.display(), "agent started");

    let shutdown = CancellationToken::new();
    let control = tokio::spawn(virtman_agent::control::serve(
        Arc::clone(&agent),
        control_listener,
        control_path,
        shutdown.clone(),
    ));
    let main = tokio::spawn(Arc::clone(&agent).run(listener, shutdown.clone()));
    if let Some(tls) = tls {
        tokio::spawn(tls.reload_on_hangup());
    }
    // Ready: the control socket is bound and the exports are being served;
    // a stop from now on is graceful.
    let mut signals = crate::daemon::StopSignals::install()?;
    println!("listening on {bound}");
    crate::daemon::ready("agent");
    tokio::select! {
        () = signals.wait() => {}
        r = control => {
            r.context("control API task failed")?.context("control API failed")?;
        }
    }
    tracing::info!("signal received; stopping");
    crate::daemon::stopping();
    shutdown.cancel();
    main.await.context("agent task failed")??;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtman_pki::{Ca, IssueRequest, Role, write_node_dir};

    #[test]
    fn a_node_is_named_by_its_certificate_and_may_not_claim_another_name() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::init(&dir.path().join("ca"), 1).unwrap();
        let issued = ca
            .issue(&IssueRequest {
                name: "host7".into(),
                role: Role::Node,
                ips: vec![],
                dns: vec![],
                days: 1,
            })
            .unwrap();
        write_node_dir(&dir.path().join("n"), ca.cert_pem(), &issued).unwrap();
        let tls = virtman_pki::NodeTls::load(&dir.path().join("n")).unwrap();
        let id = tls.identity();
        assert_eq!(node_name(None, id).unwrap(), "host7");
        assert_eq!(node_name(Some("host7"), id).unwrap(), "host7");
        let e = node_name(Some("host8"), id).unwrap_err().to_string();
        assert!(
            e.contains("\"host8\" differs") && e.contains("\"host7\""),
            "{e}"
        );
        assert_eq!(node_name(Some("x"), None).unwrap(), "x");
    }
}
