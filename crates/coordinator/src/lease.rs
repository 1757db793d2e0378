//! How long this coordinator may still act as the leader, on its own clock.
//!
//! etcd starts a lease's TTL anew when it receives a keep-alive, so a
//! keep-alive *sent* at `t` proves the lease holds until at least `t + TTL`.
//! The leader stops writing and ticking a little before that (a tenth of
//! the TTL early), without asking etcd: after a long pause (SIGSTOP, a
//! frozen VM) the first thing it does is look at this clock, find it
//! expired, and refuse. The fenced transactions of the etcd store are the
//! second guard, for whatever slips past the first.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The deadline of a leader's lease, shared by its state task and store.
#[derive(Debug)]
pub struct LeaseClock {
    base: Instant,
    /// Milliseconds after `base` until which the lease holds (0: never).
    until_ms: AtomicU64,
}

impl Default for LeaseClock {
    fn default() -> Self {
        Self::new()
    }
}

impl LeaseClock {
    /// A clock that holds no lease yet.
    pub fn new() -> Self {
        Self {
            base: Instant::now(),
            until_ms: AtomicU64::new(0),
        }
    }

    /// Whether the lease still holds now.
    pub fn valid(&self) -> bool {
        let now = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        now < self.until_ms.load(Ordering::Acquire)
    }

    /// A keep-alive (or the grant) sent at `sent` was answered with `ttl`.
    pub fn extend(&self, sent: Instant, ttl: Duration) {
        let safe = ttl - ttl / 10;
        let until = sent.saturating_duration_since(self.base) + safe;
        let until = u64::try_from(until.as_millis()).unwrap_or(u64::MAX);
        self.until_ms.fetch_max(until, Ordering::AcqRel);
    }

    /// The lease is gone (lost, revoked, or stepping down).
    pub fn expire(&self) {
        self.until_ms.store(0, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_for_nine_tenths_of_the_ttl_from_the_send() {
        let c = LeaseClock::new();
        assert!(!c.valid());
        c.extend(Instant::now(), Duration::from_secs(10));
        assert!(c.valid());
        // A keep-alive sent long ago proves nothing now.
        let old = Instant::now();
        let c = LeaseClock::new();
        c.extend(old, Duration::from_millis(20));
        std::thread::sleep(Duration::from_millis(25));
        assert!(!c.valid());
        c.extend(Instant::now(), Duration::from_secs(10));
        assert!(c.valid());
        c.expire();
        assert!(!c.valid());
    }
}
