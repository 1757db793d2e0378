//! Handshake messages: the server greeting, client flags, options and option
//! replies of fixed newstyle negotiation.
//!
//! ```text
//! server                                  client
//!   NBDMAGIC IHAVEOPT hflags(16) ──────►
//!                                ◄──────  cflags(32)
//!                                ◄──────  IHAVEOPT opt(32) len(32) data   (OptionHeader + parse_option)
//!   REPLY_MAGIC opt type len data ─────►                                   (encode_option_reply)
//!   ... repeated; OPT_GO + NBD_REP_ACK or OPT_EXPORT_NAME ends it
//! ```
//!
//! Each decoder returns a typed error that names exactly what was wrong, so the
//! server can pick the reply the specification prescribes (`NBD_REP_ERR_INVALID`,
//! `NBD_REP_ERR_UNSUP`, or a hard disconnect).

use bytes::{BufMut, BytesMut};
use thiserror::Error;

use super::{
    BlockSizes, IHAVEOPT, MAX_STRING_LEN, NBD_MAGIC, OPTION_REPLY_MAGIC, be16, be32, be64,
    client_flags, handshake_flags, info, opt, rep,
};

/// Length of the server's greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub const GREETING_LEN: usize = 18;
/// Length of an option header: magic, option, data length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Length of an option reply header: magic, option, type, data length.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Largest option data the server reads and parses. Longer options are refused
/// with `NBD_REP_ERR_TOO_BIG` (after skipping their data) or by disconnecting.
pub const MAX_OPTION_DATA: u32 = 64 * 1024;
/// Most metadata context queries accepted in one option.
pub const MAX_META_QUERIES: usize = 128;

/// What was wrong with the start of a handshake; each of these ends the session.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HandshakeError {
    /// The peer's first magic was not `NBDMAGIC`.
    #[error("bad server magic {0:#018x} (expected NBDMAGIC)")]
    BadServerMagic(u64),
    /// The server speaks oldstyle or non-newstyle negotiation.
    #[error("server does not speak newstyle negotiation (magic {0:#018x})")]
    NotNewstyle(u64),
    /// The server does not set `NBD_FLAG_FIXED_NEWSTYLE`.
    #[error("server does not support fixed newstyle negotiation")]
    NotFixedNewstyle,
    /// The client set flags the server did not offer.
    #[error("client sent unknown or unoffered flags {0:#x}")]
    BadClientFlags(u32),
    /// An option did not start with `IHAVEOPT`.
    #[error("bad option magic {0:#018x} (expected IHAVEOPT)")]
    BadOptionMagic(u64),
    /// An option reply did not start with the reply magic.
    #[error("bad option reply magic {0:#018x}")]
    BadReplyMagic(u64),
}

/// Encodes the server's greeting.
pub fn encode_greeting(flags: u16) -> [u8; GREETING_LEN] {
    let mut b = [0u8; GREETING_LEN];
    b[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..].copy_from_slice(&flags.to_be_bytes());
    b
}

/// Decodes the server's greeting (client side); returns the handshake flags.
pub fn decode_greeting(b: &[u8; GREETING_LEN]) -> Result<u16, HandshakeError> {
    let magic = be64(b, 0);
    if magic != NBD_MAGIC {
        return Err(HandshakeError::BadServerMagic(magic));
    }
    let second = be64(b, 8);
    if second != IHAVEOPT {
        return Err(HandshakeError::NotNewstyle(second));
    }
    let flags = be16(b, 16);
    if flags & handshake_flags::FIXED_NEWSTYLE == 0 {
        return Err(HandshakeError::NotFixedNewstyle);
    }
    Ok(flags)
}

/// Checks the client's flags against the handshake flags the server offered.
pub fn decode_client_flags(b: [u8; 4], offered: u16) -> Result<u32, HandshakeError> {
    let flags = u32::from_be_bytes(b);
    let mut allowed = 0;
    if offered & handshake_flags::FIXED_NEWSTYLE != 0 {
        allowed |= client_flags::FIXED_NEWSTYLE;
    }
    if offered & handshake_flags::NO_ZEROES != 0 {
        allowed |= client_flags::NO_ZEROES;
    }
    if flags & !allowed != 0 {
        return Err(HandshakeError::BadClientFlags(flags));
    }
    Ok(flags)
}

/// The fixed part of a client option.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option code (`opt::*`).
    pub option: u32,
    /// Length of the data that follows.
    pub length: u32,
}

