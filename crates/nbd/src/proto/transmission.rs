//! Transmission messages: requests, their validation, simple replies and
//! structured reply chunks.
//!
//! ```text
//! request (28 B):   magic(32) flags(16) type(16) cookie(64) offset(64) length(32) [payload]
//! simple (16 B):    magic(32) error(32) cookie(64) [read data]
//! chunk (20 B):     magic(32) flags(16) type(16) cookie(64) length(32) payload
//!   OFFSET_DATA:    offset(64) data
//!   OFFSET_HOLE:    offset(64) size(32)
//!   BLOCK_STATUS:   context(32) { length(32) flags(32) }+
//!   ERROR:          error(32) msglen(16) msg
//! ```
//!
//! [`validate`] decides, from the negotiated state alone, whether a request may
//! reach the export or which errno it gets; it is the single place where the
//! specification's rules on ranges, alignment, flags and read-only exports live.

use bytes::{BufMut, BytesMut};
use thiserror::Error;

use super::{
    BlockSizes, Errno, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, be16, be32, be64,
    cmd_flags, reply, transmission_flags,
};

/// Length of a request header.
pub const REQUEST_LEN: usize = 28;
/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Longest error message sent in an error chunk (the specification's string limit).
pub const MAX_ERROR_MESSAGE: usize = 4096;

/// The commands of the transmission phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Command {
    /// `NBD_CMD_READ`.
    Read,
    /// `NBD_CMD_WRITE`, followed by its payload.
    Write,
    /// `NBD_CMD_DISC`: soft disconnect, no reply.
    Disc,
    /// `NBD_CMD_FLUSH`.
    Flush,
    /// `NBD_CMD_TRIM`.
    Trim,
    /// `NBD_CMD_CACHE`: a prefetch hint.
    Cache,
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes,
    /// `NBD_CMD_BLOCK_STATUS`.
    BlockStatus,
}

impl Command {
    /// The command's wire value.
    pub fn code(self) -> u16 {
        match self {
            Command::Read => 0,
            Command::Write => 1,
            Command::Disc => 2,
            Command::Flush => 3,
            Command::Trim => 4,
            Command::Cache => 5,
            Command::WriteZeroes => 6,
            Command::BlockStatus => 7,
        }
    }

    /// The command for a wire value, if it is known.
    pub fn from_code(code: u16) -> Option<Command> {
        Some(match code {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disc,
            3 => Command::Flush,
            4 => Command::Trim,
            5 => Command::Cache,
            6 => Command::WriteZeroes,
            7 => Command::BlockStatus,
            _ => return None,
        })
    }

    /// Whether the command changes the export.
    pub fn writes(self) -> bool {
        matches!(self, Command::Write | Command::Trim | Command::WriteZeroes)
    }

    /// The command flags the specification allows on this command (FUA is
    /// allowed on every command when negotiated).
    fn allowed_flags(self) -> u16 {
        match self {
            Command::Read => cmd_flags::FUA | cmd_flags::DF,
            Command::WriteZeroes => cmd_flags::FUA | cmd_flags::NO_HOLE | cmd_flags::FAST_ZERO,
            Command::BlockStatus => cmd_flags::FUA | cmd_flags::REQ_ONE,
            _ => cmd_flags::FUA,
        }
    }
}

/// A request header as received.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Raw command type (unknown types are answered `EINVAL`).
    pub kind: u16,
    /// The client's opaque cookie, echoed in the reply.
    pub cookie: u64,
    /// Byte offset into the export.
    pub offset: u64,
    /// Length in bytes.
    pub length: u32,
}

impl Request {
    /// Encodes the header (client side).
    pub fn encode(&self, buf: &mut BytesMut) {
        buf.put_u32(REQUEST_MAGIC);
        buf.put_u16(self.flags);
        buf.put_u16(self.kind);
        buf.put_u64(self.cookie);
        buf.put_u64(self.offset);
        buf.put_u32(self.length);
    }

