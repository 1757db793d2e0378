//! The one task that owns the coordinator's state.
//!
//! HTTP handlers never touch the sessions: they send a [`Command`] with a
//! reply channel through a [`Handle`]. The task applies commands one at a
//! time to the pure [`Forest`] state machines (one `Session` per stripe), drains whatever else is
//! queued (up to [`MAX_BATCH`]), writes all resulting changes to redb in one
//! transaction, and only then answers every command of the batch. So an
//! answered join or leave is durable, and a storm of joins costs one fsync
//! per batch rather than one per join. A ticker drives timeouts.
//!
//! ```text
//!   handler ──Command{.., reply}──► mpsc ──► state task ──► Forest (per image)
//!   handler ◄──────── reply ─────────────────┘   │ batch
//!                                                ▼
//!                                       redb (one txn per batch)
//!   ticker ──tick(now)──► state task ──► dead nodes, repairs ──► redb
//! ```
//!
//! Why a task and not a mutex: the store commit is blocking I/O that must
//! finish before replies go out; one owner makes group commit natural, and
//! the order of events (which the decisions depend on) is the queue's order.
//!
//! Here: [`State`], its recovery, the run loop, batching and commit. Its
//! parts: `command` ([`Command`], [`Handle`]), `image` (one image's session
//! and its views), `requests` (what each request does).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use virtman_topology::{Forest, NodeId, Outcome, SavedMember, Settings};

use crate::config::CoordinatorConfig;
use crate::error::ApiError;
use crate::lease::LeaseClock;
use crate::metrics::Metrics;
use crate::store::{Batch, Loaded, MemberRecord, Store, StoreError};

mod command;
mod image;
mod preheat;
mod requests;

use command::Reply;
pub use command::{Command, Handle};
use image::{ImageState, Member, image_forest};

/// The most commands applied before one store commit.
pub const MAX_BATCH: usize = 512;

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
    /// Nodes refused everything until unbanned.
    banned: BTreeSet<String>,
    next_id: u64,
    start: Instant,
    store: Store,
    metrics: Arc<Metrics>,
    batch: Batch,
    preheats: preheat::Preheats,
    /// With etcd: the leader's lease. Writes and ticks stop once it may
    /// have expired; reads go on from memory.
    lease: Option<Arc<LeaseClock>>,
    /// A commit failed: memory may hold what the store does not, so the
    /// task stops (a new leader loads from the store).
    poisoned: bool,
}

