//! What a run leaves behind for its report: the VMs, the images and the
//! engine's counters.
//!
//! ```text
//!   engine (runs, fills these in) ──► Vm, ImageState, Raw ◄── report::build (reads them)
//! ```
//!
//! The engine keeps these as its running state; at the end the report reads
//! them. Holding them here, below both, keeps the arrows one way: the engine
//! calls the report, the report never reaches into the engine.

use serde::Serialize;
use virtman_topology::Forest;

/// Counters the engine keeps while it runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Raw {
    /// Events handled.
    pub events: u64,
    /// Chunk (or, in direct mode, read) requests sent.
    pub requests: u64,
    /// Chunk fetches started (single flight: one per host and chunk, plus retries of dead ones).
    pub fetches: u64,
    /// Requests that timed out (their source was dead).
    pub timeouts: u64,
    /// Fetches that moved on to their next source after a timeout.
    pub failovers: u64,
    /// Heartbeats given to the topology state machine.
    pub heartbeats: u64,
    /// Hosts killed by failure waves.
    pub killed: u64,
    /// Hosts that came back.
    pub recovered: u64,
    /// The run hit its time bound (or ran out of events) before every VM booted.
    pub timed_out: bool,
    /// CPU jobs run (serving, receiving, verifying, storing, VM reads).
    pub cpu_jobs: u64,
    /// CPU work they needed, microseconds of one core.
    pub cpu_us: u64,
    /// Chunk fetches started by boot-profile prefetch (it passes over
    /// chunks already being fetched).
    pub prefetch_fetches: u64,
}

/// A VM: its host and image, where it is in the trace, and when it booted.
#[derive(Debug)]
pub(crate) struct Vm {
    pub host: u32,
    pub image: u32,
    pub start: u64,
    pub gen_: u32,
    pub next: u32,
    pub pending: u32,
    /// The read in progress waits on a chunk the replay does not expect.
    pub unexpected: bool,
    pub issued: u64,
    pub boot: Option<u64>,
    pub lost: bool,
    pub max_wait: u64,
    pub bytes_read: u64,
    pub depth: u32,
}

/// An image: its tree or forest (virtman mode), its origin's net node, its chunks.
pub(crate) struct ImageState {
    pub session: Option<Forest>,
    pub origin: u32,
    pub chunks: u32,
}
