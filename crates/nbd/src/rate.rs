//! A byte token bucket: a link's worth of bytes a second on average, a burst
//! at once, urgent takers before background ones.
//!
//! ```text
//!   tokens ◄── refilled at `rate` bytes/s, at most `burst`
//!   take(n) waits until tokens >= min(n, burst), then spends n
//!   (so over any span t, what is taken is at most burst + rate × t,
//!   plus the overdraft of one take larger than the burst)
//! ```
//!
//! A background take also waits while any urgent take waits: prefetch uses
//! only what demand leaves. The rate can change at any time ([`TokenBucket::set`]);
//! waiting takers see it at once. A rate of `None` takes nothing and never
//! waits.
//!
//! Used for the agent's upload and download caps and for a plain server's
//! link in `virtman serve --rate` and the storm's user-space links.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Who is taking: urgent takers go first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    /// A read someone waits for (a VM's, a child's).
    Urgent,
    /// Prefetch and preheat: only what urgent takers leave.
    Background,
}

/// A rate and its burst.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    /// Bytes a second (more than 0).
    pub bytes_per_sec: u64,
    /// The most taken at once without waiting (more than 0).
    pub burst: u64,
}

#[derive(Debug)]
struct State {
    rate: Option<Rate>,
    tokens: f64,
    at: Instant,
    urgent_waiting: usize,
    waited: Duration,
}

impl State {
    fn refill(&mut self, now: Instant) {
        if let Some(r) = self.rate {
            #[allow(clippy::cast_precision_loss)]
            let add = now.saturating_duration_since(self.at).as_secs_f64() * r.bytes_per_sec as f64;
            #[allow(clippy::cast_precision_loss)]
            let cap = r.burst as f64;
            self.tokens = (self.tokens + add).min(cap);
        }
        self.at = now;
    }
}

/// A byte token bucket (see the module).
#[derive(Debug)]
pub struct TokenBucket {
    state: Mutex<State>,
    changed: Notify,
}

/// Counts an urgent taker as waiting for as long as it waits (even if its
/// future is dropped).
struct UrgentWait<'a>(&'a TokenBucket);

impl Drop for UrgentWait<'_> {
    fn drop(&mut self) {
        self.0.lock().urgent_waiting -= 1;
        self.0.changed.notify_waiters();
    }
}

