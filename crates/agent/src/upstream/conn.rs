//! One source of chunks (a parent or an origin): its NBD client, opened on
//! first use, its load, whether it is cooling down after a failure or was
//! caught lying, and what it sent.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtman_nbd::{Client, ClientConfig, Endpoint};

use super::{FetchConfig, Source};

pub(super) struct Conn {
    pub(super) source: Source,
    pub(super) origin: bool,
    client: tokio::sync::Mutex<Option<Client>>,
    pub(super) outstanding: AtomicUsize,
    /// Skip until this instant (a recent failure).
    cool_until: Mutex<Option<Instant>>,
    /// Put behind the others until this instant (it lost to a hedge).
    slow_until: Mutex<Option<Instant>>,
    /// When it last answered a request (with a chunk or "not here").
    answered: Mutex<Option<Instant>>,
    /// Sent a wrong chunk: never used again for this image.
    pub(super) liar: AtomicBool,
    /// Bytes fetched from this source (shared with the image's totals,
    /// which outlive the connection).
    pub(super) bytes: Arc<AtomicU64>,
}

impl Conn {
    pub(super) fn new(source: Source, origin: bool, bytes: Arc<AtomicU64>) -> Arc<Conn> {
        Arc::new(Conn {
            source,
            origin,
            client: tokio::sync::Mutex::new(None),
            outstanding: AtomicUsize::new(0),
            cool_until: Mutex::new(None),
            slow_until: Mutex::new(None),
            answered: Mutex::new(None),
            liar: AtomicBool::new(false),
            bytes,
        })
    }

    /// Failed recently: tried after every healthy source.
    pub(super) fn cooling(&self, now: Instant) -> bool {
        until(&self.cool_until, now)
    }

    pub(super) fn cool(&self, d: Duration) {
        set_until(&self.cool_until, d);
    }

    /// Lost to a hedge recently: tried after the sources that did not.
    pub(super) fn slow(&self, now: Instant) -> bool {
        until(&self.slow_until, now)
    }

    pub(super) fn mark_slow(&self, d: Duration) {
        set_until(&self.slow_until, d);
    }

    /// It answered a request.
    pub(super) fn mark_answered(&self) {
        *self.answered.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    /// Whether it answered any request after `t`: alive and busy, not hung.
    pub(super) fn answered_since(&self, t: Instant) -> bool {
        self.answered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|a| a > t)
    }

    /// The connected client, connecting first if needed.
    pub(super) async fn client(&self, image: &str, config: &FetchConfig) -> Result<Client, String> {
        let mut g = self.client.lock().await;
        if let Some(c) = g.as_ref() {
            return Ok(c.clone());
        }
        let cc = ClientConfig {
            export: image.to_owned(),
            connections: config.connections,
            // `attempt` times reads out sooner when the source is silent.
            request_timeout: config.request_deadline.max(config.request_timeout),
            connect_timeout: config.connect_timeout,
            tls: config.tls.clone(),
            // Says "a child" to the parent, which counts what it serves
            // children apart from other readers.
            meta_contexts: vec![virtman_cache::X_VIRTMAN_PRESENT.to_owned()],
        };
        let c = Client::connect(&Endpoint::Tcp(self.source.addr.clone()), &cc)
            .await
            .map_err(|e| e.to_string())?;
        *g = Some(c.clone());
        Ok(c)
    }

    pub(super) async fn forget_client(&self) {
        *self.client.lock().await = None;
    }
}

fn until(m: &Mutex<Option<Instant>>, now: Instant) -> bool {
    let g = m.lock().unwrap_or_else(|p| p.into_inner());
    g.is_some_and(|t| now < t)
}

fn set_until(m: &Mutex<Option<Instant>>, d: Duration) {
    *m.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + d);
}
