//! `Server::disconnect_export`: the connections using one export end (their
//! handles of the export dropped), those using another go on.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Raw, TestServer, pattern};
use virtman_nbd::proto::transmission::Command;
use virtman_nbd::{Export, MemExport, ServerConfig};

#[tokio::test]
async fn disconnecting_an_export_ends_its_connections_only() {
    let a: Arc<dyn Export> = Arc::new(MemExport::new(pattern(64 * 1024, 1)));
    let b: Arc<dyn Export> = Arc::new(MemExport::new(pattern(64 * 1024, 2)));
    let s = TestServer::start(
        ServerConfig::default(),
        vec![("a", Arc::clone(&a)), ("b", Arc::clone(&b))],
    )
    .await;
    let mut on_a = Raw::start(s.addr).await;
    on_a.go("a", false).await;
    let mut on_b = Raw::start(s.addr).await;
    on_b.go("b", false).await;
    // The server and the connection each hold `a`.
    assert!(Arc::strong_count(&a) > 2);

    s.server.remove_export("a");
    s.server.disconnect_export("a");
    assert!(on_a.closed().await, "the connection to a was not closed");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while Arc::strong_count(&a) > 1 {
        assert!(tokio::time::Instant::now() < deadline, "a is still held");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // b's connection still serves.
    on_b.request(Command::Flush.code(), 0, 7, 0, 0).await;
    assert_eq!(on_b.status().await, (7, 0));
    // The export back, a new connection to it is not ended by the old token.
    s.server.add_export("a", Arc::clone(&a));
    let mut again = Raw::start(s.addr).await;
    again.go("a", false).await;
    again.request(Command::Flush.code(), 0, 8, 0, 0).await;
    assert_eq!(again.status().await, (8, 0));
    s.stop().await;
}
