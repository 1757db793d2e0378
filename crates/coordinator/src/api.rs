//! The wire types of the coordinator's HTTP+JSON API, version 1.
//!
//! Requests reject unknown fields, so a typo is an error rather than a
//! silently ignored setting. Every error answer is an [`ErrorBody`].
//!
//! ```text
//!   POST /v1/images                    RegisterImage  -> ImageInfo
//!   POST /v1/sessions/{image}/join     JoinRequest    -> Assignment (+ timing)
//!   POST /v1/sessions/{image}/leave    LeaveRequest   -> 204
//!   POST /v1/sessions/{image}/report   ReportRequest  -> Assignment
//!   POST /v1/heartbeat                 HeartbeatRequest -> HeartbeatResponse
//!   GET  /v1/sessions/{image}          TreeView        GET /v1/nodes/{node}  NodeState
//!   POST /v1/nodes/{node}/ban          -> NodeState    DELETE /v1/nodes/{node}/ban -> 204
//!   POST /v1/images/{image}/preheat    PreheatRequest -> PreheatStatus
//!   GET  /v1/images/{image}/preheat    PreheatStatus   DELETE /v1/images/{image}/preheat -> 204
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Registers an image and the origins that serve it whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterImage {
    /// Image name: 1 to 128 characters of `A-Z a-z 0-9 . _ : -`.
    #[schema(pattern = "^[A-Za-z0-9._:-]{1,128}$", min_length = 1, max_length = 128)]
    pub name: String,
    /// Image size in bytes, above zero.
    #[schema(minimum = 1)]
    pub size: u64,
    /// BLAKE3 digest of the image's manifest, 64 lowercase hex digits.
    #[schema(pattern = "^[0-9a-f]{64}$")]
    pub manifest_digest: String,
    /// Addresses (host:port) of the origins, 1 to 16, distinct: the roots of
    /// the tree and every node's parent of last resort.
    #[schema(min_items = 1, max_items = 16)]
    pub origins: Vec<String>,
    /// Fan-out k for this image's tree (2 to 1024); the coordinator's
    /// default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 2, maximum = 1024)]
    pub fanout: Option<u32>,
    /// Parents per node p for this image (1 to 16); the coordinator's
    /// default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 16)]
    pub parents: Option<u32>,
    /// Stripes S for this image (1 to 64): chunk i follows stripe i mod S's
    /// tree, and each member relays one stripe. When absent: one tree if
    /// the coordinator's default is one, else as many stripes as the
    /// image's own fan-out, or the coordinator's default without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 64)]
    pub stripes: Option<u32>,
}

/// A registered image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ImageInfo {
    /// Image name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Manifest digest.
    pub manifest_digest: String,
    /// Origin addresses.
    pub origins: Vec<String>,
    /// Fan-out k of the image's tree.
    pub fanout: u32,
    /// Parents per node p.
    pub parents: u32,
    /// Stripes S (1: one tree).
    pub stripes: u32,
    /// Live members of the image's session (origins not counted).
    pub members: u64,
}

/// A node asks to join an image's session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    /// The node's name, unique in the cluster: 1 to 128 characters of
    /// `A-Z a-z 0-9 . _ -`.
    #[schema(pattern = "^[A-Za-z0-9._-]{1,128}$", min_length = 1, max_length = 128)]
    pub node: String,
    /// Where the node's base export for this image listens (host:port).
    #[schema(pattern = "^[!-~]{1,256}$", min_length = 1, max_length = 256)]
    pub addr: String,
    /// Free-form labels (at most 32, keys and values 1 to 64 characters);
    /// `rack` is used to prefer parents in the same rack.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A node leaves an image's session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LeaveRequest {
    /// The node's name.
    #[schema(pattern = "^[A-Za-z0-9._-]{1,128}$", min_length = 1, max_length = 128)]
    pub node: String,
}

/// A child could not reach one of its parents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReportRequest {
    /// The reporting node.
    #[schema(pattern = "^[A-Za-z0-9._-]{1,128}$", min_length = 1, max_length = 128)]
    pub node: String,
    /// The parent it could not reach, by name (`origin:N` for origins).
    #[schema(min_length = 1, max_length = 128)]
    pub parent: String,
}

/// A node to fetch from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Parent {
    /// The parent's name (`origin:N` for origins).
    pub node: String,
    /// Its base export address.
    pub addr: String,
}

/// Whom a node fetches one image from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Assignment {
    /// The image.
    pub image: String,
    /// Changes whenever `parents` changes; send it back as `known_epoch`.
    pub epoch: u64,
    /// Parents in order of preference: the tree parent first. Empty when the
    /// node holds the complete image (it is a root). With stripes, every
    /// stripe's parents once each (the node's home stripe first).
    pub parents: Vec<Parent>,
    /// With S > 1 stripes, the parents of each stripe (chunk i is fetched
    /// from stripe i mod S's); empty for one tree.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stripes: Vec<Vec<Parent>>,
    /// The image's origins: the parents of last resort, after `parents`.
    pub origins: Vec<String>,
}

