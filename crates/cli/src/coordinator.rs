//! `virtman coordinator`: run the coordinator service until SIGINT or SIGTERM.
//!
//! ```text
//!   args ─► CoordinatorConfig + Token + data dir ─► virtman_coordinator::Coordinator
//!        ─► bind --listen ─► print "listening on http://ADDR" ─► serve until a signal
//! ```

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::fields::{self, parse_listen};
use crate::config::{ConfigArgs, ConfigFile};
use anyhow::{Context, bail};
use clap::Args;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use virtman_coordinator::{Coordinator, CoordinatorConfig, EtcdOptions, EtcdTls, Options, Token};

/// Arguments of `virtman coordinator`.
#[derive(Debug, Args)]
#[command(after_help = "\
The coordinator keeps one relay tree per image: agents join an image's session,
heartbeat once per interval for all their sessions, and learn whom to fetch from
(their parents) in the answers. A node silent for longer than the timeout is
declared dead and its children are re-attached. State is kept in DATA_DIR
(redb) and recovered at the next start.

State-changing calls need `Authorization: Bearer <token>`. The token is read
from --token-file; without it, DATA_DIR/token is used, and created with a
random token (mode 0600) on first start.

With --tls NODEDIR (from `virtman pki issue`) the API is HTTPS and nodes are
known by their client certificates: a node joins, heartbeats, reports and
leaves only as the node its certificate names (403 otherwise), and the token
becomes the operator's (registering images, `virtman node ban`), as does an
operator certificate (`pki issue --operator`). Reads need a certificate or the
token; /v1/health, /v1/openapi.json and /metrics stay open. SIGHUP loads
NODEDIR again.

With --etcd, the state lives in etcd under --etcd-prefix instead of DATA_DIR,
and several coordinators share it: one leads (it holds a lease-bound key in
etcd and alone decides and writes; every write is fenced by that key), the
others answer every API call with a redirect to it and take over when its
lease lapses (within about --lease-ttl). Heartbeats stay in the leader's
memory; a new leader counts every member as seen when it takes over. Give
them the same --token-file. `virtman coordinator status` shows who leads.

Examples:
  virtman coordinator                                  # 127.0.0.1:7600, ./virtman-coordinator
  virtman coordinator --listen 0.0.0.0:7600 --data-dir /var/lib/virtman/coordinator \\
      --token-file /etc/virtman/token --fanout 8 --parents 2
  virtman coordinator --listen 10.0.0.5:7600 --tls /etc/virtman/tls   # HTTPS, node certificates
  virtman coordinator --listen 10.0.0.5:7600 --token-file /etc/virtman/token \\
      --etcd http://10.0.0.1:2379,http://10.0.0.2:2379,http://10.0.0.3:2379
  virtman coordinator status --coordinator http://10.0.0.5:7600,http://10.0.0.6:7600
  curl http://127.0.0.1:7600/v1/openapi.json           # the API
  curl http://127.0.0.1:7600/metrics                   # Prometheus metrics
  virtman tree debian-12                               # print a session's tree")]
#[command(args_conflicts_with_subcommands = true)]
pub struct CoordinatorArgs {
    /// `status`: ask coordinators who leads (without it: run one).
    #[command(subcommand)]
    pub action: Option<CoordinatorAction>,

    /// The coordinator's options (a config file holds the same).
    #[command(flatten)]
    pub options: CoordinatorOptions,

    /// `--config`, `--print-config`, `--example-config`.
    #[command(flatten)]
    pub config: ConfigArgs,
}

