//! The requests a connection is waiting on, by cookie: each with its buffer
//! and reply channel. [`Connection`](super::Connection) inserts a request
//! before sending it; the reader task fills it, chunk by chunk, and answers it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::AtomicUsize;

use bytes::Bytes;
use tokio::sync::oneshot;

use super::error::RequestFailure;
use crate::proto::transmission::{Command, Descriptor};

/// What a finished request yields.
pub(super) enum Done {
    Ok,
    Data(Bytes),
    Extents(Vec<Descriptor>),
}

pub(super) struct Pending {
    pub(super) cmd: Command,
    pub(super) offset: u64,
    pub(super) length: u32,
    pub(super) buf: crate::buffers::IoBuf,
    pub(super) extents: Vec<Descriptor>,
    pub(super) error: Option<RequestFailure>,
    pub(super) tx: oneshot::Sender<Result<Done, RequestFailure>>,
}

#[derive(Default)]
pub(super) struct PendingTable {
    pub(super) map: HashMap<u64, Pending>,
    /// Why the connection died, once it has.
    pub(super) closed: Option<String>,
}

pub(super) struct Shared {
    pub(super) pending: Mutex<PendingTable>,
    pub(super) in_flight: AtomicUsize,
}

impl Shared {
    pub(super) fn table(&self) -> std::sync::MutexGuard<'_, PendingTable> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}
