//! The HTTP layer: routes, bearer-token authentication, JSON extraction with
//! JSON errors, metrics and the OpenAPI document.
//!
//! ```text
//!   request ─► body limit ─► route ─► Authorized? (POST only) ─► ApiJson<T>
//!           ─► Handle::command ─► state task ─► JSON answer | ErrorBody
//! ```
//!
//! Every refusal, including those axum would answer in plain text (bad
//! JSON, unknown fields, wrong content type, oversized body, unknown route,
//! wrong method), is turned into an [`ErrorBody`] with a 4xx status.

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::Router;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::de::DeserializeOwned;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::api::{
    Assignment, CoordinatorStatus, EndpointHealth, ErrorBody, Health, HeartbeatRequest,
    HeartbeatResponse, ImageInfo, JoinRequest, JoinResponse, LeaderView, LeaveRequest, NodeSession,
    NodeState, NodeView, Parent, PreheatHost, PreheatOrder, PreheatReport, PreheatRequest,
    PreheatState, PreheatStatus, RegisterImage, ReportRequest, SessionBeat, SessionStats, TreeView,
};
use crate::auth::{Auth, Caller, Reader};
use crate::error::ApiError;
use crate::ha::{Ha, Route, Routing};
use crate::metrics::Metrics;
use crate::state::Handle;

/// What every handler shares.
#[derive(Debug, Clone)]
pub struct AppState {
    /// Where requests go: the local state task, or the leader.
    pub routing: Arc<Routing>,
    /// The election, on etcd.
    pub ha: Option<Arc<Ha>>,
    /// Who may call what.
    pub auth: Arc<Auth>,
    /// The metrics.
    pub metrics: Arc<Metrics>,
}

impl AppState {
    /// The local state task's handle (the middleware has redirected the
    /// request if another coordinator leads).
    fn handle(&self) -> Result<Handle, ApiError> {
        self.routing.handle()
    }
}

/// `axum::Json` whose refusals are [`ErrorBody`] answers.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Self(v)),
            Err(rejection) => Err(json_rejection(&rejection)),
        }
    }
}

fn json_rejection(r: &JsonRejection) -> ApiError {
    let status = r.status();
    let code = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        _ => "bad_request",
    };
    ApiError::new(status, code, r.body_text())
}

/// `axum::extract::Path<String>` whose refusals are [`ErrorBody`] answers.
#[derive(Debug)]
pub struct ApiPath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for ApiPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(v)) => Ok(Self(v)),
            Err(r) => Err(path_rejection(&r)),
        }
    }
}

fn path_rejection(r: &PathRejection) -> ApiError {
    ApiError::new(r.status(), "bad_request", r.body_text())
}

/// Builds the router for `state`, refusing bodies above `max_body` bytes.
pub fn router(state: AppState, max_body: usize) -> Router {
    let api = Router::new()
        .route("/v1/images", post(register_image).get(list_images))
        .route("/v1/images/{image}", get(get_image))
        .route(
            "/v1/images/{image}/preheat",
            post(preheat).get(preheat_status).delete(cancel_preheat),
        )
        .route("/v1/sessions/{image}", get(tree))
        .route("/v1/sessions/{image}/join", post(join))
        .route("/v1/sessions/{image}/leave", post(leave))
        .route("/v1/sessions/{image}/report", post(report))
        .route("/v1/heartbeat", post(heartbeat))
        .route("/v1/nodes/{node}", get(node))
        .route("/v1/nodes/{node}/ban", post(ban).delete(unban))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            to_the_leader,
        ));
    Router::new()
        .merge(api)
        .route("/v1/coordinator", get(coordinator_status))
        .route("/v1/health", get(health))
        .route("/v1/openapi.json", get(openapi))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

/// A follower sends every API call to the leader: `307 Temporary Redirect`
/// to the same path there (method and body kept), with the leader's URL in
/// `x-virtman-leader`. Redirecting rather than proxying keeps the caller's
/// own certificate or token in front of the leader.
async fn to_the_leader(
    State(s): State<AppState>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    match s.routing.get() {
        Route::Local(_) => next.run(req).await,
        Route::Redirect(leader) => {
            let path = req
                .uri()
                .path_and_query()
                .map_or("/", axum::http::uri::PathAndQuery::as_str);
            let location = format!("{}{path}", leader.trim_end_matches('/'));
            let body = ErrorBody {
                error: "not_leader".into(),
                message: format!("this coordinator follows; the leader is {leader}"),
            };
            (
                StatusCode::TEMPORARY_REDIRECT,
                [
                    (header::LOCATION, location),
                    (header::HeaderName::from_static(LEADER_HEADER), leader),
                ],
                Json(body),
            )
                .into_response()
        }
        Route::Unavailable(why) => ApiError::unavailable(why).into_response(),
    }
}

