//! The fuzz targets' bodies, as plain functions: the libFuzzer binaries in
//! `fuzz_targets/` call them (`fuzz/run.sh TARGET SECONDS`), and
//! `tests/regressions.rs` runs every saved input of `regressions/TARGET/`
//! through them in the workspace's tests, so a crash once found stays fixed.
//!
//! | target | what it feeds |
//! | --- | --- |
//! | `handshake` | server-side handshake decoders: client flags, option headers, every option parser |
//! | `request` | the request decoder and validator (never accepts a request outside the export) |
//! | `reply` | client-side reply decoders |
//! | `checked` | the checked-file reader (manifests and any checked file) |
//! | `trace` | the boot-trace parser (text and JSON) |
//! | `connection` | a whole live `Server` connection on an in-memory stream, its replies parsed back |

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use virtman_nbd::proto::handshake::{self as hs, OPTION_HEADER_LEN};
use virtman_nbd::proto::transmission::{self as tm, Negotiated, REQUEST_LEN};
use virtman_nbd::proto::{BlockSizes, transmission_flags as tf};
use virtman_nbd::{Export, MemExport, Server, ServerConfig};

/// One target's body.
pub type Target = fn(&[u8]);

/// Every target by name, for the regression test.
pub const TARGETS: [(&str, Target); 6] = [
    ("handshake", handshake),
    ("request", request),
    ("reply", reply),
    ("checked", checked),
    ("trace", trace),
    ("connection", connection),
];

/// Server-side handshake decoders.
pub fn handshake(data: &[u8]) {
    if data.len() < 4 + OPTION_HEADER_LEN {
        return;
    }
    let flags: [u8; 4] = data[..4].try_into().unwrap_or_default();
    let _ = hs::decode_client_flags(flags, 3);
    let mut header = [0u8; OPTION_HEADER_LEN];
    header.copy_from_slice(&data[4..4 + OPTION_HEADER_LEN]);
    let body = &data[4 + OPTION_HEADER_LEN..];
    if let Ok(h) = hs::decode_option_header(&header) {
        // Parse the body as the announced option, and as every known option.
        let _ = hs::parse_option(h.option, body);
        for code in 1..=11 {
            let _ = hs::parse_option(code, body);
        }
    }
    let _ = hs::Info::decode(body);
    let _ = hs::decode_rep_server(body);
    let _ = hs::decode_rep_meta_context(body);
}

/// The request decoder and validator: validation never accepts a request
/// outside the export.
pub fn request(data: &[u8]) {
    if data.len() < REQUEST_LEN + 10 {
        return;
    }
    let mut header = [0u8; REQUEST_LEN];
    header.copy_from_slice(&data[..REQUEST_LEN]);
    let rest = &data[REQUEST_LEN..];
    let mut size = [0u8; 8];
    size.copy_from_slice(&rest[..8]);
    let size = u64::from_be_bytes(size) >> (rest[8] % 64);
    let flags = u16::from_be_bytes([rest[9], rest.get(10).copied().unwrap_or(0)]) | tf::HAS_FLAGS;
    let n = Negotiated {
        size,
        flags,
        block_sizes: BlockSizes::DEFAULT,
        structured: rest[8] & 1 == 1,
        meta_contexts: rest[8] & 2 == 2,
    };
    if let Ok(req) = tm::decode_request(&header)
        && tm::validate(&req, &n).is_ok()
    {
        let end = req.offset.checked_add(u64::from(req.length));
        assert!(
            end.is_some_and(|e| e <= size),
            "accepted a request outside the export"
        );
    }
}

/// Client-side reply decoders.
pub fn reply(data: &[u8]) {
    if data.len() < 4 {
        return;
    }
    let magic = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
    let _ = tm::decode_reply_header(magic, &data[4..]);
    let _ = tm::decode_block_status(&data[4..]);
    let _ = tm::decode_error(&data[4..]);
    let _ = tm::decode_offset_hole(&data[4..]);
}

/// The checked-file reader, as a manifest and as a checked file of a small
/// format; a manifest that decodes encodes back to the same bytes.
pub fn checked(data: &[u8]) {
    let path = Path::new("fuzz");
    if let Ok(m) = virtman_image::Manifest::decode(path, data) {
        assert_eq!(m.encode(), data, "a decoded manifest encodes differently");
    }
    let small = virtman_image::checked::Format {
        magic: *b"VMFUZZ01",
        version: 1,
        max_body: 4096,
        what: "fuzz",
    };
    if let Ok(body) = virtman_image::checked::decode(&small, path, data) {
        assert_eq!(virtman_image::checked::encode(&small, &body), data);
    }
}

/// The boot-trace parser (text or JSON); a trace that parses survives its
/// own text form.
pub fn trace(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(t) = virtman_sim::Trace::parse(text) {
        let again = virtman_sim::Trace::parse(&t.to_text()).expect("a trace's text parses");
        assert_eq!(again.reads, t.reads);
    }
}

struct Live {
    runtime: tokio::runtime::Runtime,
    server: Arc<Server>,
}

fn live() -> &'static Live {
    static LIVE: OnceLock<Live> = OnceLock::new();
    LIVE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let server = Server::new(ServerConfig {
            handshake_timeout: Duration::from_secs(1),
            ..ServerConfig::default()
        });
        let disk: Arc<dyn Export> = Arc::new(MemExport::new(vec![7u8; 64 << 10]));
        server.add_export("disk", disk);
        Live { runtime, server }
    })
}

/// A whole server connection: `data` is everything the client sends; the
/// server's answer is read to its end and its greeting checked.
pub fn connection(data: &[u8]) {
    let live = live();
    let server = Arc::clone(&live.server);
    live.runtime.block_on(async move {
        let (client, served) = tokio::io::duplex(1 << 20);
        let (r, w) = tokio::io::split(served);
        let stop = CancellationToken::new();
        let task = tokio::spawn(server.connection(Box::new(r), Box::new(w), "fuzz", stop.clone()));
        let (mut cr, mut cw) = tokio::io::split(client);
        let send = async {
            let _ = cw.write_all(data).await;
            let _ = cw.shutdown().await;
        };
        let mut out = Vec::new();
        let recv = cr.read_to_end(&mut out);
        let (_, got) = tokio::join!(send, recv);
        // Whatever the client sent, the server ends the connection.
        let ended = tokio::time::timeout(Duration::from_secs(5), task).await;
        assert!(ended.is_ok(), "the server did not end the connection");
        if got.is_ok() && out.len() >= 18 {
            assert_eq!(&out[..8], b"NBDMAGIC", "the greeting");
        }
        stop.cancel();
    });
}
