//! The server side of fixed newstyle negotiation.
//!
//! Reads options one at a time and answers each, until the client enters
//! transmission (`NBD_OPT_GO` acknowledged, or `NBD_OPT_EXPORT_NAME`), aborts,
//! or breaks the protocol. Parsing is in [`crate::proto::handshake`]; this file
//! only decides the answers and moves bytes.
//!
//! With TLS configured ([`super::ServerConfig::tls`]) the server runs the
//! spec's FORCEDTLS mode: until `NBD_OPT_STARTTLS` every option but ABORT is
//! answered `NBD_REP_ERR_TLS_REQD` (`NBD_OPT_EXPORT_NAME`, which cannot be
//! answered with an error, closes the connection); after the TLS handshake
//! all state negotiated before it is forgotten, and a second STARTTLS is
//! `NBD_REP_ERR_INVALID`. Without TLS, STARTTLS is `NBD_REP_ERR_POLICY`.

use std::sync::Arc;

use bytes::BytesMut;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use rustls_pki_types::CertificateDer;

use super::Server;
use crate::export::Export;
use crate::io::{BoxRead, BoxWrite};
use crate::proto::handshake::{
    self as hs, ClientOption, GoRequest, HandshakeError, Info, MAX_OPTION_DATA, MetaRequest,
    OPTION_HEADER_LEN, encode_option_reply,
};
use crate::proto::transmission::Negotiated;
use crate::proto::{
    BASE_ALLOCATION, client_flags, handshake_flags, info, opt, rep, transmission_flags,
};

/// The message of every `NBD_REP_ERR_TLS_REQD`.
const TLS_REQUIRED: &str = "TLS is required: send NBD_OPT_STARTTLS first";

/// Option data longer than this is not even skipped: the connection is closed.
const MAX_SKIPPED_OPTION: u32 = 16 * 1024 * 1024;

/// The id of `base:allocation` on every connection; an export's own
/// contexts ([`Export::meta_contexts`]) follow from 2, in its order.
pub(super) const BASE_ALLOCATION_ID: u32 = 1;

/// A metadata context selected for block status: its id and full name.
pub(super) type MetaContext = (u32, String);

/// What transmission needs from a finished handshake.
pub(super) struct Session {
    pub name: String,
    pub export: Arc<dyn Export>,
    pub negotiated: Negotiated,
    /// The metadata contexts selected for this export, by id.
    pub contexts: Vec<MetaContext>,
    /// The client asked for [`crate::ServerConfig::tag_context`] in its last
    /// `NBD_OPT_SET_META_CONTEXT` (whether the export has it or not).
    pub tagged: bool,
}