/// The header a follower's redirect names the leader in.
pub const LEADER_HEADER: &str = "x-virtman-leader";

/// This coordinator: its role, who leads, since when, the term, and each
/// etcd endpoint's health. Answered by every coordinator itself.
#[utoipa::path(get, path = "/v1/coordinator", tag = "meta",
    responses((status = 200, description = "this coordinator and its leader", body = CoordinatorStatus)))]
async fn coordinator_status(State(s): State<AppState>) -> Json<CoordinatorStatus> {
    match &s.ha {
        Some(ha) => Json(ha.status().await),
        None => Json(CoordinatorStatus {
            name: "standalone".into(),
            url: String::new(),
            role: "standalone".into(),
            store: "redb".into(),
            leader: None,
            leader_changes: 0,
            etcd_error: None,
            endpoints: Vec::new(),
        }),
    }
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this route",
    )
}

/// Registers an image (idempotent when the same record is sent again).
#[utoipa::path(post, path = "/v1/images", tag = "images",
    request_body = RegisterImage, security(("bearer" = [])),
    responses(
        (status = 201, description = "registered", body = ImageInfo),
        (status = 200, description = "already registered with the same record", body = ImageInfo),
        (status = 400, description = "bad input", body = ErrorBody),
        (status = 401, description = "no certificate and no or a wrong token", body = ErrorBody),
        (status = 409, description = "registered with another record", body = ErrorBody),
        (status = 413, description = "body too large", body = ErrorBody),
        (status = 415, description = "not application/json", body = ErrorBody),
        (status = 422, description = "JSON of the wrong shape or with unknown fields", body = ErrorBody),
    ))]
async fn register_image(
    State(s): State<AppState>,
    _caller: Caller,
    ApiJson(req): ApiJson<RegisterImage>,
) -> Result<(StatusCode, Json<ImageInfo>), ApiError> {
    let (created, info) = s.handle()?.register_image(req).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(info)))
}

/// Lists registered images.
#[utoipa::path(get, path = "/v1/images", tag = "images",
    responses((status = 200, description = "all images", body = Vec<ImageInfo>)))]
async fn list_images(
    State(s): State<AppState>,
    _reader: Reader,
) -> Result<Json<Vec<ImageInfo>>, ApiError> {
    Ok(Json(s.handle()?.images().await?))
}

/// One image.
#[utoipa::path(get, path = "/v1/images/{image}", tag = "images",
    params(("image" = String, Path, description = "image name")),
    responses(
        (status = 200, description = "the image", body = ImageInfo),
        (status = 404, description = "unknown image", body = ErrorBody),
    ))]
async fn get_image(
    State(s): State<AppState>,
    _reader: Reader,
    ApiPath(image): ApiPath,
) -> Result<Json<ImageInfo>, ApiError> {
    Ok(Json(s.handle()?.image(image).await?))
}

/// Orders an image's preheat (replacing any order of it): matching hosts
/// join its session and fetch its boot profile (or every chunk) before any
/// VM needs it; hosts that come later and match do too. Operators only.
#[utoipa::path(post, path = "/v1/images/{image}/preheat", tag = "images",
    params(("image" = String, Path, description = "image name")),
    request_body = PreheatRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "ordered; its hosts so far", body = PreheatStatus),
        (status = 400, description = "bad selector, or no live host matches it", body = ErrorBody),
        (status = 401, description = "no certificate and no or a wrong token", body = ErrorBody),
        (status = 403, description = "not an operator", body = ErrorBody),
        (status = 404, description = "unknown image", body = ErrorBody),
    ))]
async fn preheat(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(image): ApiPath,
    ApiJson(req): ApiJson<PreheatRequest>,
) -> Result<Json<PreheatStatus>, ApiError> {
    caller.operator()?;
    Ok(Json(s.handle()?.preheat(image, req).await?))
}

/// An image's preheat order and where each of its hosts is.
#[utoipa::path(get, path = "/v1/images/{image}/preheat", tag = "images",
    params(("image" = String, Path, description = "image name")),
    responses(
        (status = 200, description = "the order and its hosts", body = PreheatStatus),
        (status = 404, description = "no preheat order for the image", body = ErrorBody),
    ))]
async fn preheat_status(
    State(s): State<AppState>,
    _reader: Reader,
    ApiPath(image): ApiPath,
) -> Result<Json<PreheatStatus>, ApiError> {
    Ok(Json(s.handle()?.preheat_status(image).await?))
}

/// Cancels an image's preheat: its hosts stop fetching at their next
/// heartbeat (what they hold stays). Operators only.
#[utoipa::path(delete, path = "/v1/images/{image}/preheat", tag = "images",
    params(("image" = String, Path, description = "image name")),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "cancelled"),
        (status = 401, description = "no certificate and no or a wrong token", body = ErrorBody),
        (status = 403, description = "not an operator", body = ErrorBody),
        (status = 404, description = "no preheat order for the image", body = ErrorBody),
    ))]
