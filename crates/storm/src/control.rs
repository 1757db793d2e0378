//! A local cluster's control plane: one coordinator on redb, or N
//! coordinators sharing an N-member etcd (Debian's `etcd-server`), one of
//! them leading.
//!
//! ```text
//!   N = 1   coordinator (DIR/coordinator, redb)
//!   N > 1   etcd1..etcdN   (DIR/etcdI: data and log; client and peer ports on the
//!                           coordinators' address, free ones picked at start)
//!           coordinator, coordinator2..N (--etcd all members, same token)
//!           up: every etcd member answers /health, then one coordinator leads
//! ```
//!
//! Members are recorded in `cluster.json` like every process, etcd first,
//! so `down` stops the agents, then the coordinators, then etcd.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::cluster::{
    Cluster, ClusterConfig, ClusterError, Member, command, io, issue, spawn, start_error,
    start_process,
};

/// Starts the coordinators (and etcd, with several) of `cluster`; sets its
/// coordinator URL(s).
pub(crate) fn start(
    cluster: &mut Cluster,
    config: &ClusterConfig,
    listen_ip: &str,
    token: &Path,
    ca: Option<&virtman_pki::Ca>,
) -> Result<(), ClusterError> {
    let n = config.coordinators.max(1);
    let etcd = if n > 1 {
        Some(start_etcd(cluster, n, listen_ip)?)
    } else {
        None
    };
    let scheme = if ca.is_some() { "https" } else { "http" };
    let mut urls = Vec::new();
    for i in 1..=n {
        let name = if i == 1 {
            "coordinator".to_owned()
        } else {
            format!("coordinator{i}")
        };
        let dir = cluster.dir.join(&name);
        let mut args: Vec<String> = [
            "coordinator",
            "--listen",
            &format!("{listen_ip}:0"),
            "--data-dir",
            &dir.display().to_string(),
            "--token-file",
            &token.display().to_string(),
            "--fanout",
            &config.fanout.to_string(),
            "--origin-fanout",
            &config.origin_fanout.to_string(),
            "--parents",
            &config.parents.to_string(),
            "--stripes",
            &config.stripes.to_string(),
            "--heartbeat-interval",
            "500ms",
            "--heartbeat-timeout",
            "2s",
        ]
        .map(str::to_owned)
        .to_vec();
        if let Some(endpoints) = &etcd {
            args.extend([
                "--etcd".to_owned(),
                endpoints.join(","),
                "--name".to_owned(),
                name.clone(),
            ]);
        }
        if let Some(ca) = ca {
            // The coordinator is a node of the PKI too (HTTPS, certificate
            // for its address); the operator's directory is for the CLI.
            let node_dir = issue(ca, &cluster.dir, &name, listen_ip, virtman_pki::Role::Node)?;
            args.extend(["--tls".to_owned(), node_dir.display().to_string()]);
        }
        fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
        let (pid, addr) = spawn(&config.bin, &args, &name, &dir.join("log"), None)?;
        urls.push(format!("{scheme}://{addr}"));
        cluster.state.members.push(Member {
            name,
            pid,
            data_dir: dir,
            addr,
            netns: None,
            command: command(&config.bin, &args),
        });
    }
    if let Some(ca) = ca {
        cluster.state.operator_tls = Some(issue(
            ca,
            &cluster.dir,
            "operator",
            "127.0.0.1",
            virtman_pki::Role::Operator,
        )?);
    }
    cluster.state.coordinator = urls.join(",");
    if etcd.is_some() {
        wait_for_a_leader(cluster)?;
    }
    Ok(())
}

fn free_port(ip: &str) -> Result<u16, ClusterError> {
    TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| ClusterError::Command(format!("finding a free port on {ip}: {e}")))
}

/// Starts an `n`-member etcd on `ip`; returns its client URLs.
fn start_etcd(cluster: &mut Cluster, n: usize, ip: &str) -> Result<Vec<String>, ClusterError> {
    // Found on PATH by the spawn; a missing one says which package.
    let bin = PathBuf::from("etcd");
    let mut ports = Vec::new();
    for _ in 0..n {
        ports.push((free_port(ip)?, free_port(ip)?));
    }
    let initial = ports
        .iter()
        .enumerate()
        .map(|(i, (_, peer))| format!("etcd{}=http://{ip}:{peer}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let token = format!("virtman-{}", ports[0].0);
    let mut endpoints = Vec::new();
    for (i, (client, peer)) in ports.iter().enumerate() {
        let name = format!("etcd{}", i + 1);
        let dir = cluster.dir.join(&name);
        fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
        let client_url = format!("http://{ip}:{client}");
        let peer_url = format!("http://{ip}:{peer}");
        let args = vec![
            format!("--name={name}"),
            format!("--data-dir={}", dir.join("data").display()),
            format!("--listen-client-urls={client_url}"),
            format!("--advertise-client-urls={client_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster={initial}"),
            "--initial-cluster-state=new".to_owned(),
            format!("--initial-cluster-token={token}"),
            "--logger=zap".to_owned(),
        ];
        let pid = start_process(&bin, &args, &dir.join("log"), None).map_err(|e| {
            ClusterError::Command(format!(
                "several coordinators need etcd (Debian's etcd-server): {e}"
            ))
        })?;
        cluster.state.members.push(Member {
            name,
            pid,
            data_dir: dir,
            addr: format!("{ip}:{client}"),
            netns: None,
            command: command(&bin, &args),
        });
        endpoints.push(client_url);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for m in cluster
        .state
        .members
        .iter()
        .filter(|m| m.name.starts_with("etcd"))
    {
        while !healthy(&m.addr) {
            if Instant::now() > deadline {
                return Err(start_error(&m.name, 30, &m.data_dir.join("log")));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(endpoints)
}

/// Whether the etcd at `addr` answers `GET /health` with true.
fn healthy(addr: &str) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer.contains("\"health\":\"true\"")
}

/// Waits until a coordinator's log says it leads (15 s at most).
fn wait_for_a_leader(cluster: &Cluster) -> Result<(), ClusterError> {
    let deadline = Instant::now() + Duration::from_secs(15);
    let coordinators: Vec<&Member> = cluster
        .state
        .members
        .iter()
        .filter(|m| m.name.starts_with("coordinator"))
        .collect();
    loop {
        for m in &coordinators {
            let mut text = String::new();
            if let Ok(mut f) = fs::File::open(m.data_dir.join("log")) {
                let _ = f.read_to_string(&mut text);
            }
            if text.contains("leading") {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            let first = coordinators.first().map_or("coordinator", |m| &m.name);
            let log = cluster.dir.join(first).join("log");
            return Err(start_error(
                &format!("a leader among the coordinators ({first})"),
                15,
                &log,
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
