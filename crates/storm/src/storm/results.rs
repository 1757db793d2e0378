//! What a storm reports: each VM's boot time and bytes, each host's traffic,
//! the origin's bytes, and the percentiles the comparison table prints.

use serde::{Deserialize, Serialize};

use super::StormMode;
pub use super::leader::TreeFacts;

/// One VM's result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmResult {
    /// The VM.
    pub vm: String,
    /// Its host.
    pub host: String,
    /// Seconds from the storm's start until its last read completed (or
    /// until it failed).
    pub boot_secs: f64,
    /// Bytes it read.
    pub bytes: u64,
    /// Why it did not boot (its host died, a read failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Bytes of its reads that differed from the image (must be 0).
    #[serde(default)]
    pub wrong_bytes: u64,
    /// Its longest single read, milliseconds (replays only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub longest_read_ms: Option<f32>,
}

/// What a storm with chaos did, and whether the promise held: no wrong
/// byte, no failed read on a host that stayed up.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChaosReport {
    /// What was done, in order (`1.00s kill host3`).
    pub actions: Vec<String>,
    /// Bytes VMs read that differed from the image.
    pub wrong_bytes: u64,
    /// VMs whose reads failed although their host was never killed or
    /// restarted.
    pub failed_on_live_hosts: usize,
    /// VMs that failed with their own host (killed or restarted).
    pub lost_with_host: usize,
    /// The longest single VM read, milliseconds.
    pub longest_read_ms: f32,
    /// The 99th percentile of VM reads, milliseconds.
    pub p99_read_ms: f32,
    /// Whether the promise held.
    pub held: bool,
    /// With the leading coordinator hit: the failover and the tree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<ControlReport>,
}

/// What hitting the leading coordinator did to the control plane.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ControlReport {
    /// Milliseconds from each hit to another coordinator leading (`null`:
    /// none did within 20 s).
    pub failovers_ms: Vec<Option<f64>>,
    /// The tree just before the first hit (the old leader's counts).
    pub before: TreeFacts,
    /// The tree once the VMs were done (the new leader's counts, since it
    /// took over); none if no coordinator answered.
    pub after: Option<TreeFacts>,
}

/// One host's figures.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HostResult {
    /// The host.
    pub host: String,
    /// Its depth in the tree (1 = child of the origin).
    pub depth: Option<u64>,
    /// Bytes it fetched from parents that are not origins.
    pub from_parents: u64,
    /// Bytes it fetched from origins.
    pub from_origin: u64,
    /// Bytes it served to child hosts.
    pub served_to_children: u64,
}

/// The result of one storm.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StormReport {
    /// The mode.
    pub mode: StormMode,
    /// Hosts.
    pub hosts: usize,
    /// VMs.
    pub vms: usize,
    /// Bytes of the image.
    pub image_size: u64,
    /// Bytes of distinct chunks the trace touches (the working set).
    pub working_set: u64,
    /// Whether reads were replayed back to back.
    pub back_to_back: bool,
    /// Every VM.
    pub vm_results: Vec<VmResult>,
    /// Every host (empty in `direct` mode).
    pub host_results: Vec<HostResult>,
    /// Bytes the origin (or the plain server) sent.
    pub origin_bytes: u64,
    /// Whether `origin_bytes` was measured: not for real guests reading a
    /// plain server on loopback (qemu-nbd counts nothing), nor when the
    /// origin died.
    #[serde(default = "yes")]
    pub origin_measured: bool,
    /// Seconds until every VM had booted (or failed, when some did).
    pub all_booted_secs: f64,
    /// Processes of the cluster found dead after the storm (`hostN`,
    /// `origin`, `coordinator`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dead: Vec<String>,
    /// With `--chaos`: what happened and whether the promise held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chaos: Option<ChaosReport>,
}

fn yes() -> bool {
    true
}

impl StormReport {
    /// The VMs that did not boot.
    pub fn failed(&self) -> impl Iterator<Item = &VmResult> {
        self.vm_results.iter().filter(|v| v.error.is_some())
    }

    /// The boot time below which a fraction `q` of the booted VMs finished.
    pub fn percentile(&self, q: f64) -> f64 {
        let mut t: Vec<f64> = self
            .vm_results
            .iter()
            .filter(|v| v.error.is_none())
            .map(|v| v.boot_secs)
            .collect();
        t.sort_by(f64::total_cmp);
        if t.is_empty() {
            return 0.0;
        }
        let i = ((t.len() as f64 - 1.0) * q.clamp(0.0, 1.0)).round();
        // In [0, len - 1] by construction: the cast cannot truncate.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let i = i as usize;
        t[i.min(t.len() - 1)]
    }
}
