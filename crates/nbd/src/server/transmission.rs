//! The transmission phase of one connection.
//!
//! ```text
//!            ┌──────────── budget (bytes in flight) ─────────────┐
//! socket ─► reader ─ validate ─► execute ─ready─► batch ─(no request buffered)─► writer ─► socket
//!              │                    └─pending─► task ─► its own reply ─────────► writer
//!              │ invalid: error reply into the batch
//!              └ DISC / EOF / shutdown: stop reading, finish what is in flight
//! ```
//!
//! Requests run concurrently and reply out of order. A request whose export
//! call completes at once (a warm page cache) is answered on the reader task,
//! and its reply batched with the others until no request is left in the read
//! buffer: one write per burst, no task hand-off. A request that must wait
//! becomes a task that writes its own reply. A semaphore counts the bytes each
//! request holds (its payload or read buffer plus a fixed overhead) until its
//! reply is written, so a client that floods requests or stops reading replies
//! stalls only its own connection, with bounded memory.

use std::future::Future;
use std::sync::Arc;
use std::task::Poll;

use bytes::{Bytes, BytesMut};
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::handshake::{BASE_ALLOCATION_ID, Session};
use super::{Server, ServerStats};
use crate::export::{Export, ExportError, Extent, ReadChunk};
use crate::io::{BoxRead, BoxWrite};
use crate::proto::transmission::{
    self as tm, Command, Descriptor, Negotiated, REQUEST_LEN, Request, RequestError,
};
use crate::proto::{Errno, cmd_flags, state};

/// Bytes charged to every request besides its payload.
const REQUEST_OVERHEAD: u32 = 4096;
/// Most descriptors in one block status reply.
const MAX_DESCRIPTORS: usize = 1024;

static ZEROES: [u8; 1 << 20] = [0u8; 1 << 20];

