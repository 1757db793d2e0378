//! The plain server of `direct` mode: on loopback `virtman serve` on a unix
//! socket (capped at the user-space link rate, if any: a server behind a
//! link); with namespaces `qemu-nbd -e 1024` in the origin's namespace behind
//! its shaped link (an origin-only cluster provides it), where the link's
//! counter measures what it sent.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use virtman_nbd::Endpoint;

use super::{StormConfig, StormError};
use crate::cluster::{Cluster, ClusterConfig};

/// A running plain server.
pub(super) struct PlainServer {
    /// The origin-only cluster that provides the namespace, if any.
    pub(super) cluster: Option<Cluster>,
    /// The server, killed on drop.
    pub(super) server: KillOnDrop,
    /// For real guests in a namespace: the namespace and its link's sent
    /// bytes before the storm (qemu-nbd has no counter of its own).
    pub(super) counter: Option<(String, u64)>,
    /// Where VMs connect.
    pub(super) endpoint: Endpoint,
}

/// Starts the plain server for `config`'s image under `dir` and waits until it
/// accepts connections.
pub(super) async fn start(config: &StormConfig, dir: &Path) -> Result<PlainServer, StormError> {
    let mut cluster = None;
    let mut counter = None;
    std::fs::create_dir_all(dir).map_err(|e| StormError::Config(e.to_string()))?;
    // With namespaces, the plain server runs in the origin's namespace
    // behind its shaped link (an origin-only cluster provides it).
    let origin_ns = match &config.net {
        Some(net) => {
            let c = Cluster::up(&ClusterConfig {
                bin: config.bin.clone(),
                dir: dir.join("net"),
                hosts: 0,
                image: config.image.clone(),
                image_name: "img".into(),
                store: None,
                fanout: 2,
                origin_fanout: 1,
                parents: 1,
                stripes: 1,
                cache_size: "64M".into(),
                profile_trace: None,
                net: Some(net.clone()),
                // Only its namespace is used: the plain server is qemu-nbd.
                tls: false,
                liars: Vec::new(),
                agent_args: Vec::new(),
                coordinators: 1,
            })?;
            let o = c.state.members.iter().find(|m| m.name == "origin").cloned();
            cluster = Some(c);
            o.and_then(|o| {
                let ip = o.addr.rsplit_once(':')?.0.to_owned();
                Some((o.netns?, ip))
            })
        }
        None => None,
    };
    let sock = dir.join("plain.sock");
    let mut cmd = match &origin_ns {
        Some((ns, ip)) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "qemu-nbd"]);
            c.args(["-r", "-t", "-e", "1024", "-f", "raw", "-x", "img"]);
            c.args(["-b", ip, "-p", "10809"]);
            c
        }
        None => {
            let mut c = Command::new(&config.bin);
            c.args(["serve", "--read-only", "--name", "img", "--socket"])
                .arg(&sock);
            if let Some(rate) = config.link_rate {
                c.args(["--rate", &format!("{rate}B/s")]);
            }
            c
        }
    };
    let what = if origin_ns.is_some() {
        "qemu-nbd (install qemu-utils)"
    } else {
        "virtman serve"
    };
    let child = cmd
        .arg(&config.image)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| StormError::Config(format!("starting {what}: {e}")))?;
    let server = KillOnDrop(child);
    if config.qemu.is_some()
        && let Some((ns, _)) = &origin_ns
        && let Some(before) = ns_tx_bytes(ns)
    {
        counter = Some((ns.clone(), before));
    }
    let endpoint = match &origin_ns {
        Some((_, ip)) => Endpoint::Tcp(format!("{ip}:10809")),
        None => Endpoint::Unix(sock.clone()),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ready = match &endpoint {
            Endpoint::Unix(p) => p.exists(),
            Endpoint::Tcp(a) => std::net::TcpStream::connect(a).is_ok(),
        };
        if ready {
            break;
        }
        if Instant::now() > deadline {
            return Err(StormError::Config(format!("{what} did not start")));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(PlainServer {
        cluster,
        server,
        counter,
        endpoint,
    })
}

/// Bytes sent so far by network namespace `ns`'s link (`eth0`), headers
/// included.
pub(super) fn ns_tx_bytes(ns: &str) -> Option<u64> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "cat",
            "/sys/class/net/eth0/statistics/tx_bytes",
        ])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// A child process killed and reaped on drop.
pub(super) struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
