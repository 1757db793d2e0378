//! The client's own behaviour: per-request timeouts, errors that name the
//! server, export, offset and length, and a connection that survives both.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use common::{TestServer, pattern};
use virtman_nbd::client::{RequestFailure, list_exports};
use virtman_nbd::proto::Errno;
use virtman_nbd::{
    Capabilities, Client, ClientConfig, Export, ExportError, MemExport, ReadChunk, ServerConfig,
};

/// Reads at offset 0 never complete; everything else reads zeroes.
struct Stuck;

#[async_trait]
impl Export for Stuck {
    fn size(&self) -> u64 {
        1 << 20
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::read_only()
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadChunk>, ExportError> {
        if offset == 0 {
            std::future::pending::<()>().await;
        }
        Ok(vec![ReadChunk::Zero(len)])
    }
}

#[tokio::test]
async fn a_stuck_request_times_out_with_context_and_the_connection_lives_on() {
    let stuck: Arc<dyn Export> = Arc::new(Stuck);
    let config = ServerConfig {
        drain_timeout: Duration::from_millis(100),
        ..ServerConfig::default()
    };
    let s = TestServer::start(config, vec![("stuck", stuck)]).await;
    let c = Client::connect(
        &s.endpoint(),
        &ClientConfig {
            export: "stuck".into(),
            request_timeout: Duration::from_millis(300),
            ..ClientConfig::default()
        },
    )
    .await
    .unwrap();
    let err = c.read(0, 4096).await.unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(
            err,
            virtman_nbd::ClientError::Request {
                failure: RequestFailure::Timeout(_),
                ..
            }
        ),
        "{text}"
    );
    for needle in [
        &s.addr.to_string(),
        "\"stuck\"",
        "offset 0",
        "4096 bytes",
        "read",
    ] {
        assert!(text.contains(needle), "{text:?} lacks {needle:?}");
    }
    // Other requests on the same connection still work, holes and all.
    let got = c.read(65536, 8192).await.unwrap();
    assert!(got.iter().all(|&b| b == 0) && got.len() == 8192);
    s.stop().await;
}

#[tokio::test]
async fn server_errors_carry_errno_and_context() {
    let ro: Arc<dyn Export> = Arc::new(MemExport::new(pattern(1 << 20, 5)).read_only());
    let s = TestServer::start(ServerConfig::default(), vec![("ro", ro)]).await;
    let c = Client::connect(
        &s.endpoint(),
        &ClientConfig {
            export: "ro".into(),
            ..ClientConfig::default()
        },
    )
    .await
    .unwrap();
    assert!(c.info().read_only());
    let err = c
        .write(8192, Bytes::from_static(b"hello"), false)
        .await
        .unwrap_err();
    assert_eq!(err.errno(), Some(Errno::Perm));
    let text = err.to_string();
    assert!(
        text.contains("offset 8192") && text.contains("5 bytes"),
        "{text}"
    );
    let err = c.read((1 << 20) - 10, 20).await.unwrap_err();
    assert_eq!(err.errno(), Some(Errno::Inval));
    s.stop().await;
}

