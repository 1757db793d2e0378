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

use sd_notify::NotifyState;

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
