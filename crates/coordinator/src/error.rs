//! Errors: [`ApiError`] is what a request gets back (status, stable code,
//! message, as an [`ErrorBody`]); [`CoordinatorError`] is why the service
//! could not start or stopped.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::api::ErrorBody;

/// A refused request: an HTTP status, a stable code and a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status} {code}: {message}")]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The stable code of [`ErrorBody::error`].
    pub code: &'static str,
    /// What is wrong.
    pub message: String,
}

impl ApiError {
    /// Any error with a status and code.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// 400: the request is malformed or a value is out of range.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// 401: the bearer token is missing or wrong.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// 403: the caller is authenticated but may not do this.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// 403: the node is banned (`virtman node ban`).
    pub fn banned(node: &str) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "banned",
            format!("node {node:?} is banned from this cluster"),
        )
    }

    /// 404: no such image.
    pub fn unknown_image(image: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "unknown_image",
            format!("no image named {image:?} is registered"),
        )
    }

    /// 404: the node is not a member of the session.
    pub fn unknown_node(node: &str, image: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "unknown_node",
            format!("node {node:?} is not in the session of image {image:?}"),
        )
    }

    /// 409: the node already joined this session.
    pub fn already_joined(node: &str, image: &str) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "already_joined",
            format!("node {node:?} already joined the session of image {image:?}"),
        )
    }

    /// 410: the node was declared dead and must join again.
    pub fn dead(node: &str, images: &[String]) -> Self {
        Self::new(
            StatusCode::GONE,
            "dead",
            format!(
                "node {node:?} was declared dead in {}; join again",
                images.join(", ")
            ),
        )
    }

    /// 500: the coordinator failed (storage, a stopped state task).
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    /// 503: this coordinator cannot decide now (it does not lead, or its
    /// store is unreachable); another coordinator, or a retry, may.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    /// The JSON body sent with this error.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: self.code.to_owned(),
            message: self.message.clone(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// Why the coordinator could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// The configuration is not usable.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The data directory could not be created.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The durable store failed.
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    /// etcd could not be used (unreachable, not etcd, or refused).
    #[error("etcd at {endpoints}: {message}")]
    Etcd {
        /// The endpoints tried.
        endpoints: String,
        /// What failed.
        message: String,
    },
    /// Serving HTTP failed.
    #[error("serving: {0}")]
    Serve(std::io::Error),
}