    /// Whether a payload of `length` bytes follows this header on the wire.
    pub fn has_payload(&self) -> bool {
        self.kind == Command::Write.code()
    }
}

/// A request that cannot be answered at all; the connection must be closed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RequestError {
    /// The request did not start with the request magic.
    #[error("bad request magic {0:#010x}")]
    BadMagic(u32),
}

/// Decodes a request header.
pub fn decode_request(b: &[u8; REQUEST_LEN]) -> Result<Request, RequestError> {
    let magic = be32(b, 0);
    if magic != REQUEST_MAGIC {
        return Err(RequestError::BadMagic(magic));
    }
    Ok(Request {
        flags: be16(b, 4),
        kind: be16(b, 6),
        cookie: be64(b, 8),
        offset: be64(b, 16),
        length: be32(b, 24),
    })
}

/// What the handshake settled for one connection: everything [`validate`] needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags sent to the client.
    pub flags: u16,
    /// Size constraints in force.
    pub block_sizes: BlockSizes,
    /// Whether structured replies were negotiated.
    pub structured: bool,
    /// Whether at least one metadata context is selected.
    pub meta_contexts: bool,
}

/// Checks a request against the negotiated state. `Ok` means the export may
/// execute it; `Err` is the errno to reply with. A `WRITE` whose payload is over
/// the maximum is refused here too; the caller must then disconnect, since it
/// cannot take the payload.
pub fn validate(req: &Request, n: &Negotiated) -> Result<Command, Errno> {
    let cmd = Command::from_code(req.kind).ok_or(Errno::Inval)?;
    let mut allowed = cmd.allowed_flags();
    if n.flags & transmission_flags::SEND_FUA == 0 {
        allowed &= !cmd_flags::FUA;
    }
    if n.flags & transmission_flags::SEND_DF == 0 {
        allowed &= !cmd_flags::DF;
    }
    if n.flags & transmission_flags::SEND_FAST_ZERO == 0 {
        allowed &= !cmd_flags::FAST_ZERO;
    }
    if req.flags & !allowed != 0 {
        return Err(Errno::Inval);
    }
    let needs = |flag: u16| {
        if n.flags & flag == 0 {
            Err(Errno::Inval)
        } else {
            Ok(())
        }
    };
    match cmd {
        Command::Disc | Command::Flush => {
            if cmd == Command::Flush {
                needs(transmission_flags::SEND_FLUSH)?;
            }
            if req.offset != 0 || req.length != 0 {
                return Err(Errno::Inval);
            }
            return Ok(cmd);
        }
        Command::Trim => needs(transmission_flags::SEND_TRIM)?,
        Command::WriteZeroes => needs(transmission_flags::SEND_WRITE_ZEROES)?,
        Command::BlockStatus => {
            if !n.structured || !n.meta_contexts {
                return Err(Errno::Inval);
            }
        }
        Command::Read | Command::Write | Command::Cache => {}
    }
    if cmd.writes() && n.flags & transmission_flags::READ_ONLY != 0 {
        return Err(Errno::Perm);
    }
    let max = n.block_sizes.maximum;
    if cmd == Command::Write && req.length > max {
        return Err(Errno::Inval);
    }
    if cmd == Command::Read && req.length > max {
        return Err(if req.flags & cmd_flags::DF != 0 {
            Errno::Overflow
        } else {
            Errno::Inval
        });
    }
    let min = u64::from(n.block_sizes.minimum.max(1));
    if !req.offset.is_multiple_of(min) || u64::from(req.length) % min != 0 {
        return Err(Errno::Inval);
    }
    let end = req.offset.checked_add(u64::from(req.length));
    match end {
        Some(end) if end <= n.size => Ok(cmd),
        // Writing past the end is "no space"; everything else is invalid.
        Some(_) if matches!(cmd, Command::Write | Command::WriteZeroes) => Err(Errno::NoSpc),
        _ => Err(Errno::Inval),
    }
}

