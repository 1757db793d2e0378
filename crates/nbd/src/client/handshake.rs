//! The client side of fixed newstyle negotiation.
//!
//! Each connection negotiates structured replies, `base:allocation` and
//! `NBD_OPT_GO` (falling back to `NBD_OPT_EXPORT_NAME` for old servers), and
//! ends with what the server said about the export ([`ExportInfo`]).
//! [`list_exports`] asks a server for its exports (`NBD_OPT_LIST`) instead.
//! Parsing is in [`crate::proto::handshake`]; this file only chooses the
//! options and moves bytes. With TLS configured, `NBD_OPT_STARTTLS` comes
//! first and any answer but `NBD_REP_ACK` ends the connection: no plaintext
//! fallback.

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::config::Endpoint;
use super::error::ClientError;
use super::transport::dial;
use crate::io::{BoxRead, BoxWrite};
use crate::proto::handshake::{
    self as hs, GREETING_LEN, GoRequest, Info, MetaRequest, OPTION_REPLY_HEADER_LEN,
};
use crate::proto::{
    BASE_ALLOCATION, BlockSizes, client_flags, handshake_flags, info, opt, rep, transmission_flags,
};
use crate::tls::ClientTls;

/// Largest option reply data accepted during the handshake.
const MAX_OPTION_REPLY: u32 = 1024 * 1024;

/// What the server said about the export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// Size constraints (the defaults if the server sent none).
    pub block_sizes: BlockSizes,
    /// Whether structured replies are in use.
    pub structured: bool,
    /// The id of `base:allocation`, if the server selected it.
    pub base_allocation: Option<u32>,
}

impl ExportInfo {
    /// Whether the export refuses writes.
    pub fn read_only(&self) -> bool {
        self.flags & transmission_flags::READ_ONLY != 0
    }

    /// Whether several connections may be used.
    pub fn multi_conn(&self) -> bool {
        self.flags & transmission_flags::CAN_MULTI_CONN != 0
    }
}

/// Client side of the handshake; errors are human-readable reasons.
pub(super) async fn negotiate(
    r: &mut BoxRead,
    w: &mut BoxWrite,
    export: &str,
    tls: Option<(&ClientTls, &Endpoint)>,
    extra_contexts: &[String],
) -> Result<ExportInfo, String> {
    let no_zeroes = greet(r, w, tls).await?;
    let structured = match option(r, w, opt::STRUCTURED_REPLY, &[]).await?.last() {
        Some((t, _)) => *t == rep::ACK,
        None => false,
    };
    let mut base_allocation = None;
    if structured {
        let m = MetaRequest {
            name: export.to_owned(),
            queries: std::iter::once(BASE_ALLOCATION.to_owned())
                .chain(extra_contexts.iter().cloned())
                .collect(),
        };
        let replies = option(r, w, opt::SET_META_CONTEXT, &m.encode()).await?;
        if replies.last().is_some_and(|(t, _)| *t == rep::ACK) {
            for (t, data) in &replies {
                if *t == rep::META_CONTEXT
                    && let Ok((id, name)) = hs::decode_rep_meta_context(data)
                    && name == BASE_ALLOCATION
                {
                    base_allocation = Some(id);
                }
            }
        }
    }

    let go = GoRequest {
        name: export.to_owned(),
        requests: vec![info::BLOCK_SIZE],
    };
    let replies = option(r, w, opt::GO, &go.encode()).await?;
    let (last, last_data) = replies.last().cloned().unwrap_or((0, Vec::new()));
    if last == rep::ERR_UNSUP {
        return export_name(r, w, export, no_zeroes, structured, base_allocation).await;
    }
    if last != rep::ACK {
        return Err(format!(
            "server refused the export: {} {}",
            rep_name(last),
            String::from_utf8_lossy(&last_data)
        ));
    }
    let mut size_flags = None;
    let mut block_sizes = BlockSizes::DEFAULT;
    for (t, data) in &replies {
        if *t != rep::INFO {
            continue;
        }
        match Info::decode(data).map_err(|e| format!("bad NBD_REP_INFO: {e}"))? {
            Info::Export { size, flags } => size_flags = Some((size, flags)),
            Info::BlockSize(b) => block_sizes = b,
            _ => {}
        }
    }
    let (size, flags) = size_flags.ok_or("server acknowledged GO without NBD_INFO_EXPORT")?;
    Ok(ExportInfo {
        size,
        flags,
        block_sizes,
        structured,
        base_allocation,
    })
}

/// Falls back to `NBD_OPT_EXPORT_NAME` for servers without `NBD_OPT_GO`.
async fn export_name(
    r: &mut BoxRead,
    w: &mut BoxWrite,
    export: &str,
    no_zeroes: bool,
    structured: bool,
    base_allocation: Option<u32>,
) -> Result<ExportInfo, String> {
    let mut b = BytesMut::new();
    hs::encode_option(&mut b, opt::EXPORT_NAME, export.as_bytes());
    w.write_all(&b).await.map_err(|e| e.to_string())?;
    w.flush().await.map_err(|e| e.to_string())?;
    let mut reply = [0u8; 10];
    r.read_exact(&mut reply)
        .await
        .map_err(|e| format!("server closed after NBD_OPT_EXPORT_NAME (no such export?): {e}"))?;
    if !no_zeroes {
        let mut z = [0u8; 124];
        r.read_exact(&mut z).await.map_err(|e| e.to_string())?;
    }
    let mut size = [0u8; 8];
    size.copy_from_slice(&reply[..8]);
    Ok(ExportInfo {
        size: u64::from_be_bytes(size),
        flags: u16::from_be_bytes([reply[8], reply[9]]),
        block_sizes: BlockSizes::DEFAULT,
        structured,
        base_allocation,
    })
}