/// Decodes an option header.
pub fn decode_option_header(b: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, HandshakeError> {
    let magic = be64(b, 0);
    if magic != IHAVEOPT {
        return Err(HandshakeError::BadOptionMagic(magic));
    }
    Ok(OptionHeader {
        option: be32(b, 8),
        length: be32(b, 12),
    })
}

/// Encodes an option header followed by its data (client side).
pub fn encode_option(buf: &mut BytesMut, option: u32, data: &[u8]) {
    buf.put_u64(IHAVEOPT);
    buf.put_u32(option);
    buf.put_u32(len_u32(data.len()));
    buf.put_slice(data);
}

/// The data of `NBD_OPT_INFO` and `NBD_OPT_GO`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoRequest {
    /// Export name; empty means the default export.
    pub name: String,
    /// Information types the client asked for.
    pub requests: Vec<u16>,
}

impl GoRequest {
    /// Encodes the option data (client side).
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(6 + self.name.len() + 2 * self.requests.len());
        v.extend_from_slice(&len_u32(self.name.len()).to_be_bytes());
        v.extend_from_slice(self.name.as_bytes());
        let n = u16::try_from(self.requests.len()).unwrap_or(u16::MAX);
        v.extend_from_slice(&n.to_be_bytes());
        for r in self.requests.iter().take(usize::from(n)) {
            v.extend_from_slice(&r.to_be_bytes());
        }
        v
    }
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaRequest {
    /// Export the contexts are for.
    pub name: String,
    /// Query strings, each starting with a namespace and a colon.
    pub queries: Vec<String>,
}

impl MetaRequest {
    /// Encodes the option data (client side).
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&len_u32(self.name.len()).to_be_bytes());
        v.extend_from_slice(self.name.as_bytes());
        v.extend_from_slice(&len_u32(self.queries.len()).to_be_bytes());
        for q in &self.queries {
            v.extend_from_slice(&len_u32(q.len()).to_be_bytes());
            v.extend_from_slice(q.as_bytes());
        }
        v
    }
}

/// A client option, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientOption {
    /// `NBD_OPT_EXPORT_NAME` with the name.
    ExportName(String),
    /// `NBD_OPT_ABORT`.
    Abort,
    /// `NBD_OPT_LIST`.
    List,
    /// `NBD_OPT_STARTTLS`.
    StartTls,
    /// `NBD_OPT_INFO`.
    Info(GoRequest),
    /// `NBD_OPT_GO`.
    Go(GoRequest),
    /// `NBD_OPT_STRUCTURED_REPLY`.
    StructuredReply,
    /// `NBD_OPT_LIST_META_CONTEXT`.
    ListMetaContext(MetaRequest),
    /// `NBD_OPT_SET_META_CONTEXT`.
    SetMetaContext(MetaRequest),
    /// An option this implementation does not know (answered `NBD_REP_ERR_UNSUP`).
    Unknown(u32),
}

