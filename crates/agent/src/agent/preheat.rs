//! Preheat on this host: the coordinator's orders, from its heartbeat answers.
//!
//! ```text
//!   heartbeat answer: every order this host matches
//!     new order (image, id) ─► task: join the image (which replays its boot
//!                              profile) ─► whole? pin ─► wait until done
//!     order gone            ─► cancelled: stop the task, the replay and the pin
//!   next heartbeat: one report per order (running, done, failed + why)
//! ```
//!
//! An origin image is whole here: done at once. An image larger than the
//! cache cannot be held whole: a `whole` order fails at once, saying so.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use virtman_coordinator::api::{PreheatOrder, PreheatReport, PreheatState};

use super::{Agent, Role, lock};

/// One order this host follows.
#[derive(Debug)]
pub(crate) struct Run {
    id: u64,
    state: Arc<Mutex<(PreheatState, String)>>,
    cancel: CancellationToken,
}

impl Agent {
    /// What to tell the coordinator of each order followed.
    pub(super) fn preheat_reports(&self) -> Vec<PreheatReport> {
        lock(&self.preheats)
            .iter()
            .map(|(image, run)| {
                let (state, message) = lock(&run.state).clone();
                PreheatReport {
                    image: image.clone(),
                    id: run.id,
                    state,
                    message,
                }
            })
            .collect()
    }

    /// Follows the orders of a heartbeat answer: starts the new ones, stops
    /// the ones no longer there.
    pub(super) fn follow_preheats(self: &Arc<Self>, orders: Vec<PreheatOrder>) {
        let mut runs = lock(&self.preheats);
        runs.retain(|image, run| {
            let keep = orders.iter().any(|o| &o.image == image && o.id == run.id);
            if !keep {
                run.cancel.cancel();
                let running = lock(&run.state).0 == PreheatState::Running;
                if running {
                    info!(
                        image,
                        id = run.id,
                        "preheat cancelled; stopping its fetches"
                    );
                    self.stop_prefetch(image);
                }
            }
            keep
        });
        for order in orders {
            if runs.contains_key(&order.image) {
                continue;
            }
            let run = Run {
                id: order.id,
                state: Arc::new(Mutex::new((PreheatState::Running, String::new()))),
                cancel: CancellationToken::new(),
            };
            let (state, cancel) = (Arc::clone(&run.state), run.cancel.clone());
            runs.insert(order.image.clone(), run);
            let agent = Arc::clone(self);
            tokio::spawn(async move {
                let result = tokio::select! {
                    r = agent.preheat(&order) => r,
                    () = cancel.cancelled() => return,
                };
                agent.set_preheating(&order.image, false);
                let s = match result {
                    Ok(()) => {
                        info!(image = %order.image, id = order.id, "preheated");
                        (PreheatState::Done, String::new())
                    }
                    Err(e) => {
                        warn!(image = %order.image, id = order.id, error = %e, "preheat failed");
                        (PreheatState::Failed, e)
                    }
                };
                *lock(&state) = s;
            });
        }
    }

    /// The prefetch state of a member image.
    fn member_prefetch(&self, image: &str) -> Option<Arc<crate::prefetch::ImagePrefetch>> {
        match &lock(&self.images).get(image)?.role {
            Role::Member { prefetch, .. } => Some(Arc::clone(prefetch)),
            Role::Origin { .. } => None,
        }
    }

    /// Stops an image's profile replay and pin.
    fn stop_prefetch(&self, image: &str) {
        if let Some(p) = self.member_prefetch(image) {
            p.stop_background();
            p.set_preheat(false);
        }
    }

    /// Whether an image's replay and pin count as preheat (a member joined
    /// before the order came: its pin, from now on).
    fn set_preheating(&self, image: &str, on: bool) {
        if let Some(p) = self.member_prefetch(image) {
            p.set_preheat(on);
        }
    }

    /// Carries out one order until it is done.
    async fn preheat(self: &Arc<Self>, order: &PreheatOrder) -> Result<(), String> {
        let image = order.image.as_str();
        if self.is_origin(image) {
            return Ok(());
        }
        info!(
            image,
            id = order.id,
            whole = order.request.whole,
            "preheating"
        );
        self.ensure_image(image).await.map_err(|e| e.to_string())?;
        self.set_preheating(image, true);
        let entry = lock(&self.images).get(image).cloned();
        let Some(Role::Member {
            volume, prefetch, ..
        }) = entry.as_deref().map(|e| &e.role)
        else {
            return Err(format!("image {image:?} is not a member image here"));
        };
        if order.request.whole {
            let usage = self.group.usage();
            let need = volume.manifest().size();
            if need > usage.capacity {
                return Err(format!(
                    "the image ({need} bytes) does not fit this host's cache ({} bytes)",
                    usage.capacity
                ));
            }
            self.pin_image(image).await.map_err(|e| e.to_string())?;
        }
        loop {
            let s = prefetch.status(volume);
            let done = if order.request.whole {
                s.pin_done || volume.is_complete()
            } else {
                s.profile_done
            };
            if done {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
