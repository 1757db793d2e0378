//! The one task that owns the coordinator's state.
//!
//! HTTP handlers never touch the sessions: they send a [`Command`] with a
//! reply channel through a [`Handle`]. The task applies commands one at a
//! time to the pure [`Session`] state machines, drains whatever else is
//! queued (up to [`MAX_BATCH`]), writes all resulting changes to redb in one
//! transaction, and only then answers every command of the batch. So an
//! answered join or leave is durable, and a storm of joins costs one fsync
//! per batch rather than one per join. A ticker drives timeouts.
//!
//! ```text
//!   handler ──Command{.., reply}──► mpsc ──► state task ──► Session (per image)
//!   handler ◄──────── reply ─────────────────┘   │ batch
//!                                                ▼
//!                                       redb (one txn per batch)
//!   ticker ──tick(now)──► state task ──► dead nodes, repairs ──► redb
//! ```
//!
//! Why a task and not a mutex: the store commit is blocking I/O that must
//! finish before replies go out; one owner makes group commit natural, and
//! the order of events (which the decisions depend on) is the queue's order.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use virtman_topology::{NodeId, Outcome, Progress, SavedNode, Session, Settings, TopologyError};

use crate::api::{
    Assignment, HeartbeatRequest, HeartbeatResponse, ImageInfo, JoinRequest, JoinResponse,
    LeaveRequest, NodeSession, NodeState, NodeView, Parent, RegisterImage, ReportRequest,
    SessionStats, TreeView,
};
use crate::config::CoordinatorConfig;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::store::{Batch, ImageRecord, Loaded, MemberRecord, Store, StoreError};
use crate::validate;

/// The most commands applied before one store commit.
pub const MAX_BATCH: usize = 512;

type Reply<T> = oneshot::Sender<Result<T, ApiError>>;

/// A request to the state task, with the channel for its answer.
#[derive(Debug)]
pub enum Command {
    /// Register an image; the answer says whether it was new.
    RegisterImage(RegisterImage, Reply<(bool, ImageInfo)>),
    /// List images.
    Images(Reply<Vec<ImageInfo>>),
    /// One image.
    Image(String, Reply<ImageInfo>),
    /// Join an image's session.
    Join(String, JoinRequest, Reply<JoinResponse>),
    /// Leave an image's session.
    Leave(String, LeaveRequest, Reply<()>),
    /// Report an unreachable parent.
    Report(String, ReportRequest, Reply<Assignment>),
    /// One node's heartbeat for all its sessions.
    Heartbeat(HeartbeatRequest, Reply<HeartbeatResponse>),
    /// A session's tree.
    Tree(String, Reply<TreeView>),
    /// A node's state.
    Node(String, Reply<NodeState>),
}

/// The API layer's way in: cheap to clone, one per handler call.
#[derive(Debug, Clone)]
pub struct Handle {
    tx: mpsc::Sender<Command>,
}

impl Handle {
    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, ApiError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| ApiError::internal("the coordinator is shutting down"))?;
        rx.await
            .map_err(|_| ApiError::internal("the coordinator is shutting down"))?
    }

    /// Registers an image; `true` if it was new.
    pub async fn register_image(&self, req: RegisterImage) -> Result<(bool, ImageInfo), ApiError> {
        self.call(|r| Command::RegisterImage(req, r)).await
    }

    /// Every image.
    pub async fn images(&self) -> Result<Vec<ImageInfo>, ApiError> {
        self.call(Command::Images).await
    }

    /// One image.
    pub async fn image(&self, name: String) -> Result<ImageInfo, ApiError> {
        self.call(|r| Command::Image(name, r)).await
    }

    /// Joins `image`'s session.
    pub async fn join(&self, image: String, req: JoinRequest) -> Result<JoinResponse, ApiError> {
        self.call(|r| Command::Join(image, req, r)).await
    }

    /// Leaves `image`'s session.
    pub async fn leave(&self, image: String, req: LeaveRequest) -> Result<(), ApiError> {
        self.call(|r| Command::Leave(image, req, r)).await
    }

    /// Reports an unreachable parent in `image`'s session.
    pub async fn report(&self, image: String, req: ReportRequest) -> Result<Assignment, ApiError> {
        self.call(|r| Command::Report(image, req, r)).await
    }

    /// A node's heartbeat.
    pub async fn heartbeat(&self, req: HeartbeatRequest) -> Result<HeartbeatResponse, ApiError> {
        self.call(|r| Command::Heartbeat(req, r)).await
    }

    /// `image`'s tree.
    pub async fn tree(&self, image: String) -> Result<TreeView, ApiError> {
        self.call(|r| Command::Tree(image, r)).await
    }

    /// A node's state.
    pub async fn node(&self, node: String) -> Result<NodeState, ApiError> {
        self.call(|r| Command::Node(node, r)).await
    }
}