/// The options of `virtman coordinator`: flags, and keys of its config file
/// (`/etc/virtman/coordinator.toml`; see [`crate::config`]).
#[derive(Debug, Clone, Args, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinatorOptions {
    /// Address to listen on. Port 0 picks a free port; the address bound is
    /// printed on stdout as `listening on http://ADDR` (https with --tls).
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:7600", value_parser = parse_listen)]
    #[serde(deserialize_with = "fields::listen")]
    pub listen: String,

    /// Directory for the durable state (created if missing).
    #[arg(long, value_name = "DIR", default_value = "virtman-coordinator")]
    pub data_dir: PathBuf,

    /// File holding the bearer token (at least 16 printable characters).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,

    /// Serve HTTPS with this node directory (`virtman pki issue`; its
    /// certificate needs the address clients dial in its SANs) and know
    /// nodes by their client certificates.
    #[arg(long, value_name = "NODEDIR")]
    pub tls: Option<PathBuf>,

    /// Fan-out k: the most tree children a node serves (2 to 1024). Images may
    /// override it when they are registered.
    #[arg(long, value_name = "K", default_value_t = 4)]
    #[serde(deserialize_with = "fields::count_in::<_, 2, 1024>")]
    pub fanout: u32,

    /// The most tree children an origin serves (1 to the fan-out). With 1 the
    /// origin feeds one relay head that feeds the rest, so each chunk leaves
    /// the origin about once per storm; with K it leaves K times.
    #[arg(long, value_name = "N", default_value_t = 1)]
    #[serde(deserialize_with = "fields::count_in::<_, 1, 1024>")]
    pub origin_fanout: u32,

    /// Parents per node p: the tree parent plus p-1 parents in other subtrees,
    /// for failover and load spreading (1 to 16).
    #[arg(long, value_name = "P", default_value_t = 2)]
    #[serde(deserialize_with = "fields::count_in::<_, 1, 16>")]
    pub parents: u32,

    /// Stripes S of an image registered without its own (1 to 64): chunk i
    /// follows stripe i mod S's tree, and every host relays one stripe and
    /// only receives the others (a striped forest; fan-out S makes each host
    /// upload about what it downloads, so the default is the fan-out's 4).
    /// An image registered with its own fan-out k (and no stripe count)
    /// gets k stripes instead, unless this is 1. 1 is one tree.
    #[arg(long, value_name = "S", default_value_t = 4)]
    #[serde(deserialize_with = "fields::count_in::<_, 1, 64>")]
    pub stripes: u32,

    /// How often agents heartbeat (e.g. 1s, 500ms).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    #[serde(with = "fields::duration")]
    pub heartbeat_interval: Duration,

    /// Silence after which a node is declared dead (longer than the interval).
    #[arg(long, value_name = "DURATION", default_value = "4s", value_parser = parse_duration)]
    #[serde(with = "fields::duration")]
    pub heartbeat_timeout: Duration,

    /// Keep the state in etcd at these endpoints (comma-separated), shared
    /// with other coordinators: one leads, the others redirect to it.
    #[arg(long, value_name = "URL,...", value_delimiter = ',')]
    pub etcd: Vec<String>,

    /// The key prefix in etcd; a prefix holding another program's keys is
    /// refused.
    #[arg(
        long,
        value_name = "PREFIX",
        default_value = "/virtman",
        requires = "etcd"
    )]
    pub etcd_prefix: String,

    /// The leader's lease in etcd: a dead leader is replaced after about
    /// this long (etcd's minimum is 2s with its default settings).
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_duration, requires = "etcd")]
    #[serde(with = "fields::duration")]
    pub lease_ttl: Duration,

    /// TLS to etcd with this node directory (`virtman pki issue`): its CA
    /// verifies etcd's certificates, its client certificate is presented
    /// (etcd run with --client-cert-auth). The endpoints are then https://.
    #[arg(long, value_name = "NODEDIR", requires = "etcd")]
    pub etcd_tls: Option<PathBuf>,

    /// This coordinator's name among its peers (default: coordinator-ADDR).
    #[arg(long, value_name = "NAME", requires = "etcd")]
    pub name: Option<String>,

    /// The URL the other coordinators send clients to when this one leads
    /// (default: the scheme and the address bound).
    #[arg(long, value_name = "URL", requires = "etcd")]
    pub advertise: Option<String>,
}

impl Default for CoordinatorOptions {
    fn default() -> Self {
        crate::config::clap_defaults()
    }
}

impl ConfigFile for CoordinatorOptions {
    const FILE_NAME: &'static str = "coordinator.toml";
}

/// `virtman coordinator` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum CoordinatorAction {
    /// Who leads, since when, the term, and the etcd endpoints' health, as
    /// each coordinator sees it.
    Status(crate::coordinator_status::StatusArgs),
}

/// Parses `500ms`, `2s`, `1.5s`, `1m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => s.split_at(i),
        None => return Err(format!("{s:?} needs a unit: ms, s or m")),
    };
    let value: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 500ms, 2s or 1m"))?;
    let secs = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s or m)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Reads the token file, or creates `data_dir/token` with a random token.
