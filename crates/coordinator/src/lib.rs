//! `virtman-coordinator`: the service that arranges each image's hosts into a
//! relay tree, takes their heartbeats, declares the silent ones dead and
//! repairs the tree, over a versioned HTTP+JSON API.
//!
//! ```text
//!   agents ──HTTP+JSON (/v1)──► http (axum) ──Command──► state task ──► Session per image
//!                                   │                        │         (virtman-topology)
//!   Prometheus ──/metrics──► metrics│                        └──► store (redb, group commit)
//! ```
//!
//! Modules: [`api`] (wire types), [`http`] (routes, OpenAPI), [`auth`] (the
//! token, client certificates, who may call what), [`tls`] (HTTPS), [`state`]
//! (the task that owns the state), [`store`] (redb or etcd), [`ha`] (the
//! election among coordinators on etcd), [`lease`] (the leader's deadline),
//! [`metrics`], [`config`], [`validate`], [`error`], and [`client`] (a
//! reqwest client for agents and the CLI, over several coordinator URLs).
//!
//! A service is started with [`Coordinator::open`] (redb: recovers from the
//! data directory, starts the state task) or [`Coordinator::open_etcd`]
//! (joins the election; the state task runs while it leads), then
//! [`Coordinator::serve`] on a listener the caller bound, until the
//! [`CancellationToken`] is cancelled.

pub mod api;
pub mod auth;
pub mod client;
pub mod config;
pub mod error;
pub mod ha;
pub mod http;
pub mod lease;
pub mod metrics;
pub mod state;
pub mod store;
pub mod tls;
pub mod validate;

use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use auth::{Token, TokenError};
pub use client::{Client, ClientError, HealthReport};
pub use config::CoordinatorConfig;
pub use error::{ApiError, CoordinatorError};
pub use ha::{EtcdOptions, EtcdTls};
pub use http::openapi_json;
pub use tls::HttpsConfig;

/// Everything a coordinator needs to start.
#[derive(Debug, Clone)]
pub struct Options {
    /// Tunables.
    pub config: CoordinatorConfig,
    /// The bearer token for state-changing calls (with `tls`, for operator
    /// calls only: nodes present their certificates).
    pub token: Token,
    /// HTTPS: the API is served over TLS, and clients that present a
    /// certificate of the cluster CA are known by its name.
    pub tls: Option<Arc<HttpsConfig>>,
    /// Where the redb file lives (created if missing).
    pub data_dir: PathBuf,
}

/// A running coordinator: its router and its state task.
#[derive(Debug)]
pub struct Coordinator {
    router: Router,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    metrics: Arc<metrics::Metrics>,
    tls: Option<Arc<HttpsConfig>>,
}

impl Coordinator {
    /// Opens the store in the data directory, recovers images and sessions,
    /// and starts the state task, which stops when `shutdown` is cancelled.
    /// Must be called inside a tokio runtime.
    pub fn open(options: Options, shutdown: CancellationToken) -> Result<Self, CoordinatorError> {
        let settings = options
            .config
            .settings()
            .map_err(CoordinatorError::Config)?;
        std::fs::create_dir_all(&options.data_dir).map_err(|source| CoordinatorError::DataDir {
            path: options.data_dir.clone(),
            source,
        })?;
        let (store, loaded) = store::RedbStore::open(&options.data_dir)?;
        let metrics = Arc::new(metrics::Metrics::new());
        let state = state::State::recover(
            options.config.clone(),
            settings,
            Box::new(store),
            loaded,
            Arc::clone(&metrics),
            None,
        )?;
        let (handle, rx) = state::State::channel();
        let tracker = TaskTracker::new();
        tracker.spawn(state.run(rx, shutdown.clone()));
        metrics.leader.set(1);
        let routing = Arc::new(ha::Routing::new(ha::Route::Local(handle)));
        Ok(Self::assemble(
            options, routing, None, metrics, tracker, shutdown,
        ))
    }

