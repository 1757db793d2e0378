//! Bad input against a real server: each case gets the reply or errno the
//! specification prescribes, or a closed connection, and never harms the
//! server or other connections.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{Raw, TestServer, pattern};
use virtman_nbd::proto::handshake::GoRequest;
use virtman_nbd::proto::transmission::Command;
use virtman_nbd::proto::{BlockSizes, Errno, cmd_flags, opt, rep, reply};
use virtman_nbd::{Client, ClientConfig, Export, MemExport, ServerConfig};

const SIZE: usize = 1 << 20;

async fn server() -> TestServer {
    let rw: Arc<dyn Export> = Arc::new(MemExport::new(pattern(SIZE, 1)));
    let ro: Arc<dyn Export> = Arc::new(MemExport::new(pattern(SIZE, 2)).read_only());
    let aligned: Arc<dyn Export> = Arc::new(MemExport::new(pattern(SIZE, 3)).with_block_sizes(
        BlockSizes {
            minimum: 512,
            preferred: 4096,
            maximum: 1 << 20,
        },
    ));
    TestServer::start(
        ServerConfig::default(),
        vec![("rw", rw), ("ro", ro), ("aligned", aligned)],
    )
    .await
}

/// The server still serves a well-behaved client correctly.
async fn still_serves(s: &TestServer) {
    let c = Client::connect(
        &s.endpoint(),
        &ClientConfig {
            export: "rw".into(),
            ..ClientConfig::default()
        },
    )
    .await
    .unwrap();
    let got = c.read(4096, 8192).await.unwrap();
    assert_eq!(&got[..], &pattern(SIZE, 1)[4096..4096 + 8192]);
}

#[tokio::test]
async fn bad_option_magic_closes() {
    let s = server().await;
    let mut r = Raw::start(s.addr).await;
    r.send(&[0x42; 16]).await;
    assert!(r.closed().await);
    still_serves(&s).await;
    s.stop().await;
}

#[tokio::test]
async fn unknown_client_flags_close() {
    let s = server().await;
    let mut r = Raw::connect(s.addr).await;
    r.send(&0x8000_0001u32.to_be_bytes()).await;
    assert!(r.closed().await);
    s.stop().await;
}

#[tokio::test]
async fn unknown_option_is_unsupported_and_negotiation_goes_on() {
    let s = server().await;
    let mut r = Raw::start(s.addr).await;
    r.option(4242, b"whatever").await;
    let (o, t, _) = r.reply().await;
    assert_eq!((o, t), (4242, rep::ERR_UNSUP));
    // Extended headers are not supported either.
    r.option(opt::EXTENDED_HEADERS, &[]).await;
    assert_eq!(r.reply().await.1, rep::ERR_UNSUP);
    r.go("rw", true).await;
    s.stop().await;
}

#[tokio::test]
async fn oversized_option_data_is_too_big_or_closed() {
    let s = server().await;
    let mut r = Raw::start(s.addr).await;
    r.option(opt::LIST, &vec![0u8; 100 * 1024]).await;
    assert_eq!(r.reply().await.1, rep::ERR_TOO_BIG);
    r.option(opt::LIST, &[]).await;
    let list = r.replies().await;
    assert_eq!(list.iter().filter(|x| x.1 == rep::SERVER).count(), 3);
    // An option announcing gigabytes is not read at all.
    let mut h = Vec::new();
    h.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
    h.extend_from_slice(&opt::GO.to_be_bytes());
    h.extend_from_slice(&0xffff_fff0u32.to_be_bytes());
    r.send(&h).await;
    assert!(r.closed().await);
    s.stop().await;
}

