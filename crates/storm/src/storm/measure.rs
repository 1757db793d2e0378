//! What a storm measures of its cluster once every VM is done: each host's
//! depth (from `virtman tree`) and bytes by source, what the origin sent (from
//! the agents' status), and every process's log kept for later.

use std::path::Path;
use std::process::Command;

use virtman_agent::control::ControlClient;

use super::{HostResult, StormConfig, StormError};
use crate::cluster::{Cluster, ClusterState};

/// Each live host's figures and the bytes the origin sent (`None` when the
/// origin is among `dead`: its counters died with it).
pub(super) async fn cluster_figures(
    config: &StormConfig,
    c: &Cluster,
    dead: &[String],
) -> Result<(Vec<HostResult>, Option<u64>), StormError> {
    let mut host_results = Vec::new();
    let depths = tree_depths(&config.bin, &c.state);
    for h in c.state.hosts().filter(|h| !dead.contains(&h.name)) {
        let s = ControlClient::new(h.data_dir.join("agent.sock"))
            .status()
            .await
            .map_err(|e| StormError::Config(format!("status of {}: {e}", h.name)))?;
        let (mut from_parents, mut from_origin) = (0, 0);
        for i in &s.images {
            for (_, origin, b) in &i.fetched {
                if *origin {
                    from_origin += b;
                } else {
                    from_parents += b;
                }
            }
        }
        host_results.push(HostResult {
            host: h.name.clone(),
            depth: depths.iter().find(|(n, _)| *n == h.name).map(|d| d.1),
            from_parents,
            from_origin,
            served_to_children: s.served_to_children,
        });
    }
    let origin = c
        .state
        .members
        .iter()
        .find(|m| m.name == "origin")
        .ok_or_else(|| StormError::Config("no origin".into()))?;
    if dead.contains(&origin.name) {
        return Ok((host_results, None));
    }
    let s = ControlClient::new(origin.data_dir.join("agent.sock"))
        .status()
        .await
        .map_err(|e| StormError::Config(format!("status of the origin: {e}")))?;
    let sent = s
        .images
        .iter()
        .filter_map(|i| i.sent.map(|x| x.bytes))
        .sum();
    Ok((host_results, Some(sent)))
}

/// Copies each member's log to `to/NAME.log` (before the cluster and its
/// directory go). A log that cannot be copied is reported and skipped.
pub(super) fn save_logs(cluster: &Cluster, to: &Path) {
    if let Err(e) = std::fs::create_dir_all(to) {
        tracing::warn!(dir = %to.display(), error = %e, "cannot keep the cluster's logs");
        return;
    }
    for m in &cluster.state.members {
        let from = m.data_dir.join("log");
        if let Err(e) = std::fs::copy(&from, to.join(format!("{}.log", m.name))) {
            tracing::warn!(log = %from.display(), error = %e, "cannot keep a log");
        }
    }
}

/// Each host's depth, from `virtman tree --json`.
fn tree_depths(bin: &Path, cluster: &ClusterState) -> Vec<(String, u64)> {
    let mut cmd = Command::new(bin);
    cmd.args([
        "tree",
        "img",
        "--json",
        "--coordinator",
        &cluster.coordinator,
    ]);
    if let Some(dir) = &cluster.operator_tls {
        cmd.arg("--tls").arg(dir);
    }
    let Ok(out) = cmd.output() else {
        return Vec::new();
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
        return Vec::new();
    };
    v["nodes"]
        .as_array()
        .map(|nodes| {
            nodes
                .iter()
                .filter_map(|n| Some((n["node"].as_str()?.to_owned(), n["depth"].as_u64()?)))
                .collect()
        })
        .unwrap_or_default()
}