    /// The router over `routing`, with the tasks already in `tracker`.
    fn assemble(
        options: Options,
        routing: Arc<ha::Routing>,
        ha: Option<Arc<ha::Ha>>,
        metrics: Arc<metrics::Metrics>,
        tracker: TaskTracker,
        shutdown: CancellationToken,
    ) -> Self {
        tracker.close();
        let app = http::AppState {
            routing,
            ha,
            auth: Arc::new(auth::Auth {
                token: options.token,
                certificates: options.tls.is_some(),
            }),
            metrics: Arc::clone(&metrics),
        };
        Self {
            router: http::router(app, options.config.max_body_bytes),
            tracker,
            shutdown,
            metrics,
            tls: options.tls,
        }
    }

    /// Joins the election among the coordinators on `etcd`: connects,
    /// checks the prefix (another program's keys or a newer format are
    /// refused here, before anything is written), and starts the loop that
    /// leads or follows. `options.data_dir` is not used.
    pub async fn open_etcd(
        options: Options,
        etcd: EtcdOptions,
        shutdown: CancellationToken,
    ) -> Result<Self, CoordinatorError> {
        let settings = options
            .config
            .settings()
            .map_err(CoordinatorError::Config)?;
        let metrics = Arc::new(metrics::Metrics::new());
        let routing = Arc::new(ha::Routing::new(ha::Route::Unavailable(
            "no leader elected yet".into(),
        )));
        let endpoints = etcd.endpoints.join(",");
        let ha = ha::Ha::open(
            etcd,
            options.config.clone(),
            settings,
            Arc::clone(&metrics),
            Arc::clone(&routing),
        )
        .await
        .map_err(|e| match e {
            store::StoreError::Etcd(message) => CoordinatorError::Etcd { endpoints, message },
            other => CoordinatorError::Store(other),
        })?;
        let ha = Arc::new(ha);
        let tracker = TaskTracker::new();
        tracker.spawn(Arc::clone(&ha).run(shutdown.clone()));
        Ok(Self::assemble(
            options,
            routing,
            Some(ha),
            metrics,
            tracker,
            shutdown,
        ))
    }

    /// The router, for serving or for in-process requests in tests.
    pub fn router(&self) -> Router {
        self.router.clone()
    }

    /// This coordinator's metrics.
    pub fn metrics(&self) -> Arc<metrics::Metrics> {
        Arc::clone(&self.metrics)
    }

    /// Serves HTTP (HTTPS with [`Options::tls`]) on `listener` until the
    /// shutdown token is cancelled, then waits for in-flight requests and
    /// for the state task to end (its last batch committed, the store
    /// closed).
    pub async fn serve(self, listener: TcpListener) -> Result<(), CoordinatorError> {
        let shutdown = self.shutdown.clone();
        let stopped = async move { shutdown.cancelled().await };
        let result = match &self.tls {
            Some(tls) => {
                let listener = tls::TlsListener::new(listener, Arc::clone(tls))
                    .map_err(CoordinatorError::Serve)?;
                let app = self
                    .router
                    .clone()
                    .into_make_service_with_connect_info::<tls::Peer>();
                axum::serve(listener, app)
                    .with_graceful_shutdown(stopped)
                    .await
            }
            None => {
                axum::serve(listener, self.router.clone())
                    .with_graceful_shutdown(stopped)
                    .await
            }
        };
        self.stop().await;
        result.map_err(CoordinatorError::Serve)
    }

    /// Cancels the shutdown token and waits for the state task to end.
    pub async fn stop(self) {
        self.shutdown.cancel();
        drop(self.router);
        self.tracker.wait().await;
    }
}

/// Opens a coordinator and serves it on `listener` until `shutdown`.
pub async fn run(
    options: Options,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), CoordinatorError> {
    Coordinator::open(options, shutdown)?.serve(listener).await
}