/// Encodes a simple reply header (read data, if any, follows it).
pub fn encode_simple_reply(buf: &mut BytesMut, error: u32, cookie: u64) {
    buf.put_u32(SIMPLE_REPLY_MAGIC);
    buf.put_u32(error);
    buf.put_u64(cookie);
}

/// Encodes a structured chunk header whose payload is `length` bytes.
pub fn encode_chunk_header(buf: &mut BytesMut, flags: u16, ty: u16, cookie: u64, length: u32) {
    buf.put_u32(STRUCTURED_REPLY_MAGIC);
    buf.put_u16(flags);
    buf.put_u16(ty);
    buf.put_u64(cookie);
    buf.put_u32(length);
}

/// Encodes the header of an `OFFSET_DATA` chunk; `data_len` bytes of data follow.
pub fn encode_offset_data_header(
    buf: &mut BytesMut,
    done: bool,
    cookie: u64,
    offset: u64,
    data_len: u32,
) {
    let flags = if done { reply::FLAG_DONE } else { 0 };
    encode_chunk_header(
        buf,
        flags,
        reply::TYPE_OFFSET_DATA,
        cookie,
        data_len.saturating_add(8),
    );
    buf.put_u64(offset);
}

/// Encodes an `OFFSET_HOLE` chunk.
pub fn encode_offset_hole(buf: &mut BytesMut, done: bool, cookie: u64, offset: u64, size: u32) {
    let flags = if done { reply::FLAG_DONE } else { 0 };
    encode_chunk_header(buf, flags, reply::TYPE_OFFSET_HOLE, cookie, 12);
    buf.put_u64(offset);
    buf.put_u32(size);
}

/// Encodes a final `NONE` chunk.
pub fn encode_done(buf: &mut BytesMut, cookie: u64) {
    encode_chunk_header(buf, reply::FLAG_DONE, reply::TYPE_NONE, cookie, 0);
}

/// Encodes a final `ERROR` chunk with a human-readable message (cut to 4096 bytes
/// on a character boundary).
pub fn encode_error_chunk(buf: &mut BytesMut, cookie: u64, error: Errno, message: &str) {
    let mut end = message.len().min(MAX_ERROR_MESSAGE);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let msg = &message.as_bytes()[..end];
    let msg_len = u16::try_from(msg.len()).unwrap_or(0);
    let msg = &msg[..usize::from(msg_len)];
    encode_chunk_header(
        buf,
        reply::FLAG_DONE,
        reply::TYPE_ERROR,
        cookie,
        6 + u32::from(msg_len),
    );
    buf.put_u32(error.code());
    buf.put_u16(msg_len);
    buf.put_slice(msg);
}

/// One block status descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// Length of the extent (non-zero).
    pub length: u32,
    /// Status flags of the context (`state::*` for `base:allocation`).
    pub flags: u32,
}

/// Encodes a `BLOCK_STATUS` chunk for one metadata context.
pub fn encode_block_status(
    buf: &mut BytesMut,
    done: bool,
    cookie: u64,
    context: u32,
    descriptors: &[Descriptor],
) {
    let flags = if done { reply::FLAG_DONE } else { 0 };
    let len = descriptors
        .len()
        .checked_mul(8)
        .and_then(|n| n.checked_add(4))
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(u32::MAX);
    encode_chunk_header(buf, flags, reply::TYPE_BLOCK_STATUS, cookie, len);
    buf.put_u32(context);
    for d in descriptors {
        buf.put_u32(d.length);
        buf.put_u32(d.flags);
    }
}

/// A reply header as the client reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply.
    Simple {
        /// Error value (zero on success).
        error: u32,
        /// The request's cookie.
        cookie: u64,
    },
    /// A structured chunk, whose payload of `length` bytes follows.
    Chunk {
        /// Chunk flags.
        flags: u16,
        /// Chunk type.
        ty: u16,
        /// The request's cookie.
        cookie: u64,
        /// Payload length.
        length: u32,
    },
}

