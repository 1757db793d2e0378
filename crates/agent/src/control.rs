//! The agent's control API: HTTP+JSON on a local unix socket, used by the CLI
//! (`virtman vm ...`, `virtman status`, `virtman image evict|pin`), and Prometheus
//! metrics at `/metrics`.
//!
//! ```text
//!   GET    /v1/status                  Status
//!   GET    /v1/vms                     [VmInfo]
//!   POST   /v1/vms  {name, image}      VmInfo        (joins the image first if needed)
//!   DELETE /v1/vms/{name}[?force=true] 204           (refused while a client has it open, unless forced)
//!   POST   /v1/images/{name}/evict     204
//!   POST   /v1/images/{name}/pin       202           (joins first; fetches the rest in the background)
//!   GET    /v1/caps                    CapRates      (bytes/s; null: no cap)
//!   PUT    /v1/caps  CapRates          CapRates      (both caps, at once; 0 refused)
//!   GET    /metrics                    Prometheus text
//! ```
//!
//! Errors are `{"error": code, "message": text}` with a 4xx/5xx status.

use std::path::PathBuf;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::agent::{Agent, AgentError};
use crate::caps::CapRates;
use crate::metrics::AgentCollector;

/// Body of `POST /v1/vms`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    /// The VM's name.
    pub name: String,
    /// The image it boots.
    pub image: String,
}

/// An error answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    /// A stable code.
    pub error: String,
    /// For a human.
    pub message: String,
}

struct ApiError(AgentError);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = match &self.0 {
            AgentError::UnknownImage(_) => (StatusCode::NOT_FOUND, "unknown_image"),
            AgentError::NoVm(_) => (StatusCode::NOT_FOUND, "unknown_vm"),
            AgentError::NotCached(_) => (StatusCode::NOT_FOUND, "not_cached"),
            AgentError::VmExists(_) => (StatusCode::CONFLICT, "vm_exists"),
            AgentError::InUse(_) => (StatusCode::CONFLICT, "in_use"),
            AgentError::Invalid(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            AgentError::Cache(e) if e.is_no_space() => {
                (StatusCode::INSUFFICIENT_STORAGE, "no_space")
            }
            AgentError::Cache(virtman_cache::CacheError::Name { .. }) => {
                (StatusCode::BAD_REQUEST, "bad_name")
            }
            AgentError::Coordinator(_) | AgentError::Manifest { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "upstream")
            }
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        let body = ErrorBody {
            error: code.to_owned(),
            message: self.0.to_string(),
        };
        (status, Json(body)).into_response()
    }
}

struct Ctx {
    agent: Arc<Agent>,
    registry: Registry,
}

/// The router of the control API.
pub fn router(agent: Arc<Agent>) -> Router {
    let mut registry = Registry::with_prefix("virtman");
    registry.register_collector(Box::new(AgentCollector::new(Arc::clone(&agent))));
    let ctx = Arc::new(Ctx { agent, registry });
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/vms", get(list_vms).post(create_vm))
        .route("/v1/vms/{name}", axum::routing::delete(remove_vm))
        .route("/v1/images/{name}/evict", post(evict))
        .route("/v1/images/{name}/pin", post(pin))
        .route("/v1/caps", get(caps).put(set_caps))
        .route("/metrics", get(metrics))
        .layer(axum::extract::DefaultBodyLimit::max(64 * 1024))
        .with_state(ctx)
}

async fn status(State(c): State<Arc<Ctx>>) -> Json<crate::agent::Status> {
    Json(c.agent.status())
}

async fn list_vms(State(c): State<Arc<Ctx>>) -> Json<Vec<crate::agent::VmInfo>> {
    Json(c.agent.list_vms())
}

async fn create_vm(
    State(c): State<Arc<Ctx>>,
    Json(req): Json<CreateVm>,
) -> Result<(StatusCode, Json<crate::agent::VmInfo>), ApiError> {
    let vm = c
        .agent
        .create_vm(&req.name, &req.image)
        .await
        .map_err(ApiError)?;
    Ok((StatusCode::CREATED, Json(vm)))
}

/// Query of `DELETE /v1/vms/{name}`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveVm {
    /// End the connections of clients still using the VM's disk first.
    #[serde(default)]
    force: bool,
}

