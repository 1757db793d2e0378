//! Preheat orders: warm an image on matching hosts before any VM needs it.
//!
//! ```text
//!   operator ─POST preheat─► order (stored, one per image, a new id each time)
//!   every heartbeat: the node's labels ─► seen nodes (in memory)
//!                    its reports       ─► per (image, node): id, state, message
//!                    answer            ◄─ every order the node matches
//!   status: the order, and each live matching host or host that reported
//! ```
//!
//! Agents do the work (join the image, fetch its boot profile or every
//! chunk) and report it; an order missing from a node's answer was
//! cancelled, and the node stops. A node that comes later and matches gets
//! the order at its first heartbeat. What nodes reported is not stored: after
//! a restart they say it again within a heartbeat.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::http::StatusCode;

use crate::api::{
    HeartbeatRequest, PreheatHost, PreheatOrder, PreheatRequest, PreheatState, PreheatStatus,
};
use crate::error::ApiError;
use crate::validate;

use super::State;

/// What the coordinator knows of a node from its heartbeats.
#[derive(Debug, Clone)]
pub(super) struct SeenNode {
    labels: BTreeMap<String, String>,
    at: Duration,
}

/// What a node last said of an image's preheat.
#[derive(Debug, Clone)]
pub(super) struct Reported {
    id: u64,
    state: PreheatState,
    message: String,
}

/// The coordinator's preheat state.
#[derive(Debug, Default)]
pub(super) struct Preheats {
    /// Orders by image.
    pub(super) orders: BTreeMap<String, PreheatOrder>,
    next_id: u64,
    /// Nodes by name, from their heartbeats.
    seen: BTreeMap<String, SeenNode>,
    /// (image, node) ─► the node's last report.
    reports: BTreeMap<(String, String), Reported>,
}

impl Preheats {
    /// The orders loaded from the store.
    pub(super) fn load(orders: Vec<PreheatOrder>) -> Preheats {
        let next_id = orders.iter().map(|o| o.id).max().unwrap_or(0) + 1;
        Preheats {
            orders: orders.into_iter().map(|o| (o.image.clone(), o)).collect(),
            next_id,
            ..Preheats::default()
        }
    }
}

/// Whether a node with `labels` matches `req`.
fn matches(req: &PreheatRequest, node: &str, labels: &BTreeMap<String, String>) -> bool {
    (req.hosts.is_empty() || req.hosts.iter().any(|h| h == node))
        && req.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
}

impl State {
    /// A node heartbeat's part for preheats: remembers its labels and
    /// reports, and returns every order it matches.
    pub(super) fn preheat_beat(&mut self, req: &HeartbeatRequest) -> Vec<PreheatOrder> {
        let now = self.now();
        let p = &mut self.preheats;
        p.seen.insert(
            req.node.clone(),
            SeenNode {
                labels: req.labels.clone(),
                at: now,
            },
        );
        for r in &req.preheats {
            let key = (r.image.clone(), req.node.clone());
            let before = p.reports.get(&key).map(|x| (x.id, x.state));
            if before != Some((r.id, r.state)) && r.state == PreheatState::Failed {
                tracing::warn!(image = %r.image, node = %req.node, message = %r.message, "preheat failed");
            } else if before != Some((r.id, r.state)) && r.state == PreheatState::Done {
                tracing::info!(image = %r.image, node = %req.node, "preheat done");
            }
            p.reports.insert(
                key,
                Reported {
                    id: r.id,
                    state: r.state,
                    message: r.message.clone(),
                },
            );
        }
        p.orders
            .values()
            .filter(|o| matches(&o.request, &req.node, &req.labels))
            .cloned()
            .collect()
    }

    /// Live nodes (heard from within a heartbeat timeout) matching `req`.
    fn live_matching(&self, req: &PreheatRequest) -> Vec<String> {
        let now = self.now();
        let timeout = Duration::from_millis(self.config.heartbeat_timeout_ms);
        self.preheats
            .seen
            .iter()
            .filter(|(_, s)| now.saturating_sub(s.at) <= timeout)
            .filter(|(n, s)| matches(req, n, &s.labels))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Stores a new order for `image`, replacing any; refused if the image
    /// is unknown or no live host matches.
    pub(super) fn preheat(
        &mut self,
        image: &str,
        req: PreheatRequest,
    ) -> Result<PreheatStatus, ApiError> {
        validate::preheat(&req)?;
        if !self.images.contains_key(image) {
            return Err(ApiError::unknown_image(image));
        }
        if self.live_matching(&req).is_empty() {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "no_host",
                format!(
                    "no live host matches (hosts {:?}, labels {:?}); {} hosts are live",
                    req.hosts,
                    req.labels,
                    self.live_matching(&PreheatRequest::default()).len()
                ),
            ));
        }
        let order = PreheatOrder {
            image: image.to_owned(),
            id: self.preheats.next_id,
            request: req,
        };
        self.preheats.next_id += 1;
        tracing::info!(image, id = order.id, hosts = ?order.request.hosts,
            labels = ?order.request.labels, whole = order.request.whole, "preheat ordered");
        self.batch
            .preheats
            .insert(image.to_owned(), Some(order.clone()));
        self.preheats.orders.insert(image.to_owned(), order);
        self.preheat_status(image)
    }

    /// Cancels `image`'s order: nodes stop at their next heartbeat.
    pub(super) fn cancel_preheat(&mut self, image: &str) -> Result<(), ApiError> {
        if self.preheats.orders.remove(image).is_none() {
            return Err(no_preheat(image));
        }
        tracing::info!(image, "preheat cancelled");
        self.batch.preheats.insert(image.to_owned(), None);
        Ok(())
    }

    /// `image`'s order and its hosts.
    pub(super) fn preheat_status(&self, image: &str) -> Result<PreheatStatus, ApiError> {
        let order = self
            .preheats
            .orders
            .get(image)
            .ok_or_else(|| no_preheat(image))?
            .clone();
        let mut names = self.live_matching(&order.request);
        names.extend(
            self.preheats
                .reports
                .iter()
                .filter(|((i, _), r)| i == image && r.id == order.id)
                .map(|((_, n), _)| n.clone()),
        );
        names.sort();
        names.dedup();
        let st = self.images.get(image);
        let now = self.now();
        let hosts = names
            .into_iter()
            .map(|node| {
                let held = st
                    .and_then(|st| self.ids.get(&node).and_then(|&id| st.view(id, now)))
                    .map_or(0.0, |v| v.progress);
                let (state, message) =
                    match self.preheats.reports.get(&(image.to_owned(), node.clone())) {
                        Some(r) if r.id == order.id => (r.state, r.message.clone()),
                        _ => (PreheatState::Waiting, String::new()),
                    };
                PreheatHost {
                    node,
                    state,
                    held,
                    message,
                }
            })
            .collect();
        Ok(PreheatStatus { order, hosts })
    }
}

fn no_preheat(image: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no_preheat",
        format!("image {image:?} has no preheat order"),
    )
}
