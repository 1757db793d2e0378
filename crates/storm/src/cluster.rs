//! A local cluster: a coordinator, an origin and M agents as separate
//! `virtman` processes on loopback, with their state in one directory.
//!
//! ```text
//!  DIR/cluster.json      what is running (pids, addresses, data dirs)
//!  DIR/token             the coordinator's token
//!  DIR/pki/              with TLS: the CA, each process's node directory,
//!                        and `operator` for `virtman tree|node --tls`
//!  DIR/coordinator/      coordinator state and log (DIR/coordinatorI/ for
//!                        the others, DIR/etcdI/ for etcd's members, with
//!                        several coordinators: see `control`)
//!  DIR/origin/images/    the image store of the origin
//!  DIR/hostN/            each agent's cache group, sockets and log
//! ```
//!
//! Every process is started in its own process group, so `down` (or a drop of
//! the owning [`Cluster`]) stops it and everything it started, and then removes
//! the directory: nothing is left behind.
//!
//! With [`NetConfig`] (root only), every agent lives in its own network
//! namespace, linked by a veth pair to a bridge that carries the
//! coordinator's address; `tc tbf` shapes each link to the given rate in both
//! directions, and the agents add the given latency to every fetch in user
//! space (netem may be missing). `down` deletes the namespaces and the bridge.
//!
//! ```text
//!   bridge vmbID 10.201.ID.1 (coordinator) ── vmIDxN ══ eth0 10.201.ID.N+2 (netns vmID-NAME: agent)
//!                                              tbf rate  tbf rate
//! ```

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Why a cluster could not be started or stopped.
#[derive(Debug, Error)]
pub enum ClusterError {
    /// A file or directory operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was done.
        what: &'static str,
        /// On which path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// A process did not come up.
    #[error("{name} did not start within {secs} s; its log ({log}) ends with:\n{tail}")]
    Start {
        /// The process.
        name: String,
        /// Seconds waited.
        secs: u64,
        /// Its log file.
        log: String,
        /// The end of its log.
        tail: String,
    },
    /// A command failed.
    #[error("{0}")]
    Command(String),
    /// No cluster state in the directory.
    #[error("no cluster in {0} (no cluster.json)")]
    NotFound(String),
}

pub(crate) fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ClusterError {
    let path = path.display().to_string();
    move |source| ClusterError::Io { what, path, source }
}

/// How to build a cluster.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// The `virtman` binary to run.
    pub bin: PathBuf,
    /// The cluster's directory (created; must not hold a running cluster).
    pub dir: PathBuf,
    /// Member hosts (agents besides the origin).
    pub hosts: usize,
    /// The raw image the origin serves, imported as `image_name` (unless
    /// `store` is given).
    pub image: PathBuf,
    /// The image's name.
    pub image_name: String,
    /// An image store already holding `image_name`: the origin serves it
    /// from there (every image of the store, in fact) and `image` is not
    /// read.
    pub store: Option<PathBuf>,
    /// Fan-out of the relay tree.
    pub fanout: u32,
    /// Tree children of the origin (1: one relay head).
    pub origin_fanout: u32,
    /// Parents per host.
    pub parents: u32,
    /// Stripes of the image's forest (1: one tree).
    pub stripes: u32,
    /// Cache capacity per host, as `virtman agent --cache-size` takes it.
    pub cache_size: String,
    /// A boot trace to store as the image's boot profile at the origin
    /// (`virtman image profile`), so that hosts prefetch it; none: no profile.
    pub profile_trace: Option<PathBuf>,
    /// Network namespaces and shaped links, or loopback when `None`.
    pub net: Option<NetConfig>,
    /// TLS on every link: a cluster CA in `DIR/pki/ca`, a node directory per
    /// process in `DIR/pki/NAME` (its name, its address), every base export
    /// TLS-only with client certificates, every fetch over TLS, the
    /// coordinator on HTTPS knowing agents by their certificates, and an
    /// operator directory in `DIR/pki/operator`.
    pub tls: bool,
    /// Hosts started with the agent's test-only `--test-lie` (chaos).
    pub liars: Vec<String>,
    /// Arguments every agent gets besides the cluster's own (e.g.
    /// `--no-hedge`, for comparisons).
    pub agent_args: Vec<String>,
    /// Coordinators: 1 keeps its state in redb; more share an etcd of as
    /// many members (Debian's `etcd-server`), one leading (see
    /// [`crate::control`]).
    pub coordinators: usize,
}

