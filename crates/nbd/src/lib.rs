//! The NBD protocol for virtman.
//!
//! Every block path of virtman speaks NBD: VMs read their snapshots over it and
//! hosts fetch image chunks from their parents over it. This crate is that layer:
//!
//! - [`proto`]: the wire format without I/O (constants, pure encoders and
//!   decoders, request validation), property-tested and fuzzed;
//! - [`export`]: the [`Export`] trait that anything served implements;
//! - [`file`](mod@file): a file-backed export;
//! - [`server`]: a tokio server for many exports, connections and requests in
//!   flight, on TCP and unix sockets;
//! - [`client`]: a tokio client with many requests in flight per connection,
//!   several connections, and per-request timeouts;
//! - [`tls`]: `NBD_OPT_STARTTLS` on both sides (rustls);
//! - [`rate`]: a byte token bucket (a server's upload cap, an agent's caps).

// Tests may cast freely; library code must use checked conversions.
#![cfg_attr(test, allow(clippy::cast_possible_truncation))]

pub mod buffers;
pub mod client;
pub mod export;
pub mod file;
mod io;
pub mod mem;
pub mod proto;
pub mod rate;
pub mod server;
pub mod tls;

pub use client::{Client, ClientConfig, ClientError, Endpoint};
pub use export::{Capabilities, Export, ExportError, Extent, ReadChunk};
pub use file::FileExport;
pub use mem::MemExport;
pub use server::{ExpectedExport, ExportAccess, Listener, Server, ServerConfig};
pub use tls::{ClientTls, ServerTls};