impl State {
    /// Rebuilds the state from what the store held. Every member counts as
    /// seen now: nobody is declared dead before one heartbeat timeout.
    /// Lists that recovery had to change are written by the first commit of
    /// [`run`](Self::run). With `lease`, the state writes only while it holds.
    pub fn recover(
        config: CoordinatorConfig,
        settings: Settings,
        store: Store,
        loaded: Loaded,
        metrics: Arc<Metrics>,
        lease: Option<Arc<LeaseClock>>,
    ) -> Result<Self, StoreError> {
        let mut s = Self {
            config,
            settings,
            images: BTreeMap::new(),
            ids: BTreeMap::new(),
            banned: loaded.bans.iter().cloned().collect(),
            next_id: 1,
            start: Instant::now(),
            store,
            metrics,
            batch: Batch::default(),
            preheats: preheat::Preheats::load(loaded.preheats),
            lease,
            poisoned: false,
        };
        let mut members: BTreeMap<String, Vec<(String, MemberRecord)>> = BTreeMap::new();
        for (image, node, record) in loaded.members {
            members.entry(image).or_default().push((node, record));
        }
        for record in loaded.images {
            let origins = s.origin_ids(&record.origins);
            let ids: Vec<NodeId> = origins.iter().map(|(id, _, _)| *id).collect();
            let session =
                image_forest(settings, &record, &ids).map_err(|e| StoreError::Corrupt {
                    key: format!("images/{}", record.name),
                    source: serde::de::Error::custom(e.to_string()),
                })?;
            let mut state = ImageState {
                record,
                session,
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
                        lists: rec.lists(),
                    },
                );
                saved.push((id, rec));
            }
            let ids_of = |names: &[String]| -> Vec<NodeId> {
                names
                    .iter()
                    .filter_map(|p| state.origin_by_name(p).or_else(|| s.ids.get(p).copied()))
                    .collect()
            };
            let saved: Vec<SavedMember> = saved
                .into_iter()
                .map(|(id, rec)| SavedMember {
                    id,
                    rack: rec.labels.get("rack").cloned(),
                    home: rec.home,
                    lent: rec.lent.clone(),
                    parents: rec.lists().iter().map(|l| ids_of(l)).collect(),
                    complete: rec.complete,
                    epoch: rec.epoch,
                })
                .collect();
            // A new leader also waits out the clients' failover: an agent
            // whose call hangs on the old leader reaches this one up to
            // that much later.
            let grace = if s.lease.is_some() {
                crate::client::FAILOVER_TIMEOUT
            } else {
                Duration::ZERO
            };
            let (settings, stripes) = (*state.session.settings(), state.session.stripe_count());
            state.session =
                Forest::restore(settings, stripes, &ids, saved, grace).map_err(|e| {
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
        s.update_gauges();
        Ok(s)
    }

    /// Serves commands until `shutdown`, until every [`Handle`] is gone, or
    /// until a commit fails with a lease (the caller then steps down).
    pub async fn run(mut self, mut rx: mpsc::Receiver<Command>, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(Duration::from_millis(self.config.tick_ms));
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut pending: Vec<Pending> = Vec::new();
        if let Some(e) = self.flush().await {
            tracing::error!(error = %e.message, "writing back recovered parent lists failed");
        }
        while !self.poisoned {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                _ = ticker.tick() => {
                    if self.may_write() {
                        self.tick();
                    }
                }
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
            let failure = self.flush().await;
            for p in pending.drain(..) {
                p(failure.as_ref());
            }
        }
        if self.poisoned {
            return;
        }
        if let Some(e) = self.flush().await {
            tracing::error!(error = %e.message, "final commit failed");
        }
    }

    /// Whether this state may decide: always on redb; with etcd, while the
    /// lease holds.
    fn may_write(&self) -> bool {
        !self.poisoned && self.lease.as_ref().is_none_or(|l| l.valid())
    }

    /// Creates the state task's channel and returns its [`Handle`].
    pub fn channel() -> (Handle, mpsc::Receiver<Command>) {
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        (Handle { tx }, rx)
    }

    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    async fn flush(&mut self) -> Option<ApiError> {
        if self.batch.is_empty() {
            return None;
        }
        let batch = std::mem::take(&mut self.batch);
        match self.store.commit(&batch).await {
            Ok(()) => None,
            Err(e) if self.lease.is_some() => {
                // Memory is ahead of etcd now: stop, and let a leader that
                // loads from etcd go on.
                tracing::warn!(error = %e, "commit refused; stepping down");
                self.poisoned = true;
                Some(ApiError::unavailable(format!(
                    "this coordinator lost its leadership while storing the change ({e}); retry"
                )))
            }
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
        why: &dyn std::fmt::Display,
    ) {
        let name = image.record.name.clone();
        // One line per death and per repair, for the operator.
        for &id in &outcome.dead {
            if let Some(node) = image.name_of(id) {
                tracing::info!(image = %name, node = %node, why = %why, "declared dead");
            }
        }
        for id in &outcome.removed {
            if let Some(m) = image.members.remove(id) {
                batch.members.remove(&(name.clone(), m.name.clone()));
                batch.removed.push((name.clone(), m.name));
            }
        }
        for &id in &outcome.changed {
            let Some(rec) = image.record(id) else {
                continue;
            };
            let Some(m) = image.members.get_mut(&id) else {
                continue;
            };
            // Every stripe's list: a change in any of them is one to log.
            let lists = rec.lists();
            if m.lists.iter().all(Vec::is_empty) {
                tracing::debug!(image = %name, node = %m.name, parents = ?lists, why = %why, "parents given");
            } else if m.lists != lists {
                tracing::info!(image = %name, node = %m.name, old = ?m.lists,
                    new = ?lists, why = %why, "parents changed");
            }
            m.lists = lists;
            batch.members.insert((name.clone(), m.name.clone()), rec);
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
        if cmd.writes() && !self.may_write() {
            cmd.refuse(ApiError::unavailable(
                "this coordinator does not lead now (its lease expired or etcd is unreachable): \
                 changes are refused; retry on the leader",
            ));
            return;
        }
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
            Command::Preheat(image, req, reply) => {
                let r = self.preheat(&image, req);
                defer(pending, reply, r);
            }
            Command::PreheatStatus(image, reply) => {
                let r = self.preheat_status(&image);
                defer(pending, reply, r);
            }
            Command::CancelPreheat(image, reply) => {
                let r = self.cancel_preheat(&image);
                defer(pending, reply, r);
            }
            Command::Ban(node, banned, reply) => {
                let r = self.ban(&node, banned);
                defer(pending, reply, r);
            }
        }
        self.update_gauges();
    }
}
