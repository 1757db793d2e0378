//! Who may call what: the bearer token, client certificates, and the
//! [`Caller`] every guarded handler extracts.
//!
//! ```text
//!   request ─► ConnectInfo<Peer> with a certificate? ─► Node(name) | Operator(name)
//!           └► else Authorization: Bearer <token>     ─► Token
//!           └► else 401
//!   node calls (join, leave, report, heartbeat): Node(n) as n only (403 otherwise);
//!       the token too when the coordinator has no certificates (a PKI-less cluster)
//!   operator calls (ban, unban): Operator or Token
//!   register an image: any caller (an origin agent registers what it serves)
//!   reads (/v1/images, trees, nodes): open without certificates; with them,
//!       any caller; /v1/health, /v1/openapi.json and /metrics stay open
//! ```
//!
//! With certificates the token is the operator's: it no longer acts for
//! nodes, so holding it does not let a host speak as another host.

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::header;
use axum::http::request::Parts;
use subtle::ConstantTimeEq;
use virtman_pki::Role;

use crate::error::ApiError;
use crate::http::AppState;
use crate::tls::Peer;

/// The shared secret that state-changing calls must present as
/// `Authorization: Bearer <token>`. Only its BLAKE3 digest is kept, and a
/// candidate is compared digest to digest in constant time, so neither the
/// secret's bytes nor its length leak through timing.
#[derive(Clone)]
pub struct Token {
    digest: [u8; 32],
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Tokens must be at least 16 characters.
    #[error("a token must be at least 16 characters, got {0}")]
    TooShort(usize),
    /// Tokens must be printable ASCII without spaces (they go in a header).
    #[error("a token must be printable ASCII without spaces")]
    BadCharacters,
}

impl Token {
    /// The smallest accepted token length.
    pub const MIN_LEN: usize = 16;

    /// A token from its secret (surrounding whitespace is trimmed).
    pub fn new(secret: &str) -> Result<Self, TokenError> {
        let secret = secret.trim();
        if secret.len() < Self::MIN_LEN {
            return Err(TokenError::TooShort(secret.len()));
        }
        if !secret.chars().all(|c| c.is_ascii_graphic()) {
            return Err(TokenError::BadCharacters);
        }
        Ok(Self {
            digest: *blake3::hash(secret.as_bytes()).as_bytes(),
        })
    }

    /// Whether `candidate` is the secret, in constant time.
    pub fn verify(&self, candidate: &str) -> bool {
        let d = blake3::hash(candidate.as_bytes());
        d.as_bytes().ct_eq(&self.digest).into()
    }
}

/// What the coordinator accepts.
#[derive(Debug, Clone)]
pub struct Auth {
    /// The bearer token.
    pub token: Token,
    /// Clients may authenticate with certificates of the cluster CA (the
    /// API is HTTPS); nodes must then use theirs.
    pub certificates: bool,
}

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A node, by its certificate.
    Node(String),
    /// An operator, by their certificate.
    Operator(String),
    /// Whoever holds the bearer token.
    Token,
}

impl Caller {
    /// Whether this caller may act for node `node` (join, leave, report,
    /// heartbeat as it).
    pub fn act_as(&self, node: &str, auth: &Auth) -> Result<(), ApiError> {
        match self {
            Caller::Node(name) if name == node => Ok(()),
            Caller::Node(name) => Err(ApiError::forbidden(format!(
                "this certificate is node {name:?}'s; it may not act as node {node:?}"
            ))),
            Caller::Operator(name) => Err(ApiError::forbidden(format!(
                "{name:?} holds an operator certificate; only node {node:?} acts as itself"
            ))),
            Caller::Token if auth.certificates => Err(ApiError::forbidden(format!(
                "this coordinator authenticates nodes by certificate: node {node:?} must \
                 present its own (the token is for operators)"
            ))),
            Caller::Token => Ok(()),
        }
    }

    /// Whether this caller may make operator calls.
    pub fn operator(&self) -> Result<(), ApiError> {
        match self {
            Caller::Operator(_) | Caller::Token => Ok(()),
            Caller::Node(name) => Err(ApiError::forbidden(format!(
                "node {name:?} may not do this: it needs an operator certificate or the token"
            ))),
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let certified = parts
            .extensions
            .get::<ConnectInfo<Peer>>()
            .and_then(|ConnectInfo(peer)| peer.identity.as_ref());
        if let Some(id) = certified {
            return Ok(match id.role {
                Role::Node => Caller::Node(id.name.clone()),
                Role::Operator => Caller::Operator(id.name.clone()),
            });
        }
        let Some(value) = parts.headers.get(header::AUTHORIZATION) else {
            let how = match state.auth.certificates {
                true => "a client certificate of the cluster CA or ",
                false => "",
            };
            return Err(ApiError::unauthorized(format!(
                "this call needs {how}an Authorization: Bearer token"
            )));
        };
        let value = value
            .to_str()
            .map_err(|_| ApiError::unauthorized("the Authorization header is not text"))?;
        // The scheme is case-insensitive (RFC 9110); the token is not.
        let token = match value.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token,
            _ => {
                return Err(ApiError::unauthorized(
                    "the Authorization header must be Bearer",
                ));
            }
        };
        if state.auth.token.verify(token.trim()) {
            Ok(Caller::Token)
        } else {
            Err(ApiError::unauthorized("wrong token"))
        }
    }
}

/// Proof that the caller may read the cluster's state: anyone without
/// certificates (as before them), any [`Caller`] with them.
#[derive(Debug)]
pub struct Reader;

impl FromRequestParts<AppState> for Reader {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if state.auth.certificates {
            Caller::from_request_parts(parts, state).await?;
        }
        Ok(Reader)
    }
}
