//! A typed client of the coordinator API, for agents and `virtman tree`.
//!
//! ```text
//!   Client::new("http://127.0.0.1:7600", Some(token))
//!     .join("debian", &JoinRequest{..}) ──POST /v1/sessions/debian/join──► coordinator
//!     ◄── Ok(JoinResponse) | Err(ClientError::Api{status, code, message})
//! ```
//!
//! Error answers are decoded into [`ClientError::Api`] with the server's
//! stable code, so callers can act on `dead` (join again) or
//! `already_joined` without parsing messages.
//!
//! Several coordinators (`http://a:7600,http://b:7600,...`): calls go to the
//! one that answered last; one that does not answer (connection refused, no
//! answer within the timeout) or answers 503 is skipped for the next, and a
//! follower's `307` redirect to its leader is followed by hand (reqwest
//! would drop the bearer token on a redirect to another port), at most
//! twice per call.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::{
    Assignment, CoordinatorStatus, ErrorBody, Health, HeartbeatRequest, HeartbeatResponse,
    ImageInfo, JoinRequest, JoinResponse, LeaveRequest, NodeState, PreheatRequest, PreheatStatus,
    RegisterImage, ReportRequest, TreeView,
};

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The base URL is not an http(s) URL (https with TLS).
    #[error("coordinator URL {0:?} must start with http:// or https:// (https:// with TLS)")]
    Url(String),
    /// The request could not be sent or the answer not read.
    #[error("coordinator request failed: {}", with_causes(.0))]
    Http(#[from] reqwest::Error),
    /// The coordinator refused the request.
    #[error("coordinator answered {status} {code}: {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// Stable error code (see [`ErrorBody`]).
        code: String,
        /// The coordinator's message.
        message: String,
    },
}

/// `e` and every error under it ("error sending request" alone says little:
/// the cause is a refused connection, a certificate, a timeout).
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        next = cause.source();
    }
    s
}

impl ClientError {
    /// The server's error code, if the server answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// What [`Client::health`] learnt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthReport {
    /// The answer's status (`ok`).
    pub status: String,
    /// The answer's `Date` header (RFC 9110 format), the coordinator's clock.
    pub date: Option<String>,
}

/// A coordinator client. Cheap to clone (clones share the connection pool,
/// the TLS configuration and which coordinator answers).
#[derive(Debug, Clone)]
pub struct Client {
    http: Arc<RwLock<reqwest::Client>>,
    bases: Arc<Vec<String>>,
    /// The index in `bases` of the coordinator to try first.
    current: Arc<AtomicUsize>,
    token: Option<String>,
}

/// With several coordinators: how long a call waits for one before trying
/// the next (a new leader adds it to every member's grace, see `State`).
pub const FAILOVER_TIMEOUT: Duration = Duration::from_secs(2);

/// The most redirects followed in one call (follower to leader, and once
/// more if the leader changed meanwhile).
const MAX_REDIRECTS: usize = 2;

fn http_client(
    tls: Option<Arc<rustls::ClientConfig>>,
    several: bool,
) -> Result<reqwest::Client, ClientError> {
    // With several coordinators a silent one must cost less than a
    // heartbeat timeout before the next is tried.
    let (timeout, connect) = if several {
        (FAILOVER_TIMEOUT, Duration::from_secs(1))
    } else {
        (Duration::from_secs(10), Duration::from_secs(3))
    };
    let mut builder = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(connect)
        .redirect(reqwest::redirect::Policy::none());
    if let Some(tls) = tls {
        builder = builder.tls_backend_preconfigured(Arc::unwrap_or_clone(tls));
    }
    Ok(builder.build()?)
}

/// What one attempt at one coordinator came to.
enum Attempt<T> {
    Done(Result<Option<T>, ClientError>),
    /// Try the next coordinator (this error if none answers).
    Next(ClientError),
    /// The coordinator named its leader: go there.
    Redirect {
        location: String,
        leader: String,
    },
}

impl Client {
    /// A client of the coordinator at `base_url` (e.g. `http://127.0.0.1:7600`,
    /// or several separated by commas), sending `token` on state-changing
    /// calls.
    pub fn new(base_url: &str, token: Option<String>) -> Result<Self, ClientError> {
        Self::with_tls(base_url, token, None)
    }

