//! What each request does to the state: register an image, join, leave,
//! report, heartbeat, tick, bans, and the read-only tree and node views. Each
//! returns its answer; the batch it belongs to is committed before any
//! answer goes out (see the parent module).

use std::collections::{BTreeMap, BTreeSet};

use axum::http::StatusCode;
use virtman_topology::{NodeId, Progress};

use crate::api::{
    Assignment, HeartbeatRequest, HeartbeatResponse, ImageInfo, JoinRequest, JoinResponse,
    LeaveRequest, NodeSession, NodeState, NodeView, RegisterImage, ReportRequest, SessionStats,
    TreeView,
};
use crate::error::ApiError;
use crate::store::ImageRecord;
use crate::validate;

use super::State;
use super::image::{ImageState, Member, image_forest, topology_error};

impl State {
    pub(super) fn register_image(
        &mut self,
        req: RegisterImage,
    ) -> Result<(bool, ImageInfo), ApiError> {
        validate::image(&req)?;
        let record = ImageRecord {
            name: req.name,
            size: req.size,
            manifest_digest: req.manifest_digest,
            origins: req.origins,
            fanout: req.fanout,
            parents: req.parents,
            // Resolved now and stored: the default may change later.
            stripes: Some(
                req.stripes
                    .unwrap_or_else(|| self.config.stripes_for(req.fanout)),
            ),
        };
        if let Some(existing) = self.images.get(&record.name) {
            // Asking without a stripe count takes the one registered.
            let asked = ImageRecord {
                stripes: req.stripes.or(existing.record.stripes),
                ..record
            };
            if existing.record == asked {
                return Ok((false, existing.info()));
            }
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                format!(
                    "image {:?} is already registered with other size, digest, origins or counts",
                    asked.name
                ),
            ));
        }
        let origins = self.origin_ids(&record.origins);
        let ids: Vec<NodeId> = origins.iter().map(|(id, _, _)| *id).collect();
        let session = image_forest(self.settings, &record, &ids)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let state = ImageState {
            record: record.clone(),
            session,
            origins,
            members: BTreeMap::new(),
        };
        let info = state.info();
        self.batch.images.push(record.clone());
        self.images.insert(record.name, state);
        Ok((true, info))
    }

    pub(super) fn join(&mut self, image: &str, req: JoinRequest) -> Result<JoinResponse, ApiError> {
        validate::join(&req)?;
        self.not_banned(&req.node)?;
        if !self.images.contains_key(image) {
            return Err(ApiError::unknown_image(image));
        }
        let id = self.node_id(&req.node);
        let now = self.now();
        let st = self
            .images
            .get_mut(image)
            .ok_or_else(|| ApiError::unknown_image(image))?;
        if st.session.contains(id) {
            return Err(ApiError::already_joined(&req.node, image));
        }
        let before = st.session.stats();
        let rack = req.labels.get("rack").cloned();
        let outcome = st
            .session
            .join(id, rack.as_deref(), now)
            .map_err(|e| topology_error(e, &req.node, image))?;
        st.members.insert(
            id,
            Member {
                name: req.node.clone(),
                addr: req.addr,
                labels: req.labels,
                lists: Vec::new(),
            },
        );
        let why = format_args!("{} joined", req.node);
        Self::absorb(&mut self.batch, &self.metrics, st, &outcome, before, &why);
        self.metrics.joins.inc();
        Ok(JoinResponse {
            assignment: st.assignment(id),
            heartbeat_interval_ms: self.config.heartbeat_interval_ms,
            heartbeat_timeout_ms: self.config.heartbeat_timeout_ms,
        })
    }

    fn not_banned(&self, node: &str) -> Result<(), ApiError> {
        if self.banned.contains(node) {
            return Err(ApiError::banned(node));
        }
        Ok(())
    }

    fn member_id(&self, st: &ImageState, node: &str, image: &str) -> Result<NodeId, ApiError> {
        validate::node_name(node)?;
        self.not_banned(node)?;
        let id = self
            .ids
            .get(node)
            .copied()
            .ok_or_else(|| ApiError::unknown_node(node, image))?;
        if st.session.is_dead(id) {
            return Err(ApiError::dead(node, &[image.to_owned()]));
        }
        if !st.members.contains_key(&id) {
            return Err(ApiError::unknown_node(node, image));
        }
        Ok(id)
    }

    pub(super) fn leave(&mut self, image: &str, req: &LeaveRequest) -> Result<(), ApiError> {
        let st = self
            .images
            .get(image)
            .ok_or_else(|| ApiError::unknown_image(image))?;
        let id = self.member_id(st, &req.node, image)?;
        let now = self.now();
        let st = self
            .images
            .get_mut(image)
            .ok_or_else(|| ApiError::unknown_image(image))?;
        let before = st.session.stats();
        let outcome = st
            .session
            .leave(id, now)
            .map_err(|e| topology_error(e, &req.node, image))?;
        let why = format_args!("{} left", req.node);
        Self::absorb(&mut self.batch, &self.metrics, st, &outcome, before, &why);
        self.metrics.leaves.inc();
        Ok(())
    }

    pub(super) fn report(
        &mut self,
        image: &str,
        req: &ReportRequest,
    ) -> Result<Assignment, ApiError> {
        let st = self
            .images
            .get(image)
            .ok_or_else(|| ApiError::unknown_image(image))?;
        let id = self.member_id(st, &req.node, image)?;
        let parent = st
            .origin_by_name(&req.parent)
            .or_else(|| self.ids.get(&req.parent).copied())
            .ok_or_else(|| ApiError::unknown_node(&req.parent, image))?;
        let now = self.now();
        let st = self
            .images
            .get_mut(image)
            .ok_or_else(|| ApiError::unknown_image(image))?;
        let before = st.session.stats();
        let outcome = st
            .session
            .report_unreachable(id, parent, now)
            .map_err(|e| topology_error(e, &req.node, image))?;
        let why = format_args!("{} reported {} unreachable", req.node, req.parent);
        if st.session.stats().reports > before.reports {
            tracing::info!(image, node = %req.node, parent = %req.parent, "report acted on");
        } else {
            tracing::debug!(image, node = %req.node, parent = %req.parent, "report not acted on");
        }
        Self::absorb(&mut self.batch, &self.metrics, st, &outcome, before, &why);
        self.metrics.reports.inc();
        Ok(st.assignment(id))
    }

    pub(super) fn heartbeat(
        &mut self,
        req: &HeartbeatRequest,
    ) -> Result<HeartbeatResponse, ApiError> {
        validate::heartbeat(req)?;
        self.not_banned(&req.node)?;
        let preheats = self.preheat_beat(req);
        if req.sessions.is_empty() {
            // A host in no session (an origin, a host with no VM yet) asks
            // for the ban list and its preheat orders.
            return Ok(HeartbeatResponse {
                changed: Vec::new(),
                heartbeat_interval_ms: self.config.heartbeat_interval_ms,
                banned: self.banned.iter().cloned().collect(),
                preheats,
            });
        }
        let image_hint = req.sessions.first().map_or("", |s| s.image.as_str());
        let id = self
            .ids
            .get(&req.node)
            .copied()
            .ok_or_else(|| ApiError::unknown_node(&req.node, image_hint))?;
        // Check everything first: a refused heartbeat changes nothing.
        let mut dead = Vec::new();
        for beat in &req.sessions {
            let st = self
                .images
                .get(&beat.image)
                .ok_or_else(|| ApiError::unknown_image(&beat.image))?;
            if st.session.is_dead(id) {
                dead.push(beat.image.clone());
            } else if !st.members.contains_key(&id) {
                return Err(ApiError::unknown_node(&req.node, &beat.image));
            }
        }
        if !dead.is_empty() {
            return Err(ApiError::dead(&req.node, &dead));
        }
        let now = self.now();
        let mut changed = Vec::new();
        for beat in &req.sessions {
            let Some(st) = self.images.get_mut(&beat.image) else {
                continue;
            };
            let before = st.session.stats();
            let progress = Progress {
                fraction: beat.progress,
                complete: beat.complete,
            };
            let outcome = st
                .session
                .heartbeat(id, now, progress)
                .map_err(|e| topology_error(e, &req.node, &beat.image))?;
            // Formatted only if a line is logged: heartbeats are the hot path.
            let what = if beat.complete {
                "is complete"
            } else {
                "heartbeated"
            };
            let why = format_args!("{} {what}", req.node);
            Self::absorb(&mut self.batch, &self.metrics, st, &outcome, before, &why);
            if st.session.epoch(id) != Some(beat.known_epoch) {
                changed.push(st.assignment(id));
            }
        }
        Ok(HeartbeatResponse {
            changed,
            heartbeat_interval_ms: self.config.heartbeat_interval_ms,
            banned: self.banned.iter().cloned().collect(),
            preheats,
        })
    }

    pub(super) fn tick(&mut self) {
        let now = self.now();
        for st in self.images.values_mut() {
            let before = st.session.stats();
            let outcome = st.session.tick(now);
            Self::absorb(
                &mut self.batch,
                &self.metrics,
                st,
                &outcome,
                before,
                &"heartbeats stopped",
            );
        }
        self.update_gauges();
    }

    pub(super) fn tree(&self, image: &str) -> Result<TreeView, ApiError> {
        let st = self
            .images
            .get(image)
            .ok_or_else(|| ApiError::unknown_image(image))?;
        let now = self.now();
        let mut nodes: Vec<NodeView> = st
            .origins
            .iter()
            .filter_map(|(id, _, _)| st.view(*id, now))
            .collect();
        let mut members: Vec<NodeView> = st
            .members
            .keys()
            .filter_map(|&id| st.view(id, now))
            .collect();
        members.sort_by(|a, b| a.node.cmp(&b.node));
        nodes.extend(members);
        let s = st.session.stats();
        Ok(TreeView {
            image: image.to_owned(),
            fanout: st.session.settings().fanout,
            origin_fanout: st.session.settings().origin_fanout,
            parents_per_node: st.session.settings().parents,
            depth_bound: st.session.depth_bound(),
            max_depth: st.session.max_depth(),
            nodes,
            stats: SessionStats {
                joins: s.joins,
                leaves: s.leaves,
                deaths: s.deaths,
                reports: s.reports,
                parent_changes: s.parent_changes,
                rebalance_moves: s.rebalance_moves,
                promotions: s.promotions,
            },
        })
    }

    pub(super) fn node(&self, node: &str) -> Result<NodeState, ApiError> {
        validate::node_name(node)?;
        let banned = self.banned.contains(node);
        let Some(id) = self.ids.get(node).copied() else {
            if !banned {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "unknown_node",
                    format!("node {node:?} never joined"),
                ));
            }
            // Banned before it ever joined.
            return Ok(NodeState {
                node: node.to_owned(),
                sessions: Vec::new(),
                dead_in: Vec::new(),
                banned,
            });
        };
        let now = self.now();
        let mut sessions = Vec::new();
        let mut dead_in = BTreeSet::new();
        for (name, st) in &self.images {
            if st.members.contains_key(&id) {
                if let Some(view) = st.view(id, now) {
                    sessions.push(NodeSession {
                        image: name.clone(),
                        view,
                    });
                }
            } else if st.session.is_dead(id) {
                dead_in.insert(name.clone());
            }
        }
        Ok(NodeState {
            node: node.to_owned(),
            sessions,
            dead_in: dead_in.into_iter().collect(),
            banned,
        })
    }

    /// Bans `node`: it leaves every session at once (its children are
    /// re-attached) and every later call of its is refused; or lifts the ban.
    pub(super) fn ban(&mut self, node: &str, banned: bool) -> Result<NodeState, ApiError> {
        validate::node_name(node)?;
        let changed = if banned {
            self.banned.insert(node.to_owned())
        } else {
            self.banned.remove(node)
        };
        if changed {
            self.batch.bans.insert(node.to_owned(), banned);
            tracing::warn!(node, banned, "ban changed");
        }
        if let Some(id) = self.ids.get(node).copied().filter(|_| banned) {
            let now = self.now();
            for st in self.images.values_mut() {
                if !st.members.contains_key(&id) {
                    continue;
                }
                let before = st.session.stats();
                let outcome = st
                    .session
                    .leave(id, now)
                    .map_err(|e| topology_error(e, node, &st.record.name))?;
                let why = format_args!("{node} banned");
                Self::absorb(&mut self.batch, &self.metrics, st, &outcome, before, &why);
            }
        }
        // Unbanning a node that never joined leaves nothing to show.
        self.node(node).or_else(|_| {
            Ok(NodeState {
                node: node.to_owned(),
                sessions: Vec::new(),
                dead_in: Vec::new(),
                banned,
            })
        })
    }
}
