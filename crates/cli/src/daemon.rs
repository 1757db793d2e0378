//! What a long-running server tells its service manager: readiness for
//! systemd's `Type=notify` (`dist/virtman-agent.service`,
//! `dist/virtman-coordinator.service`).
//!
//! ```text
//!   bind listeners ─► print "listening on ADDR" ─► ready() ─► READY=1 to $NOTIFY_SOCKET
//!   signal ─► stopping() ─► STOPPING=1 ─► finish the requests in flight
//! ```
//!
//! Without `NOTIFY_SOCKET` (not started by systemd) both do nothing. A
//! notification that cannot be sent is logged, never fatal: the service then
//! fails its start timeout, which says more than an exit would.
//!
//! [`StopSignals`] are installed before the server says it is ready: a
//! SIGTERM sent the moment after `READY=1` (or the `listening on` line) is
//! then a graceful stop, not the signal's default action killing the process.

use anyhow::Context;
use sd_notify::NotifyState;
use tokio::signal::unix::{Signal, SignalKind, signal};

/// SIGTERM and SIGINT, caught from the moment this is made; and SIGHUP,
/// whose default action would end the process (`systemctl reload`): with
/// `--tls` it reloads the certificates (its own task), else it is logged.
pub struct StopSignals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl StopSignals {
    /// Installs the handlers (inside a tokio runtime).
    pub fn install() -> anyhow::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate()).context("installing SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing SIGINT handler")?,
            hup: signal(SignalKind::hangup()).context("installing SIGHUP handler")?,
        })
    }

    /// Waits for SIGTERM or SIGINT; a SIGHUP meanwhile is logged.
    pub async fn wait(&mut self) {
        loop {
            tokio::select! {
                _ = self.term.recv() => return,
                _ = self.int.recv() => return,
                _ = self.hup.recv() => {
                    tracing::info!("SIGHUP: certificates are reloaded when serving with --tls; nothing else to reload");
                }
            }
        }
    }
}

/// Tells the service manager that `what` is serving: its listeners are bound,
/// so a client connecting now is accepted.
pub fn ready(what: &str) {
    send(&[
        NotifyState::Ready,
        NotifyState::Status(&format!("{what} serving")),
    ]);
}

/// Tells the service manager that the service is stopping.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

fn send(state: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "cannot notify the service manager (NOTIFY_SOCKET)");
    }
}