/// Why a connection ended abnormally.
#[derive(Debug, Error)]
pub(super) enum TransmissionError {
    /// The socket failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The client sent garbage.
    #[error(transparent)]
    Protocol(#[from] RequestError),
    /// A write payload too large to accept.
    #[error("write payload of {0} bytes exceeds the maximum; disconnecting")]
    PayloadTooLarge(u32),
}

/// One reply, as the byte segments to send, holding its budget until written.
struct Outgoing {
    parts: Vec<Bytes>,
    _permit: Option<OwnedSemaphorePermit>,
}

/// The socket's write half, shared by the reader (which writes the replies of
/// requests it completed itself, in batches) and the tasks of requests that had
/// to wait (which write their own).
type SharedWriter = Arc<tokio::sync::Mutex<BufWriter<BoxWrite>>>;

/// Everything a request task needs.
struct Context {
    export: Arc<dyn Export>,
    negotiated: Negotiated,
    /// The metadata contexts selected for block status, by id.
    contexts: Vec<super::handshake::MetaContext>,
    name: String,
    /// The client asked for [`crate::ServerConfig::tag_context`].
    tagged: bool,
}

pub(super) async fn run(
    server: &Arc<Server>,
    session: Session,
    read: BoxRead,
    write: BoxWrite,
    peer: &str,
    shutdown: CancellationToken,
) -> Result<(), TransmissionError> {
    let budget_total = server.config.connection_budget.max(REQUEST_OVERHEAD * 2);
    let budget = Arc::new(Semaphore::new(
        usize::try_from(budget_total).unwrap_or(usize::MAX),
    ));
    let writer: SharedWriter = Arc::new(tokio::sync::Mutex::new(BufWriter::with_capacity(
        256 * 1024,
        write,
    )));
    let tagged = session.tagged;
    let ctx = Arc::new(Context {
        export: session.export,
        negotiated: session.negotiated,
        contexts: session.contexts,
        name: session.name,
        tagged,
    });
    let tasks = TaskTracker::new();
    let io = Io {
        writer: Arc::clone(&writer),
        budget,
        budget_total,
        tasks: tasks.clone(),
    };

    let result = reader(server, &ctx, read, &io, &shutdown).await;
    // Let requests in flight finish and write their replies, then close.
    tasks.close();
    if tokio::time::timeout(server.config.drain_timeout, tasks.wait())
        .await
        .is_err()
    {
        warn!(%peer, "requests in flight did not finish in time; closing");
    }
    let mut w = writer.lock().await;
    if let Err(e) = w.shutdown().await {
        debug!(%peer, error = %e, "closing the socket failed");
    }
    result
}

/// The connection's shared write side and limits.
struct Io {
    writer: SharedWriter,
    budget: Arc<Semaphore>,
    budget_total: u32,
    tasks: TaskTracker,
}

async fn reader(
    server: &Arc<Server>,
    ctx: &Arc<Context>,
    read: BoxRead,
    io: &Io,
    shutdown: &CancellationToken,
) -> Result<(), TransmissionError> {
    let mut r = BufReader::with_capacity(64 * 1024, read);
    let n = ctx.negotiated;
    // Replies of requests completed here, written when no request is buffered.
    let mut batch: Vec<Outgoing> = Vec::new();
    loop {
        if r.buffer().len() < REQUEST_LEN {
            write_batch(&io.writer, &mut batch).await?;
        }
        let mut header = [0u8; REQUEST_LEN];
        let got = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(()),
            g = r.read_exact(&mut header) => g,
        };
        match got {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                write_batch(&io.writer, &mut batch).await?;
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
        let req = tm::decode_request(&header)?;
        ServerStats::add(&server.stats.requests, 1);

        let cmd = match tm::validate(&req, &n) {
            Ok(cmd) => cmd,
            Err(errno) => {
                let too_big = req.has_payload() && req.length > n.block_sizes.maximum;
                if req.has_payload() && !too_big {
                    skip(&mut r, req.length).await?;
                }
                ServerStats::add(&server.stats.errors, 1);
                let msg = format!("{} refused", describe(&req));
                batch.push(error_reply(&req, &n, errno, &msg));
                if too_big {
                    write_batch(&io.writer, &mut batch).await?;
                    return Err(TransmissionError::PayloadTooLarge(req.length));
                }
                continue;
            }
        };
        if cmd == Command::Disc {
            write_batch(&io.writer, &mut batch).await?;
            return Ok(());
        }

        let payload_cost = match cmd {
            Command::Read | Command::Write => req.length,
            _ => 0,
        };
        let cost = payload_cost
            .saturating_add(REQUEST_OVERHEAD)
            .min(io.budget_total);
        let permit = match Arc::clone(&io.budget).try_acquire_many_owned(cost) {
            Ok(p) => p,
            Err(_) => {
                // Out of budget: send what is ready, then wait for replies to drain.
                write_batch(&io.writer, &mut batch).await?;
                Arc::clone(&io.budget)
                    .acquire_many_owned(cost)
                    .await
                    .map_err(|_| std::io::Error::other("budget closed"))?
            }
        };
        let payload = if cmd == Command::Write {
            let len = usize::try_from(req.length).unwrap_or(0);
            // Filled whole, or the connection ends.
            let mut buf = crate::buffers::IoBuf::take(len);
            r.read_exact(&mut buf).await?;
            buf.freeze()
        } else {
            Bytes::new()
        };
        let ctx = Arc::clone(ctx);
        let server = Arc::clone(server);
        let mut work = Box::pin(async move {
            let reply = execute(&server, &ctx, &req, cmd, payload).await;
            let mut out = match reply {
                Ok(parts) => Outgoing {
                    parts,
                    _permit: None,
                },
                Err(e) => {
                    ServerStats::add(&server.stats.errors, 1);
                    warn!(export = %ctx.name, error = %e, "{} failed", describe(&req));
                    let msg = format!("{} failed: {e}", describe(&req));
                    error_reply(&req, &ctx.negotiated, e.errno(), &msg)
                }
            };
            out._permit = Some(permit);
            out
        });
        // Most requests on a warm export complete at once: run them here and
        // spawn a task only for those that must wait.
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match work.as_mut().poll(&mut cx) {
            Poll::Ready(out) => batch.push(out),
            Poll::Pending => {
                let writer = Arc::clone(&io.writer);
                io.tasks.spawn(async move {
                    let out = work.await;
                    let mut w = writer.lock().await;
                    // A failed write means the client is gone; the reader sees it too.
                    let _ = write_out(&mut w, &out).await;
                    let _ = w.flush().await;
                });
            }
        }
    }
}

/// Writes the replies the reader has collected, and flushes.
async fn write_batch(writer: &SharedWriter, batch: &mut Vec<Outgoing>) -> std::io::Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let mut w = writer.lock().await;
    for out in batch.drain(..) {
        write_out(&mut w, &out).await?;
    }
    w.flush().await
}