/// Issues `name`'s certificate (valid for `ip`) into `DIR/pki/NAME`.
pub(crate) fn issue(
    ca: &virtman_pki::Ca,
    dir: &Path,
    name: &str,
    ip: &str,
    role: virtman_pki::Role,
) -> Result<PathBuf, ClusterError> {
    let ip = ip
        .parse()
        .map_err(|_| ClusterError::Command(format!("{ip:?} is not an IP address")))?;
    let out = dir.join("pki").join(name);
    ca.issue(&virtman_pki::IssueRequest {
        name: name.to_owned(),
        role,
        ips: vec![ip],
        dns: vec![],
        days: 30,
    })
    .and_then(|i| virtman_pki::write_node_dir(&out, ca.cert_pem(), &i))
    .map_err(|e| ClusterError::Command(format!("issuing {name}'s certificate: {e}")))?;
    Ok(out)
}

/// Shaped links between namespaced hosts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// Link rate for `tc tbf`, e.g. `1gbit`.
    pub rate: String,
    /// Latency each agent adds to a fetch, e.g. `200us`, as the agent's
    /// `--link-delay` takes it (empty for none).
    pub delay: String,
}

/// One process of a cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// `coordinator` (`coordinatorI`, `etcdI`), `origin` or `hostN`.
    pub name: String,
    /// Its pid (also its process group).
    pub pid: u32,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// The address it listens on.
    pub addr: String,
    /// Its network namespace, if any.
    #[serde(default)]
    pub netns: Option<String>,
    /// The program and arguments it was started with (to start it again).
    #[serde(default)]
    pub command: Vec<String>,
}

/// What `cluster.json` records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// Coordinator URL (several, comma-separated, with etcd).
    pub coordinator: String,
    /// The image's name.
    pub image: String,
    /// Every process, coordinator and origin first.
    pub members: Vec<Member>,
    /// Network namespaces created for the cluster.
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// The bridge created for the cluster.
    #[serde(default)]
    pub bridge: Option<String>,
    /// With TLS: the operator's directory, for `virtman tree --tls` and
    /// `virtman node --tls`.
    #[serde(default)]
    pub operator_tls: Option<PathBuf>,
}

impl ClusterState {
    /// The member hosts (not the coordinator or the origin).
    pub fn hosts(&self) -> impl Iterator<Item = &Member> {
        self.members.iter().filter(|m| m.name.starts_with("host"))
    }
}

/// A running local cluster. Dropping it stops every process and removes its
/// directory, unless it was [`Cluster::detach`]ed.
#[derive(Debug)]
pub struct Cluster {
    /// Where it lives.
    pub dir: PathBuf,
    /// What runs.
    pub state: ClusterState,
    detached: bool,
}

const TOKEN: &str = "local-cluster-token-0123456789abcdef";

/// Starts `bin ARGS` in its own process group (in `netns` if given) with
/// output to `log`; returns its pid.
pub(crate) fn start_process(
    bin: &Path,
    args: &[String],
    log: &Path,
    netns: Option<&str>,
) -> Result<u32, ClusterError> {
    let out = fs::File::create(log).map_err(io("creating", log))?;
    let err = out.try_clone().map_err(io("opening", log))?;
    // `ip netns exec` enters the namespace and execs the program: same pid.
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    // The cluster's processes take their options from their arguments only,
    // not from the host's /etc/virtman/*.toml (a directory without them).
    let config_dir = log.parent().unwrap_or(log);
    let child = cmd
        .args(args)
        .env("VIRTMAN_LOG", "info")
        .env("VIRTMAN_CONFIG_DIR", config_dir)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .map_err(|e| ClusterError::Command(format!("starting {}: {e}", bin.display())))?;
    // The child is reaped by whoever stops it (kill + waitpid in `stop`), or
    // by init once this process exits; dropping the handle does not kill it.
    Ok(child.id())
}

/// `name` did not start within `secs`: the error, with the end of its log.
pub(crate) fn start_error(name: &str, secs: u64, log: &Path) -> ClusterError {
    let text = fs::read_to_string(log).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(15).collect();
    ClusterError::Start {
        name: name.to_owned(),
        secs,
        log: log.display().to_string(),
        tail: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
    }
}

