//! Prometheus metrics of one coordinator, in a registry of its own (no
//! globals), so that several coordinators in one process (tests, a local
//! cluster) keep separate counts.
//!
//! ```text
//!   virtman_coordinator_nodes              gauge      live members, all sessions
//!   virtman_coordinator_sessions           gauge      registered images
//!   virtman_coordinator_joins_total        counter
//!   virtman_coordinator_leaves_total       counter
//!   virtman_coordinator_deaths_total       counter    timeouts and reports
//!   virtman_coordinator_repairs_total      counter    parent-list changes of existing members
//!   virtman_coordinator_reports_total      counter    unreachable-parent reports
//!   virtman_coordinator_heartbeat_seconds  histogram  heartbeat handling latency
//!   virtman_coordinator_leader             gauge      1 while this coordinator leads (always, on redb)
//!   virtman_coordinator_leader_changes_total counter  leaders seen to take over (etcd)
//!   virtman_coordinator_etcd_seconds       histogram  etcd transaction latency
//!   virtman_coordinator_fenced_total       counter    writes etcd refused: the leader key was not ours
//! ```

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The coordinator's metrics and their registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Live members across sessions.
    pub nodes: Gauge,
    /// Registered images (one session each).
    pub sessions: Gauge,
    /// Joins accepted.
    pub joins: Counter,
    /// Graceful leaves.
    pub leaves: Counter,
    /// Nodes declared dead.
    pub deaths: Counter,
    /// Parent-list changes of existing members.
    pub repairs: Counter,
    /// Unreachable-parent reports received.
    pub reports: Counter,
    /// Time to handle one heartbeat call, seconds.
    pub heartbeat_seconds: Histogram,
    /// 1 while this coordinator leads.
    pub leader: Gauge,
    /// Leaders seen to take over.
    pub leader_changes: Counter,
    /// etcd transaction latency, seconds.
    pub etcd_seconds: Histogram,
    /// Writes etcd refused because the leader key was not this one's.
    pub fenced: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Fresh metrics in a fresh registry.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("virtman_coordinator");
        let nodes = Gauge::default();
        let sessions = Gauge::default();
        let joins = Counter::default();
        let leaves = Counter::default();
        let deaths = Counter::default();
        let repairs = Counter::default();
        let reports = Counter::default();
        // 10 us to about 1.3 s.
        let heartbeat_seconds = Histogram::new(exponential_buckets(1e-5, 2.0, 18));
        let leader = Gauge::default();
        let leader_changes = Counter::default();
        // 100 us to about 3 s.
        let etcd_seconds = Histogram::new(exponential_buckets(1e-4, 2.0, 16));
        let fenced = Counter::default();
        registry.register("leader", "1 while this coordinator leads", leader.clone());
        registry.register(
            "leader_changes",
            "Leaders seen to take over",
            leader_changes.clone(),
        );
        registry.register(
            "etcd_seconds",
            "etcd transaction latency",
            etcd_seconds.clone(),
        );
        registry.register(
            "fenced",
            "Writes etcd refused because the leader key was not this coordinator's",
            fenced.clone(),
        );
        registry.register("nodes", "Live members across sessions", nodes.clone());
        registry.register("sessions", "Registered images", sessions.clone());
        registry.register("joins", "Joins accepted", joins.clone());
        registry.register("leaves", "Graceful leaves", leaves.clone());
        registry.register("deaths", "Nodes declared dead", deaths.clone());
        registry.register(
            "repairs",
            "Parent-list changes of existing members",
            repairs.clone(),
        );
        registry.register("reports", "Unreachable-parent reports", reports.clone());
        registry.register(
            "heartbeat_seconds",
            "Time to handle one heartbeat call",
            heartbeat_seconds.clone(),
        );
        Self {
            registry,
            nodes,
            sessions,
            joins,
            leaves,
            deaths,
            repairs,
            reports,
            heartbeat_seconds,
            leader,
            leader_changes,
            etcd_seconds,
            fenced,
        }
    }

    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