async fn remove_vm(
    State(c): State<Arc<Ctx>>,
    UrlPath(name): UrlPath<String>,
    axum::extract::Query(q): axum::extract::Query<RemoveVm>,
) -> Result<StatusCode, ApiError> {
    c.agent.remove_vm(&name, q.force).await.map_err(ApiError)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn evict(
    State(c): State<Arc<Ctx>>,
    UrlPath(name): UrlPath<String>,
) -> Result<StatusCode, ApiError> {
    c.agent.evict_image(&name).await.map_err(ApiError)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn pin(
    State(c): State<Arc<Ctx>>,
    UrlPath(name): UrlPath<String>,
) -> Result<StatusCode, ApiError> {
    c.agent.pin_image(&name).await.map_err(ApiError)?;
    Ok(StatusCode::ACCEPTED)
}

async fn caps(State(c): State<Arc<Ctx>>) -> Json<CapRates> {
    Json(c.agent.caps().rates())
}

async fn set_caps(
    State(c): State<Arc<Ctx>>,
    Json(rates): Json<CapRates>,
) -> Result<Json<CapRates>, ApiError> {
    rates
        .check()
        .map_err(|e| ApiError(AgentError::Invalid(e)))?;
    let caps = c.agent.caps();
    let before = caps.rates();
    caps.set(rates);
    tracing::info!(?before, now = ?rates, "bandwidth caps changed");
    Ok(Json(caps.rates()))
}

async fn metrics(State(c): State<Arc<Ctx>>) -> Response {
    let mut out = String::new();
    match encode(&mut out, &c.registry) {
        Ok(()) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            out,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// Binds the control socket at `path` (replacing a stale one).
pub fn bind(
    path: &std::path::Path,
    group: Option<u32>,
) -> std::io::Result<tokio::net::UnixListener> {
    let _ = std::fs::remove_file(path);
    let l = tokio::net::UnixListener::bind(path)?;
    crate::sockets::restrict(path, group)?;
    Ok(l)
}

/// Serves the control API on `listener` (bound at `path`, removed at the end)
/// until `shutdown`.
pub async fn serve(
    agent: Arc<Agent>,
    listener: tokio::net::UnixListener,
    path: PathBuf,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = router(agent);
    let res = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    let _ = std::fs::remove_file(&path);
    res
}

/// A client of the control API, for the CLI.
#[derive(Clone, Debug)]
pub struct ControlClient {
    socket: PathBuf,
}

/// Why a control call failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The agent is not running (or the socket is wrong).
    #[error(
        "cannot reach the agent at {path}: {source} (is `virtman agent` running with this --data-dir?)"
    )]
    Connect {
        /// The socket.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("agent control API: {0}")]
    Http(String),
    /// The agent answered with an error.
    #[error("{message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// Stable code.
        code: String,
        /// Message.
        message: String,
    },
}

impl ControlClient {
    /// A client of the agent listening at `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> ControlClient {
        ControlClient {
            socket: socket.into(),
        }
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, Vec<u8>), ControlError> {
        use http_body_util::{BodyExt, Full};
        use hyper::Request;
        use hyper_util::rt::TokioIo;
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ControlError::Connect {
                path: self.socket.display().to_string(),
                source,
            })?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ControlError::Http(e.to_string()))?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "agent")
            .header("content-type", "application/json")
            .body(Full::new(bytes::Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ControlError::Http(e.to_string()))?;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| ControlError::Http(e.to_string()))?;
        let status = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ControlError::Http(e.to_string()))?
            .to_bytes();
        if status >= 400 {
            let (code, message) = match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(e) => (e.error, e.message),
                Err(_) => (
                    "unknown".into(),
                    String::from_utf8_lossy(&bytes).into_owned(),
                ),
            };
            return Err(ControlError::Api {
                status,
                code,
                message,
            });
        }
        Ok((status, bytes.to_vec()))
    }

    fn decode<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, ControlError> {
        serde_json::from_slice(b).map_err(|e| ControlError::Http(format!("bad answer: {e}")))
    }

    /// The host's status.
    pub async fn status(&self) -> Result<crate::agent::Status, ControlError> {
        let (_, b) = self.call("GET", "/v1/status", None).await?;
        Self::decode(&b)
    }

    /// The host's VMs.
    pub async fn list_vms(&self) -> Result<Vec<crate::agent::VmInfo>, ControlError> {
        let (_, b) = self.call("GET", "/v1/vms", None).await?;
        Self::decode(&b)
    }

    /// Creates a VM.
    pub async fn create_vm(
        &self,
        name: &str,
        image: &str,
    ) -> Result<crate::agent::VmInfo, ControlError> {
        let body = serde_json::to_vec(&CreateVm {
            name: name.to_owned(),
            image: image.to_owned(),
        })
        .map_err(|e| ControlError::Http(e.to_string()))?;
        let (_, b) = self.call("POST", "/v1/vms", Some(body)).await?;
        Self::decode(&b)
    }

    /// Removes a VM (refused while a client has its disk open).
    pub async fn remove_vm(&self, name: &str) -> Result<(), ControlError> {
        self.call("DELETE", &format!("/v1/vms/{name}"), None)
            .await?;
        Ok(())
    }

    /// Removes a VM, first ending the connections of any client (a qemu)
    /// still using its disk: that client sees its disk go away.
    pub async fn remove_vm_forced(&self, name: &str) -> Result<(), ControlError> {
        self.call("DELETE", &format!("/v1/vms/{name}?force=true"), None)
            .await?;
        Ok(())
    }

    /// Evicts an image's cached volume.
    pub async fn evict(&self, image: &str) -> Result<(), ControlError> {
        self.call("POST", &format!("/v1/images/{image}/evict"), None)
            .await?;
        Ok(())
    }

    /// Starts fetching the whole image in the background.
    pub async fn pin(&self, image: &str) -> Result<(), ControlError> {
        self.call("POST", &format!("/v1/images/{image}/pin"), None)
            .await?;
        Ok(())
    }

    /// The host's bandwidth caps.
    pub async fn caps(&self) -> Result<CapRates, ControlError> {
        let (_, b) = self.call("GET", "/v1/caps", None).await?;
        Self::decode(&b)
    }

    /// Sets both bandwidth caps; returns them as now in force.
    pub async fn set_caps(&self, rates: CapRates) -> Result<CapRates, ControlError> {
        let body = serde_json::to_vec(&rates).map_err(|e| ControlError::Http(e.to_string()))?;
        let (_, b) = self.call("PUT", "/v1/caps", Some(body)).await?;
        Self::decode(&b)
    }

    /// The Prometheus metrics text.
    pub async fn metrics(&self) -> Result<String, ControlError> {
        let (_, b) = self.call("GET", "/metrics", None).await?;
        Ok(String::from_utf8_lossy(&b).into_owned())
    }
}