async fn cancel_preheat(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(image): ApiPath,
) -> Result<StatusCode, ApiError> {
    caller.operator()?;
    s.handle()?.cancel_preheat(image).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Joins an image's session; the answer holds the node's parents.
#[utoipa::path(post, path = "/v1/sessions/{image}/join", tag = "sessions",
    params(("image" = String, Path, description = "image name")),
    request_body = JoinRequest, security(("bearer" = [])),
    responses(
        (status = 200, description = "joined", body = JoinResponse),
        (status = 400, description = "bad input", body = ErrorBody),
        (status = 401, description = "no certificate and no or a wrong token", body = ErrorBody),
        (status = 403, description = "acting as another node, or banned", body = ErrorBody),
        (status = 404, description = "unknown image", body = ErrorBody),
        (status = 409, description = "already joined", body = ErrorBody),
        (status = 413, description = "body too large", body = ErrorBody),
        (status = 415, description = "not application/json", body = ErrorBody),
        (status = 422, description = "JSON of the wrong shape or with unknown fields", body = ErrorBody),
    ))]
async fn join(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(image): ApiPath,
    ApiJson(req): ApiJson<JoinRequest>,
) -> Result<Json<JoinResponse>, ApiError> {
    caller.act_as(&req.node, &s.auth)?;
    Ok(Json(s.handle()?.join(image, req).await?))
}

/// Leaves an image's session; the node's children are re-attached.
#[utoipa::path(post, path = "/v1/sessions/{image}/leave", tag = "sessions",
    params(("image" = String, Path, description = "image name")),
    request_body = LeaveRequest, security(("bearer" = [])),
    responses(
        (status = 400, description = "bad input", body = ErrorBody),
        (status = 204, description = "left"),
        (status = 401, description = "no certificate and no or a wrong token", body = ErrorBody),
        (status = 403, description = "acting as another node, or banned", body = ErrorBody),
        (status = 404, description = "unknown image or node", body = ErrorBody),
        (status = 410, description = "the node was declared dead", body = ErrorBody),
        (status = 413, description = "body too large", body = ErrorBody),
        (status = 415, description = "not application/json", body = ErrorBody),
        (status = 422, description = "JSON of the wrong shape or with unknown fields", body = ErrorBody),
    ))]
async fn leave(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(image): ApiPath,
    ApiJson(req): ApiJson<LeaveRequest>,
) -> Result<StatusCode, ApiError> {
    caller.act_as(&req.node, &s.auth)?;
    s.handle()?.leave(image, req).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Reports a parent the node cannot reach; the answer is its new list.
#[utoipa::path(post, path = "/v1/sessions/{image}/report", tag = "sessions",
    params(("image" = String, Path, description = "image name")),
    request_body = ReportRequest, security(("bearer" = [])),
    responses(
        (status = 400, description = "bad input", body = ErrorBody),
        (status = 200, description = "the reporter's parents now", body = Assignment),
        (status = 401, description = "no certificate and no or a wrong token", body = ErrorBody),
        (status = 403, description = "acting as another node, or banned", body = ErrorBody),
        (status = 404, description = "unknown image or node", body = ErrorBody),
        (status = 410, description = "the reporter was declared dead", body = ErrorBody),
        (status = 413, description = "body too large", body = ErrorBody),
        (status = 415, description = "not application/json", body = ErrorBody),
        (status = 422, description = "JSON of the wrong shape or with unknown fields", body = ErrorBody),
    ))]
async fn report(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(image): ApiPath,
    ApiJson(req): ApiJson<ReportRequest>,
) -> Result<Json<Assignment>, ApiError> {
    caller.act_as(&req.node, &s.auth)?;
    Ok(Json(s.handle()?.report(image, req).await?))
}

/// One heartbeat per node for all its sessions; the answer carries the
/// parent lists whose epoch differs from what the node sent.
#[utoipa::path(post, path = "/v1/heartbeat", tag = "sessions",
    request_body = HeartbeatRequest, security(("bearer" = [])),
    responses(
        (status = 200, description = "changed parent lists", body = HeartbeatResponse),
        (status = 400, description = "bad input", body = ErrorBody),
        (status = 401, description = "no certificate and no or a wrong token", body = ErrorBody),
        (status = 403, description = "acting as another node, or banned", body = ErrorBody),
        (status = 404, description = "unknown image or node", body = ErrorBody),
        (status = 410, description = "declared dead: join again", body = ErrorBody),
        (status = 413, description = "body too large", body = ErrorBody),
        (status = 415, description = "not application/json", body = ErrorBody),
        (status = 422, description = "JSON of the wrong shape or with unknown fields", body = ErrorBody),
    ))]
