//! One image's session as the coordinator keeps it: the pure topology
//! [`Session`] plus each node's name, address and labels, and the views the
//! API answers with (image info, a member's assignment, its stored record,
//! its place in the tree).

use std::collections::BTreeMap;
use std::time::Duration;

use virtman_topology::{NodeId, Session, Settings, TopologyError};

use crate::api::{Assignment, ImageInfo, NodeView, Parent};
use crate::error::ApiError;
use crate::store::{ImageRecord, MemberRecord};

#[derive(Debug)]
pub(super) struct Member {
    pub(super) name: String,
    pub(super) addr: String,
    pub(super) labels: BTreeMap<String, String>,
    /// Its parents' names as last handed out (to log what a change changed).
    pub(super) parents: Vec<String>,
}

#[derive(Debug)]
pub(super) struct ImageState {
    pub(super) record: ImageRecord,
    pub(super) session: Session,
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
            members: self.members.len() as u64,
        }
    }

    pub(super) fn assignment(&self, id: NodeId) -> Assignment {
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

    pub(super) fn record(&self, id: NodeId) -> Option<MemberRecord> {
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

    pub(super) fn view(&self, id: NodeId, now: Duration) -> Option<NodeView> {
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
