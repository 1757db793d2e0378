//! Several coordinators on etcd: one leads, the others redirect to it.
//!
//! ```text
//!   every coordinator:  observe PREFIX/leader ──► a leader? ──yes──► Route::Redirect(its URL)
//!                              │ no
//!                              ▼
//!                  grant lease, txn: create PREFIX/leader if absent
//!                              │ won (term = the key's create revision)
//!                              ▼
//!       load PREFIX ─► State::recover ─► state task (Route::Local)
//!       keep-alive every TTL/4 ─► LeaseClock ◄── state: writes and ticks only while valid
//!                              │ lease lost, a commit fenced, or shutdown
//!                              ▼
//!       step down: revoke the lease (the key goes, another wins at once);
//!       the old state answers reads until another leader is seen
//! ```
//!
//! Heartbeats never reach etcd: liveness lives in the leader's memory, and
//! a new leader counts every member as seen when it takes over (see
//! [`State::recover`]), so a change of leader kills nobody and moves no
//! parent on its own.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, PutOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use virtman_topology::Settings;

use crate::api::{CoordinatorStatus, EndpointHealth, LeaderView};
use crate::config::CoordinatorConfig;
use crate::error::ApiError;
use crate::lease::LeaseClock;
use crate::metrics::Metrics;
use crate::state::{Handle, State};
use crate::store::StoreError;
use crate::store::etcd::{self, EtcdStore, Keys, etcd_err};

/// How often a coordinator that does not lead looks at the leader key.
const POLL: Duration = Duration::from_millis(200);

/// How a coordinator on etcd finds its peers and holds its lease.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// etcd endpoints, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// The key prefix (default `/virtman`).
    pub prefix: String,
    /// The leader lease's time to live (etcd rounds it up to its minimum,
    /// 2 s with default settings).
    pub lease_ttl: Duration,
    /// This coordinator's name (unique among its peers).
    pub name: String,
    /// The URL the others redirect to when this one leads.
    pub advertise: String,
    /// TLS to etcd (`https://` endpoints): the CA to trust and the client
    /// certificate to present, PEM.
    pub tls: Option<EtcdTls>,
}

/// TLS to etcd: PEM files' contents.
#[derive(Clone)]
pub struct EtcdTls {
    /// The CA that signed etcd's server certificates.
    pub ca_pem: String,
    /// This coordinator's client certificate.
    pub cert_pem: String,
    /// Its key.
    pub key_pem: String,
}

impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EtcdTls { .. }")
    }
}

impl EtcdTls {
    /// Reads a node directory of the cluster PKI (`virtman pki issue`):
    /// `ca-cert.pem`, `client-cert.pem`, `client-key.pem`.
    pub fn load(dir: &std::path::Path) -> Result<Self, String> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))
        };
        Ok(Self {
            ca_pem: read(virtman_pki::CA_CERT)?,
            cert_pem: read(virtman_pki::CLIENT_CERT)?,
            key_pem: read(virtman_pki::CLIENT_KEY)?,
        })
    }
}

/// Where a request goes now.
#[derive(Debug, Clone)]
pub enum Route {
    /// This coordinator's state task answers (it leads, or it led and no
    /// other leader is known yet: then reads only).
    Local(Handle),
    /// Another coordinator leads at this URL.
    Redirect(String),
    /// Nobody can answer now.
    Unavailable(String),
}

/// The current [`Route`], shared by the HTTP layer and the leadership loop.
#[derive(Debug)]
pub struct Routing {
    route: RwLock<Route>,
}

impl Routing {
    /// Starts at `route`.
    pub fn new(route: Route) -> Self {
        Self {
            route: RwLock::new(route),
        }
    }

    /// The route now.
    pub fn get(&self) -> Route {
        self.route.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, route: Route) {
        *self.route.write().unwrap_or_else(|e| e.into_inner()) = route;
    }

    /// The local state's handle, or why there is none.
    pub fn handle(&self) -> Result<Handle, ApiError> {
        match self.get() {
            Route::Local(h) => Ok(h),
            Route::Redirect(url) => Err(ApiError::unavailable(format!(
                "this coordinator follows; the leader is {url}"
            ))),
            Route::Unavailable(why) => Err(ApiError::unavailable(why)),
        }
    }
}

/// What the leader key holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LeaderRecord {
    name: String,
    url: String,
    since_unix_ms: u64,
}