async fn heartbeat(
    State(s): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<HeartbeatRequest>,
) -> Result<Json<HeartbeatResponse>, ApiError> {
    caller.act_as(&req.node, &s.auth)?;
    let started = Instant::now();
    let result = s.handle()?.heartbeat(req).await;
    s.metrics
        .heartbeat_seconds
        .observe(started.elapsed().as_secs_f64());
    Ok(Json(result?))
}

/// A session's tree: every node with depth, parents and progress.
#[utoipa::path(get, path = "/v1/sessions/{image}", tag = "sessions",
    params(("image" = String, Path, description = "image name")),
    responses(
        (status = 200, description = "the tree", body = TreeView),
        (status = 404, description = "unknown image", body = ErrorBody),
    ))]
async fn tree(
    State(s): State<AppState>,
    _reader: Reader,
    ApiPath(image): ApiPath,
) -> Result<Json<TreeView>, ApiError> {
    Ok(Json(s.handle()?.tree(image).await?))
}

/// A node's state in every session.
#[utoipa::path(get, path = "/v1/nodes/{node}", tag = "nodes",
    params(("node" = String, Path, description = "node name")),
    responses(
        (status = 200, description = "the node", body = NodeState),
        (status = 400, description = "not a node name", body = ErrorBody),
        (status = 404, description = "unknown node", body = ErrorBody),
    ))]
async fn node(
    State(s): State<AppState>,
    _reader: Reader,
    ApiPath(node): ApiPath,
) -> Result<Json<NodeState>, ApiError> {
    Ok(Json(s.handle()?.node(node).await?))
}

/// Bans a node: it leaves every session (its children are re-attached),
/// every later call of its is refused with 403 `banned`, and agents refuse
/// its connections from their next heartbeat on. Operators only.
#[utoipa::path(post, path = "/v1/nodes/{node}/ban", tag = "nodes",
    params(("node" = String, Path, description = "node name")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "banned; the node's state now", body = NodeState),
        (status = 400, description = "not a node name", body = ErrorBody),
        (status = 401, description = "no certificate and no or a wrong token", body = ErrorBody),
        (status = 403, description = "not an operator", body = ErrorBody),
    ))]
async fn ban(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(node): ApiPath,
) -> Result<Json<NodeState>, ApiError> {
    caller.operator()?;
    tracing::warn!(node, by = ?caller, "banning");
    Ok(Json(s.handle()?.ban(node, true).await?))
}

/// Lifts a node's ban: it may join again. Operators only.
#[utoipa::path(delete, path = "/v1/nodes/{node}/ban", tag = "nodes",
    params(("node" = String, Path, description = "node name")),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "not banned (any more)"),
        (status = 400, description = "not a node name", body = ErrorBody),
        (status = 401, description = "no certificate and no or a wrong token", body = ErrorBody),
        (status = 403, description = "not an operator", body = ErrorBody),
    ))]
async fn unban(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(node): ApiPath,
) -> Result<StatusCode, ApiError> {
    caller.operator()?;
    s.handle()?.ban(node, false).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Liveness.
#[utoipa::path(get, path = "/v1/health", tag = "meta",
    responses((status = 200, description = "up", body = Health)))]
async fn health() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

/// This document.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "meta",
    responses((status = 200, description = "the OpenAPI document")))]
async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], openapi_json()).into_response()
}

/// Prometheus metrics (OpenMetrics text).
#[utoipa::path(get, path = "/metrics", tag = "meta",
    responses((status = 200, description = "metrics in the OpenMetrics text format")))]
async fn metrics(State(s): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

struct BearerSecurity;

impl Modify for BearerSecurity {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "virtman coordinator",
        version = "1",
        description = "Relay trees per image: registration, join, leave, heartbeat, reports, trees.",
        license(name = "Apache-2.0")
    ),
    paths(register_image, list_images, get_image, preheat, preheat_status, cancel_preheat, join,
        leave, report, heartbeat, tree, node, ban, unban, coordinator_status, health, openapi,
        metrics),
    components(schemas(RegisterImage, ImageInfo, JoinRequest, JoinResponse, LeaveRequest,
        ReportRequest, Assignment, Parent, HeartbeatRequest, SessionBeat, HeartbeatResponse,
        TreeView, NodeView, SessionStats, NodeState, NodeSession, ErrorBody, Health,
        PreheatRequest, PreheatOrder, PreheatState, PreheatReport, PreheatHost, PreheatStatus,
        CoordinatorStatus, LeaderView, EndpointHealth)),
    modifiers(&BearerSecurity),
)]
struct ApiDoc;

/// The OpenAPI document of the API, pretty-printed JSON with a final newline
/// (the committed `openapi.json` must equal it).
pub fn openapi_json() -> String {
    let mut s = ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    s.push('\n');
    s
}