/// Why an option's data was refused; the server answers `NBD_REP_ERR_INVALID`
/// (or `NBD_REP_ERR_TOO_BIG`) with this text, except for `NBD_OPT_EXPORT_NAME`,
/// whose errors end the session.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum OptionError {
    /// The option must not carry data.
    #[error("option {0} takes no data")]
    UnexpectedData(u32),
    /// The data ended before a field it announced.
    #[error("option data truncated: {0}")]
    Truncated(&'static str),
    /// Bytes were left after the last field.
    #[error("option data has {0} trailing bytes")]
    Trailing(usize),
    /// A string was not UTF-8.
    #[error("{0} is not valid UTF-8")]
    NotUtf8(&'static str),
    /// A string was longer than 4096 bytes.
    #[error("{0} longer than 4096 bytes")]
    StringTooLong(&'static str),
    /// An information type was requested twice.
    #[error("information type {0} requested twice")]
    DuplicateInfo(u16),
    /// A metadata query had no namespace.
    #[error("metadata query {0:?} has no namespace")]
    QueryWithoutNamespace(String),
    /// Too many metadata queries.
    #[error("more than {MAX_META_QUERIES} metadata queries")]
    TooManyQueries,
}

impl OptionError {
    /// The reply type this error is answered with.
    pub fn reply_type(&self) -> u32 {
        match self {
            OptionError::TooManyQueries => rep::ERR_TOO_BIG,
            _ => rep::ERR_INVALID,
        }
    }
}

/// Parses the data of option `code`.
pub fn parse_option(code: u32, data: &[u8]) -> Result<ClientOption, OptionError> {
    let no_data = |o: ClientOption| {
        if data.is_empty() {
            Ok(o)
        } else {
            Err(OptionError::UnexpectedData(code))
        }
    };
    match code {
        opt::EXPORT_NAME => Ok(ClientOption::ExportName(string(data, "export name")?)),
        // The specification tells servers to ignore data sent with ABORT.
        opt::ABORT => Ok(ClientOption::Abort),
        opt::LIST => no_data(ClientOption::List),
        opt::STARTTLS => no_data(ClientOption::StartTls),
        opt::STRUCTURED_REPLY => no_data(ClientOption::StructuredReply),
        opt::INFO => Ok(ClientOption::Info(parse_go(data)?)),
        opt::GO => Ok(ClientOption::Go(parse_go(data)?)),
        opt::LIST_META_CONTEXT => Ok(ClientOption::ListMetaContext(parse_meta(data)?)),
        opt::SET_META_CONTEXT => Ok(ClientOption::SetMetaContext(parse_meta(data)?)),
        other => Ok(ClientOption::Unknown(other)),
    }
}

/// A cursor over option data that fails with `Truncated` instead of panicking.
struct Cursor<'a> {
    data: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], OptionError> {
        if self.data.len() < n {
            return Err(OptionError::Truncated(what));
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Ok(head)
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, OptionError> {
        Ok(be16(self.take(2, what)?, 0))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, OptionError> {
        Ok(be32(self.take(4, what)?, 0))
    }

    fn string(&mut self, what: &'static str) -> Result<String, OptionError> {
        let len = self.u32(what)?;
        let len = usize::try_from(len).map_err(|_| OptionError::Truncated(what))?;
        if len > MAX_STRING_LEN {
            return Err(OptionError::StringTooLong(what));
        }
        string(self.take(len, what)?, what)
    }

    fn finish(self) -> Result<(), OptionError> {
        if self.data.is_empty() {
            Ok(())
        } else {
            Err(OptionError::Trailing(self.data.len()))
        }
    }
}

fn string(b: &[u8], what: &'static str) -> Result<String, OptionError> {
    if b.len() > MAX_STRING_LEN {
        return Err(OptionError::StringTooLong(what));
    }
    String::from_utf8(b.to_vec()).map_err(|_| OptionError::NotUtf8(what))
}

fn parse_go(data: &[u8]) -> Result<GoRequest, OptionError> {
    let mut c = Cursor { data };
    let name = c.string("export name")?;
    let n = c.u16("number of information requests")?;
    let mut requests = Vec::with_capacity(usize::from(n).min(16));
    for _ in 0..n {
        let r = c.u16("information request")?;
        if requests.contains(&r) {
            return Err(OptionError::DuplicateInfo(r));
        }
        requests.push(r);
    }
    c.finish()?;
    Ok(GoRequest { name, requests })
}

fn parse_meta(data: &[u8]) -> Result<MetaRequest, OptionError> {
    let mut c = Cursor { data };
    let name = c.string("export name")?;
    let n = c.u32("number of queries")?;
    if usize::try_from(n).map_or(true, |n| n > MAX_META_QUERIES) {
        return Err(OptionError::TooManyQueries);
    }
    let mut queries = Vec::new();
    for _ in 0..n {
        let q = c.string("metadata query")?;
        if !q.contains(':') || q.starts_with(':') {
            return Err(OptionError::QueryWithoutNamespace(q));
        }
        queries.push(q);
    }
    c.finish()?;
    Ok(MetaRequest { name, queries })
}

/// Encodes an option reply with its data.
pub fn encode_option_reply(buf: &mut BytesMut, option: u32, reply_type: u32, data: &[u8]) {
    buf.put_u64(OPTION_REPLY_MAGIC);
    buf.put_u32(option);
    buf.put_u32(reply_type);
    buf.put_u32(len_u32(data.len()));
    buf.put_slice(data);
}

/// The fixed part of an option reply (client side).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option this replies to.
    pub option: u32,
    /// The reply type (`rep::*`).
    pub reply_type: u32,
    /// Length of the data that follows.
    pub length: u32,
}

/// Decodes an option reply header (client side).
pub fn decode_option_reply_header(
    b: &[u8; OPTION_REPLY_HEADER_LEN],
) -> Result<OptionReplyHeader, HandshakeError> {
    let magic = be64(b, 0);
    if magic != OPTION_REPLY_MAGIC {
        return Err(HandshakeError::BadReplyMagic(magic));
    }
    Ok(OptionReplyHeader {
        option: be32(b, 8),
        reply_type: be32(b, 12),
        length: be32(b, 16),
    })
}

/// The data of an `NBD_REP_SERVER` reply: the export's name and description.
pub fn encode_rep_server(name: &str, description: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + name.len() + description.len());
    v.extend_from_slice(&len_u32(name.len()).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(description.as_bytes());
    v
}

/// The data of an `NBD_REP_META_CONTEXT` reply.
pub fn encode_rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + name.len());
    v.extend_from_slice(&id.to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v
}

/// One piece of export information, as sent in `NBD_REP_INFO`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Info {
    /// Size in bytes and transmission flags.
    Export {
        /// Export size in bytes.
        size: u64,
        /// Transmission flags.
        flags: u16,
    },
    /// Canonical name.
    Name(String),
    /// Human-readable description.
    Description(String),
    /// Size constraints.
    BlockSize(BlockSizes),
    /// An information type this implementation does not know; ignored.
    Unknown(u16),
}

