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
        tls: None,
        meta_contexts: Vec::new(),
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

/// An agent running in this process, on a loopback listener.
pub struct Node {
    pub agent: std::sync::Arc<virtman_agent::Agent>,
    /// The address children use.
    pub addr: String,
    /// Cancelling it stops the agent (and anything tied to its life).
    pub stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Node {
    /// Starts agent `name` with its data in `data_dir`, heartbeating every
    /// 200 ms to the coordinator at `url`, with prefetch set to `prefetch`.
    pub async fn start(
        name: &str,
        data_dir: PathBuf,
        url: &str,
        token: &str,
        prefetch: virtman_agent::prefetch::PrefetchConfig,
    ) -> Node {
        let config = Self::config(name, data_dir, url);
        Self::start_with(
            virtman_agent::AgentConfig {
                token: Some(token.into()),
                ..config
            },
            prefetch,
        )
        .await
    }

    /// Starts agent `name` with TLS on every link from its node directory
    /// `tls` (the coordinator at `url` on HTTPS), fetching with `fetch`.
    pub async fn start_tls(
        name: &str,
        data_dir: PathBuf,
        url: &str,
        tls: &Path,
        fetch: virtman_agent::upstream::FetchConfig,
    ) -> Node {
        let node = virtman_pki::NodeTls::load(tls).unwrap();
        let config = Self::config(name, data_dir, url);
        let client = node.client_config().unwrap();
        let server = node
            .server_config(virtman_pki::PeerVerification::Required)
            .unwrap();
        let config = virtman_agent::AgentConfig {
            coordinator_tls: Some(std::sync::Arc::clone(&client)),
            serve_tls: Some(virtman_nbd::ServerTls::new(server)),
            fetch: virtman_agent::upstream::FetchConfig {
                tls: Some(virtman_nbd::ClientTls::new(client)),
                ..fetch
            },
            ..config
        };
        Self::start_with(config, virtman_agent::prefetch::PrefetchConfig::default()).await
    }

    fn config(name: &str, data_dir: PathBuf, url: &str) -> virtman_agent::AgentConfig {
        virtman_agent::AgentConfig {
            name: name.into(),
            data_dir,
            image_store: None,
            coordinator: url.to_owned(),
            token: None,
            coordinator_tls: None,
            advertise: String::new(),
            cache: virtman_cache::GroupConfig::with_capacity(1 << 30),
            labels: std::collections::BTreeMap::new(),
            fetch: virtman_agent::upstream::FetchConfig::default(),
            heartbeat_interval: Duration::from_millis(200),
            serve_tls: None,
            socket_group: None,
            caps: std::sync::Arc::default(),
            test_lie: false,
        }
    }

    /// Starts agent `name` like [`Node::start`], its configuration changed
    /// by `edit` first.
    pub async fn start_edited(
        name: &str,
        data_dir: PathBuf,
        url: &str,
        token: &str,
        edit: impl FnOnce(&mut virtman_agent::AgentConfig),
    ) -> Node {
        let mut config = virtman_agent::AgentConfig {
            token: Some(token.into()),
            ..Self::config(name, data_dir, url)
        };
        edit(&mut config);
        Self::start_with(config, virtman_agent::prefetch::PrefetchConfig::default()).await
    }

    /// Starts agent `name` like [`Node::start`], with bandwidth `caps`.
    pub async fn start_capped(
        name: &str,
        data_dir: PathBuf,
        url: &str,
        token: &str,
        caps: virtman_agent::caps::CapRates,
    ) -> Node {
        let config = Self::config(name, data_dir, url);
        Self::start_with(
            virtman_agent::AgentConfig {
                token: Some(token.into()),
                caps: std::sync::Arc::new(virtman_agent::caps::Caps::new(caps)),
                ..config
            },
            virtman_agent::prefetch::PrefetchConfig::default(),
        )
        .await
    }

    async fn start_with(
        config: virtman_agent::AgentConfig,
        prefetch: virtman_agent::prefetch::PrefetchConfig,
    ) -> Node {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let agent = virtman_agent::Agent::open(virtman_agent::AgentConfig {
            advertise: addr.clone(),
            ..config
        })
        .unwrap();
        agent.set_prefetch(prefetch);
        let stop = tokio_util::sync::CancellationToken::new();
        let a = std::sync::Arc::clone(&agent);
        let s = stop.clone();
        let task = tokio::spawn(async move { a.run(listener, s).await.unwrap() });
        Node {
            agent,
            addr,
            stop,
            task,
        }
    }

    /// Stops the agent (as a crash would, without leaving its sessions).
    pub async fn kill(self) {
        self.stop.cancel();
        self.task.await.unwrap();
    }
}

/// Serves a coordinator (one tree of fan-out 2, one parent per host,
/// heartbeats every 200 ms, dead after 2 s) with its data in `data_dir` on
/// `listener`; cancel the token to stop it, then await the task.
pub fn serve_coordinator(
    data_dir: PathBuf,
    token: &str,
    listener: tokio::net::TcpListener,
) -> (
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let config = virtman_coordinator::CoordinatorConfig {
        fanout: 2,
        parents: 1,
        stripes: 1,
        heartbeat_interval_ms: 200,
        heartbeat_timeout_ms: 2000,
        ..virtman_coordinator::CoordinatorConfig::default()
    };
    serve_coordinator_with(data_dir, token, listener, config, None)
}

/// [`serve_coordinator`] with `config`, and HTTPS with `tls`.
pub fn serve_coordinator_with(
    data_dir: PathBuf,
    token: &str,
    listener: tokio::net::TcpListener,
    config: virtman_coordinator::CoordinatorConfig,
    tls: Option<std::sync::Arc<virtman_coordinator::HttpsConfig>>,
) -> (
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let stop = tokio_util::sync::CancellationToken::new();
    let coordinator = virtman_coordinator::Coordinator::open(
        virtman_coordinator::Options {
            config,
            token: virtman_coordinator::Token::new(token).unwrap(),
            tls,
            data_dir,
        },
        stop.clone(),
    )
    .unwrap();
    let task = tokio::spawn(async move { coordinator.serve(listener).await.unwrap() });
    (stop, task)
}

/// Waits until an origin has registered `image` with the coordinator at `url`.
pub async fn wait_for_image(url: &str, image: &str) {
    let client = virtman_coordinator::Client::new(url, None).unwrap();
    wait_for("the image to be registered", || async {
        client
            .images()
            .await
            .is_ok_and(|l| l.iter().any(|i| i.name == image))
    })
    .await;
}

/// A coordinator on loopback (see [`serve_coordinator`]) and an origin agent
/// `origin` serving `image` as `img` in chunks of `chunk` bytes, with a boot
/// profile of `profile` (chunks in boot order) unless it is empty; `edit`
/// changes the origin's configuration. Returns the coordinator's URL, what
/// stops it, and the origin once the image is registered.
pub async fn origin_cluster(
    dir: &Path,
    image: &[u8],
    chunk: u32,
    profile: &[u64],
    token: &str,
    edit: impl FnOnce(&mut virtman_agent::AgentConfig),
) -> (String, tokio_util::sync::CancellationToken, Node) {
    origin_cluster_with(dir, image, chunk, profile, token, None, edit).await
}

/// [`origin_cluster`] with the coordinator's `config` (`None`: that of
/// [`serve_coordinator`]).
pub async fn origin_cluster_with(
    dir: &Path,
    image: &[u8],
    chunk: u32,
    profile: &[u64],
    token: &str,
    config: Option<virtman_coordinator::CoordinatorConfig>,
    edit: impl FnOnce(&mut virtman_agent::AgentConfig),
) -> (String, tokio_util::sync::CancellationToken, Node) {
    let raw = dir.join("img.raw");
    std::fs::write(&raw, image).unwrap();
    let stored = virtman_image::ImageStore::open(dir.join("origin/images"))
        .unwrap()
        .import(&raw, "img", chunk, &mut |_, _| {})
        .unwrap();
    if !profile.is_empty() {
        let reads = profile
            .iter()
            .enumerate()
            .map(|(t, &c)| (c * u64::from(chunk) + 10, 4096, t as u64 * 1000));
        virtman_cache::BootProfile::from_reads(reads, &stored.manifest)
            .store(
                &stored.data_path.with_file_name("profile"),
                &stored.manifest,
            )
            .unwrap();
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, _task) = match config {
        Some(c) => serve_coordinator_with(dir.join("coord"), token, listener, c, None),
        None => serve_coordinator(dir.join("coord"), token, listener),
    };
    let origin = Node::start_edited("origin", dir.join("origin"), &url, token, edit).await;
    wait_for_image(&url, "img").await;
    (url, stop, origin)
}