/// Connects to etcd (short timeouts: a dead member must not hold a
/// request for long; requests need a member with a raft leader).
pub async fn connect(
    endpoints: &[String],
    tls: Option<&EtcdTls>,
) -> Result<Client, etcd_client::Error> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(2))
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
        .with_require_leader(true);
    if let Some(t) = tls {
        options = options.with_tls(
            etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(&t.ca_pem))
                .identity(etcd_client::Identity::from_pem(&t.cert_pem, &t.key_pem)),
        );
    }
    Client::connect(endpoints, Some(options)).await
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[derive(Debug, Default)]
struct View {
    role: &'static str,
    leader: Option<LeaderView>,
    changes: u64,
    error: Option<String>,
}

/// A state task this coordinator runs: the leader's, or a deposed
/// leader's kept for reads.
struct Running {
    token: CancellationToken,
    task: JoinHandle<()>,
    handle: Handle,
}

impl Running {
    async fn stop(self) {
        self.token.cancel();
        let _ = self.task.await;
    }
}

/// One coordinator's part in the election, and what it knows of it.
pub struct Ha {
    options: EtcdOptions,
    keys: Keys,
    client: Client,
    config: CoordinatorConfig,
    settings: Settings,
    metrics: Arc<Metrics>,
    routing: Arc<Routing>,
    view: Mutex<View>,
}

impl std::fmt::Debug for Ha {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ha")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Ha {
    /// Connects, checks the prefix (refusing another program's keys or a
    /// newer format), and returns the loop's state; nothing is written but
    /// the format key of an empty prefix.
    pub async fn open(
        options: EtcdOptions,
        config: CoordinatorConfig,
        settings: Settings,
        metrics: Arc<Metrics>,
        routing: Arc<Routing>,
    ) -> Result<Self, StoreError> {
        let client = connect(&options.endpoints, options.tls.as_ref())
            .await
            .map_err(|e| etcd_err("connecting", &e))?;
        let keys = Keys::new(&options.prefix);
        etcd::check_prefix(&client, &keys, true).await?;
        Ok(Self {
            options,
            keys,
            client,
            config,
            settings,
            metrics,
            routing,
            view: Mutex::new(View {
                role: "candidate",
                ..View::default()
            }),
        })
    }

    fn view(&self) -> std::sync::MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// This coordinator's view, with each endpoint asked for its health
    /// (all at once: a dead member costs its 1 s timeout once, not once per
    /// member).
    pub async fn status(&self) -> CoordinatorStatus {
        let mut asks = tokio::task::JoinSet::new();
        for (i, endpoint) in self.options.endpoints.iter().enumerate() {
            let (endpoint, tls) = (endpoint.clone(), self.options.tls.clone());
            asks.spawn(async move { (i, endpoint_health(&endpoint, tls.as_ref()).await) });
        }
        let mut endpoints: Vec<(usize, EndpointHealth)> = asks.join_all().await;
        endpoints.sort_by_key(|(i, _)| *i);
        let endpoints = endpoints.into_iter().map(|(_, h)| h).collect();
        let view = self.view();
        CoordinatorStatus {
            name: self.options.name.clone(),
            url: self.options.advertise.clone(),
            role: view.role.to_owned(),
            store: "etcd".into(),
            leader: view.leader.clone(),
            leader_changes: view.changes,
            etcd_error: view.error.clone(),
            endpoints,
        }
    }

    /// The leader key, if any: (record, term).
    async fn leader(&self) -> Result<Option<LeaderView>, StoreError> {
        let mut kv = self.client.kv_client();
        let started = Instant::now();
        let r = kv
            .get(self.keys.leader(), None)
            .await
            .map_err(|e| etcd_err("reading the leader key", &e))?;
        self.metrics
            .etcd_seconds
            .observe(started.elapsed().as_secs_f64());
        let Some(kv) = r.kvs().first() else {
            return Ok(None);
        };
        let record: LeaderRecord =
            serde_json::from_slice(kv.value()).map_err(|source| StoreError::Corrupt {
                key: self.keys.leader(),
                source,
            })?;
        Ok(Some(LeaderView {
            name: record.name,
            url: record.url,
            term: kv.create_revision(),
            since_unix_ms: record.since_unix_ms,
        }))
    }