/// Replies at least this long bypass the buffer: header and data go to the
/// socket in one vectored write, without a copy.
const DIRECT_WRITE_MIN: usize = 16 * 1024;

async fn write_out(w: &mut BufWriter<BoxWrite>, out: &Outgoing) -> std::io::Result<()> {
    let total: usize = out.parts.iter().map(Bytes::len).sum();
    if total < DIRECT_WRITE_MIN {
        for part in &out.parts {
            w.write_all(part).await?;
        }
        return Ok(());
    }
    w.flush().await?;
    let sock = w.get_mut();
    let mut slices: Vec<std::io::IoSlice<'_>> =
        out.parts.iter().map(|p| std::io::IoSlice::new(p)).collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let n = sock.write_vectored(rest).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        std::io::IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
}

fn describe(req: &Request) -> String {
    let name = match Command::from_code(req.kind) {
        Some(c) => format!("{c:?}"),
        None => format!("command {}", req.kind),
    };
    format!("{name} of {} bytes at offset {}", req.length, req.offset)
}

async fn skip(r: &mut BufReader<BoxRead>, n: u32) -> std::io::Result<()> {
    let mut left = u64::from(n);
    let mut sink = tokio::io::sink();
    let copied = tokio::io::copy(&mut (&mut *r).take(left), &mut sink).await?;
    left -= copied;
    if left > 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Runs a validated request against the export and encodes its reply.
async fn execute(
    server: &Server,
    ctx: &Context,
    req: &Request,
    cmd: Command,
    payload: Bytes,
) -> Result<Vec<Bytes>, ExportError> {
    let e = &*ctx.export;
    let fua = req.flags & cmd_flags::FUA != 0;
    match cmd {
        Command::Read => {
            let chunks = if req.length == 0 {
                Vec::new()
            } else {
                e.read(req.offset, req.length).await?
            };
            check_cover(&chunks, req.length)?;
            let data: u64 = chunks
                .iter()
                .filter(|c| matches!(c, ReadChunk::Data(_)))
                .map(|c| u64::from(c.len()))
                .sum();
            if let Some(cap) = &server.config.upload {
                cap.take(data, crate::rate::Priority::Urgent).await;
            }
            ServerStats::add(&server.stats.bytes_read, data);
            if ctx.tagged {
                ServerStats::add(&server.stats.bytes_read_tagged, data);
            }
            Ok(read_reply(req, &ctx.negotiated, chunks))
        }
        Command::Write => {
            let len = u64::from(req.length);
            if req.length > 0 {
                e.write(req.offset, payload, fua).await?;
            }
            ServerStats::add(&server.stats.bytes_written, len);
            Ok(ok_reply(req))
        }
        Command::Flush => {
            e.flush().await?;
            Ok(ok_reply(req))
        }
        Command::Trim => {
            if req.length > 0 {
                e.trim(req.offset, req.length, fua).await?;
            }
            Ok(ok_reply(req))
        }
        Command::WriteZeroes => {
            if req.length > 0 {
                let may_trim = req.flags & cmd_flags::NO_HOLE == 0;
                e.write_zeroes(req.offset, req.length, fua, may_trim)
                    .await?;
            }
            Ok(ok_reply(req))
        }
        Command::Cache => {
            if req.length > 0 {
                e.cache(req.offset, req.length).await?;
            }
            Ok(ok_reply(req))
        }
        Command::BlockStatus => {
            if req.length == 0 || ctx.contexts.is_empty() {
                return Err(ExportError::Invalid("empty block status request".into()));
            }
            // One chunk per selected context, the last one marked done.
            let req_one = req.flags & cmd_flags::REQ_ONE != 0;
            let mut b = BytesMut::new();
            for (i, (id, name)) in ctx.contexts.iter().enumerate() {
                let runs = if *id == BASE_ALLOCATION_ID {
                    extent_runs(&e.block_status(req.offset, req.length).await?)
                } else {
                    e.context_status(name, req.offset, req.length).await?
                };
                let descriptors = descriptors(&runs, req.length, req_one);
                if descriptors.is_empty() {
                    return Err(ExportError::Invalid(format!(
                        "export returned no extents for {name}"
                    )));
                }
                let done = i + 1 == ctx.contexts.len();
                tm::encode_block_status(&mut b, done, req.cookie, *id, &descriptors);
            }
            Ok(vec![b.freeze()])
        }
        Command::Disc => Ok(Vec::new()),
    }
}

/// An export that returns a read of the wrong length is a bug; fail the request
/// rather than send a malformed reply.
fn check_cover(chunks: &[ReadChunk], len: u32) -> Result<(), ExportError> {
    let total: u64 = chunks.iter().map(|c| u64::from(c.len())).sum();
    if total != u64::from(len) || chunks.iter().any(ReadChunk::is_empty) {
        return Err(ExportError::Io(std::io::Error::other(format!(
            "export returned {total} bytes for a read of {len}"
        ))));
    }
    Ok(())
}

fn ok_reply(req: &Request) -> Vec<Bytes> {
    let mut b = BytesMut::with_capacity(tm::SIMPLE_REPLY_LEN);
    tm::encode_simple_reply(&mut b, 0, req.cookie);
    vec![b.freeze()]
}

fn error_reply(req: &Request, n: &Negotiated, errno: Errno, message: &str) -> Outgoing {
    let mut b = BytesMut::with_capacity(64);
    if n.structured {
        tm::encode_error_chunk(&mut b, req.cookie, errno, message);
    } else {
        tm::encode_simple_reply(&mut b, errno.code(), req.cookie);
    }
    Outgoing {
        parts: vec![b.freeze()],
        _permit: None,
    }
}

/// Zeroes as shared static slices, for holes that must be sent as data.
fn zeroes(mut n: u32, parts: &mut Vec<Bytes>) {
    while n > 0 {
        let k = n.min(1 << 20);
        parts.push(Bytes::from_static(
            &ZEROES[..usize::try_from(k).unwrap_or(0)],
        ));
        n -= k;
    }
}

fn read_reply(req: &Request, n: &Negotiated, chunks: Vec<ReadChunk>) -> Vec<Bytes> {
    let mut parts = Vec::with_capacity(chunks.len() * 2 + 1);
    let mut h = BytesMut::with_capacity(64);
    let whole = !n.structured
        || req.flags & cmd_flags::DF != 0
        || chunks.len() <= 1 && matches!(chunks.first(), Some(ReadChunk::Data(_)));
    if !n.structured {
        tm::encode_simple_reply(&mut h, 0, req.cookie);
        parts.push(h.freeze());
        push_flat(chunks, &mut parts);
        return parts;
    }
    if chunks.is_empty() {
        tm::encode_done(&mut h, req.cookie);
        return vec![h.freeze()];
    }
    if whole {
        // One content chunk: data with any holes written out as zeroes.
        tm::encode_offset_data_header(&mut h, true, req.cookie, req.offset, req.length);
        parts.push(h.freeze());
        push_flat(chunks, &mut parts);
        return parts;
    }
    let last = chunks.len() - 1;
    let mut offset = req.offset;
    for (i, c) in chunks.into_iter().enumerate() {
        let done = i == last;
        let mut h = BytesMut::with_capacity(32);
        let len = c.len();
        match c {
            ReadChunk::Data(b) => {
                tm::encode_offset_data_header(&mut h, done, req.cookie, offset, len);
                parts.push(h.freeze());
                parts.push(b);
            }
            ReadChunk::Zero(z) => {
                tm::encode_offset_hole(&mut h, done, req.cookie, offset, z);
                parts.push(h.freeze());
            }
        }
        offset += u64::from(len);
    }
    parts
}

fn push_flat(chunks: Vec<ReadChunk>, parts: &mut Vec<Bytes>) {
    for c in chunks {
        match c {
            ReadChunk::Data(b) => parts.push(b),
            ReadChunk::Zero(z) => zeroes(z, parts),
        }
    }
}

/// `base:allocation` runs (length, flags) of extents.
fn extent_runs(extents: &[Extent]) -> Vec<(u64, u32)> {
    extents
        .iter()
        .map(|e| {
            let flags = if e.hole { state::HOLE } else { 0 } | if e.zero { state::ZERO } else { 0 };
            (e.length, flags)
        })
        .collect()
}

/// Turns runs of (length, flags) into block status descriptors: merged where
/// the flags are equal, cut to fit `u32`, and no more than the request needs.
fn descriptors(runs: &[(u64, u32)], len: u32, req_one: bool) -> Vec<Descriptor> {
    let mut out: Vec<Descriptor> = Vec::new();
    let mut covered: u64 = 0;
    for &(length, flags) in runs {
        if covered >= u64::from(len) || length == 0 {
            break;
        }
        // Keep descriptor lengths multiples of 512 where they are cut.
        let max = u64::from(u32::MAX - 511);
        let mut left = length;
        while left > 0 {
            let piece = left.min(max);
            let piece32 = u32::try_from(piece).unwrap_or(u32::MAX - 511);
            match out.last_mut() {
                Some(d) if d.flags == flags && d.length.checked_add(piece32).is_some() => {
                    d.length += piece32;
                }
                _ => out.push(Descriptor {
                    length: piece32,
                    flags,
                }),
            }
            left -= piece;
            covered += piece;
            if covered >= u64::from(len) {
                break;
            }
        }
        if out.len() >= MAX_DESCRIPTORS {
            break;
        }
    }
    if req_one {
        out.truncate(1);
        if let Some(d) = out.first_mut() {
            d.length = d.length.min(len);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_merge_and_respect_req_one() {
        let ext = [
            Extent {
                length: 4096,
                hole: false,
                zero: false,
            },
            Extent {
                length: 4096,
                hole: false,
                zero: false,
            },
            Extent {
                length: 8192,
                hole: true,
                zero: true,
            },
        ];
        let d = descriptors(&extent_runs(&ext), 16384, false);
        assert_eq!(
            d,
            vec![
                Descriptor {
                    length: 8192,
                    flags: 0
                },
                Descriptor {
                    length: 8192,
                    flags: state::HOLE | state::ZERO
                },
            ]
        );
        let d = descriptors(&extent_runs(&ext), 1000, true);
        assert_eq!(
            d,
            vec![Descriptor {
                length: 1000,
                flags: 0
            }]
        );
    }

    #[test]
    fn huge_extents_are_cut_to_u32() {
        let ext = [Extent {
            length: 1 << 40,
            hole: true,
            zero: true,
        }];
        let d = descriptors(&extent_runs(&ext), u32::MAX, false);
        // The first descriptor stops short of the request; the last may cross it.
        assert_eq!(d.len(), 2);
        assert!(d.iter().all(|d| d.length % 512 == 0));
        assert!(u64::from(d[0].length) < u64::from(u32::MAX));
    }
}