    /// A client that speaks HTTPS with `tls` (trusting the cluster CA and
    /// presenting the node's or operator's certificate; see
    /// `virtman_pki::NodeTls::client_config`). Every URL in `base_url` must
    /// then be `https://`.
    pub fn with_tls(
        base_url: &str,
        token: Option<String>,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Self, ClientError> {
        let mut bases = Vec::new();
        for part in base_url.split(',') {
            let base = part.trim().trim_end_matches('/').to_owned();
            let ok = match tls {
                Some(_) => base.starts_with("https://"),
                None => base.starts_with("http://") || base.starts_with("https://"),
            };
            if !ok {
                return Err(ClientError::Url(part.trim().to_owned()));
            }
            bases.push(base);
        }
        let several = bases.len() > 1;
        let http = Arc::new(RwLock::new(http_client(tls, several)?));
        Ok(Self {
            http,
            bases: Arc::new(bases),
            current: Arc::new(AtomicUsize::new(0)),
            token,
        })
    }

    /// The coordinator URLs, as given.
    pub fn urls(&self) -> &[String] {
        &self.bases
    }

    /// A client of `url` alone (one of [`urls`](Self::urls)), with the same
    /// credentials and TLS.
    pub fn only(&self, url: &str) -> Result<Self, ClientError> {
        let base = url.trim_end_matches('/').to_owned();
        if !self.bases.contains(&base) {
            return Err(ClientError::Url(url.to_owned()));
        }
        Ok(Self {
            http: Arc::clone(&self.http),
            bases: Arc::new(vec![base]),
            current: Arc::new(AtomicUsize::new(0)),
            token: self.token.clone(),
        })
    }

    /// The URL calls go to first now (the one that answered last).
    pub fn current_url(&self) -> &str {
        &self.bases[self.current.load(Ordering::Relaxed) % self.bases.len()]
    }

    /// Uses `tls` for connections from now on (renewed certificates); every
    /// clone of this client follows.
    pub fn set_tls(&self, tls: Arc<rustls::ClientConfig>) -> Result<(), ClientError> {
        let http = http_client(Some(tls), self.bases.len() > 1)?;
        *self.http.write().unwrap_or_else(|e| e.into_inner()) = http;
        Ok(())
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<Option<T>, ClientError> {
        let n = self.bases.len();
        let first = self.current.load(Ordering::Relaxed);
        let mut last = None;
        for i in 0..n {
            let index = (first + i) % n;
            let mut url = format!("{}{path}", self.bases[index]);
            let mut hops = 0;
            loop {
                match self.attempt(method.clone(), &url, body).await {
                    Attempt::Done(result) => {
                        if hops == 0 {
                            self.current.store(index, Ordering::Relaxed);
                        }
                        return result;
                    }
                    Attempt::Next(e) => {
                        last = Some(e);
                        break;
                    }
                    Attempt::Redirect { location, leader } if hops < MAX_REDIRECTS => {
                        hops += 1;
                        // Go straight to the leader next time, if it is one
                        // of ours.
                        let leader = leader.trim_end_matches('/');
                        if let Some(j) = self.bases.iter().position(|b| b == leader) {
                            self.current.store(j, Ordering::Relaxed);
                        }
                        url = location;
                    }
                    Attempt::Redirect { location, .. } => {
                        last = Some(ClientError::Api {
                            status: 307,
                            code: "not_leader".into(),
                            message: format!("redirected too often (last to {location})"),
                        });
                        break;
                    }
                }
            }
        }
        Err(last.unwrap_or_else(|| ClientError::Url(String::new())))
    }

    async fn attempt<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        url: &str,
        body: Option<&B>,
    ) -> Attempt<T> {
        let http = self.http.read().unwrap_or_else(|e| e.into_inner()).clone();
        let mut req = http.request(method, url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = match req.send().await {
            Ok(r) => r,
            // Not sent or not answered: another coordinator may answer.
            Err(e) => return Attempt::Next(e.into()),
        };
        let status = resp.status();
        if status == StatusCode::NO_CONTENT {
            return Attempt::Done(Ok(None));
        }
        if status == StatusCode::TEMPORARY_REDIRECT || status == StatusCode::PERMANENT_REDIRECT {
            let header = |name: &str| {
                resp.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            if let Some(location) = header("location") {
                let leader = header(crate::http::LEADER_HEADER).unwrap_or_default();
                return Attempt::Redirect { location, leader };
            }
        }
        if status.is_success() {
            return Attempt::Done(resp.json().await.map(Some).map_err(Into::into));
        }
        let text = resp.text().await.unwrap_or_default();
        let (code, message) = match serde_json::from_str::<ErrorBody>(&text) {
            Ok(e) => (e.error, e.message),
            Err(_) => ("unknown".to_owned(), text),
        };
        let error = ClientError::Api {
            status: status.as_u16(),
            code,
            message,
        };
        if status == StatusCode::SERVICE_UNAVAILABLE {
            return Attempt::Next(error);
        }
        Attempt::Done(Err(error))
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call::<(), T>(Method::GET, path, None)
            .await?
            .ok_or_else(|| empty_answer(path))
    }

    async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.call(Method::POST, path, Some(body))
            .await?
            .ok_or_else(|| empty_answer(path))
    }

    /// `GET /v1/health` at the coordinator calls go to first, with its
    /// clock: the answer's `Date` header (for `virtman doctor` to measure
    /// skew). Open: no token or certificate needed, so an answer says the
    /// coordinator is up and, over HTTPS, that it accepted the TLS handshake.
    pub async fn health(&self) -> Result<HealthReport, ClientError> {
        let url = format!("{}/v1/health", self.current_url());
        let http = self.http.read().unwrap_or_else(|e| e.into_inner()).clone();
        let resp = http.get(&url).send().await?;
        let status = resp.status();
        let date = resp
            .headers()
            .get(reqwest::header::DATE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        if !status.is_success() {
            return Err(ClientError::Api {
                status: status.as_u16(),
                code: "unknown".into(),
                message: resp.text().await.unwrap_or_default(),
            });
        }
        let health: Health = resp.json().await?;
        Ok(HealthReport {
            status: health.status,
            date,
        })
    }

    /// Registers an image (idempotent for the same record).
    pub async fn register_image(&self, req: &RegisterImage) -> Result<ImageInfo, ClientError> {
        self.post("/v1/images", req).await
    }

    /// Every registered image.
    pub async fn images(&self) -> Result<Vec<ImageInfo>, ClientError> {
        self.get("/v1/images").await
    }

    /// Joins `image`'s session.
    pub async fn join(&self, image: &str, req: &JoinRequest) -> Result<JoinResponse, ClientError> {
        self.post(&format!("/v1/sessions/{image}/join"), req).await
    }

    /// Leaves `image`'s session.
    pub async fn leave(&self, image: &str, req: &LeaveRequest) -> Result<(), ClientError> {
        self.call::<_, serde_json::Value>(
            Method::POST,
            &format!("/v1/sessions/{image}/leave"),
            Some(req),
        )
        .await
        .map(|_| ())
    }

    /// Reports an unreachable parent; returns the node's parents now.
    pub async fn report(
        &self,
        image: &str,
        req: &ReportRequest,
    ) -> Result<Assignment, ClientError> {
        self.post(&format!("/v1/sessions/{image}/report"), req)
            .await
    }

    /// Sends one heartbeat for all of a node's sessions.
    pub async fn heartbeat(
        &self,
        req: &HeartbeatRequest,
    ) -> Result<HeartbeatResponse, ClientError> {
        self.post("/v1/heartbeat", req).await
    }

    /// `image`'s tree.
    pub async fn tree(&self, image: &str) -> Result<TreeView, ClientError> {
        self.get(&format!("/v1/sessions/{image}")).await
    }

    /// A node's state.
    pub async fn node(&self, node: &str) -> Result<NodeState, ClientError> {
        self.get(&format!("/v1/nodes/{node}")).await
    }

    /// Bans `node` (operators only); returns its state after.
    pub async fn ban(&self, node: &str) -> Result<NodeState, ClientError> {
        self.post(&format!("/v1/nodes/{node}/ban"), &()).await
    }

    /// Orders `image`'s preheat (operators only).
    pub async fn preheat(
        &self,
        image: &str,
        req: &PreheatRequest,
    ) -> Result<PreheatStatus, ClientError> {
        self.post(&format!("/v1/images/{image}/preheat"), req).await
    }

    /// `image`'s preheat and its hosts.
    pub async fn preheat_status(&self, image: &str) -> Result<PreheatStatus, ClientError> {
        self.get(&format!("/v1/images/{image}/preheat")).await
    }

    /// Cancels `image`'s preheat (operators only).
    pub async fn cancel_preheat(&self, image: &str) -> Result<(), ClientError> {
        self.call::<(), serde_json::Value>(
            Method::DELETE,
            &format!("/v1/images/{image}/preheat"),
            None,
        )
        .await
        .map(|_| ())
    }

    /// What this coordinator says of itself and its leader (answered by
    /// each coordinator, never redirected).
    pub async fn coordinator_status(&self) -> Result<CoordinatorStatus, ClientError> {
        self.get("/v1/coordinator").await
    }

    /// Lifts `node`'s ban (operators only).
    pub async fn unban(&self, node: &str) -> Result<(), ClientError> {
        self.call::<(), serde_json::Value>(Method::DELETE, &format!("/v1/nodes/{node}/ban"), None)
            .await
            .map(|_| ())
    }
}

fn empty_answer(path: &str) -> ClientError {
    ClientError::Api {
        status: 204,
        code: "empty".into(),
        message: format!("{path} answered without a body"),
    }
}
