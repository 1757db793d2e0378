//! The coordinators as a chaos run sees them: who leads now, how long until
//! another leads, and the image's tree (members, deaths, parent changes),
//! through `virtman coordinator status --json` and `virtman tree --json`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::cluster::ClusterState;

/// How to ask a cluster's coordinators.
#[derive(Clone, Debug)]
pub(crate) struct Coordinators {
    bin: PathBuf,
    urls: String,
    tls: Option<PathBuf>,
    image: String,
}

/// A session's tree as the leader tells it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeFacts {
    /// Its members (origins left out), sorted.
    pub members: Vec<String>,
    /// Joins the answering leader took since it took over (a member told
    /// it was dead joins again).
    pub joins: u64,
    /// Nodes the answering leader declared dead since it took over.
    pub deaths: u64,
    /// Parent-list changes of existing members since it took over.
    pub parent_changes: u64,
}

impl Coordinators {
    pub(crate) fn new(bin: PathBuf, cluster: &ClusterState) -> Self {
        Self {
            bin,
            urls: cluster.coordinator.clone(),
            tls: cluster.operator_tls.clone(),
            image: cluster.image.clone(),
        }
    }

    async fn json(&self, args: &[&str]) -> Option<serde_json::Value> {
        let mut cmd = tokio::process::Command::new(&self.bin);
        cmd.args(args)
            .args(["--json", "--coordinator", &self.urls])
            .env("VIRTMAN_LOG", "error");
        if let Some(dir) = &self.tls {
            cmd.arg("--tls").arg(dir);
        }
        let out = cmd.output().await.ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }

    /// The leader's name and term, if one says it leads.
    pub(crate) async fn leader(&self) -> Option<(String, i64)> {
        let list = self.json(&["coordinator", "status"]).await?;
        list.as_array()?.iter().find_map(|s| {
            (s["role"] == "leader").then(|| {
                Some((
                    s["name"].as_str()?.to_owned(),
                    s["leader"]["term"].as_i64()?,
                ))
            })?
        })
    }

    /// Waits until a coordinator other than `old` leads; how long it took.
    pub(crate) async fn next_leader(
        &self,
        old: &str,
        since: Instant,
        within: Duration,
    ) -> Option<(String, Duration)> {
        while since.elapsed() < within {
            if let Some((name, _)) = self.leader().await
                && name != old
            {
                return Some((name, since.elapsed()));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        None
    }

    /// The image's tree now.
    pub(crate) async fn tree(&self) -> Option<TreeFacts> {
        let t = self.json(&["tree", &self.image]).await?;
        let mut members: Vec<String> = t["nodes"]
            .as_array()?
            .iter()
            .filter(|n| n["origin"] != true)
            .filter_map(|n| Some(n["node"].as_str()?.to_owned()))
            .collect();
        members.sort();
        Some(TreeFacts {
            members,
            joins: t["stats"]["joins"].as_u64()?,
            deaths: t["stats"]["deaths"].as_u64()?,
            parent_changes: t["stats"]["parent_changes"].as_u64()?,
        })
    }
}
