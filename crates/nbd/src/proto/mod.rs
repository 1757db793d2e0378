//! The NBD wire protocol without I/O: constants, and pure encoders and decoders
//! for every handshake and transmission message virtman sends or receives.
//!
//! Nothing here touches a socket or a clock. The server and client drivers read
//! fixed-size headers from their sockets, hand the bytes to these functions, and
//! write what they return. That keeps every parsing decision testable with
//! property tests and fuzzable (see `fuzz/`).
//!
//! ```text
//!  handshake (handshake.rs)                      transmission (transmission.rs)
//!  S: NBDMAGIC IHAVEOPT hflags                   C: request header (28 B) [+ write payload]
//!  C: cflags                                     S: simple reply (16 B)
//!  C: IHAVEOPT opt len data ──► ClientOption     S: structured chunk (20 B + payload) ...
//!  S: reply magic opt type len data              ... until NBD_CMD_DISC or a hard disconnect
//!  ... until OPT_GO ─ACK─► transmission
//! ```
//!
//! All integers are big-endian, as the specification requires.

pub mod handshake;
pub mod transmission;

/// `NBDMAGIC`: the first eight bytes a server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle magic, sent by the server after `NBDMAGIC` and by the
/// client before every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every fixed-newstyle option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server to client, 16 bits).
pub mod handshake_flags {
    /// The server speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    /// The server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags (client to server, 32 bits).
pub mod client_flags {
    /// The client speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    /// The client does not want the 124 zero bytes.
    pub const NO_ZEROES: u32 = 1 << 1;
}

/// Transmission flags (16 bits), sent with an export's size.
pub mod transmission_flags {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// The export refuses writes.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_CMD_FLUSH` is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_CMD_FLAG_FUA` is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// The export behaves like a rotational disk.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// `NBD_CMD_TRIM` is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_CMD_WRITE_ZEROES` (and `NO_HOLE`) is supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `NBD_CMD_FLAG_DF` is supported on reads (structured replies only).
    pub const SEND_DF: u16 = 1 << 7;
    /// Several connections see one consistent export.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// `NBD_CMD_CACHE` is understood.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// `NBD_CMD_FLAG_FAST_ZERO` is supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Option codes of the handshake phase.
pub mod opt {
    /// Choose an export and enter transmission (no error path).
    pub const EXPORT_NAME: u32 = 1;
    /// Abort the negotiation.
    pub const ABORT: u32 = 2;
    /// List the exports.
    pub const LIST: u32 = 3;
    /// Upgrade to TLS.
    pub const STARTTLS: u32 = 5;
    /// Describe an export.
    pub const INFO: u32 = 6;
    /// Describe an export and enter transmission.
    pub const GO: u32 = 7;
    /// Use structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
    /// Extended headers (experimental; virtman does not support it).
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types.
pub mod rep {
    /// Success, or the end of a list.
    pub const ACK: u32 = 1;
    /// One export in a list.
    pub const SERVER: u32 = 2;
    /// One item of export information.
    pub const INFO: u32 = 3;
    /// One metadata context.
    pub const META_CONTEXT: u32 = 4;
    /// Bit 31 marks an error reply.
    pub const ERR_BIT: u32 = 1 << 31;
    /// The option is unknown.
    pub const ERR_UNSUP: u32 = ERR_BIT | 1;
    /// Policy forbids the option.
    pub const ERR_POLICY: u32 = ERR_BIT | 2;
    /// The option is syntactically or semantically invalid.
    pub const ERR_INVALID: u32 = ERR_BIT | 3;
    /// The platform does not support the option.
    pub const ERR_PLATFORM: u32 = ERR_BIT | 4;
    /// TLS is required first.
    pub const ERR_TLS_REQD: u32 = ERR_BIT | 5;
    /// The export does not exist.
    pub const ERR_UNKNOWN: u32 = ERR_BIT | 6;
    /// The server is shutting down.
    pub const ERR_SHUTDOWN: u32 = ERR_BIT | 7;
    /// The client must request block sizes.
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR_BIT | 8;
    /// The request or reply is too large.
    pub const ERR_TOO_BIG: u32 = ERR_BIT | 9;
}

/// Information types inside `NBD_REP_INFO`.
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// Canonical name.
    pub const NAME: u16 = 1;
    /// Human-readable description.
    pub const DESCRIPTION: u16 = 2;
    /// Minimum, preferred and maximum block sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Command flags (16 bits) of a request.
pub mod cmd_flags {
    /// Force unit access: reply only once the data is durable.
    pub const FUA: u16 = 1 << 0;
    /// Write zeroes without punching a hole.
    pub const NO_HOLE: u16 = 1 << 1;
    /// Don't fragment a read reply.
    pub const DF: u16 = 1 << 2;
    /// Block status: one extent only.
    pub const REQ_ONE: u16 = 1 << 3;
    /// Write zeroes only if faster than writing.
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// Structured reply chunk types and flags.
pub mod reply {
    /// The last chunk of a reply.
    pub const FLAG_DONE: u16 = 1;
    /// No payload; ends a reply.
    pub const TYPE_NONE: u16 = 0;
    /// Data at an offset.
    pub const TYPE_OFFSET_DATA: u16 = 1;
    /// Zeroes at an offset.
    pub const TYPE_OFFSET_HOLE: u16 = 2;
    /// Block status extents of one metadata context.
    pub const TYPE_BLOCK_STATUS: u16 = 5;
    /// Bit 15 marks an error chunk.
    pub const TYPE_ERROR_BIT: u16 = 1 << 15;
    /// An error for the whole request.
    pub const TYPE_ERROR: u16 = TYPE_ERROR_BIT | 1;
    /// An error at an offset.
    pub const TYPE_ERROR_OFFSET: u16 = TYPE_ERROR_BIT | 2;
}

/// `base:allocation` status flags.
pub mod state {
    /// The extent is not allocated.
    pub const HOLE: u32 = 1 << 0;
    /// The extent reads as zeroes.
    pub const ZERO: u32 = 1 << 1;
}

/// The one metadata context of the `base:` namespace.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// The longest string (export name, description, query) the specification allows.
pub const MAX_STRING_LEN: usize = 4096;

/// Error values on the wire: the specification's small set of errnos.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Errno {
    /// Operation not permitted (writes to a read-only export).
    Perm = 1,
    /// Input/output error.
    Io = 5,
    /// Cannot allocate memory.
    NoMem = 12,
    /// Invalid argument (bad range, alignment, flags or command).
    Inval = 22,
    /// No space left (writes past the end, full cache).
    NoSpc = 28,
    /// Value too large (unfragmented read too long).
    Overflow = 75,
    /// Operation not supported (fast zero that would not be fast).
    NotSup = 95,
    /// The server is shutting down.
    Shutdown = 108,
}

impl Errno {
    /// The value sent on the wire.
    pub fn code(self) -> u32 {
        self as u32
    }