/// The answer to a join.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JoinResponse {
    /// The node's parents for the image.
    pub assignment: Assignment,
    /// How often to heartbeat, in milliseconds.
    pub heartbeat_interval_ms: u64,
    /// Silence longer than this (milliseconds) and the node is declared dead.
    pub heartbeat_timeout_ms: u64,
}

/// One image's part of a heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionBeat {
    /// The image.
    #[schema(pattern = "^[A-Za-z0-9._:-]{1,128}$", min_length = 1, max_length = 128)]
    pub image: String,
    /// Fraction of the image's chunks the node holds, 0 to 1.
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub progress: f64,
    /// The node holds every chunk: it becomes a root for the others.
    #[serde(default)]
    pub complete: bool,
    /// The epoch of the parent list the node has; 0 if none.
    #[serde(default)]
    pub known_epoch: u64,
}

/// One call per node for all its sessions.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatRequest {
    /// The node's name.
    #[schema(pattern = "^[A-Za-z0-9._-]{1,128}$", min_length = 1, max_length = 128)]
    pub node: String,
    /// Each session the node is in (at most 1024, no image twice). None:
    /// a host in no session (an origin, a host with no VM yet) asking for
    /// the ban list and preheat orders.
    #[schema(max_items = 1024)]
    pub sessions: Vec<SessionBeat>,
    /// The node's labels (preheat orders select hosts by them).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// How the node's preheat orders go.
    #[serde(default)]
    #[schema(max_items = 1024)]
    pub preheats: Vec<PreheatReport>,
}

/// Warm an image on matching hosts before any VM needs it: each joins the
/// image's session and fetches its boot profile (or, `whole`, every chunk)
/// through the tree. Hosts match when they are in `hosts` (if given) and
/// carry every one of `labels` (if given); neither: every host. Hosts that
/// come later and match preheat too, until the order is cancelled.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PreheatRequest {
    /// Labels a host must carry, e.g. `{"rack": "r1"}`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Host names (at most 10,000).
    #[serde(default)]
    #[schema(max_items = 10000)]
    pub hosts: Vec<String>,
    /// Every chunk, not only the boot profile's.
    #[serde(default)]
    pub whole: bool,
}

/// A preheat order, as stored and as handed to matching hosts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PreheatOrder {
    /// The image.
    pub image: String,
    /// The order's number (a new order for the image gets a new one).
    pub id: u64,
    /// What was asked.
    pub request: PreheatRequest,
}

/// Where a host is with a preheat order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PreheatState {
    /// Matched; the host has not said anything of it yet.
    Waiting,
    /// Fetching.
    Running,
    /// Everything asked is held.
    Done,
    /// It could not (say, the image does not fit its cache).
    Failed,
}

/// A node's word on one preheat order, in its heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PreheatReport {
    /// The image.
    #[schema(pattern = "^[A-Za-z0-9._:-]{1,128}$", min_length = 1, max_length = 128)]
    pub image: String,
    /// The order's number.
    pub id: u64,
    /// Where it is.
    pub state: PreheatState,
    /// Why it failed.
    #[serde(default)]
    #[schema(max_length = 1024)]
    pub message: String,
}

/// One host of a preheat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PreheatHost {
    /// The host.
    pub node: String,
    /// Where it is.
    pub state: PreheatState,
    /// Fraction of the image's chunks it holds, 0 to 1.
    pub held: f64,
    /// Why it failed.
    pub message: String,
}

/// A preheat order and every host it concerns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PreheatStatus {
    /// The order.
    pub order: PreheatOrder,
    /// Hosts that match it (live ones) or reported on it, by name.
    pub hosts: Vec<PreheatHost>,
}

/// The answer to a heartbeat: only the parent lists the node does not have.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HeartbeatResponse {
    /// Assignments whose epoch differs from the `known_epoch` sent.
    pub changed: Vec<Assignment>,
    /// How often to heartbeat, in milliseconds.
    pub heartbeat_interval_ms: u64,
    /// Every banned node: refuse their connections (all of them each time;
    /// the list is short).
    #[serde(default)]
    pub banned: Vec<String>,
    /// Every preheat order this node matches (all of them each time: an
    /// order missing from here was cancelled).
    #[serde(default)]
    pub preheats: Vec<PreheatOrder>,
}