impl Info {
    /// Encodes the `NBD_REP_INFO` data.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        match self {
            Info::Export { size, flags } => {
                v.extend_from_slice(&info::EXPORT.to_be_bytes());
                v.extend_from_slice(&size.to_be_bytes());
                v.extend_from_slice(&flags.to_be_bytes());
            }
            Info::Name(n) => {
                v.extend_from_slice(&info::NAME.to_be_bytes());
                v.extend_from_slice(n.as_bytes());
            }
            Info::Description(d) => {
                v.extend_from_slice(&info::DESCRIPTION.to_be_bytes());
                v.extend_from_slice(d.as_bytes());
            }
            Info::BlockSize(s) => {
                v.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
                v.extend_from_slice(&s.minimum.to_be_bytes());
                v.extend_from_slice(&s.preferred.to_be_bytes());
                v.extend_from_slice(&s.maximum.to_be_bytes());
            }
            Info::Unknown(t) => v.extend_from_slice(&t.to_be_bytes()),
        }
        v
    }

    /// Decodes `NBD_REP_INFO` data (client side).
    pub fn decode(data: &[u8]) -> Result<Info, OptionError> {
        let mut c = Cursor { data };
        let ty = c.u16("information type")?;
        let info = match ty {
            info::EXPORT => {
                let b = c.take(10, "export information")?;
                Info::Export {
                    size: be64(b, 0),
                    flags: be16(b, 8),
                }
            }
            info::NAME => Info::Name(string(std::mem::take(&mut c.data), "name")?),
            info::DESCRIPTION => {
                Info::Description(string(std::mem::take(&mut c.data), "description")?)
            }
            info::BLOCK_SIZE => {
                let b = c.take(12, "block size information")?;
                Info::BlockSize(BlockSizes {
                    minimum: be32(b, 0),
                    preferred: be32(b, 4),
                    maximum: be32(b, 8),
                })
            }
            other => {
                c.data = &[];
                Info::Unknown(other)
            }
        };
        c.finish()?;
        Ok(info)
    }
}

/// Decodes `NBD_REP_SERVER` data into the export's name and description.
pub fn decode_rep_server(data: &[u8]) -> Result<(String, String), OptionError> {
    let mut c = Cursor { data };
    let name = c.string("export name")?;
    let description = string(c.data, "description")?;
    Ok((name, description))
}

/// Decodes `NBD_REP_META_CONTEXT` data into the context id and name.
pub fn decode_rep_meta_context(data: &[u8]) -> Result<(u32, String), OptionError> {
    let mut c = Cursor { data };
    let id = c.u32("context id")?;
    let name = string(c.data, "context name")?;
    Ok((id, name))
}

/// Encodes the reply to `NBD_OPT_EXPORT_NAME`: size, flags, and the 124 zero
/// bytes unless the client negotiated `NO_ZEROES`.
pub fn encode_export_name_reply(buf: &mut BytesMut, size: u64, flags: u16, no_zeroes: bool) {
    buf.put_u64(size);
    buf.put_u16(flags);
    if !no_zeroes {
        buf.put_bytes(0, 124);
    }
}