#[derive(Debug)]
struct Member {
    name: String,
    addr: String,
    labels: BTreeMap<String, String>,
}

#[derive(Debug)]
struct ImageState {
    record: ImageRecord,
    session: Session,
    /// Origin ids with their names (`origin:N`) and addresses, in order.
    origins: Vec<(NodeId, String, String)>,
    members: BTreeMap<NodeId, Member>,
}

impl ImageState {
    fn name_of(&self, id: NodeId) -> Option<&str> {
        if let Some(m) = self.members.get(&id) {
            return Some(&m.name);
        }
        self.origins
            .iter()
            .find(|(o, _, _)| *o == id)
            .map(|(_, n, _)| n.as_str())
    }

    fn addr_of(&self, id: NodeId) -> Option<&str> {
        if let Some(m) = self.members.get(&id) {
            return Some(&m.addr);
        }
        self.origins
            .iter()
            .find(|(o, _, _)| *o == id)
            .map(|(_, _, a)| a.as_str())
    }

    fn origin_by_name(&self, name: &str) -> Option<NodeId> {
        self.origins
            .iter()
            .find(|(_, n, _)| n == name)
            .map(|(id, _, _)| *id)
    }

    fn info(&self) -> ImageInfo {
        ImageInfo {
            name: self.record.name.clone(),
            size: self.record.size,
            manifest_digest: self.record.manifest_digest.clone(),
            origins: self.record.origins.clone(),
            fanout: self.session.settings().fanout,
            parents: self.session.settings().parents,
            members: self.members.len() as u64,
        }
    }

    fn assignment(&self, id: NodeId) -> Assignment {
        let parents = self
            .session
            .parents(id)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|p| {
                Some(Parent {
                    node: self.name_of(p)?.to_owned(),
                    addr: self.addr_of(p)?.to_owned(),
                })
            })
            .collect();
        Assignment {
            image: self.record.name.clone(),
            epoch: self.session.epoch(id).unwrap_or(0),
            parents,
            origins: self.record.origins.clone(),
        }
    }

    fn record(&self, id: NodeId) -> Option<MemberRecord> {
        let m = self.members.get(&id)?;
        let info = self.session.node(id)?;
        Some(MemberRecord {
            addr: m.addr.clone(),
            labels: m.labels.clone(),
            parents: info
                .parents
                .iter()
                .filter_map(|&p| self.name_of(p).map(str::to_owned))
                .collect(),
            complete: info.complete,
            epoch: info.epoch,
        })
    }

    fn view(&self, id: NodeId, now: Duration) -> Option<NodeView> {
        let info = self.session.node(id)?;
        let labels = self
            .members
            .get(&id)
            .map(|m| m.labels.clone())
            .unwrap_or_default();
        Some(NodeView {
            node: self.name_of(id)?.to_owned(),
            addr: self.addr_of(id)?.to_owned(),
            origin: info.origin,
            complete: info.complete,
            depth: info.depth,
            parents: info
                .parents
                .iter()
                .filter_map(|&p| self.name_of(p).map(str::to_owned))
                .collect(),
            children: info.children as u64,
            secondary_children: info.secondary_children as u64,
            progress: info.progress,
            silent_ms: if info.origin {
                0
            } else {
                u64::try_from(now.saturating_sub(info.last_seen).as_millis()).unwrap_or(u64::MAX)
            },
            epoch: info.epoch,
            labels,
        })
    }
}