/// Why a handshake ended without a session.
#[derive(Debug, Error)]
pub(super) enum NegotiationError {
    /// The socket failed or closed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The client broke the protocol.
    #[error(transparent)]
    Protocol(#[from] HandshakeError),
    /// Option data too long to even skip.
    #[error("option {option} carries {length} bytes of data")]
    OptionTooLong {
        /// The option.
        option: u32,
        /// Its announced length.
        length: u32,
    },
    /// `NBD_OPT_EXPORT_NAME` named an export that does not exist, or was bad.
    #[error("export {0:?} refused")]
    ExportNameRefused(String),
    /// `NBD_OPT_EXPORT_NAME` before TLS on a server that requires it.
    #[error("NBD_OPT_EXPORT_NAME before STARTTLS on a TLS-only server")]
    TlsRequired,
    /// The TLS handshake after STARTTLS failed.
    #[error("TLS handshake: {0}")]
    Tls(std::io::Error),
}

/// Runs the handshake; `Ok(None)` means the client aborted cleanly.
pub(super) async fn negotiate(
    server: &Server,
    r: &mut BoxRead,
    w: &mut BoxWrite,
) -> Result<Option<Session>, NegotiationError> {
    let offered = handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES;
    w.write_all(&hs::encode_greeting(offered)).await?;
    w.flush().await?;
    let mut cflags = [0u8; 4];
    r.read_exact(&mut cflags).await?;
    let cflags = hs::decode_client_flags(cflags, offered)?;
    let no_zeroes = cflags & client_flags::NO_ZEROES != 0;

    let mut state = State::default();
    let mut out = BytesMut::with_capacity(4096);
    loop {
        let mut header = [0u8; OPTION_HEADER_LEN];
        r.read_exact(&mut header).await?;
        let header = hs::decode_option_header(&header)?;
        let (option, length) = (header.option, header.length);

        if length > MAX_OPTION_DATA {
            if option == opt::EXPORT_NAME || length > MAX_SKIPPED_OPTION {
                return Err(NegotiationError::OptionTooLong { option, length });
            }
            skip(r, length).await?;
            reply_error(&mut out, option, rep::ERR_TOO_BIG, "option data too long");
            flush(w, &mut out).await?;
            continue;
        }
        let mut data = vec![0u8; usize::try_from(length).unwrap_or(0)];
        r.read_exact(&mut data).await?;

        // A TLS-only server answers nothing but STARTTLS and ABORT before
        // TLS, malformed options included.
        if server.config.tls.is_some()
            && !state.tls
            && option != opt::STARTTLS
            && option != opt::ABORT
        {
            if option == opt::EXPORT_NAME {
                return Err(NegotiationError::TlsRequired);
            }
            reply_error(&mut out, option, rep::ERR_TLS_REQD, TLS_REQUIRED);
            flush(w, &mut out).await?;
            continue;
        }

        let parsed = match hs::parse_option(option, &data) {
            Ok(p) => p,
            Err(e) if option == opt::EXPORT_NAME => {
                return Err(NegotiationError::ExportNameRefused(e.to_string()));
            }
            Err(e) => {
                reply_error(&mut out, option, e.reply_type(), &e.to_string());
                flush(w, &mut out).await?;
                continue;
            }
        };

        match parsed {
            ClientOption::ExportName(name) => {
                server
                    .wait_for_export(&name, &mut state.expect_deadline)
                    .await;
                if refusal(server, &state, &name).await.is_some() {
                    return Err(NegotiationError::ExportNameRefused(name));
                }
                let Some((name, export)) = server.lookup(&name) else {
                    return Err(NegotiationError::ExportNameRefused(name));
                };
                let negotiated = negotiated(&*export, state.structured);
                hs::encode_export_name_reply(
                    &mut out,
                    negotiated.size,
                    negotiated.flags,
                    no_zeroes,
                );
                flush(w, &mut out).await?;
                let export = server.view(state.peer_certificate.as_ref(), &name, export);
                return Ok(Some(state.into_session(name, export, negotiated)));
            }
            ClientOption::Abort => {
                encode_option_reply(&mut out, option, rep::ACK, &[]);
                // The client may already have closed; that is fine.
                let _ = flush(w, &mut out).await;
                return Ok(None);
            }
            ClientOption::List => {
                let peer = state.peer_certificate.as_ref();
                let all: Vec<_> = server
                    .exports_ref()
                    .iter()
                    .map(|(n, e)| (n.clone(), e.capabilities().description.unwrap_or_default()))
                    .collect();
                let mut exports = Vec::with_capacity(all.len());
                for (name, description) in all {
                    if server.check_access(peer, &name).await.is_ok() {
                        exports.push((name, description));
                    }
                }
                for (name, description) in exports {
                    let data = hs::encode_rep_server(&name, &description);
                    encode_option_reply(&mut out, option, rep::SERVER, &data);
                }
                encode_option_reply(&mut out, option, rep::ACK, &[]);
            }
            ClientOption::StartTls if state.tls => {
                reply_error(&mut out, option, rep::ERR_INVALID, "TLS is already in use");
            }
            ClientOption::StartTls if let Some(tls) = &server.config.tls => {
                encode_option_reply(&mut out, option, rep::ACK, &[]);
                flush(w, &mut out).await?;
                let peer = crate::tls::accept(tls, r, w)
                    .await
                    .map_err(NegotiationError::Tls)?;
                // Nothing negotiated before TLS counts after it.
                state = State {
                    tls: true,
                    peer_certificate: peer,
                    ..State::default()
                };
                continue;
            }
            ClientOption::StartTls => {
                reply_error(
                    &mut out,
                    option,
                    rep::ERR_POLICY,
                    "TLS is not configured on this server",
                );
            }
            ClientOption::StructuredReply => {
                if state.structured {
                    reply_error(
                        &mut out,
                        option,
                        rep::ERR_INVALID,
                        "structured replies already negotiated",
                    );
                } else {
                    state.structured = true;
                    encode_option_reply(&mut out, option, rep::ACK, &[]);
                }
            }
            ClientOption::ListMetaContext(m) | ClientOption::SetMetaContext(m) => {
                server
                    .wait_for_export(&m.name, &mut state.expect_deadline)
                    .await;
                let set = option == opt::SET_META_CONTEXT;
                if let Some(msg) = refusal(server, &state, &m.name).await {
                    if set {
                        state.meta = None;
                    }
                    reply_error(&mut out, option, rep::ERR_POLICY, &msg);
                } else {
                    meta_context(server, &mut state, &mut out, option, m, set);
                }
            }
            ClientOption::Info(req) | ClientOption::Go(req) => {
                server
                    .wait_for_export(&req.name, &mut state.expect_deadline)
                    .await;
                let go = option == opt::GO;
                if let Some(msg) = refusal(server, &state, &req.name).await {
                    reply_error(&mut out, option, rep::ERR_POLICY, &msg);
                } else if let Some((name, export)) =
                    info_or_go(server, &state, &mut out, option, &req)
                    && go
                {
                    flush(w, &mut out).await?;
                    let negotiated = negotiated(&*export, state.structured);
                    let export = server.view(state.peer_certificate.as_ref(), &name, export);
                    return Ok(Some(state.into_session(name, export, negotiated)));
                }
            }
            ClientOption::Unknown(code) => {
                let msg = format!("option {code} is not supported");
                reply_error(&mut out, option, rep::ERR_UNSUP, &msg);
            }
        }
        flush(w, &mut out).await?;
    }
}

/// Why this client may not use export `name` (resolved as [`Server::lookup`]
/// does), or `None` when it may.
async fn refusal(server: &Server, state: &State, name: &str) -> Option<String> {
    let canonical = server
        .lookup(name)
        .map_or_else(|| name.to_owned(), |(n, _)| n);
    server
        .check_access(state.peer_certificate.as_ref(), &canonical)
        .await
        .err()
        .map(|why| format!("export {canonical:?} is not open to this client: {why}"))
}

/// Negotiation state that later options depend on.
#[derive(Default)]
struct State {
    /// TLS is in use.
    tls: bool,
    /// The client's certificate, when it sent one over TLS.
    peer_certificate: Option<CertificateDer<'static>>,
    structured: bool,
    /// The export metadata contexts were selected for, and those contexts.
    meta: Option<(String, Vec<MetaContext>)>,
    /// The last SET_META_CONTEXT asked for the server's tag context.
    tagged: bool,
    /// When waiting for expected exports ends for this connection (set at
    /// its first wait: one wait per handshake, however many options).
    expect_deadline: Option<tokio::time::Instant>,
}

impl State {
    fn into_session(
        self,
        name: String,
        export: Arc<dyn Export>,
        mut negotiated: Negotiated,
    ) -> Session {
        // Contexts count only if selected for the export finally chosen.
        let contexts = match self.meta {
            Some((for_export, contexts)) if self.structured && for_export == name => contexts,
            _ => Vec::new(),
        };
        negotiated.meta_contexts = !contexts.is_empty();
        Session {
            name,
            export,
            negotiated,
            contexts,
            tagged: self.tagged,
        }
    }
}

/// The transmission flags and limits of an export for this connection.
fn negotiated(export: &dyn Export, structured: bool) -> Negotiated {
    let caps = export.capabilities();
    let mut flags = transmission_flags::HAS_FLAGS | transmission_flags::SEND_CACHE;
    if caps.read_only {
        flags |= transmission_flags::READ_ONLY;
    }
    if caps.flush {
        flags |= transmission_flags::SEND_FLUSH | transmission_flags::SEND_FUA;
    }
    if caps.trim && !caps.read_only {
        flags |= transmission_flags::SEND_TRIM;
    }
    if caps.write_zeroes && !caps.read_only {
        flags |= transmission_flags::SEND_WRITE_ZEROES;
    }
    if caps.multi_conn {
        flags |= transmission_flags::CAN_MULTI_CONN;
    }
    if structured {
        flags |= transmission_flags::SEND_DF;
    }
    Negotiated {
        size: export.size(),
        flags,
        block_sizes: caps.block_sizes,
        structured,
        meta_contexts: false,
    }
}

/// Answers `NBD_OPT_INFO` or `NBD_OPT_GO`; returns the export on success.
fn info_or_go(
    server: &Server,
    state: &State,
    out: &mut BytesMut,
    option: u32,
    req: &GoRequest,
) -> Option<(String, Arc<dyn Export>)> {
    let Some((name, export)) = server.lookup(&req.name) else {
        let msg = format!("no export named {:?}", req.name);
        reply_error(out, option, rep::ERR_UNKNOWN, &msg);
        return None;
    };
    let n = negotiated(&*export, state.structured);
    let caps = export.capabilities();
    let mut infos = vec![Info::Export {
        size: n.size,
        flags: n.flags,
    }];
    // Block sizes are always sent: they cost nothing and tell the client the limits.
    infos.push(Info::BlockSize(caps.block_sizes));
    if req.requests.contains(&info::NAME) || name != req.name {
        infos.push(Info::Name(name.clone()));
    }
    if req.requests.contains(&info::DESCRIPTION)
        && let Some(d) = caps.description
    {
        infos.push(Info::Description(d));
    }
    for i in infos {
        encode_option_reply(out, option, rep::INFO, &i.encode());
    }
    encode_option_reply(out, option, rep::ACK, &[]);
    Some((name, export))
}

/// Answers `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
fn meta_context(
    server: &Server,
    state: &mut State,
    out: &mut BytesMut,
    option: u32,
    m: MetaRequest,
    set: bool,
) {
    if set {
        // SET replaces the selection even when it fails.
        state.meta = None;
        state.tagged = server
            .config
            .tag_context
            .as_ref()
            .is_some_and(|t| m.queries.iter().any(|q| q == t));
    }
    if !state.structured {
        reply_error(
            out,
            option,
            rep::ERR_INVALID,
            "negotiate structured replies first",
        );
        return;
    }
    let Some((canonical, export)) = server.lookup(&m.name) else {
        let msg = format!("no export named {:?}", m.name);
        reply_error(out, option, rep::ERR_UNKNOWN, &msg);
        return;
    };
    let own = export
        .meta_contexts()
        .into_iter()
        .zip(BASE_ALLOCATION_ID + 1..);
    let all = std::iter::once((BASE_ALLOCATION.to_owned(), BASE_ALLOCATION_ID)).chain(own);
    // SET takes full names; LIST also takes `namespace:` for all of one
    // namespace, and no query at all for every context.
    let matches =
        |q: &str, name: &str| q == name || (!set && q.ends_with(':') && name.starts_with(q));
    let chosen: Vec<MetaContext> = all
        .filter(|(name, _)| {
            (!set && m.queries.is_empty()) || m.queries.iter().any(|q| matches(q, name))
        })
        .map(|(name, id)| (id, name))
        .collect();
    for (id, name) in &chosen {
        let id = if set { *id } else { 0 };
        let data = hs::encode_rep_meta_context(id, name);
        encode_option_reply(out, option, rep::META_CONTEXT, &data);
    }
    if set && !chosen.is_empty() {
        state.meta = Some((canonical, chosen));
    }
    encode_option_reply(out, option, rep::ACK, &[]);
}

fn reply_error(out: &mut BytesMut, option: u32, reply_type: u32, message: &str) {
    encode_option_reply(out, option, reply_type, message.as_bytes());
}

async fn flush(w: &mut BoxWrite, out: &mut BytesMut) -> std::io::Result<()> {
    w.write_all(out).await?;
    out.clear();
    w.flush().await
}

async fn skip(r: &mut BoxRead, mut n: u32) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    while n > 0 {
        let take = n.min(64 * 1024);
        let k = usize::try_from(take).unwrap_or(0);
        r.read_exact(&mut buf[..k]).await?;
        n -= take;
    }
    Ok(())
}