    /// Tries to take the leader key: `Some((lease, term, granted at, ttl))`
    /// if this coordinator leads now.
    async fn campaign(&self) -> Result<Option<(i64, i64, Instant, Duration)>, StoreError> {
        let mut lease = self.client.lease_client();
        let sent = Instant::now();
        let ttl = i64::try_from(self.options.lease_ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let grant = lease
            .grant(ttl, None)
            .await
            .map_err(|e| etcd_err("granting a lease", &e))?;
        let record = LeaderRecord {
            name: self.options.name.clone(),
            url: self.options.advertise.clone(),
            since_unix_ms: unix_ms(),
        };
        let value = serde_json::to_vec(&record).unwrap_or_default();
        let txn = Txn::new()
            .when([Compare::create_revision(
                self.keys.leader(),
                CompareOp::Equal,
                0,
            )])
            .and_then([TxnOp::put(
                self.keys.leader(),
                value,
                Some(PutOptions::new().with_lease(grant.id())),
            )]);
        let won = self.client.kv_client().txn(txn).await;
        match won {
            Ok(r) if r.succeeded() => {
                let term = r.header().map_or(0, |h| h.revision());
                let ttl = Duration::from_secs(u64::try_from(grant.ttl()).unwrap_or(1));
                Ok(Some((grant.id(), term, sent, ttl)))
            }
            other => {
                let _ = lease.revoke(grant.id()).await;
                other.map(|_| None).map_err(|e| etcd_err("campaigning", &e))
            }
        }
    }

    /// Runs the election until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut kept: Option<Running> = None;
        let mut seen_term = 0;
        while !shutdown.is_cancelled() {
            match self.leader().await {
                Ok(Some(leader)) => {
                    self.view().error = None;
                    if leader.term != seen_term {
                        seen_term = leader.term;
                        self.seen_change(&leader);
                    }
                    if let Some(old) = kept.take() {
                        old.stop().await;
                    }
                    if leader.name == self.options.name {
                        // Our own key from before a restart: wait for its
                        // lease to expire rather than redirect to ourselves.
                        self.routing.set(Route::Unavailable(
                            "waiting for this coordinator's previous lease to expire".into(),
                        ));
                        self.view().role = "candidate";
                    } else {
                        self.routing.set(Route::Redirect(leader.url.clone()));
                        self.view().role = "follower";
                    }
                    self.view().leader = Some(leader);
                }
                Ok(None) => match self.campaign().await {
                    Ok(Some((lease, term, sent, ttl))) => {
                        seen_term = term;
                        if let Some(old) = kept.take() {
                            old.stop().await;
                        }
                        // Then a pause before looking again: a leadership
                        // that could not start (a record etcd holds that
                        // does not load) must not turn into a tight loop
                        // of campaigns.
                        kept = self.lead(lease, term, sent, ttl, &shutdown).await;
                    }
                    Ok(None) => continue,
                    Err(e) => self.unreachable(&e, kept.as_ref()),
                },
                Err(e) => self.unreachable(&e, kept.as_ref()),
            }
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = tokio::time::sleep(POLL) => {}
            }
        }
        if let Some(old) = kept.take() {
            old.stop().await;
        }
    }

    fn seen_change(&self, leader: &LeaderView) {
        self.metrics.leader_changes.inc();
        self.view().changes += 1;
        tracing::info!(leader = %leader.name, url = %leader.url, term = leader.term, "leader");
    }

    fn unreachable(&self, e: &StoreError, kept: Option<&Running>) {
        tracing::warn!(error = %e, "etcd");
        let mut view = self.view();
        view.error = Some(e.to_string());
        view.role = "candidate";
        // A deposed leader answers reads from memory; changes are refused
        // (its lease is gone). Without one, nothing can be answered.
        self.routing.set(match kept {
            Some(r) => Route::Local(r.handle.clone()),
            None => Route::Unavailable(format!("no leader is known: {e}")),
        });
    }

    /// Leads until the lease is lost, a commit is fenced, or `shutdown`.
    /// Returns the state task to keep for reads after stepping down.
    async fn lead(
        &self,
        lease: i64,
        term: i64,
        sent: Instant,
        ttl: Duration,
        shutdown: &CancellationToken,
    ) -> Option<Running> {
        let clock = Arc::new(LeaseClock::new());
        clock.extend(sent, ttl);
        let started = Instant::now();
        let running = match self.start_state(term, &clock).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "could not load the state from etcd; stepping down");
                self.step_down(lease, &clock).await;
                self.view().error = Some(format!("could not load the state: {e}"));
                return None;
            }
        };
        let leader = LeaderView {
            name: self.options.name.clone(),
            url: self.options.advertise.clone(),
            term,
            since_unix_ms: unix_ms(),
        };
        self.seen_change(&leader);
        tracing::info!(term, load_ms = started.elapsed().as_millis(), "leading");
        {
            let mut view = self.view();
            view.role = "leader";
            view.leader = Some(leader);
            view.error = None;
        }
        self.routing.set(Route::Local(running.handle.clone()));
        self.metrics.leader.set(1);
        let Running {
            token,
            mut task,
            handle,
        } = running;
        let mut keeper = None;
        let beat = ttl / 4;
        let mut finished = false;
        let lost = loop {
            tokio::select! {
                () = shutdown.cancelled() => break false,
                _ = &mut task => {
                    tracing::warn!(term, "the state task stopped (a commit failed); stepping down");
                    finished = true;
                    break true;
                }
                () = tokio::time::sleep(beat) => {
                    let sent = Instant::now();
                    match tokio::time::timeout(beat, self.keep_alive(lease, &mut keeper)).await {
                        Ok(Ok(Some(ttl))) => clock.extend(sent, ttl),
                        Ok(Ok(None)) => {
                            tracing::warn!(term, "the leader lease expired; stepping down");
                            break true;
                        }
                        Ok(Err(_)) | Err(_) => {
                            keeper = None;
                            if !clock.valid() {
                                tracing::warn!(term, "the leader lease could not be renewed in time; stepping down");
                                break true;
                            }
                        }
                    }
                }
            }
        };
        self.step_down(lease, &clock).await;
        if finished {
            return None;
        }
        if !lost {
            token.cancel();
            let _ = task.await;
            return None;
        }
        Some(Running {
            token,
            task,
            handle,
        })
    }

    async fn start_state(&self, term: i64, clock: &Arc<LeaseClock>) -> Result<Running, StoreError> {
        let loaded = etcd::load(&self.client, &self.keys).await?;
        let store = EtcdStore::new(
            self.client.clone(),
            self.keys.clone(),
            term,
            Arc::clone(clock),
            Arc::clone(&self.metrics),
        );
        let state = State::recover(
            self.config.clone(),
            self.settings,
            Box::new(store),
            loaded,
            Arc::clone(&self.metrics),
            Some(Arc::clone(clock)),
        )?;
        let (handle, rx) = State::channel();
        let token = CancellationToken::new();
        let task = tokio::spawn(state.run(rx, token.clone()));
        Ok(Running {
            token,
            task,
            handle,
        })
    }

    /// One keep-alive: the lease's remaining TTL, or `None` if it is gone.
    async fn keep_alive(
        &self,
        lease: i64,
        keeper: &mut Option<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream)>,
    ) -> Result<Option<Duration>, etcd_client::Error> {
        if keeper.is_none() {
            *keeper = Some(self.client.lease_client().keep_alive(lease).await?);
        }
        let Some((k, stream)) = keeper.as_mut() else {
            return Ok(None);
        };
        k.keep_alive().await?;
        match stream.message().await? {
            Some(r) if r.ttl() > 0 => Ok(Some(Duration::from_secs(
                u64::try_from(r.ttl()).unwrap_or(1),
            ))),
            _ => Ok(None),
        }
    }

    async fn step_down(&self, lease: i64, clock: &LeaseClock) {
        clock.expire();
        self.metrics.leader.set(0);
        {
            let mut view = self.view();
            view.role = "candidate";
            view.leader = None;
        }
        self.routing.set(Route::Unavailable("stepping down".into()));
        // Revoking deletes the leader key: the next leader need not wait
        // for the TTL. A lease already gone makes this fail, harmlessly.
        let mut leases = self.client.lease_client();
        let _ = tokio::time::timeout(Duration::from_secs(1), leases.revoke(lease)).await;
    }
}

async fn endpoint_health(endpoint: &str, tls: Option<&EtcdTls>) -> EndpointHealth {
    let started = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(1), async {
        let mut client = connect(&[endpoint.to_owned()], tls).await?;
        client.status().await
    })
    .await;
    let down = |error: String| EndpointHealth {
        endpoint: endpoint.to_owned(),
        healthy: false,
        version: None,
        raft_leader: false,
        latency_ms: None,
        error: Some(error),
    };
    match result {
        Ok(Ok(status)) => EndpointHealth {
            endpoint: endpoint.to_owned(),
            healthy: true,
            version: Some(status.version().to_owned()),
            raft_leader: status
                .header()
                .is_some_and(|h| h.member_id() == status.leader()),
            latency_ms: Some(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)),
            error: None,
        },
        Ok(Err(e)) => down(e.to_string()),
        Err(_) => down("no answer within 1 s".into()),
    }
}
