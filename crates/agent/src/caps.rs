//! A host's bandwidth caps: what relaying may take from its network.
//!
//! ```text
//!   upload   base server ─► children: every read reply waits for its bytes
//!            (all children and origins' sends together, first come first served)
//!   download Parents ─► each attempt at a parent or origin waits for the
//!            chunk's bytes: demand before prefetch, which uses what is left
//! ```
//!
//! Both are [`TokenBucket`]s with a burst of a few chunks; either can be off,
//! and both change at run time (`PUT /v1/caps`, `virtman agent set`).
//! Counted: bytes fetched per class and the time each class waited, and the
//! time the upload cap held replies.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use virtman_cache::FetchClass;
use virtman_nbd::rate::{Priority, Rate, TokenBucket};

/// The burst of a cap: four default-size chunks.
pub const BURST: u64 = 4 * virtman_image::DEFAULT_CHUNK_SIZE as u64;

/// The caps of a host, in bytes a second (none: no cap). The body of
/// `GET`/`PUT /v1/caps`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapRates {
    /// Bytes a second this host may send to children.
    pub upload: Option<u64>,
    /// Bytes a second this host may fetch from parents and origins.
    pub download: Option<u64>,
}

impl CapRates {
    /// Refuses a cap of 0 (it would stop all traffic: no cap is `None`).
    pub fn check(&self) -> Result<(), String> {
        for (what, r) in [("upload", self.upload), ("download", self.download)] {
            if r == Some(0) {
                return Err(format!(
                    "an {what} cap of 0 would stop all traffic; to remove the cap, leave it out (or say off)"
                ));
            }
        }
        Ok(())
    }
}

fn rate(bytes_per_sec: Option<u64>) -> Option<Rate> {
    bytes_per_sec.filter(|&b| b > 0).map(|b| Rate {
        bytes_per_sec: b,
        burst: BURST,
    })
}

#[derive(Debug, Default)]
struct ClassStats {
    bytes: AtomicU64,
    waited_ns: AtomicU64,
}

/// A host's upload and download caps and their counters.
#[derive(Debug)]
pub struct Caps {
    upload: Arc<TokenBucket>,
    download: TokenBucket,
    /// Demand, prefetch, preheat.
    classes: [ClassStats; 3],
}

impl Default for Caps {
    fn default() -> Self {
        Caps::new(CapRates::default())
    }
}

fn class_index(class: FetchClass) -> usize {
    match class {
        FetchClass::Demand => 0,
        FetchClass::Prefetch => 1,
        FetchClass::Preheat => 2,
    }
}

impl Caps {
    /// Caps at `rates` (a rate of 0 is taken as no cap; check first).
    pub fn new(rates: CapRates) -> Caps {
        Caps {
            upload: Arc::new(TokenBucket::new(rate(rates.upload))),
            download: TokenBucket::new(rate(rates.download)),
            classes: Default::default(),
        }
    }

    /// The caps now.
    pub fn rates(&self) -> CapRates {
        CapRates {
            upload: self.upload.rate().map(|r| r.bytes_per_sec),
            download: self.download.rate().map(|r| r.bytes_per_sec),
        }
    }

    /// Changes both caps; waiting transfers see the new rates at once.
    pub fn set(&self, rates: CapRates) {
        self.upload.set(rate(rates.upload));
        self.download.set(rate(rates.download));
    }

    /// The upload bucket, for the base server.
    pub fn upload(&self) -> Arc<TokenBucket> {
        Arc::clone(&self.upload)
    }

    /// Waits until `n` bytes of a `class` fetch may be asked for.
    pub async fn download(&self, n: u64, class: FetchClass) {
        let priority = match class {
            FetchClass::Demand => Priority::Urgent,
            FetchClass::Prefetch | FetchClass::Preheat => Priority::Background,
        };
        let waited = self.download.take(n, priority).await;
        let c = &self.classes[class_index(class)];
        c.bytes.fetch_add(n, Ordering::Relaxed);
        c.waited_ns.fetch_add(
            u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Bytes asked for by `class` fetches (hedges and retries included).
    pub fn fetched(&self, class: FetchClass) -> u64 {
        self.classes[class_index(class)]
            .bytes
            .load(Ordering::Relaxed)
    }

    /// Time `class` fetches waited for the download cap.
    pub fn download_waited(&self, class: FetchClass) -> Duration {
        Duration::from_nanos(
            self.classes[class_index(class)]
                .waited_ns
                .load(Ordering::Relaxed),
        )
    }

    /// Time replies to children waited for the upload cap.
    pub fn upload_waited(&self) -> Duration {
        self.upload.waited()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_is_refused_and_rates_read_back() {
        assert!(
            CapRates {
                upload: Some(0),
                download: None
            }
            .check()
            .unwrap_err()
            .contains("upload")
        );
        let caps = Caps::new(CapRates {
            upload: Some(1000),
            download: None,
        });
        assert_eq!(caps.rates().upload, Some(1000));
        caps.set(CapRates {
            upload: None,
            download: Some(5),
        });
        assert_eq!(
            caps.rates(),
            CapRates {
                upload: None,
                download: Some(5)
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn classes_are_counted_and_prefetch_waits_behind_demand() {
        let caps = Arc::new(Caps::new(CapRates {
            upload: None,
            download: Some(BURST),
        }));
        // Empty the bucket, then one prefetch and one demand take at once.
        caps.download(BURST, FetchClass::Demand).await;
        let p = {
            let c = Arc::clone(&caps);
            tokio::spawn(async move { c.download(BURST / 2, FetchClass::Prefetch).await })
        };
        tokio::task::yield_now().await;
        caps.download(BURST / 2, FetchClass::Demand).await;
        p.await.unwrap();
        assert_eq!(caps.fetched(FetchClass::Demand), BURST + BURST / 2);
        assert_eq!(caps.fetched(FetchClass::Prefetch), BURST / 2);
        assert!(
            caps.download_waited(FetchClass::Prefetch) > caps.download_waited(FetchClass::Demand)
        );
    }
}
