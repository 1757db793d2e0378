//! Helpers shared by the agent's in-process tests.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use virtman_nbd::{Client, ClientConfig, Endpoint};

/// Polls `f` every 20 ms until it holds; fails the test after 30 s.
pub async fn wait_for<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An NBD client of VM `vm` on the agent's VM socket. Retries for a while:
/// a (re)started agent binds its socket and restores its VMs in `run`.
pub async fn vm_client(socket: &Path, vm: &str) -> Client {
    let cfg = ClientConfig {
        export: vm.into(),
        request_timeout: Duration::from_secs(30),
        connect_timeout: Duration::from_secs(5),
        connections: 1,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Client::connect(&Endpoint::Unix(PathBuf::from(socket)), &cfg).await {
            Ok(c) => return c,
            Err(e) => {
                assert!(Instant::now() < deadline, "connecting to VM {vm}: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}
