//! The NBD client: one export, several connections, many requests in flight.
//!
//! ```text
//! Client ─pick least busy─► Connection ─ writer (async mutex) ──► socket
//!                              │  pending: cookie ─► (request, buffer, reply channel)
//!                              └ reader task ◄── replies, any order, chunk by chunk
//! ```
//!
//! Each connection negotiates structured replies, `base:allocation` and
//! `NBD_OPT_GO` (falling back to `NBD_OPT_EXPORT_NAME` for old servers). A reader
//! task per connection matches replies to requests by cookie and assembles
//! structured read chunks straight into the request's buffer. Every request has
//! a timeout; every error names the server, export, operation, offset and length.
//! Later, agents fetch image chunks from their parents with this client.
//!
//! Where each part lives:
//!
//! - this file: [`Client`], several connections to one export; it picks the
//!   least busy connection and splits large reads into parallel requests;
//! - `client/config.rs`: [`Endpoint`] and [`ClientConfig`];
//! - `client/transport.rs`: dialling the endpoint, the byte stream under a
//!   connection;
//! - `client/handshake.rs`: the client side of negotiation, ending in an
//!   [`ExportInfo`]; [`list_exports`];
//! - `client/connection.rs`: [`Connection`]: the writer, requests and their
//!   timeouts;
//! - `client/pending.rs`: the requests awaiting replies, shared by a connection
//!   and its reader task;
//! - `client/reader.rs`: the reader task, matching replies to requests and
//!   assembling chunks;
//! - `client/error.rs`: [`ClientError`] and [`RequestFailure`].

mod config;
mod connection;
mod error;
mod handshake;
mod pending;
mod reader;
mod transport;

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::task::JoinSet;

pub use config::{ClientConfig, Endpoint};
pub use connection::Connection;
pub use error::{ClientError, RequestFailure};
pub use handshake::{ExportInfo, list_exports};

/// A client of one export over one or more connections.
#[derive(Clone, Debug)]
pub struct Client {
    conns: Arc<Vec<Connection>>,
}

impl Client {
    /// Connects `config.connections` times (once if the server forbids
    /// multi-conn).
    pub async fn connect(
        endpoint: &Endpoint,
        config: &ClientConfig,
    ) -> Result<Client, ClientError> {
        let first = Connection::connect(endpoint, config).await?;
        let want = if first.info().multi_conn() {
            config.connections.max(1)
        } else {
            1
        };
        let mut conns = vec![first];
        for _ in 1..want {
            conns.push(Connection::connect(endpoint, config).await?);
        }
        Ok(Client {
            conns: Arc::new(conns),
        })
    }

    /// What the server said about the export.
    pub fn info(&self) -> &ExportInfo {
        self.conns[0].info()
    }

    /// The export's size.
    pub fn size(&self) -> u64 {
        self.info().size
    }

    /// The connections in use.
    pub fn connections(&self) -> &[Connection] {
        &self.conns
    }

    /// The connection with the fewest requests in flight.
    pub fn pick(&self) -> &Connection {
        self.conns
            .iter()
            .min_by_key(|c| c.in_flight())
            .unwrap_or(&self.conns[0])
    }

    /// Reads any length, split into requests of at most the maximum payload,
    /// sent in parallel over the connections.
    pub async fn read(&self, offset: u64, length: u64) -> Result<Bytes, ClientError> {
        let max = u64::from(self.info().block_sizes.maximum.clamp(4096, 32 << 20));
        if length <= max {
            let len = u32::try_from(length).unwrap_or(u32::MAX);
            return self.pick().read(offset, len).await;
        }
        let mut tasks = JoinSet::new();
        let mut pos = 0;
        while pos < length {
            let n = (length - pos).min(max);
            let conn = self.pick().clone();
            let len = u32::try_from(n).unwrap_or(u32::MAX);
            tasks.spawn(async move { (pos, conn.read(offset + pos, len).await) });
            pos += n;
        }
        let mut out = BytesMut::zeroed(usize::try_from(length).unwrap_or(0));
        while let Some(res) = tasks.join_next().await {
            let (at, data) = res.map_err(|e| {
                let c = &self.conns[0].inner;
                ClientError::Request {
                    server: c.server.clone(),
                    export: c.export.clone(),
                    op: "read",
                    offset,
                    length,
                    failure: RequestFailure::Disconnected(format!("read task ended: {e}")),
                }
            })?;
            let data = data?;
            let at = usize::try_from(at).unwrap_or(0);
            out[at..at + data.len()].copy_from_slice(&data);
        }
        Ok(out.freeze())
    }

    /// Writes `data` at `offset` on the least busy connection.
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ClientError> {
        self.pick().write(offset, data, fua).await
    }

    /// Flushes every connection.
    pub async fn flush(&self) -> Result<(), ClientError> {
        for c in self.conns.iter() {
            c.flush().await?;
        }
        Ok(())
    }

    /// Sends a soft disconnect on every connection.
    pub async fn disconnect(&self) -> Result<(), ClientError> {
        for c in self.conns.iter() {
            c.disconnect().await?;
        }
        Ok(())
    }
}