/// A reply stream the client cannot make sense of; it must disconnect.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ReplyError {
    /// Neither reply magic.
    #[error("bad reply magic {0:#010x}")]
    BadMagic(u32),
    /// A chunk's payload did not fit its type.
    #[error("malformed {what} chunk: {reason}")]
    Malformed {
        /// Which chunk type.
        what: &'static str,
        /// What was wrong.
        reason: &'static str,
    },
}

/// How many header bytes follow the 4-byte magic of a reply.
pub fn reply_header_rest(magic: u32) -> Result<usize, ReplyError> {
    match magic {
        SIMPLE_REPLY_MAGIC => Ok(SIMPLE_REPLY_LEN - 4),
        STRUCTURED_REPLY_MAGIC => Ok(CHUNK_HEADER_LEN - 4),
        other => Err(ReplyError::BadMagic(other)),
    }
}

/// Decodes a reply header: the magic, then the bytes [`reply_header_rest`] said.
pub fn decode_reply_header(magic: u32, rest: &[u8]) -> Result<ReplyHeader, ReplyError> {
    let need = reply_header_rest(magic)?;
    if rest.len() < need {
        return Err(ReplyError::Malformed {
            what: "reply",
            reason: "short header",
        });
    }
    Ok(match magic {
        SIMPLE_REPLY_MAGIC => ReplyHeader::Simple {
            error: be32(rest, 0),
            cookie: be64(rest, 4),
        },
        _ => ReplyHeader::Chunk {
            flags: be16(rest, 0),
            ty: be16(rest, 2),
            cookie: be64(rest, 4),
            length: be32(rest, 12),
        },
    })
}

/// Decodes an `OFFSET_HOLE` payload into offset and size.
pub fn decode_offset_hole(p: &[u8]) -> Result<(u64, u32), ReplyError> {
    if p.len() != 12 {
        return Err(ReplyError::Malformed {
            what: "OFFSET_HOLE",
            reason: "length is not 12",
        });
    }
    let size = be32(p, 8);
    if size == 0 {
        return Err(ReplyError::Malformed {
            what: "OFFSET_HOLE",
            reason: "zero size",
        });
    }
    Ok((be64(p, 0), size))
}

/// Decodes an error chunk payload into the errno and message.
pub fn decode_error(p: &[u8]) -> Result<(u32, String), ReplyError> {
    let bad = |reason| ReplyError::Malformed {
        what: "ERROR",
        reason,
    };
    if p.len() < 6 {
        return Err(bad("shorter than 6 bytes"));
    }
    let msg_len = usize::from(be16(p, 4));
    let msg = p.get(6..6 + msg_len).ok_or(bad("message overruns chunk"))?;
    Ok((be32(p, 0), String::from_utf8_lossy(msg).into_owned()))
}