/// Starts `bin ARGS` in its own process group with output to `log`, and waits
/// for `listening on ADDR` in the log.
pub(crate) fn spawn(
    bin: &Path,
    args: &[String],
    name: &str,
    log: &Path,
    netns: Option<&str>,
) -> Result<(u32, String), ClusterError> {
    let pid = start_process(bin, args, log, netns)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = fs::read_to_string(log).unwrap_or_default();
        if let Some(addr) = text.lines().find_map(|l| l.strip_prefix("listening on ")) {
            let addr = addr.trim();
            let addr = addr
                .strip_prefix("https://")
                .or_else(|| addr.strip_prefix("http://"))
                .unwrap_or(addr);
            return Ok((pid, addr.to_owned()));
        }
        if Instant::now() > deadline || !alive(pid) {
            stop_pid(pid);
            return Err(start_error(name, 30, log));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub(crate) fn command(bin: &Path, args: &[String]) -> Vec<String> {
    std::iter::once(bin.display().to_string())
        .chain(args.iter().cloned())
        .collect()
}

/// Sends `signal` to member `m`'s process group.
pub fn signal(m: &Member, signal: rustix::process::Signal) {
    let Some(p) = i32::try_from(m.pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return;
    };
    let _ = rustix::process::kill_process_group(p, signal);
    // Reap it if it was ours and is gone.
    let _ = rustix::process::waitpid(Some(p), rustix::process::WaitOptions::NOHANG);
}

/// Starts member `m` again as it was started (its data directory, its
/// address: `--listen` is given the address it had), after it died; returns
/// its new pid. Its previous log is kept as `log.1`.
pub fn restart(m: &Member) -> Result<u32, ClusterError> {
    let Some((bin, args)) = m.command.split_first() else {
        return Err(ClusterError::Command(format!(
            "{} was not started by this cluster",
            m.name
        )));
    };
    let mut args = args.to_vec();
    if let Some(i) = args.iter().position(|a| a == "--listen")
        && let Some(v) = args.get_mut(i + 1)
    {
        v.clone_from(&m.addr);
    }
    let log = m.data_dir.join("log");
    let _ = fs::rename(&log, m.data_dir.join("log.1"));
    let (pid, _) = spawn(Path::new(bin), &args, &m.name, &log, m.netns.as_deref())?;
    Ok(pid)
}

/// Whether a process exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// SIGTERM to the process group, then SIGKILL after a grace period; reaps the
/// process if it is our child.
pub(crate) fn stop_pid(pid: u32) {
    let Ok(raw) = i32::try_from(pid) else { return };
    let Some(p) = rustix::process::Pid::from_raw(raw) else {
        return;
    };
    let _ = rustix::process::kill_process_group(p, rustix::process::Signal::TERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) && Instant::now() < deadline {
        let _ = rustix::process::waitpid(Some(p), rustix::process::WaitOptions::NOHANG);
        std::thread::sleep(Duration::from_millis(20));
    }
    if alive(pid) {
        let _ = rustix::process::kill_process_group(p, rustix::process::Signal::KILL);
    }
    let _ = rustix::process::waitpid(Some(p), rustix::process::WaitOptions::NOHANG);
}

/// Runs a setup command (`ip`, `tc`), turning a failure into an error.
fn run(cmd: &[&str]) -> Result<(), ClusterError> {
    let out = Command::new(cmd[0]).args(&cmd[1..]).output().map_err(|e| {
        ClusterError::Command(format!("running {}: {e} (is iproute2 installed?)", cmd[0]))
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(ClusterError::Command(format!(
            "`{}` failed: {}",
            cmd.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// The addresses and names of a namespaced cluster.
struct Net {
    id: u32,
    config: NetConfig,
}

impl Net {
    fn new(config: &NetConfig) -> Result<Net, ClusterError> {
        if !rustix::process::geteuid().is_root() {
            return Err(ClusterError::Command(
                "--netns needs root (network namespaces, veth, tc); run without --netns to use loopback"
                    .into(),
            ));
        }
        // An id whose bridge does not exist yet, so two clusters on one
        // machine do not collide.
        let start = std::process::id() % 250;
        let id = (0..250)
            .map(|k| (start + k) % 250)
            .find(|id| !Path::new(&format!("/sys/class/net/vmb{id}")).exists())
            .ok_or_else(|| {
                ClusterError::Command("250 namespaced clusters already run here".into())
            })?;
        Ok(Net {
            id,
            config: config.clone(),
        })
    }

    fn bridge(&self) -> String {
        format!("vmb{}", self.id)
    }

    fn gateway(&self) -> String {
        format!("10.201.{}.1", self.id)
    }

    /// Creates the bridge (recorded in `state` first, so a failure cleans up).
    fn make_bridge(&self, state: &mut ClusterState) -> Result<(), ClusterError> {
        let br = self.bridge();
        // A fixed address: a bridge otherwise takes the lowest of its ports'
        // addresses, so each host added could change it under the hosts
        // already running, whose cached neighbour entry for the coordinator
        // would then point nowhere for seconds (their first HTTPS calls hung).
        let mac = format!("02:76:6d:00:{:02x}:01", self.id);
        run(&["ip", "link", "add", &br, "address", &mac, "type", "bridge"])?;
        state.bridge = Some(br.clone());
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", self.gateway()),
            "dev",
            &br,
        ])?;
        run(&["ip", "link", "set", &br, "up"])
    }

    /// Creates host `n`'s namespace and shaped link; returns (namespace, address).
    fn make_host(
        &self,
        n: usize,
        name: &str,
        state: &mut ClusterState,
    ) -> Result<(String, String), ClusterError> {
        let ns = format!("vm{}-{name}", self.id);
        run(&["ip", "netns", "add", &ns])?;
        state.namespaces.push(ns.clone());
        let outer = format!("vm{}x{n}", self.id);
        let addr = format!("10.201.{}.{}", self.id, n + 2);
        let rate = self.config.rate.as_str();
        run(&["ip", "netns", "exec", &ns, "ip", "link", "set", "lo", "up"])?;
        run(&[
            "ip", "link", "add", &outer, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        run(&["ip", "link", "set", &outer, "master", &self.bridge(), "up"])?;
        run(&[
            "ip",
            "netns",
            "exec",
            &ns,
            "ip",
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ])?;
        run(&[
            "ip", "netns", "exec", &ns, "ip", "link", "set", "eth0", "up",
        ])?;
        let tbf = [
            "root", "tbf", "rate", rate, "burst", "256kb", "latency", "100ms",
        ];
        let mut down = vec!["tc", "qdisc", "add", "dev", outer.as_str()];
        down.extend_from_slice(&tbf);
        run(&down)?;
        let mut up = vec![
            "ip", "netns", "exec", &ns, "tc", "qdisc", "add", "dev", "eth0",
        ];
        up.extend_from_slice(&tbf);
        run(&up)?;
        Ok((ns, addr))
    }
}

impl Cluster {
    /// Imports the image and starts the coordinator, the origin and the hosts.
    pub fn up(config: &ClusterConfig) -> Result<Cluster, ClusterError> {
        let dir = &config.dir;
        if dir.join("cluster.json").exists() {
            return Err(ClusterError::Command(format!(
                "{} already holds a cluster; run `virtman cluster down --dir {}` first",
                dir.display(),
                dir.display()
            )));
        }
        // `cluster down` (and a failed `up`) removes the directory whole, so
        // it must hold nothing but the cluster.
        if fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some()) {
            return Err(ClusterError::Command(format!(
                "{} is not empty: a cluster needs a new or empty directory \
                 (`cluster down` removes it whole)",
                dir.display()
            )));
        }
        fs::create_dir_all(dir).map_err(io("creating", dir))?;
        let dir = std::path::absolute(dir).map_err(io("resolving", dir))?;
        // From here on, a failure stops what was started and removes `dir`.
        let mut cluster = Cluster {
            dir: dir.clone(),
            state: ClusterState {
                coordinator: String::new(),
                image: config.image_name.clone(),
                members: Vec::new(),
                namespaces: Vec::new(),
                bridge: None,
                operator_tls: None,
            },
            detached: false,
        };
        let token = dir.join("token");
        fs::write(&token, TOKEN).map_err(io("writing", &token))?;
        let store = match &config.store {
            Some(store) => {
                virtman_image::ImageStore::open(store)
                    .map_err(|e| e.to_string())
                    .and_then(|s| s.open_image(&config.image_name).map_err(|e| e.to_string()))
                    .map_err(|e| {
                        ClusterError::Command(format!(
                            "image {:?} in the store {}: {e}",
                            config.image_name,
                            store.display()
                        ))
                    })?;
                std::path::absolute(store).map_err(io("resolving", store))?
            }
            None => {
                let store = dir.join("origin/images");
                let out = Command::new(&config.bin)
                    .args(["image", "import"])
                    .arg(&config.image)
                    .args(["--name", &config.image_name, "--store"])
                    .arg(&store)
                    .env("VIRTMAN_LOG", "warn")
                    .output()
                    .map_err(|e| ClusterError::Command(format!("importing the image: {e}")))?;
                if !out.status.success() {
                    return Err(ClusterError::Command(format!(
                        "importing {}: {}",
                        config.image.display(),
                        child_error(&out.stderr)
                    )));
                }
                store
            }
        };
        if let Some(trace) = &config.profile_trace {
            let out = Command::new(&config.bin)
                .args(["image", "profile", &config.image_name, "--trace"])
                .arg(trace)
                .arg("--store")
                .arg(&store)
                .env("VIRTMAN_LOG", "warn")
                .output()
                .map_err(|e| ClusterError::Command(format!("storing the boot profile: {e}")))?;
            if !out.status.success() {
                return Err(ClusterError::Command(format!(
                    "storing the boot profile {}: {}",
                    trace.display(),
                    child_error(&out.stderr)
                )));
            }
        }
        let net = match &config.net {
            Some(n) => {
                let net = Net::new(n)?;
                net.make_bridge(&mut cluster.state)?;
                Some(net)
            }
            None => None,
        };
        let listen_ip = net.as_ref().map_or("127.0.0.1".to_owned(), Net::gateway);
        let s = |x: &str| x.to_owned();
        let ca = if config.tls {
            let ca_dir = dir.join("pki").join("ca");
            Some(
                virtman_pki::Ca::init(&ca_dir, 30)
                    .map_err(|e| ClusterError::Command(format!("making the cluster CA: {e}")))?,
            )
        } else {
            None
        };
        crate::control::start(&mut cluster, config, &listen_ip, &token, ca.as_ref())?;
        let names =
            std::iter::once(s("origin")).chain((1..=config.hosts).map(|i| format!("host{i}")));
        for (n, name) in names.enumerate() {
            let data = dir.join(&name);
            fs::create_dir_all(&data).map_err(io("creating", &data))?;
            let (netns, ip) = match &net {
                Some(net) => {
                    let (ns, ip) = net.make_host(n, &name, &mut cluster.state)?;
                    (Some(ns), ip)
                }
                None => (None, s("127.0.0.1")),
            };
            let mut args = vec![
                s("agent"),
                s("--coordinator"),
                cluster.state.coordinator.clone(),
                s("--token-file"),
                token.display().to_string(),
                s("--data-dir"),
                data.display().to_string(),
                s("--listen"),
                format!("{ip}:0"),
                s("--name"),
                name.clone(),
                s("--cache-size"),
                config.cache_size.clone(),
            ];
            if let Some(ca) = &ca {
                let node_dir = issue(ca, &dir, &name, &ip, virtman_pki::Role::Node)?;
                args.extend([s("--tls"), node_dir.display().to_string()]);
            }
            if config.liars.contains(&name) {
                args.push(s("--test-lie"));
            }
            if name == "origin" && config.store.is_some() {
                args.extend([s("--image-store"), store.display().to_string()]);
            }
            args.extend(config.agent_args.iter().cloned());
            if let Some(d) = config
                .net
                .as_ref()
                .map(|n| n.delay.clone())
                .filter(|d| !d.is_empty())
            {
                args.extend([s("--link-delay"), d]);
            }
            let (pid, addr) = spawn(
                &config.bin,
                &args,
                &name,
                &data.join("log"),
                netns.as_deref(),
            )?;
            cluster.state.members.push(Member {
                name,
                pid,
                data_dir: data,
                addr,
                netns,
                command: command(&config.bin, &args),
            });
        }
        cluster.save()?;
        Ok(cluster)
    }

    fn save(&self) -> Result<(), ClusterError> {
        let p = self.dir.join("cluster.json");
        let json = serde_json::to_vec_pretty(&self.state)
            .map_err(|e| ClusterError::Command(e.to_string()))?;
        fs::write(&p, json).map_err(io("writing", &p))
    }

    /// Leaves the processes running when this handle is dropped (for
    /// `virtman cluster up`); `down` stops them later.
    pub fn detach(mut self) -> ClusterState {
        self.detached = true;
        self.state.clone()
    }

    /// Stops the cluster recorded in `dir` and removes the directory.
    pub fn down(dir: &Path) -> Result<ClusterState, ClusterError> {
        let p = dir.join("cluster.json");
        let text = fs::read(&p).map_err(|_| ClusterError::NotFound(dir.display().to_string()))?;
        let state: ClusterState = serde_json::from_slice(&text)
            .map_err(|e| ClusterError::Command(format!("{}: {e}", p.display())))?;
        stop_all(&state);
        fs::remove_dir_all(dir).map_err(io("removing", dir))?;
        Ok(state)
    }
}

/// Stops hosts first, then the origin, then the coordinator; then deletes
/// the namespaces (their veth ends go with them) and the bridge.
fn stop_all(state: &ClusterState) {
    for m in state.members.iter().rev() {
        stop_pid(m.pid);
    }
    for ns in &state.namespaces {
        let _ = run(&["ip", "netns", "del", ns]);
    }
    if let Some(br) = &state.bridge {
        let _ = run(&["ip", "link", "del", br]);
    }
}

/// What a failed `virtman` subcommand printed, without its own prefix.
fn child_error(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let text = text.trim();
    text.strip_prefix("virtman: error: ")
        .unwrap_or(text)
        .to_owned()
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.detached {
            stop_all(&self.state);
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}