/// Converts a length that is known to be small to `u32`, saturating.
fn len_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn go_bytes(name: &[u8], reqs: &[u16]) -> Vec<u8> {
        let mut v = (name.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(name);
        v.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
        for r in reqs {
            v.extend_from_slice(&r.to_be_bytes());
        }
        v
    }

    #[test]
    fn greeting_round_trips() {
        let g = encode_greeting(handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES);
        assert_eq!(decode_greeting(&g), Ok(3));
    }

    #[test]
    fn greeting_errors_are_exact() {
        let mut g = encode_greeting(1);
        g[0] ^= 1;
        assert!(matches!(
            decode_greeting(&g),
            Err(HandshakeError::BadServerMagic(_))
        ));
        let mut g = encode_greeting(1);
        g[8..16].copy_from_slice(&0x0000_4202_8186_1253u64.to_be_bytes());
        assert_eq!(
            decode_greeting(&g),
            Err(HandshakeError::NotNewstyle(0x0000_4202_8186_1253))
        );
        assert_eq!(
            decode_greeting(&encode_greeting(0)),
            Err(HandshakeError::NotFixedNewstyle)
        );
    }

    #[test]
    fn client_flags_must_match_offer() {
        assert_eq!(decode_client_flags([0, 0, 0, 3], 3), Ok(3));
        assert_eq!(
            decode_client_flags([0, 0, 0, 2], 1),
            Err(HandshakeError::BadClientFlags(2))
        );
        assert_eq!(
            decode_client_flags([0, 0, 0, 4], 3),
            Err(HandshakeError::BadClientFlags(4))
        );
    }

    #[test]
    fn go_parses_and_refuses_duplicates() {
        let ok = parse_option(opt::GO, &go_bytes(b"disk", &[3, 1])).unwrap();
        assert_eq!(
            ok,
            ClientOption::Go(GoRequest {
                name: "disk".into(),
                requests: vec![3, 1]
            })
        );
        assert_eq!(
            parse_option(opt::GO, &go_bytes(b"disk", &[3, 3])),
            Err(OptionError::DuplicateInfo(3))
        );
        let mut trailing = go_bytes(b"", &[]);
        trailing.push(0);
        assert_eq!(
            parse_option(opt::INFO, &trailing),
            Err(OptionError::Trailing(1))
        );
        assert_eq!(
            parse_option(opt::GO, &go_bytes(&[0xff, 0xfe], &[])),
            Err(OptionError::NotUtf8("export name"))
        );
    }

    #[test]
    fn options_without_data_refuse_data() {
        for code in [opt::LIST, opt::STRUCTURED_REPLY, opt::STARTTLS] {
            assert_eq!(
                parse_option(code, b"x"),
                Err(OptionError::UnexpectedData(code))
            );
        }
        assert_eq!(
            parse_option(opt::ABORT, b"ignored"),
            Ok(ClientOption::Abort)
        );
        assert_eq!(parse_option(99, b"any"), Ok(ClientOption::Unknown(99)));
    }

    #[test]
    fn meta_request_round_trips_and_checks_namespace() {
        let m = MetaRequest {
            name: "x".into(),
            queries: vec!["base:allocation".into(), "qemu:".into()],
        };
        assert_eq!(
            parse_option(opt::SET_META_CONTEXT, &m.encode()),
            Ok(ClientOption::SetMetaContext(m))
        );
        let bad = MetaRequest {
            name: "x".into(),
            queries: vec!["nocolon".into()],
        };
        assert_eq!(
            parse_option(opt::LIST_META_CONTEXT, &bad.encode()),
            Err(OptionError::QueryWithoutNamespace("nocolon".into()))
        );
    }

    #[test]
    fn info_round_trips() {
        for i in [
            Info::Export {
                size: 1 << 40,
                flags: 0x1ff,
            },
            Info::Name("n".into()),
            Info::Description("a disk".into()),
            Info::BlockSize(BlockSizes::DEFAULT),
        ] {
            assert_eq!(Info::decode(&i.encode()), Ok(i));
        }
    }

    proptest! {
        /// Any truncation of a valid GO request is refused as truncated, never
        /// accepted or panicking.
        #[test]
        fn truncated_go_is_refused(name in "[a-z]{0,20}", reqs in proptest::collection::btree_set(0u16..8, 0..4), cut in 1usize..40) {
            let reqs: Vec<u16> = reqs.into_iter().collect();
            let full = go_bytes(name.as_bytes(), &reqs);
            prop_assume!(cut <= full.len());
            let short = &full[..full.len() - cut];
            let r = parse_option(opt::GO, short);
            prop_assert!(matches!(r, Err(OptionError::Truncated(_))), "{:?}", r);
        }

        /// Arbitrary bytes never panic any option parser.
        #[test]
        fn arbitrary_option_data_never_panics(code in 0u32..16, data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_option(code, &data);
        }

        /// An option header with a wrong magic is refused with that magic.
        #[test]
        fn bad_option_magic_is_named(magic in any::<u64>(), o in any::<u32>(), l in any::<u32>()) {
            prop_assume!(magic != IHAVEOPT);
            let mut b = [0u8; OPTION_HEADER_LEN];
            b[..8].copy_from_slice(&magic.to_be_bytes());
            b[8..12].copy_from_slice(&o.to_be_bytes());
            b[12..].copy_from_slice(&l.to_be_bytes());
            prop_assert_eq!(decode_option_header(&b), Err(HandshakeError::BadOptionMagic(magic)));
        }
    }
}