fn load_token(args: &CoordinatorOptions) -> anyhow::Result<Token> {
    let path = match &args.token_file {
        Some(p) => p.clone(),
        None => {
            let p = args.data_dir.join("token");
            if !p.exists() {
                create_token(&p)?;
                tracing::info!(path = %p.display(), "created a new token");
            }
            p
        }
    };
    let secret = std::fs::read_to_string(&path)
        .with_context(|| format!("reading the token file {}", path.display()))?;
    Token::new(&secret).with_context(|| format!("token file {}", path.display()))
}

fn create_token(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom for a token")?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    writeln!(f, "{hex}").with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Runs the coordinator until SIGINT or SIGTERM.
pub fn run(args: CoordinatorArgs) -> anyhow::Result<()> {
    match crate::config::options_or_print(args.options, &args.config, "coordinator")? {
        Some(options) => serve(options),
        None => Ok(()),
    }
}

/// Runs the coordinator with `args` (after the config file) until a signal.
fn serve(args: CoordinatorOptions) -> anyhow::Result<()> {
    let config = CoordinatorConfig {
        fanout: args.fanout,
        origin_fanout: args.origin_fanout,
        parents: args.parents,
        stripes: args.stripes,
        heartbeat_interval_ms: millis(args.heartbeat_interval),
        heartbeat_timeout_ms: millis(args.heartbeat_timeout),
        suspect_after_ms: millis(args.heartbeat_interval.saturating_mul(2)),
        tick_ms: millis(args.heartbeat_interval / 4).max(1),
        ..CoordinatorConfig::default()
    };
    if let Err(e) = config.settings() {
        bail!("invalid settings: {e}");
    }
    if !args.etcd.is_empty() && args.lease_ttl < Duration::from_secs(1) {
        bail!("--lease-ttl must be at least 1s (etcd counts leases in seconds)");
    }
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let token = load_token(&args)?;
    let etcd_tls = match &args.etcd_tls {
        Some(dir) => Some(EtcdTls::load(dir).map_err(|e| anyhow::anyhow!("--etcd-tls: {e}"))?),
        None => None,
    };
    if !args.etcd.is_empty()
        && etcd_tls.is_some() != args.etcd.iter().all(|e| e.starts_with("https://"))
    {
        bail!(
            "--etcd-tls goes with https:// etcd endpoints, and https:// endpoints need --etcd-tls"
        );
    }
    let tls = match &args.tls {
        Some(dir) => Some(crate::tls::NodeTlsHandles::load_https(dir)?),
        None => None,
    };
    let runtime = crate::server_runtime()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        let addr = listener.local_addr().context("reading the bound address")?;
        let shutdown = CancellationToken::new();
        let options = Options {
            config,
            token,
            tls: tls.as_ref().and_then(|t| t.https.clone()),
            data_dir: args.data_dir.clone(),
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let coordinator = if args.etcd.is_empty() {
            Coordinator::open(options, shutdown.clone())
                .with_context(|| format!("opening the state in {}", args.data_dir.display()))?
        } else {
            let etcd = EtcdOptions {
                endpoints: args.etcd.clone(),
                prefix: args.etcd_prefix.clone(),
                lease_ttl: args.lease_ttl,
                name: args
                    .name
                    .clone()
                    .unwrap_or_else(|| format!("coordinator-{addr}")),
                advertise: args
                    .advertise
                    .clone()
                    .unwrap_or_else(|| format!("{scheme}://{addr}")),
                tls: etcd_tls,
            };
            Coordinator::open_etcd(options, etcd, shutdown.clone())
                .await
                .context("joining the coordinators on etcd")?
        };
        // A stop from the moment the address is known is graceful.
        let mut signals = crate::daemon::StopSignals::install()?;
        // The one line on stdout: scripts and tests read the bound address here.
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {scheme}://{addr}").context("writing to stdout")?;
        out.flush().context("writing to stdout")?;
        drop(out);
        tracing::info!(%addr, data_dir = %args.data_dir.display(), "coordinator serving");
        let server = tokio::spawn(coordinator.serve(listener));
        // The listener is bound: connections are accepted from here on.
        crate::daemon::ready("coordinator");
        if let Some(tls) = tls {
            tokio::spawn(tls.reload_on_hangup());
        }
        signals.wait().await;
        tracing::info!("signal received; stopping");
        crate::daemon::stopping();
        shutdown.cancel();
        server
            .await
            .context("coordinator task panicked")?
            .context("coordinator failed")?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}
