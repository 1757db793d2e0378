//! One connection in the transmission phase.
//!
//! A [`Connection`] dials, negotiates, then starts its reader task. A request
//! takes a cookie, enters the pending table, and goes out through the writer
//! (an async mutex, so requests from many tasks never interleave on the
//! socket); it then waits for its reply, for at most the request timeout.

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::sync::oneshot;

use super::config::{ClientConfig, Endpoint};
use super::error::{ClientError, RequestFailure};
use super::handshake::{ExportInfo, negotiate};
use super::pending::{Done, Pending, PendingTable, Shared};
use super::reader::reader_task;
use super::transport::dial;
use crate::export::Extent;
use crate::io::BoxWrite;
use crate::proto::transmission::{self as tm, Command, Request};
use crate::proto::{cmd_flags, state};

pub(super) struct ConnInner {
    shared: Arc<Shared>,
    writer: tokio::sync::Mutex<BoxWrite>,
    next_cookie: AtomicU64,
    info: ExportInfo,
    pub(super) server: String,
    pub(super) export: String,
    timeout: Duration,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for ConnInner {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// One NBD connection in the transmission phase. Cheap to clone.
#[derive(Clone)]
pub struct Connection {
    pub(super) inner: Arc<ConnInner>,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("server", &self.inner.server)
            .field("export", &self.inner.export)
            .field("info", &self.inner.info)
            .finish()
    }
}

impl Connection {
    /// Connects and negotiates.
    pub async fn connect(
        endpoint: &Endpoint,
        config: &ClientConfig,
    ) -> Result<Connection, ClientError> {
        let server = endpoint.to_string();
        let handshake_error = |reason: String| ClientError::Handshake {
            server: server.clone(),
            export: config.export.clone(),
            reason,
        };
        let work = async {
            let (mut r, mut w) = dial(endpoint)
                .await
                .map_err(|source| ClientError::Connect {
                    server: server.clone(),
                    source,
                })?;
            let tls = config.tls.as_ref().map(|t| (t, endpoint));
            let info = negotiate(&mut r, &mut w, &config.export, tls, &config.meta_contexts)
                .await
                .map_err(handshake_error)?;
            Ok::<_, ClientError>((r, w, info))
        };
        let (r, w, info) = tokio::time::timeout(config.connect_timeout, work)
            .await
            .map_err(|_| {
                handshake_error(format!("timed out after {:?}", config.connect_timeout))
            })??;
        let shared = Arc::new(Shared {
            pending: Mutex::new(PendingTable::default()),
            in_flight: AtomicUsize::new(0),
        });
        let reader = tokio::spawn(reader_task(r, Arc::clone(&shared), info.clone()));
        Ok(Connection {
            inner: Arc::new(ConnInner {
                shared,
                writer: tokio::sync::Mutex::new(w),
                next_cookie: AtomicU64::new(1),
                info,
                server,
                export: config.export.clone(),
                timeout: config.request_timeout,
                reader,
            }),
        })
    }

    /// What the server said about the export.
    pub fn info(&self) -> &ExportInfo {
        &self.inner.info
    }

    /// Requests currently waiting for a reply.
    pub fn in_flight(&self) -> usize {
        self.inner.shared.in_flight.load(Ordering::Relaxed)
    }