/// Decodes a `BLOCK_STATUS` payload into its context id and descriptors.
pub fn decode_block_status(p: &[u8]) -> Result<(u32, Vec<Descriptor>), ReplyError> {
    if p.len() < 12 || !(p.len() - 4).is_multiple_of(8) {
        return Err(ReplyError::Malformed {
            what: "BLOCK_STATUS",
            reason: "length is not 4 + 8n",
        });
    }
    let descriptors = p[4..]
        .chunks_exact(8)
        .map(|d| Descriptor {
            length: be32(d, 0),
            flags: be32(d, 4),
        })
        .collect();
    Ok((be32(p, 0), descriptors))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::transmission_flags as tf;
    use proptest::prelude::*;

    fn rw() -> Negotiated {
        Negotiated {
            size: 1 << 20,
            flags: tf::HAS_FLAGS
                | tf::SEND_FLUSH
                | tf::SEND_FUA
                | tf::SEND_TRIM
                | tf::SEND_WRITE_ZEROES
                | tf::SEND_DF
                | tf::SEND_CACHE,
            block_sizes: BlockSizes::DEFAULT,
            structured: true,
            meta_contexts: true,
        }
    }

    fn req(kind: Command, flags: u16, offset: u64, length: u32) -> Request {
        Request {
            flags,
            kind: kind.code(),
            cookie: 7,
            offset,
            length,
        }
    }

    #[test]
    fn request_round_trips() {
        let r = req(Command::Write, cmd_flags::FUA, 4096, 512);
        let mut b = BytesMut::new();
        r.encode(&mut b);
        let arr: [u8; REQUEST_LEN] = b[..].try_into().unwrap();
        assert_eq!(decode_request(&arr), Ok(r));
    }

    #[test]
    fn exact_errnos() {
        let n = rw();
        let size = n.size;
        assert_eq!(
            validate(&req(Command::Read, 0, 0, 4096), &n),
            Ok(Command::Read)
        );
        assert_eq!(
            validate(&req(Command::Read, 0, size, 1), &n),
            Err(Errno::Inval)
        );
        assert_eq!(
            validate(&req(Command::Write, 0, size, 1), &n),
            Err(Errno::NoSpc)
        );
        assert_eq!(
            validate(&req(Command::WriteZeroes, 0, size - 1, 2), &n),
            Err(Errno::NoSpc)
        );
        assert_eq!(
            validate(&req(Command::Trim, 0, size - 1, 2), &n),
            Err(Errno::Inval)
        );
        assert_eq!(
            validate(&req(Command::Read, 0, u64::MAX, 2), &n),
            Err(Errno::Inval)
        );
        assert_eq!(
            validate(
                &Request {
                    kind: 99,
                    ..req(Command::Read, 0, 0, 1)
                },
                &n
            ),
            Err(Errno::Inval)
        );
        // A flag that does not belong to the command.
        assert_eq!(
            validate(&req(Command::Read, cmd_flags::REQ_ONE, 0, 1), &n),
            Err(Errno::Inval)
        );
        // FAST_ZERO was not advertised.
        assert_eq!(
            validate(&req(Command::WriteZeroes, cmd_flags::FAST_ZERO, 0, 1), &n),
            Err(Errno::Inval)
        );
        assert_eq!(
            validate(&req(Command::Flush, 0, 1, 0), &n),
            Err(Errno::Inval)
        );
        assert_eq!(
            validate(&req(Command::Write, 0, 0, (32 << 20) + 1), &n),
            Err(Errno::Inval)
        );
        assert_eq!(
            validate(&req(Command::Read, cmd_flags::DF, 0, (32 << 20) + 1), &n),
            Err(Errno::Overflow)
        );
    }

    #[test]
    fn read_only_refuses_writes_with_eperm() {
        let n = Negotiated {
            flags: tf::HAS_FLAGS
                | tf::READ_ONLY
                | tf::SEND_FLUSH
                | tf::SEND_TRIM
                | tf::SEND_WRITE_ZEROES,
            ..rw()
        };
        for c in [Command::Write, Command::Trim, Command::WriteZeroes] {
            assert_eq!(validate(&req(c, 0, 0, 512), &n), Err(Errno::Perm), "{c:?}");
        }
        assert_eq!(
            validate(&req(Command::Read, 0, 0, 512), &n),
            Ok(Command::Read)
        );
    }

    #[test]
    fn alignment_follows_minimum_block() {
        let n = Negotiated {
            block_sizes: BlockSizes {
                minimum: 512,
                preferred: 4096,
                maximum: 1 << 25,
            },
            ..rw()
        };
        assert_eq!(
            validate(&req(Command::Read, 0, 512, 512), &n),
            Ok(Command::Read)
        );
        assert_eq!(
            validate(&req(Command::Read, 0, 1, 512), &n),
            Err(Errno::Inval)
        );
        assert_eq!(
            validate(&req(Command::Write, 0, 0, 100), &n),
            Err(Errno::Inval)
        );
    }

    #[test]
    fn block_status_needs_meta_context() {
        let n = Negotiated {
            meta_contexts: false,
            ..rw()
        };
        assert_eq!(
            validate(&req(Command::BlockStatus, 0, 0, 512), &n),
            Err(Errno::Inval)
        );
    }

    #[test]
    fn error_chunk_round_trips_and_caps_message() {
        let mut b = BytesMut::new();
        let long = "é".repeat(3000);
        encode_error_chunk(&mut b, 9, Errno::NoSpc, &long);
        let magic = be32(&b, 0);
        let h = decode_reply_header(magic, &b[4..CHUNK_HEADER_LEN]).unwrap();
        let ReplyHeader::Chunk {
            ty,
            cookie,
            length,
            flags,
        } = h
        else {
            panic!("not a chunk")
        };
        assert_eq!(
            (ty, cookie, flags),
            (reply::TYPE_ERROR, 9, reply::FLAG_DONE)
        );
        let (errno, msg) = decode_error(&b[CHUNK_HEADER_LEN..]).unwrap();
        assert_eq!(errno, Errno::NoSpc.code());
        assert!(msg.len() <= MAX_ERROR_MESSAGE && msg.chars().all(|c| c == 'é'));
        assert_eq!(length as usize, b.len() - CHUNK_HEADER_LEN);
    }

    #[test]
    fn block_status_round_trips() {
        let d = vec![
            Descriptor {
                length: 4096,
                flags: 0,
            },
            Descriptor {
                length: 8192,
                flags: 3,
            },
        ];
        let mut b = BytesMut::new();
        encode_block_status(&mut b, true, 1, 5, &d);
        assert_eq!(decode_block_status(&b[CHUNK_HEADER_LEN..]), Ok((5, d)));
        assert!(decode_block_status(&[0; 11]).is_err());
    }

    proptest! {
        /// A header with a wrong magic is refused with that magic.
        #[test]
        fn bad_request_magic(magic in any::<u32>(), rest in proptest::collection::vec(any::<u8>(), 24)) {
            prop_assume!(magic != REQUEST_MAGIC);
            let mut b = [0u8; REQUEST_LEN];
            b[..4].copy_from_slice(&magic.to_be_bytes());
            b[4..].copy_from_slice(&rest);
            prop_assert_eq!(decode_request(&b), Err(RequestError::BadMagic(magic)));
        }

        /// Any request whose range leaves the export is refused with EINVAL, or
        /// ENOSPC for writes; any request inside it with valid flags is accepted.
        #[test]
        fn range_rule(kind in 0u16..8, offset in 0u64..(2 << 20), length in 0u32..(2 << 20)) {
            let n = rw();
            let cmd = Command::from_code(kind).unwrap();
            let r = Request { flags: 0, kind, cookie: 1, offset, length };
            let got = validate(&r, &n);
            let inside = offset + u64::from(length) <= n.size;
            match cmd {
                Command::Disc | Command::Flush => {
                    prop_assert_eq!(got.is_ok(), offset == 0 && length == 0);
                }
                Command::Write | Command::WriteZeroes => {
                    prop_assert_eq!(got, if inside { Ok(cmd) } else { Err(Errno::NoSpc) });
                }
                _ => prop_assert_eq!(got, if inside { Ok(cmd) } else { Err(Errno::Inval) }),
            }
        }

        /// Unknown command types are EINVAL whatever their range.
        #[test]
        fn unknown_commands(kind in 8u16.., offset in any::<u64>(), length in any::<u32>(), flags in any::<u16>()) {
            let r = Request { flags, kind, cookie: 1, offset, length };
            prop_assert_eq!(validate(&r, &rw()), Err(Errno::Inval));
        }

        /// Decoding arbitrary chunk payloads never panics.
        #[test]
        fn chunk_payload_decoders_never_panic(p in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_block_status(&p);
            let _ = decode_error(&p);
            let _ = decode_offset_hole(&p);
        }
    }
}
