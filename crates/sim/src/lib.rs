//! `virtman-sim`: boot storms of thousands of hosts on virtual time.
//!
//! A seeded, deterministic discrete-event simulator. The relay trees are the
//! real [`virtman_topology::Session`] (join, heartbeat, report, tick), driven
//! on virtual time exactly as the coordinator drives it on wall-clock time.
//! Around it the simulator models what the agents and the network do: cached
//! volumes filled chunk by chunk with single-flight fetches, parents tried in
//! the coordinator's order (busy ones after) with the origin last and
//! failover on timeout, cut-through down the tree, boot-profile prefetch
//! ahead of the readers (virtman mode), links shared max-min fairly, and CPU work
//! (serving, receiving, verifying and storing chunks, VM reads) on each
//! host's cores or on one machine's shared cores, by processor sharing.
//!
//! ```text
//!   Config ──► engine::run ──────────────────────────────────────► Report
//!                │  event heap (time, seq)                          text / JSON / SVG
//!                ├── VMs replay the Trace (reads + think time)
//!                ├── hosts: cached volumes, fetches, parents ◄── Session (real)
//!                └── net: pairs on uplinks/downlinks, max-min rates
//! ```
//!
//! Modules: [`config`] (parameters, validation, unit parsers), [`trace`] (the
//! boot-trace format and the synthetic generator), `engine` (the event
//! loop, with one file per kind of handler: VMs, fetches, prefetch, control,
//! failures), `net` (the network model), `cpu` (cores shared by processor
//! sharing), `record` (what the engine leaves for the report: VMs, images,
//! counters), [`report`] (figures, text, chart), [`rng`] (the seeded
//! generator).

pub mod config;
mod cpu;
mod engine;
mod net;
mod record;
pub mod report;
pub mod rng;
pub mod trace;

pub use config::{
    Config, ConfigError, Cost, CpuCosts, CpuModel, FailSpec, FailureWave, JoinLead, Mode, Prefetch,
    SecondImage,
};
pub use engine::run;
pub use report::{ChartLine, Report, booted_chart_svg, chart_svg};
pub use trace::{Read, SyntheticSpec, Trace, TraceError};

/// Why a run could not start.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SimError {
    /// The scenario is impossible.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The trace is unusable.
    #[error("trace: {0}")]
    Trace(#[from] TraceError),
    /// The topology state machine refused its settings.
    #[error("topology: {0}")]
    Topology(#[from] virtman_topology::TopologyError),
    /// The image has more chunks than the model indexes (2^32).
    #[error("an image of {0} bytes has too many chunks")]
    ImageTooLarge(u64),
}
