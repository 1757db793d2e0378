//! One image's session as the coordinator keeps it: the pure topology
//! [`Forest`] (one tree per stripe; a single tree when the image has one
//! stripe) plus each node's name, address and labels, and the views the API
//! answers with (image info, a member's assignment, its stored record, its
//! place in the tree).

use std::collections::BTreeMap;
use std::time::Duration;

use virtman_topology::{Forest, NodeId, NodeInfo, Settings, TopologyError};

use crate::api::{Assignment, ImageInfo, NodeView, Parent};
use crate::error::ApiError;
use crate::store::{ImageRecord, MemberRecord};

#[derive(Debug)]
pub(super) struct Member {
    pub(super) name: String,
    pub(super) addr: String,
    pub(super) labels: BTreeMap<String, String>,
    /// Each stripe's parent names as last handed out (to log what a change
    /// changed; one list for a tree).
    pub(super) lists: Vec<Vec<String>>,
}

#[derive(Debug)]
pub(super) struct ImageState {
    pub(super) record: ImageRecord,
    pub(super) session: Forest,
    /// Origin ids with their names (`origin:N`) and addresses, in order.
    pub(super) origins: Vec<(NodeId, String, String)>,
    pub(super) members: BTreeMap<NodeId, Member>,
}

impl ImageState {
    pub(super) fn name_of(&self, id: NodeId) -> Option<&str> {
        if let Some(m) = self.members.get(&id) {
            return Some(&m.name);
        }
        self.origins
            .iter()
            .find(|(o, _, _)| *o == id)
            .map(|(_, n, _)| n.as_str())
    }

    pub(super) fn addr_of(&self, id: NodeId) -> Option<&str> {
        if let Some(m) = self.members.get(&id) {
            return Some(&m.addr);
        }
        self.origins
            .iter()
            .find(|(o, _, _)| *o == id)
            .map(|(_, _, a)| a.as_str())
    }

    pub(super) fn origin_by_name(&self, name: &str) -> Option<NodeId> {
        self.origins
            .iter()
            .find(|(_, n, _)| n == name)
            .map(|(id, _, _)| *id)
    }

    pub(super) fn info(&self) -> ImageInfo {
        ImageInfo {
            name: self.record.name.clone(),
            size: self.record.size,
            manifest_digest: self.record.manifest_digest.clone(),
            origins: self.record.origins.clone(),
            fanout: self.session.settings().fanout,
            parents: self.session.settings().parents,
            stripes: self.session.stripe_count(),
            members: self.members.len() as u64,
        }
    }

    fn names(&self, ids: &[NodeId]) -> Vec<String> {
        ids.iter()
            .filter_map(|&p| self.name_of(p).map(str::to_owned))
            .collect()
    }

    fn parent(&self, p: NodeId) -> Option<Parent> {
        Some(Parent {
            node: self.name_of(p)?.to_owned(),
            addr: self.addr_of(p)?.to_owned(),
        })
    }

    /// Each stripe's parent names; none for one tree.
    fn stripe_names(&self, lists: &[Vec<NodeId>]) -> Vec<Vec<String>> {
        if lists.len() > 1 {
            lists.iter().map(|l| self.names(l)).collect()
        } else {
            Vec::new()
        }
    }

    /// The node's home stripe and its parent lists, one per stripe.
    fn lists(&self, id: NodeId) -> (u32, Vec<Vec<NodeId>>) {
        let home = self.session.home(id).unwrap_or(0);
        (home, self.session.parents(id).unwrap_or_default())
    }

    /// The node in its home stripe's tree.
    fn home_node(&self, id: NodeId) -> Option<NodeInfo> {
        let home = self.session.home(id).unwrap_or(0);
        self.session.stripe(home)?.node(id)
    }

    pub(super) fn assignment(&self, id: NodeId) -> Assignment {
        let (home, lists) = self.lists(id);
        let mut order: Vec<NodeId> = Vec::new();
        let home_first = lists.get(home as usize).into_iter().chain(lists.iter());
        for p in home_first.flatten() {
            if !order.contains(p) {
                order.push(*p);
            }
        }
        let stripes = if lists.len() > 1 {
            lists
                .iter()
                .map(|l| l.iter().filter_map(|&p| self.parent(p)).collect())
                .collect()
        } else {
            Vec::new()
        };
        Assignment {
            image: self.record.name.clone(),
            epoch: self.session.epoch(id).unwrap_or(0),
            parents: order.into_iter().filter_map(|p| self.parent(p)).collect(),
            stripes,
            origins: self.record.origins.clone(),
        }
    }

    pub(super) fn record(&self, id: NodeId) -> Option<MemberRecord> {
        let m = self.members.get(&id)?;
        let info = self.home_node(id)?;
        let (home, lists) = self.lists(id);
        Some(MemberRecord {
            addr: m.addr.clone(),
            labels: m.labels.clone(),
            parents: self.names(&info.parents),
            complete: info.complete,
            epoch: self.session.epoch(id).unwrap_or(0),
            home,
            lent: self.session.lent(id),
            stripe_parents: self.stripe_names(&lists),
        })
    }

    pub(super) fn view(&self, id: NodeId, now: Duration) -> Option<NodeView> {
        // An origin has no home stripe: stripe 0's view of it.
        let info = self.home_node(id)?;
        let (home, lists) = self.lists(id);
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
            parents: self.names(&info.parents),
            home,
            stripe_parents: self.stripe_names(&lists),
            children: info.children as u64,
            secondary_children: info.secondary_children as u64,
            progress: info.progress,
            silent_ms: if info.origin {
                0
            } else {
                u64::try_from(now.saturating_sub(info.last_seen).as_millis()).unwrap_or(u64::MAX)
            },
            epoch: self.session.epoch(id).unwrap_or(info.epoch),
            labels,
        })
    }
}

pub(super) fn topology_error(e: TopologyError, node: &str, image: &str) -> ApiError {
    match e {
        TopologyError::AlreadyMember(_) => ApiError::already_joined(node, image),
        TopologyError::UnknownNode(_) => ApiError::unknown_node(node, image),
        TopologyError::Dead(_) => ApiError::dead(node, &[image.to_owned()]),
        TopologyError::Origin(_) => ApiError::bad_request(format!("{node:?} is an origin")),
        other => ApiError::bad_request(other.to_string()),
    }
}

/// The coordinator's settings with the image's overrides, checked.
pub(super) fn image_settings(
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

/// The image's forest over its origins `ids`: the coordinator's settings
/// with the image's overrides, and the stripe count it was registered with
/// (resolved then; a record from before stripes is one tree), so a new
/// default never reshapes an image already registered.
pub(super) fn image_forest(
    base: Settings,
    record: &ImageRecord,
    ids: &[NodeId],
) -> Result<Forest, TopologyError> {
    Forest::new(
        image_settings(base, record)?,
        record.stripes.unwrap_or(1),
        ids,
    )
}