#[tokio::test]
async fn malformed_options_are_invalid() {
    let s = server().await;
    let mut r = Raw::start(s.addr).await;
    r.option(opt::LIST, b"x").await;
    assert_eq!(r.reply().await.1, rep::ERR_INVALID);
    r.option(opt::GO, &[0, 0, 0, 9, b'r']).await; // name length beyond data
    assert_eq!(r.reply().await.1, rep::ERR_INVALID);
    // Meta contexts need structured replies first.
    let m = virtman_nbd::proto::handshake::MetaRequest {
        name: "rw".into(),
        queries: vec!["base:allocation".into()],
    };
    r.option(opt::SET_META_CONTEXT, &m.encode()).await;
    assert_eq!(r.reply().await.1, rep::ERR_INVALID);
    let g = GoRequest {
        name: "nope".into(),
        requests: vec![],
    };
    r.option(opt::GO, &g.encode()).await;
    let (_, t, msg) = r.reply().await;
    assert_eq!(t, rep::ERR_UNKNOWN);
    assert!(String::from_utf8_lossy(&msg).contains("nope"));
    r.option(opt::STARTTLS, &[]).await;
    assert_eq!(r.reply().await.1, rep::ERR_POLICY);
    r.option(opt::ABORT, &[]).await;
    assert_eq!(r.reply().await.1, rep::ACK);
    assert!(r.closed().await);
    s.stop().await;
}

#[tokio::test]
async fn export_name_of_unknown_export_closes() {
    let s = server().await;
    let mut r = Raw::start(s.addr).await;
    r.option(opt::EXPORT_NAME, b"nope").await;
    assert!(r.closed().await);
    s.stop().await;
}

#[tokio::test]
async fn out_of_range_and_misaligned_requests_get_exact_errnos() {
    let s = server().await;
    let size = SIZE as u64;
    let mut r = Raw::start(s.addr).await;
    r.go("rw", true).await;
    let cases: Vec<(Command, u16, u64, u32, Errno)> = vec![
        (Command::Read, 0, size - 10, 20, Errno::Inval),
        (Command::Trim, 0, size, 1, Errno::Inval),
        (Command::WriteZeroes, 0, size - 1, 2, Errno::NoSpc),
        (Command::Cache, 0, u64::MAX - 1, 4, Errno::Inval),
        (Command::Read, cmd_flags::REQ_ONE, 0, 1, Errno::Inval),
        (Command::Flush, 0, 4096, 0, Errno::Inval),
    ];
    for (i, (cmd, flags, off, len, errno)) in cases.iter().enumerate() {
        r.request(cmd.code(), *flags, i as u64, *off, *len).await;
        let (cookie, e) = r.status().await;
        assert_eq!((cookie, e), (i as u64, errno.code()), "{cmd:?} {off} {len}");
    }
    // An unknown command type.
    r.request(77, 0, 100, 0, 0).await;
    assert_eq!(r.status().await, (100, Errno::Inval.code()));
    // A write past the end: its payload is consumed and ENOSPC returned.
    r.request(Command::Write.code(), 0, 101, size - 2, 4).await;
    r.send(&[1, 2, 3, 4]).await;
    assert_eq!(r.status().await, (101, Errno::NoSpc.code()));
    // The connection still works.
    r.request(Command::Flush.code(), 0, 102, 0, 0).await;
    assert_eq!(r.status().await, (102, 0));

    let mut a = Raw::start(s.addr).await;
    a.go("aligned", true).await;
    a.request(Command::Read.code(), 0, 1, 100, 512).await;
    let (_, ty, cookie, p) = a.chunk().await;
    assert_eq!((ty, cookie), (reply::TYPE_ERROR, 1));
    assert_eq!(
        u32::from_be_bytes(p[..4].try_into().unwrap()),
        Errno::Inval.code()
    );
    a.request(Command::Write.code(), 0, 2, 512, 100).await;
    a.send(&[0u8; 100]).await;
    assert_eq!(a.status().await, (2, Errno::Inval.code()));
    s.stop().await;
}