/// Reads the greeting, answers it, and upgrades to TLS when configured;
/// returns whether the server omits the zeroes after `NBD_OPT_EXPORT_NAME`.
async fn greet(
    r: &mut BoxRead,
    w: &mut BoxWrite,
    tls: Option<(&ClientTls, &Endpoint)>,
) -> Result<bool, String> {
    let mut g = [0u8; GREETING_LEN];
    r.read_exact(&mut g)
        .await
        .map_err(|e| format!("reading greeting: {e}"))?;
    let hflags = hs::decode_greeting(&g).map_err(|e| e.to_string())?;
    let mut cflags = client_flags::FIXED_NEWSTYLE;
    let no_zeroes = hflags & handshake_flags::NO_ZEROES != 0;
    if no_zeroes {
        cflags |= client_flags::NO_ZEROES;
    }
    w.write_all(&cflags.to_be_bytes())
        .await
        .map_err(|e| e.to_string())?;
    if let Some((tls, endpoint)) = tls {
        start_tls(r, w, tls, endpoint).await?;
    }
    Ok(no_zeroes)
}

/// Upgrades the connection with `NBD_OPT_STARTTLS`, replacing `r` and `w`
/// by their encrypted halves.
async fn start_tls(
    r: &mut BoxRead,
    w: &mut BoxWrite,
    tls: &ClientTls,
    endpoint: &Endpoint,
) -> Result<(), String> {
    let name = tls.name_for(endpoint)?;
    let replies = option(r, w, opt::STARTTLS, &[]).await?;
    let (last, data) = replies.last().cloned().unwrap_or((0, Vec::new()));
    if last != rep::ACK {
        return Err(format!(
            "server refused TLS ({} {}); not continuing without it",
            rep_name(last),
            String::from_utf8_lossy(&data)
        ));
    }
    crate::tls::connect(tls, name, r, w)
        .await
        .map_err(|e| format!("TLS handshake: {e}"))
}

/// Sends one option and collects its replies up to the final one.
async fn option(
    r: &mut BoxRead,
    w: &mut BoxWrite,
    code: u32,
    data: &[u8],
) -> Result<Vec<(u32, Vec<u8>)>, String> {
    let mut b = BytesMut::new();
    hs::encode_option(&mut b, code, data);
    w.write_all(&b).await.map_err(|e| e.to_string())?;
    w.flush().await.map_err(|e| e.to_string())?;
    let mut replies = Vec::new();
    loop {
        let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
        r.read_exact(&mut h)
            .await
            .map_err(|e| format!("reading reply to option {code}: {e}"))?;
        let h = hs::decode_option_reply_header(&h).map_err(|e| e.to_string())?;
        if h.option != code {
            return Err(format!(
                "reply for option {} while waiting for {code}",
                h.option
            ));
        }
        if h.length > MAX_OPTION_REPLY {
            return Err(format!("option reply of {} bytes is too long", h.length));
        }
        let mut data = vec![0u8; usize::try_from(h.length).unwrap_or(0)];
        r.read_exact(&mut data).await.map_err(|e| e.to_string())?;
        let t = h.reply_type;
        replies.push((t, data));
        let more = matches!(t, rep::SERVER | rep::INFO | rep::META_CONTEXT);
        if !more {
            return Ok(replies);
        }
    }
}

fn rep_name(t: u32) -> String {
    match t {
        rep::ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN".into(),
        rep::ERR_POLICY => "NBD_REP_ERR_POLICY".into(),
        rep::ERR_INVALID => "NBD_REP_ERR_INVALID".into(),
        rep::ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD".into(),
        rep::ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN".into(),
        rep::ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD".into(),
        rep::ERR_UNSUP => "NBD_REP_ERR_UNSUP".into(),
        other => format!("reply type {other:#x}"),
    }
}

/// Lists the exports of a server (`NBD_OPT_LIST`) as (name, description)
/// pairs, over TLS when `tls` is given.
pub async fn list_exports(
    endpoint: &Endpoint,
    tls: Option<&ClientTls>,
) -> Result<Vec<(String, String)>, ClientError> {
    let server = endpoint.to_string();
    let herr = |reason: String| ClientError::Handshake {
        server: server.clone(),
        export: String::new(),
        reason,
    };
    let (mut r, mut w) = dial(endpoint)
        .await
        .map_err(|source| ClientError::Connect {
            server: server.clone(),
            source,
        })?;
    greet(&mut r, &mut w, tls.map(|t| (t, endpoint)))
        .await
        .map_err(herr)?;
    let replies = option(&mut r, &mut w, opt::LIST, &[]).await.map_err(herr)?;
    let mut out = Vec::new();
    for (t, data) in replies {
        match t {
            rep::SERVER => out.push(hs::decode_rep_server(&data).map_err(|e| herr(e.to_string()))?),
            rep::ACK => {}
            other => return Err(herr(format!("list refused: {}", rep_name(other)))),
        }
    }
    // A polite end: NBD_OPT_ABORT, whose reply we do not need.
    let mut b = BytesMut::new();
    hs::encode_option(&mut b, opt::ABORT, &[]);
    let _ = w.write_all(&b).await;
    Ok(out)
}