    /// Reads an error value; unknown values are treated as `EINVAL`, as the
    /// specification tells clients to.
    pub fn from_code(code: u32) -> Errno {
        match code {
            1 => Errno::Perm,
            5 => Errno::Io,
            12 => Errno::NoMem,
            28 => Errno::NoSpc,
            75 => Errno::Overflow,
            95 => Errno::NotSup,
            108 => Errno::Shutdown,
            _ => Errno::Inval,
        }
    }
}

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            Errno::Perm => "EPERM",
            Errno::Io => "EIO",
            Errno::NoMem => "ENOMEM",
            Errno::Inval => "EINVAL",
            Errno::NoSpc => "ENOSPC",
            Errno::Overflow => "EOVERFLOW",
            Errno::NotSup => "ENOTSUP",
            Errno::Shutdown => "ESHUTDOWN",
        };
        f.write_str(name)
    }
}

/// Size constraints of an export (`NBD_INFO_BLOCK_SIZE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSizes {
    /// Smallest addressable unit; offsets and lengths are multiples of it.
    pub minimum: u32,
    /// Size at which aligned I/O is efficient.
    pub preferred: u32,
    /// Largest READ or WRITE payload the server accepts.
    pub maximum: u32,
}

impl BlockSizes {
    /// The defaults of the specification: any alignment, 4 KiB preferred, 32 MiB
    /// payloads.
    pub const DEFAULT: BlockSizes = BlockSizes {
        minimum: 1,
        preferred: 4096,
        maximum: 32 * 1024 * 1024,
    };

    /// Checks the rules the specification puts on advertised sizes.
    pub fn is_valid(&self) -> bool {
        self.minimum.is_power_of_two()
            && self.minimum <= 65536
            && self.preferred.is_power_of_two()
            && self.preferred >= self.minimum.max(512)
            && self.maximum >= self.preferred
    }
}

impl Default for BlockSizes {
    fn default() -> Self {
        BlockSizes::DEFAULT
    }
}

/// Reads a big-endian `u16` at `at`; the caller guarantees the length.
pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Reads a big-endian `u32` at `at`; the caller guarantees the length.
pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Reads a big-endian `u64` at `at`; the caller guarantees the length.
pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}