impl TokenBucket {
    /// A bucket at `rate` (none: unlimited), full.
    pub fn new(rate: Option<Rate>) -> TokenBucket {
        #[allow(clippy::cast_precision_loss)]
        let tokens = rate.map_or(0.0, |r| r.burst as f64);
        TokenBucket {
            state: Mutex::new(State {
                rate,
                tokens,
                at: Instant::now(),
                urgent_waiting: 0,
                waited: Duration::ZERO,
            }),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The rate now.
    pub fn rate(&self) -> Option<Rate> {
        self.lock().rate
    }

    /// Changes the rate (none: unlimited); waiting takers see it at once.
    /// The tokens saved so far stay, up to the new burst.
    pub fn set(&self, rate: Option<Rate>) {
        {
            let mut s = self.lock();
            s.refill(Instant::now());
            s.rate = rate;
            #[allow(clippy::cast_precision_loss)]
            if let Some(r) = rate {
                s.tokens = s.tokens.min(r.burst as f64);
            }
        }
        self.changed.notify_waiters();
    }

    /// Total time takers have waited.
    pub fn waited(&self) -> Duration {
        self.lock().waited
    }

    /// Takes `n` bytes, waiting as the rate requires; returns how long it
    /// waited.
    pub async fn take(&self, n: u64, priority: Priority) -> Duration {
        let start = Instant::now();
        let mut urgent: Option<UrgentWait<'_>> = None;
        loop {
            // Listen before looking, so no change is missed in between.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let wait = {
                let mut s = self.lock();
                let now = Instant::now();
                s.refill(now);
                match s.rate {
                    None => break,
                    Some(_) if priority == Priority::Background && s.urgent_waiting > 0 => None,
                    Some(r) => {
                        #[allow(clippy::cast_precision_loss)]
                        let need = n.min(r.burst) as f64;
                        if s.tokens >= need {
                            #[allow(clippy::cast_precision_loss)]
                            let spend = n as f64;
                            s.tokens -= spend;
                            break;
                        }
                        if priority == Priority::Urgent && urgent.is_none() {
                            s.urgent_waiting += 1;
                            urgent = Some(UrgentWait(self));
                        }
                        #[allow(clippy::cast_precision_loss)]
                        let secs = (need - s.tokens) / r.bytes_per_sec as f64;
                        Some(Duration::from_secs_f64(secs.max(0.0)))
                    }
                }
            };
            match wait {
                Some(d) => {
                    tokio::select! {
                        () = tokio::time::sleep(d) => {}
                        () = &mut changed => {}
                    }
                }
                None => changed.await,
            }
        }
        drop(urgent);
        let waited = start.elapsed();
        if !waited.is_zero() {
            self.lock().waited += waited;
        }
        waited
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    fn rate(bytes_per_sec: u64, burst: u64) -> Option<Rate> {
        Some(Rate {
            bytes_per_sec,
            burst,
        })
    }

    /// Takers as fast as they can for `secs`: what they took.
    async fn flood(b: &Arc<TokenBucket>, takers: usize, n: u64, secs: u64) -> u64 {
        let total = Arc::new(AtomicU64::new(0));
        let end = Instant::now() + Duration::from_secs(secs);
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..takers {
            let (b, total) = (Arc::clone(b), Arc::clone(&total));
            set.spawn(async move {
                while Instant::now() < end {
                    b.take(n, Priority::Urgent).await;
                    if Instant::now() <= end {
                        total.fetch_add(n, Ordering::Relaxed);
                    }
                }
            });
        }
        while set.join_next().await.is_some() {}
        total.load(Ordering::Relaxed)
    }

    #[tokio::test(start_paused = true)]
    async fn what_is_taken_meets_the_closed_form() {
        // 1 MB/s, 256 KiB burst, 64 KiB takes by 4 takers for 10 s: at most
        // burst + rate × t, and (time being exact here) within a take of it.
        let b = Arc::new(TokenBucket::new(rate(1_000_000, 256 << 10)));
        let got = flood(&b, 4, 64 << 10, 10).await;
        let bound = (256 << 10) + 10 * 1_000_000;
        assert!(got <= bound, "{got} > {bound}");
        assert!(got + 2 * (64 << 10) >= bound, "{got} far below {bound}");
        assert!(b.waited() > Duration::from_secs(30), "{:?}", b.waited());
    }

    #[tokio::test(start_paused = true)]
    async fn unlimited_never_waits_and_a_take_larger_than_the_burst_goes_through() {
        let b = TokenBucket::new(None);
        assert_eq!(b.take(u64::MAX, Priority::Background).await, Duration::ZERO);
        let b = TokenBucket::new(rate(1000, 100));
        assert_eq!(b.take(5000, Priority::Urgent).await, Duration::ZERO);
        // It overdrew: the next waits for the debt and its own need.
        let w = b.take(100, Priority::Urgent).await;
        assert_eq!(w, Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn background_takes_wait_while_urgent_ones_wait() {
        let b = Arc::new(TokenBucket::new(rate(1000, 1000)));
        b.take(1000, Priority::Urgent).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut set = tokio::task::JoinSet::new();
        for (k, p) in [
            (0, Priority::Background),
            (1, Priority::Urgent),
            (2, Priority::Urgent),
        ] {
            let (b, order) = (Arc::clone(&b), Arc::clone(&order));
            set.spawn(async move {
                b.take(500, p).await;
                order.lock().unwrap().push(k);
            });
            tokio::task::yield_now().await;
        }
        while set.join_next().await.is_some() {}
        let order = order.lock().unwrap().clone();
        assert_eq!(order.last(), Some(&0), "{order:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_rate_reaches_waiting_takers_at_once() {
        let b = Arc::new(TokenBucket::new(rate(10, 10)));
        b.take(10, Priority::Urgent).await;
        let t = {
            let b = Arc::clone(&b);
            tokio::spawn(async move { b.take(10_000, Priority::Urgent).await })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        b.set(rate(1_000_000, 1_000_000));
        let waited = t.await.unwrap();
        assert!(waited < Duration::from_millis(1100), "{waited:?}");
        b.set(None);
        assert_eq!(b.take(1 << 40, Priority::Background).await, Duration::ZERO);
    }
}