fn topology_error(e: TopologyError, node: &str, image: &str) -> ApiError {
    match e {
        TopologyError::AlreadyMember(_) => ApiError::already_joined(node, image),
        TopologyError::UnknownNode(_) => ApiError::unknown_node(node, image),
        TopologyError::Dead(_) => ApiError::dead(node, &[image.to_owned()]),
        TopologyError::Origin(_) => ApiError::bad_request(format!("{node:?} is an origin")),
        other => ApiError::bad_request(other.to_string()),
    }
}

/// The coordinator's settings with the image's overrides, checked.
fn image_settings(
    base: Settings,
    record: &ImageRecord,
) -> Result<Settings, virtman_topology::SettingsError> {
    let fanout = record.fanout.unwrap_or(base.fanout);
    let s = Settings {
        fanout,
        // An image with a narrower tree narrows its origins' fan-out too.
        origin_fanout: base.origin_fanout.min(fanout),
        parents: record.parents.unwrap_or(base.parents),
        ..base
    };
    s.validate()?;
    Ok(s)
}

type Pending = Box<dyn FnOnce(Option<&ApiError>) + Send>;

fn defer<T: Send + 'static>(
    pending: &mut Vec<Pending>,
    reply: Reply<T>,
    result: Result<T, ApiError>,
) {
    pending.push(Box::new(move |failure: Option<&ApiError>| {
        let answer = match (failure, result) {
            // A failed commit fails every write of the batch.
            (Some(e), Ok(_)) => Err(e.clone()),
            (_, r) => r,
        };
        // The caller may have gone away; nothing to do then.
        let _ = reply.send(answer);
    }));
}

/// The coordinator's state and the task that owns it.
pub struct State {
    config: CoordinatorConfig,
    settings: Settings,
    images: BTreeMap<String, ImageState>,
    ids: BTreeMap<String, NodeId>,
    next_id: u64,
    start: Instant,
    store: Store,
    metrics: Arc<Metrics>,
    batch: Batch,
}