    async fn request(
        &self,
        cmd: Command,
        flags: u16,
        offset: u64,
        length: u32,
        payload: Option<Bytes>,
    ) -> Result<Done, ClientError> {
        let fail = |failure| ClientError::Request {
            server: self.inner.server.clone(),
            export: self.inner.export.clone(),
            op: op_name(cmd),
            offset,
            length: u64::from(length),
            failure,
        };
        let cookie = self.inner.next_cookie.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let needs_reply = cmd != Command::Disc;
        if needs_reply {
            // Zeroed: a hole in a structured reply is left as it is.
            let buf = if cmd == Command::Read {
                crate::buffers::IoBuf::zeroed(usize::try_from(length).unwrap_or(0))
            } else {
                crate::buffers::IoBuf::take(0)
            };
            let mut t = self.inner.shared.table();
            if let Some(reason) = &t.closed {
                return Err(fail(RequestFailure::Disconnected(reason.clone())));
            }
            t.map.insert(
                cookie,
                Pending {
                    cmd,
                    offset,
                    length,
                    buf,
                    extents: Vec::new(),
                    error: None,
                    tx,
                },
            );
        }
        let _guard = InFlight::new(&self.inner.shared.in_flight);
        let mut head = BytesMut::with_capacity(tm::REQUEST_LEN);
        Request {
            flags,
            kind: cmd.code(),
            cookie,
            offset,
            length,
        }
        .encode(&mut head);
        let sent = async {
            let mut w = self.inner.writer.lock().await;
            w.write_all(&head).await?;
            if let Some(p) = &payload {
                w.write_all(p).await?;
            }
            w.flush().await
        }
        .await;
        if let Err(e) = sent {
            self.inner.shared.table().map.remove(&cookie);
            return Err(fail(RequestFailure::Disconnected(e.to_string())));
        }
        if !needs_reply {
            return Ok(Done::Ok);
        }
        match tokio::time::timeout(self.inner.timeout, rx).await {
            Ok(Ok(Ok(done))) => Ok(done),
            Ok(Ok(Err(failure))) => Err(fail(failure)),
            Ok(Err(_)) => Err(fail(RequestFailure::Disconnected("reader ended".into()))),
            Err(_) => {
                self.inner.shared.table().map.remove(&cookie);
                Err(fail(RequestFailure::Timeout(self.inner.timeout)))
            }
        }
    }

    /// Reads `length` bytes at `offset` (at most the maximum payload).
    pub async fn read(&self, offset: u64, length: u32) -> Result<Bytes, ClientError> {
        match self.request(Command::Read, 0, offset, length, None).await? {
            Done::Data(b) => Ok(b),
            _ => Ok(Bytes::new()),
        }
    }

    /// Writes `data` at `offset`; with `fua` the server makes it durable first.
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ClientError> {
        let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let flags = if fua { cmd_flags::FUA } else { 0 };
        self.request(Command::Write, flags, offset, len, Some(data))
            .await
            .map(|_| ())
    }

    /// Makes completed writes durable.
    pub async fn flush(&self) -> Result<(), ClientError> {
        self.request(Command::Flush, 0, 0, 0, None)
            .await
            .map(|_| ())
    }

    /// Discards a range.
    pub async fn trim(&self, offset: u64, length: u32) -> Result<(), ClientError> {
        self.request(Command::Trim, 0, offset, length, None)
            .await
            .map(|_| ())
    }

    /// Zeroes a range; `no_hole` asks the server to keep it allocated.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        length: u32,
        no_hole: bool,
    ) -> Result<(), ClientError> {
        let flags = if no_hole { cmd_flags::NO_HOLE } else { 0 };
        self.request(Command::WriteZeroes, flags, offset, length, None)
            .await
            .map(|_| ())
    }

    /// Asks the server to prefetch a range.
    pub async fn cache(&self, offset: u64, length: u32) -> Result<(), ClientError> {
        self.request(Command::Cache, 0, offset, length, None)
            .await
            .map(|_| ())
    }

    /// `base:allocation` status from `offset`.
    pub async fn block_status(&self, offset: u64, length: u32) -> Result<Vec<Extent>, ClientError> {
        if self.inner.info.base_allocation.is_none() {
            return Err(ClientError::Request {
                server: self.inner.server.clone(),
                export: self.inner.export.clone(),
                op: "block status",
                offset,
                length: u64::from(length),
                failure: RequestFailure::Protocol("server did not select base:allocation".into()),
            });
        }
        match self
            .request(Command::BlockStatus, 0, offset, length, None)
            .await?
        {
            Done::Extents(d) => Ok(d
                .into_iter()
                .map(|d| Extent {
                    length: u64::from(d.length),
                    hole: d.flags & state::HOLE != 0,
                    zero: d.flags & state::ZERO != 0,
                })
                .collect()),
            _ => Ok(Vec::new()),
        }
    }

    /// Sends `NBD_CMD_DISC` (a soft disconnect).
    pub async fn disconnect(&self) -> Result<(), ClientError> {
        self.request(Command::Disc, 0, 0, 0, None).await.map(|_| ())
    }
}

struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn new(c: &'a AtomicUsize) -> Self {
        c.fetch_add(1, Ordering::Relaxed);
        InFlight(c)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn op_name(cmd: Command) -> &'static str {
    match cmd {
        Command::Read => "read",
        Command::Write => "write",
        Command::Disc => "disconnect",
        Command::Flush => "flush",
        Command::Trim => "trim",
        Command::Cache => "cache",
        Command::WriteZeroes => "write zeroes",
        Command::BlockStatus => "block status",
    }
}