#[tokio::test]
async fn read_only_export_refuses_writes_with_eperm() {
    let s = server().await;
    let mut r = Raw::start(s.addr).await;
    r.go("ro", true).await;
    r.request(Command::Write.code(), 0, 1, 0, 4).await;
    r.send(&[9; 4]).await;
    assert_eq!(r.status().await, (1, Errno::Perm.code()));
    r.request(Command::Trim.code(), 0, 2, 0, 4096).await;
    assert_eq!(
        r.status().await.1,
        Errno::Inval.code(),
        "TRIM is not advertised"
    );
    // Simple replies (no structured negotiation) carry the errno too.
    let mut plain = Raw::start(s.addr).await;
    plain.go("ro", false).await;
    plain.request(Command::Write.code(), 0, 3, 0, 4).await;
    plain.send(&[9; 4]).await;
    assert_eq!(plain.status().await, (3, Errno::Perm.code()));
    s.stop().await;
}

#[tokio::test]
async fn bad_request_magic_and_huge_payload_close_the_connection() {
    let s = server().await;
    let mut r = Raw::start(s.addr).await;
    r.go("rw", true).await;
    r.send(&[0xAA; 28]).await;
    assert!(r.closed().await);

    let mut w = Raw::start(s.addr).await;
    w.go("rw", true).await;
    // 64 MiB payload announced, more than the 32 MiB maximum: refused, then closed.
    w.request(Command::Write.code(), 0, 5, 0, 64 << 20).await;
    assert_eq!(w.status().await, (5, Errno::Inval.code()));
    assert!(w.closed().await);
    still_serves(&s).await;
    s.stop().await;
}

#[tokio::test]
async fn block_status_without_meta_context_is_einval() {
    let s = server().await;
    let mut r = Raw::start(s.addr).await;
    r.option(opt::STRUCTURED_REPLY, &[]).await;
    assert_eq!(r.reply().await.1, rep::ACK);
    r.go("rw", false).await;
    r.request(Command::BlockStatus.code(), 0, 1, 0, 4096).await;
    assert_eq!(r.status().await, (1, Errno::Inval.code()));
    s.stop().await;
}

#[tokio::test]
async fn client_vanishing_mid_request_harms_nobody() {
    let s = server().await;
    for _ in 0..20 {
        let mut r = Raw::start(s.addr).await;
        r.go("rw", true).await;
        r.request(Command::Write.code(), 0, 1, 0, 1 << 20).await;
        r.send(&[7u8; 1000]).await;
        drop(r);
    }
    still_serves(&s).await;
    // Nothing of the partial writes landed.
    let c = Client::connect(
        &s.endpoint(),
        &ClientConfig {
            export: "rw".into(),
            ..ClientConfig::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        &c.read(0, 4096).await.unwrap()[..],
        &pattern(SIZE, 1)[..4096]
    );
    s.stop().await;
}

#[tokio::test]
async fn a_client_that_never_reads_replies_is_bounded_and_isolated() {
    let big: Arc<dyn Export> = Arc::new(MemExport::new(pattern(8 << 20, 4)));
    let s = TestServer::start(
        ServerConfig {
            connection_budget: 4 << 20,
            ..ServerConfig::default()
        },
        vec![("rw", big)],
    )
    .await;
    let mut slow = Raw::start(s.addr).await;
    slow.go("rw", true).await;
    // 300 MiB of reads requested; the client never reads a byte of them.
    for i in 0..300u64 {
        slow.request(Command::Read.code(), 0, i, (i % 7) << 20, 1 << 20)
            .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Another client is served normally meanwhile.
    let c = Client::connect(
        &s.endpoint(),
        &ClientConfig {
            export: "rw".into(),
            ..ClientConfig::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        &c.read(0, 65536).await.unwrap()[..],
        &pattern(8 << 20, 4)[..65536]
    );
    // The server stopped taking the slow client's requests once its budget and
    // the socket buffers were full: far fewer than 300 were even decoded.
    let taken = s.server.stats().requests.load(Ordering::Relaxed);
    assert!(
        taken < 150,
        "server decoded {taken} requests from a stalled client"
    );
    drop(slow);
    s.stop().await;
}

#[tokio::test]
async fn shutdown_ends_idle_and_negotiating_connections() {
    let s = server().await;
    let mut idle = Raw::start(s.addr).await;
    idle.go("rw", true).await;
    let _negotiating = Raw::start(s.addr).await;
    s.stop().await;
    assert!(idle.closed().await);
}
