//! Many clients, many connections, many requests in flight: every byte checked.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::{TestServer, pattern};
use virtman_nbd::{Client, ClientConfig, Export, FileExport, ServerConfig};

const SIZE: usize = 16 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_many_requests_every_byte_checked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    let original = pattern(SIZE, 42);
    std::fs::write(&path, &original).unwrap();
    let export: Arc<dyn Export> = Arc::new(FileExport::open(&path, false).unwrap());
    let s = TestServer::start(ServerConfig::default(), vec![("disk", export)]).await;

    // Each client owns a 2 MiB region it rewrites; all read the whole disk.
    let clients = 8usize;
    let region = SIZE / clients;
    let mut tasks = tokio::task::JoinSet::new();
    for id in 0..clients {
        let endpoint = s.endpoint();
        let original = original.clone();
        tasks.spawn(async move {
            let c = Client::connect(
                &endpoint,
                &ClientConfig {
                    export: "disk".into(),
                    connections: 2,
                    ..ClientConfig::default()
                },
            )
            .await
            .unwrap();
            assert_eq!(c.connections().len(), 2, "multi-conn is allowed");
            let mine = id * region;
            let fresh = pattern(region, 1000 + id as u64);
            // 64 writes of 32 KiB in flight at once over two connections.
            let mut writes = tokio::task::JoinSet::new();
            for k in 0..(region / 32768) {
                let c = c.clone();
                let piece = Bytes::copy_from_slice(&fresh[k * 32768..(k + 1) * 32768]);
                writes.spawn(async move {
                    c.write((mine + k * 32768) as u64, piece, false)
                        .await
                        .unwrap();
                });
            }
            while let Some(r) = writes.join_next().await {
                r.unwrap();
            }
            c.flush().await.unwrap();
            // 200 random reads of random lengths in flight, compared with what must be there.
            let mut reads = tokio::task::JoinSet::new();
            for k in 0..200u64 {
                let c = c.clone();
                let seed = (id as u64) * 1000 + k;
                let off =
                    (seed.wrapping_mul(2_654_435_761) % (region as u64 - 70_000)) as usize + mine;
                let len = 1 + (seed.wrapping_mul(40503) % 65536) as usize;
                let want = fresh[off - mine..off - mine + len].to_vec();
                reads.spawn(async move {
                    let got = c.read(off as u64, len as u64).await.unwrap();
                    assert_eq!(&got[..], &want[..], "read of {len} at {off}");
                });
            }
            while let Some(r) = reads.join_next().await {
                r.unwrap();
            }
            // Regions of others: either their old or new bytes, never anything else.
            let whole = c.read(0, SIZE as u64).await.unwrap();
            for other in 0..clients {
                let o = other * region;
                let got = &whole[o..o + region];
                let new = pattern(region, 1000 + other as u64);
                for (j, b) in got.iter().enumerate().step_by(4093) {
                    assert!(
                        *b == original[o + j] || *b == new[j],
                        "client {id} saw a foreign byte"
                    );
                }
            }
            c.disconnect().await.unwrap();
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    // After everyone finished, the file holds exactly every client's new region.
    let on_disk = std::fs::read(&path).unwrap();
    for id in 0..clients {
        let o = id * region;
        assert!(
            on_disk[o..o + region] == pattern(region, 1000 + id as u64)[..],
            "region {id}"
        );
    }
    s.stop().await;
}
