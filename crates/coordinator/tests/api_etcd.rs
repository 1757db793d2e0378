//! The API tests of `api.rs`, against a coordinator whose state is in a real
//! one-member etcd (started per coordinator in the test's directory, so a
//! restart finds the state again).

#![allow(missing_docs, clippy::unwrap_used, clippy::type_complexity)]

/// The etcd store.
const ETCD: bool = true;

include!("api/cases.rs");