#[tokio::test]
async fn unknown_export_and_dead_server_are_clear_errors() {
    let e: Arc<dyn Export> = Arc::new(MemExport::new(vec![0; 4096]));
    let s = TestServer::start(ServerConfig::default(), vec![("a", e)]).await;
    let err = Client::connect(
        &s.endpoint(),
        &ClientConfig {
            export: "b".into(),
            ..ClientConfig::default()
        },
    )
    .await
    .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("NBD_REP_ERR_UNKNOWN") && text.contains("\"b\""),
        "{text}"
    );
    let list = list_exports(&s.endpoint(), None).await.unwrap();
    assert_eq!(list, vec![("a".to_string(), String::new())]);

    // A connection whose server goes away fails its requests, it does not hang.
    let c = Client::connect(
        &s.endpoint(),
        &ClientConfig {
            export: "a".into(),
            ..ClientConfig::default()
        },
    )
    .await
    .unwrap();
    let endpoint = s.endpoint();
    s.stop().await;
    let err = c.read(0, 512).await.unwrap_err();
    assert!(err.to_string().contains("connection"), "{err}");
    let err = Client::connect(&endpoint, &ClientConfig::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cannot connect"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_waits_for_an_expected_export_and_is_refused_when_it_never_comes() {
    let config = ServerConfig {
        expect_wait: Duration::from_secs(10),
        ..ServerConfig::default()
    };
    let s = TestServer::start(config, vec![]).await;
    let connect = |export: &str| {
        let endpoint = s.endpoint();
        let config = ClientConfig {
            export: export.into(),
            connect_timeout: Duration::from_secs(20),
            ..ClientConfig::default()
        };
        async move { Client::connect(&endpoint, &config).await }
    };
    // Expected, added 300 ms later: the handshake waits and succeeds.
    let guard = s.server.expect_export("img");
    let started = std::time::Instant::now();
    let waiting = tokio::spawn(connect("img"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "answered before the export existed");
    s.server
        .add_export("img", Arc::new(MemExport::new(pattern(8192, 3))));
    let c = waiting.await.unwrap().unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(&c.read(0, 8192).await.unwrap()[..], &pattern(8192, 3)[..]);
    drop(guard);

    // Not expected: refused at once.
    let started = std::time::Instant::now();
    let err = connect("other").await.unwrap_err();
    assert!(err.to_string().contains("NBD_REP_ERR_UNKNOWN"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // Expected but given up (the guard dropped): the waiting client is
    // refused then, not after the whole wait.
    let guard = s.server.expect_export("late");
    let started = std::time::Instant::now();
    let waiting = tokio::spawn(connect("late"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(guard);
    let err = waiting.await.unwrap().unwrap_err();
    assert!(err.to_string().contains("NBD_REP_ERR_UNKNOWN"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    s.stop().await;
}

#[tokio::test]
async fn an_expected_export_that_does_not_come_in_time_is_refused() {
    let config = ServerConfig {
        expect_wait: Duration::from_millis(300),
        ..ServerConfig::default()
    };
    let s = TestServer::start(config, vec![]).await;
    let _guard = s.server.expect_export("img");
    let started = std::time::Instant::now();
    let err = Client::connect(
        &s.endpoint(),
        &ClientConfig {
            export: "img".into(),
            ..ClientConfig::default()
        },
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("NBD_REP_ERR_UNKNOWN"), "{err}");
    // One wait per handshake, not one per option the client sends.
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_millis(600),
        "{waited:?}"
    );
    s.stop().await;
}

/// A client that asks for the server's tag context (whether the export has
/// it or not) is counted apart: what other readers take is told from it.
#[tokio::test]
async fn reads_of_clients_asking_for_the_tag_context_are_counted_apart() {
    use std::sync::atomic::Ordering;
    let data = pattern(1 << 20, 3);
    let export: Arc<dyn Export> = Arc::new(MemExport::new(data.clone()).read_only());
    let config = ServerConfig {
        tag_context: Some("x-test:child".into()),
        ..ServerConfig::default()
    };
    let s = TestServer::start(config, vec![("disk", export)]).await;
    let connect = |contexts: Vec<String>| {
        let endpoint = s.endpoint();
        async move {
            Client::connect(
                &endpoint,
                &ClientConfig {
                    export: "disk".into(),
                    meta_contexts: contexts,
                    ..ClientConfig::default()
                },
            )
            .await
            .unwrap()
        }
    };
    let child = connect(vec!["x-test:child".into()]).await;
    let other = connect(Vec::new()).await;
    assert_eq!(&child.read(0, 65536).await.unwrap()[..], &data[..65536]);
    assert_eq!(
        &other.read(65536, 4096).await.unwrap()[..],
        &data[65536..69632]
    );
    let stats = s.server.stats();
    assert_eq!(stats.bytes_read.load(Ordering::Relaxed), 65536 + 4096);
    assert_eq!(stats.bytes_read_tagged.load(Ordering::Relaxed), 65536);
}