/// One node as seen in a session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NodeView {
    /// The node's name.
    pub node: String,
    /// Its address for this image.
    pub addr: String,
    /// An origin of the image.
    pub origin: bool,
    /// Reported the complete image (a root now).
    pub complete: bool,
    /// Hops from a root along tree parents.
    pub depth: u32,
    /// Parent names, tree parent first (with stripes: the home stripe's).
    pub parents: Vec<String>,
    /// The stripe the node relays (0 for one tree).
    pub home: u32,
    /// With S > 1 stripes, each stripe's parent names; empty for one tree.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stripe_parents: Vec<Vec<String>>,
    /// Tree children (with stripes: in its home stripe).
    pub children: u64,
    /// Nodes using this one as a secondary parent.
    pub secondary_children: u64,
    /// Last reported fraction of chunks held.
    pub progress: f64,
    /// Milliseconds since the last heartbeat.
    pub silent_ms: u64,
    /// Parent-list epoch.
    pub epoch: u64,
    /// The node's labels.
    pub labels: BTreeMap<String, String>,
}

/// Counters of one session since the coordinator started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SessionStats {
    /// Joins accepted.
    pub joins: u64,
    /// Graceful leaves.
    pub leaves: u64,
    /// Nodes declared dead.
    pub deaths: u64,
    /// Unreachable-parent reports acted on.
    pub reports: u64,
    /// Changes of existing members' parent lists (repairs and rebalancing).
    pub parent_changes: u64,
    /// Moves made only to keep the depth bound.
    pub rebalance_moves: u64,
    /// Members that completed the image and became roots.
    pub promotions: u64,
}

/// A session's whole tree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TreeView {
    /// The image.
    pub image: String,
    /// Fan-out k.
    pub fanout: u32,
    /// The most tree children an origin takes.
    pub origin_fanout: u32,
    /// Parents per node p.
    pub parents_per_node: u32,
    /// The deepest a member may be now: ceil(log_k N) + 1.
    pub depth_bound: u32,
    /// The deepest member now.
    pub max_depth: u32,
    /// Every live node, origins first, then by name.
    pub nodes: Vec<NodeView>,
    /// Counters.
    pub stats: SessionStats,
}

/// One session of a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NodeSession {
    /// The image.
    pub image: String,
    /// The node in that session.
    pub view: NodeView,
}

/// A node's state across sessions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NodeState {
    /// The node's name.
    pub node: String,
    /// Sessions it is a live member of.
    pub sessions: Vec<NodeSession>,
    /// Images where it was declared dead and must join again.
    pub dead_in: Vec<String>,
    /// Banned: the coordinator refuses it and agents refuse its connections.
    #[serde(default)]
    pub banned: bool,
}

/// Every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// A stable code: `bad_request`, `unauthorized`, `forbidden`, `banned`,
    /// `unknown_image`,
    /// `unknown_node`, `already_joined`, `dead`, `conflict`,
    /// `payload_too_large`, `not_found`, `method_not_allowed`, `internal`.
    pub error: String,
    /// What is wrong, for a human.
    pub message: String,
}

/// Liveness answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    pub status: String,
}

/// `GET /v1/coordinator`: this coordinator, who leads, and the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorStatus {
    /// This coordinator's name.
    pub name: String,
    /// The URL it advertises to the others.
    pub url: String,
    /// `standalone` (redb: always decides), `leader`, `follower` (redirects
    /// to the leader), or `candidate` (no leader known: reads from memory
    /// if it led before, changes refused).
    pub role: String,
    /// `redb` or `etcd`.
    pub store: String,
    /// The leader, if one is known.
    #[serde(default)]
    pub leader: Option<LeaderView>,
    /// Leaders this coordinator has seen take over since it started.
    pub leader_changes: u64,
    /// The last etcd error, if the last attempt failed.
    #[serde(default)]
    pub etcd_error: Option<String>,
    /// Each etcd endpoint's health (empty on redb).
    #[serde(default)]
    pub endpoints: Vec<EndpointHealth>,
}

/// The leader as its key in etcd says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LeaderView {
    /// The leader's name.
    pub name: String,
    /// Its URL.
    pub url: String,
    /// Its term: the leader key's create revision (grows with each leader).
    pub term: i64,
    /// When it took over, milliseconds since the Unix epoch.
    pub since_unix_ms: u64,
}

/// One etcd endpoint, asked for its status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EndpointHealth {
    /// The endpoint.
    pub endpoint: String,
    /// It answered.
    pub healthy: bool,
    /// Its etcd version, if it answered.
    #[serde(default)]
    pub version: Option<String>,
    /// Whether it is the etcd cluster's raft leader.
    #[serde(default)]
    pub raft_leader: bool,
    /// Its answer time in milliseconds, or the error.
    #[serde(default)]
    pub latency_ms: Option<u64>,
    /// Why it did not answer.
    #[serde(default)]
    pub error: Option<String>,
}
