//! API tests against a real coordinator on 127.0.0.1:0: the whole life of a
//! session, authentication, every kind of bad input, restart with state
//! recovered, per-instance metrics, and the committed OpenAPI document.

#![allow(missing_docs, clippy::unwrap_used, clippy::type_complexity)]

/// The redb store.
const ETCD: bool = false;

include!("api/cases.rs");