impl State {
    /// Rebuilds the state from what the store held. Every member counts as
    /// seen now: nobody is declared dead before one heartbeat timeout.
    pub fn recover(
        config: CoordinatorConfig,
        settings: Settings,
        store: Store,
        loaded: Loaded,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StoreError> {
        let mut s = Self {
            config,
            settings,
            images: BTreeMap::new(),
            ids: BTreeMap::new(),
            next_id: 1,
            start: Instant::now(),
            store,
            metrics,
            batch: Batch::default(),
        };
        let mut members: BTreeMap<String, Vec<(String, MemberRecord)>> = BTreeMap::new();
        for (image, node, record) in loaded.members {
            members.entry(image).or_default().push((node, record));
        }
        for record in loaded.images {
            let origins = s.origin_ids(&record.origins);
            let ids: Vec<NodeId> = origins.iter().map(|(id, _, _)| *id).collect();
            let settings = image_settings(settings, &record).map_err(|e| StoreError::Corrupt {
                key: format!("images/{}", record.name),
                source: serde::de::Error::custom(e.to_string()),
            })?;
            let mut state = ImageState {
                record,
                session: Session::new(settings, &ids).map_err(|e| StoreError::Corrupt {
                    key: "images".into(),
                    source: serde::de::Error::custom(e.to_string()),
                })?,
                origins,
                members: BTreeMap::new(),
            };
            let mut saved = Vec::new();
            for (node, rec) in members.remove(&state.record.name).unwrap_or_default() {
                let id = s.node_id(&node);
                state.members.insert(
                    id,
                    Member {
                        name: node,
                        addr: rec.addr.clone(),
                        labels: rec.labels.clone(),
                    },
                );
                saved.push((id, rec));
            }
            let saved: Vec<SavedNode> = saved
                .into_iter()
                .map(|(id, rec)| SavedNode {
                    id,
                    rack: rec.labels.get("rack").cloned(),
                    parents: rec
                        .parents
                        .iter()
                        .filter_map(|p| state.origin_by_name(p).or_else(|| s.ids.get(p).copied()))
                        .collect(),
                    complete: rec.complete,
                    epoch: rec.epoch,
                })
                .collect();
            state.session =
                Session::restore(settings, &ids, saved, Duration::ZERO).map_err(|e| {
                    StoreError::Corrupt {
                        key: format!("images/{}", state.record.name),
                        source: serde::de::Error::custom(e.to_string()),
                    }
                })?;
            // Write back lists that restore had to change.
            for &id in state.members.keys() {
                if let Some(rec) = state.record(id) {
                    s.batch.members.insert(
                        (state.record.name.clone(), state.members[&id].name.clone()),
                        rec,
                    );
                }
            }
            s.images.insert(state.record.name.clone(), state);
        }
        s.store.commit(&s.batch)?;
        s.batch = Batch::default();
        s.update_gauges();
        Ok(s)
    }

    /// Serves commands until `shutdown` or until every [`Handle`] is gone.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Command>, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(Duration::from_millis(self.config.tick_ms));
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut pending: Vec<Pending> = Vec::new();
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                _ = ticker.tick() => self.tick(),
                cmd = rx.recv() => {
                    let Some(cmd) = cmd else { break };
                    self.handle(cmd, &mut pending);
                    while pending.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(cmd) => self.handle(cmd, &mut pending),
                            Err(_) => break,
                        }
                    }
                }
            }
            let failure = self.flush();
            for p in pending.drain(..) {
                p(failure.as_ref());
            }
        }
        if let Some(e) = self.flush() {
            tracing::error!(error = %e.message, "final commit failed");
        }
    }

    /// Creates the state task's channel and returns its [`Handle`].
    pub fn channel() -> (Handle, mpsc::Receiver<Command>) {
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        (Handle { tx }, rx)
    }

    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    fn flush(&mut self) -> Option<ApiError> {
        if self.batch.is_empty() {
            return None;
        }
        let batch = std::mem::take(&mut self.batch);
        match self.store.commit(&batch) {
            Ok(()) => None,
            Err(e) => {
                tracing::error!(error = %e, "commit failed");
                Some(ApiError::internal(format!(
                    "could not store the change: {e}"
                )))
            }
        }
    }

    fn node_id(&mut self, name: &str) -> NodeId {
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        let id = NodeId(self.next_id);
        self.next_id += 1;
        self.ids.insert(name.to_owned(), id);
        id
    }

    fn origin_ids(&mut self, addrs: &[String]) -> Vec<(NodeId, String, String)> {
        addrs
            .iter()
            .enumerate()
            .map(|(i, addr)| {
                let id = NodeId(self.next_id);
                self.next_id += 1;
                (id, format!("origin:{i}"), addr.clone())
            })
            .collect()
    }

    fn update_gauges(&self) {
        let nodes: usize = self.images.values().map(|i| i.members.len()).sum();
        self.metrics
            .nodes
            .set(i64::try_from(nodes).unwrap_or(i64::MAX));
        self.metrics
            .sessions
            .set(i64::try_from(self.images.len()).unwrap_or(i64::MAX));
    }

    /// Queues the writes an outcome implies and counts repairs and deaths.
    fn absorb(
        batch: &mut Batch,
        metrics: &Metrics,
        image: &mut ImageState,
        outcome: &Outcome,
        before: virtman_topology::Stats,
    ) {
        let name = image.record.name.clone();
        for id in &outcome.removed {
            if let Some(m) = image.members.remove(id) {
                batch.members.remove(&(name.clone(), m.name.clone()));
                batch.removed.push((name.clone(), m.name));
            }
        }
        for &id in &outcome.changed {
            if let (Some(rec), Some(m)) = (image.record(id), image.members.get(&id)) {
                batch.members.insert((name.clone(), m.name.clone()), rec);
            }
        }
        let after = image.session.stats();
        metrics
            .repairs
            .inc_by(after.parent_changes.saturating_sub(before.parent_changes));
        metrics
            .deaths
            .inc_by(after.deaths.saturating_sub(before.deaths));
    }

    fn handle(&mut self, cmd: Command, pending: &mut Vec<Pending>) {
        match cmd {
            Command::RegisterImage(req, reply) => {
                let r = self.register_image(req);
                defer(pending, reply, r);
            }
            Command::Images(reply) => {
                let r = Ok(self.images.values().map(ImageState::info).collect());
                defer(pending, reply, r);
            }
            Command::Image(name, reply) => {
                let r = self
                    .images
                    .get(&name)
                    .map(ImageState::info)
                    .ok_or_else(|| ApiError::unknown_image(&name));
                defer(pending, reply, r);
            }
            Command::Join(image, req, reply) => {
                let r = self.join(&image, req);
                defer(pending, reply, r);
            }
            Command::Leave(image, req, reply) => {
                let r = self.leave(&image, &req);
                defer(pending, reply, r);
            }
            Command::Report(image, req, reply) => {
                let r = self.report(&image, &req);
                defer(pending, reply, r);
            }
            Command::Heartbeat(req, reply) => {
                let r = self.heartbeat(&req);
                defer(pending, reply, r);
            }
            Command::Tree(image, reply) => {
                let r = self.tree(&image);
                defer(pending, reply, r);
            }
            Command::Node(node, reply) => {
                let r = self.node(&node);
                defer(pending, reply, r);
            }
        }
        self.update_gauges();
    }

    fn register_image(&mut self, req: RegisterImage) -> Result<(bool, ImageInfo), ApiError> {
        validate::image(&req)?;
        let record = ImageRecord {
            name: req.name,
            size: req.size,
            manifest_digest: req.manifest_digest,
            origins: req.origins,
            fanout: req.fanout,
            parents: req.parents,
        };
        let settings = image_settings(self.settings, &record)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        if let Some(existing) = self.images.get(&record.name) {
            if existing.record == record {
                return Ok((false, existing.info()));
            }
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                format!(
                    "image {:?} is already registered with other size, digest or origins",
                    record.name
                ),
            ));
        }
        let origins = self.origin_ids(&record.origins);
        let ids: Vec<NodeId> = origins.iter().map(|(id, _, _)| *id).collect();
        let session =
            Session::new(settings, &ids).map_err(|e| ApiError::bad_request(e.to_string()))?;
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

    fn join(&mut self, image: &str, req: JoinRequest) -> Result<JoinResponse, ApiError> {
        validate::join(&req)?;
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
            },
        );
        Self::absorb(&mut self.batch, &self.metrics, st, &outcome, before);
        self.metrics.joins.inc();
        Ok(JoinResponse {
            assignment: st.assignment(id),
            heartbeat_interval_ms: self.config.heartbeat_interval_ms,
            heartbeat_timeout_ms: self.config.heartbeat_timeout_ms,
        })
    }

    fn member_id(&self, st: &ImageState, node: &str, image: &str) -> Result<NodeId, ApiError> {
        validate::node_name(node)?;
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

    fn leave(&mut self, image: &str, req: &LeaveRequest) -> Result<(), ApiError> {
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
        Self::absorb(&mut self.batch, &self.metrics, st, &outcome, before);
        self.metrics.leaves.inc();
        Ok(())
    }

    fn report(&mut self, image: &str, req: &ReportRequest) -> Result<Assignment, ApiError> {
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
        Self::absorb(&mut self.batch, &self.metrics, st, &outcome, before);
        self.metrics.reports.inc();
        Ok(st.assignment(id))
    }

    fn heartbeat(&mut self, req: &HeartbeatRequest) -> Result<HeartbeatResponse, ApiError> {
        validate::heartbeat(req)?;
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
            Self::absorb(&mut self.batch, &self.metrics, st, &outcome, before);
            if st.session.epoch(id) != Some(beat.known_epoch) {
                changed.push(st.assignment(id));
            }
        }
        Ok(HeartbeatResponse {
            changed,
            heartbeat_interval_ms: self.config.heartbeat_interval_ms,
        })
    }

    fn tick(&mut self) {
        let now = self.now();
        for st in self.images.values_mut() {
            let before = st.session.stats();
            let outcome = st.session.tick(now);
            if !outcome.dead.is_empty() {
                let names: Vec<&str> = outcome.dead.iter().filter_map(|&d| st.name_of(d)).collect();
                tracing::info!(image = %st.record.name, dead = ?names, "declared dead");
            }
            Self::absorb(&mut self.batch, &self.metrics, st, &outcome, before);
        }
        self.update_gauges();
    }

    fn tree(&self, image: &str) -> Result<TreeView, ApiError> {
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

    fn node(&self, node: &str) -> Result<NodeState, ApiError> {
        validate::node_name(node)?;
        let id = self.ids.get(node).copied().ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_node",
                format!("node {node:?} never joined"),
            )
        })?;
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
        })
    }
}
