//! The reply reader: one task per connection.
//!
//! It matches replies (in any order) to requests by cookie and assembles
//! structured read chunks straight into the request's buffer. Once the
//! connection fails, it fails every pending request with the reason.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, BufReader};

use super::error::RequestFailure;
use super::handshake::ExportInfo;
use super::pending::{Done, Pending, Shared};
use crate::io::BoxRead;
use crate::proto::transmission::{self as tm, Command, ReplyHeader};
use crate::proto::{Errno, reply};

/// Largest non-data chunk payload accepted from a server (block status of 2^20
/// extents plus its header); anything longer is a protocol violation.
const MAX_CHUNK_PAYLOAD: u32 = 8 * 1024 * 1024 + 4;

/// Reads replies until the connection fails, then fails every pending request.
pub(super) async fn reader_task(r: BoxRead, shared: Arc<Shared>, info: ExportInfo) {
    let mut r = BufReader::with_capacity(16 * 1024, r);
    let reason = loop {
        match read_one(&mut r, &shared, &info).await {
            Ok(()) => {}
            Err(e) => break e,
        }
    };
    let mut t = shared.table();
    t.closed = Some(reason.clone());
    for (_, p) in t.map.drain() {
        let _ = p.tx.send(Err(RequestFailure::Disconnected(reason.clone())));
    }
}

async fn read_one(
    r: &mut BufReader<BoxRead>,
    shared: &Shared,
    info: &ExportInfo,
) -> Result<(), String> {
    let io = |e: io::Error| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            "server closed the connection".to_owned()
        } else {
            e.to_string()
        }
    };
    let mut magic = [0u8; 4];
    r.read_exact(&mut magic).await.map_err(io)?;
    let magic = u32::from_be_bytes(magic);
    let rest_len = tm::reply_header_rest(magic).map_err(|e| e.to_string())?;
    let mut rest = [0u8; tm::CHUNK_HEADER_LEN];
    r.read_exact(&mut rest[..rest_len]).await.map_err(io)?;
    let header = tm::decode_reply_header(magic, &rest[..rest_len]).map_err(|e| e.to_string())?;

    match header {
        ReplyHeader::Simple { error, cookie } => {
            let Some(mut p) = shared.table().map.remove(&cookie) else {
                // A late reply to a request that timed out. Without structured
                // replies its read payload length is unknown: the stream is lost.
                if info.structured {
                    return Ok(());
                }
                return Err(format!("simple reply for unknown cookie {cookie}"));
            };
            if error != 0 {
                let _ = p.tx.send(Err(RequestFailure::Server {
                    errno: Errno::from_code(error),
                    message: String::new(),
                }));
                return Ok(());
            }
            if p.cmd == Command::Read {
                if info.structured {
                    return Err(
                        "simple reply to a read after structured replies were negotiated".into(),
                    );
                }
                r.read_exact(&mut p.buf).await.map_err(io)?;
                let _ = p.tx.send(Ok(Done::Data(p.buf.freeze())));
            } else {
                let _ = p.tx.send(Ok(Done::Ok));
            }
            Ok(())
        }
        ReplyHeader::Chunk {
            flags,
            ty,
            cookie,
            length,
        } => {
            if !info.structured {
                return Err("structured reply chunk without negotiation".into());
            }
            let taken = shared.table().map.remove(&cookie);
            let Some(mut p) = taken else {
                // Late chunks of a timed-out request: skip their payload.
                let mut sink = tokio::io::sink();
                tokio::io::copy(&mut (&mut *r).take(u64::from(length)), &mut sink)
                    .await
                    .map_err(io)?;
                return Ok(());
            };
            chunk(r, &mut p, ty, length).await?;
            if flags & reply::FLAG_DONE != 0 {
                let result = match p.error.take() {
                    Some(f) => Err(f),
                    None => Ok(match p.cmd {
                        Command::Read => Done::Data(p.buf.freeze()),
                        Command::BlockStatus => Done::Extents(std::mem::take(&mut p.extents)),
                        _ => Done::Ok,
                    }),
                };
                let _ = p.tx.send(result);
            } else {
                shared.table().map.insert(cookie, p);
            }
            Ok(())
        }
    }
}

/// Applies one structured chunk to its pending request.
async fn chunk(
    r: &mut BufReader<BoxRead>,
    p: &mut Pending,
    ty: u16,
    length: u32,
) -> Result<(), String> {
    let io = |e: io::Error| e.to_string();
    if ty == reply::TYPE_OFFSET_DATA {
        if p.cmd != Command::Read || length < 9 {
            return Err(format!("bad OFFSET_DATA chunk of {length} bytes"));
        }
        let mut off = [0u8; 8];
        r.read_exact(&mut off).await.map_err(io)?;
        let off = u64::from_be_bytes(off);
        let n = length - 8;
        let start = off
            .checked_sub(p.offset)
            .filter(|s| s + u64::from(n) <= u64::from(p.length))
            .ok_or_else(|| format!("OFFSET_DATA at {off}+{n} outside the request"))?;
        let start = usize::try_from(start).map_err(|e| e.to_string())?;
        let n = usize::try_from(n).map_err(|e| e.to_string())?;
        r.read_exact(&mut p.buf[start..start + n])
            .await
            .map_err(io)?;
        return Ok(());
    }
    if length > MAX_CHUNK_PAYLOAD {
        return Err(format!("chunk type {ty} of {length} bytes is too long"));
    }
    let mut payload = vec![0u8; usize::try_from(length).unwrap_or(0)];
    r.read_exact(&mut payload).await.map_err(io)?;
    match ty {
        reply::TYPE_NONE if length == 0 => {}
        reply::TYPE_OFFSET_HOLE if p.cmd == Command::Read => {
            let (off, n) = tm::decode_offset_hole(&payload).map_err(|e| e.to_string())?;
            let inside = off
                .checked_sub(p.offset)
                .is_some_and(|s| s + u64::from(n) <= u64::from(p.length));
            if !inside {
                return Err(format!("OFFSET_HOLE at {off}+{n} outside the request"));
            }
            // The buffer starts zeroed; a hole needs no work.
        }
        reply::TYPE_BLOCK_STATUS if p.cmd == Command::BlockStatus => {
            let (_, d) = tm::decode_block_status(&payload).map_err(|e| e.to_string())?;
            if d.iter().any(|d| d.length == 0) {
                return Err("block status descriptor of length 0".into());
            }
            p.extents = d;
        }
        t if t & reply::TYPE_ERROR_BIT != 0 => {
            let (errno, message) = tm::decode_error(&payload).map_err(|e| e.to_string())?;
            p.error.get_or_insert(RequestFailure::Server {
                errno: Errno::from_code(errno),
                message,
            });
        }
        other => return Err(format!("unexpected chunk type {other} for {:?}", p.cmd)),
    }
    Ok(())
}
