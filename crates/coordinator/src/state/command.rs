//! The way in to the state task: a [`Command`] per request, each with the
//! channel for its answer, and the [`Handle`] that handlers hold to send them.

use tokio::sync::{mpsc, oneshot};

use crate::api::{
    Assignment, HeartbeatRequest, HeartbeatResponse, ImageInfo, JoinRequest, JoinResponse,
    LeaveRequest, NodeState, PreheatRequest, PreheatStatus, RegisterImage, ReportRequest, TreeView,
};
use crate::error::ApiError;

pub(super) type Reply<T> = oneshot::Sender<Result<T, ApiError>>;

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
    /// Ban a node (`true`) or lift its ban (`false`).
    Ban(String, bool, Reply<NodeState>),
    /// Order an image's preheat.
    Preheat(String, PreheatRequest, Reply<PreheatStatus>),
    /// An image's preheat.
    PreheatStatus(String, Reply<PreheatStatus>),
    /// Cancel an image's preheat.
    CancelPreheat(String, Reply<()>),
}

impl Command {
    /// Whether the command may change the state (and so needs the lease).
    pub fn writes(&self) -> bool {
        !matches!(
            self,
            Self::Images(_)
                | Self::Image(..)
                | Self::Tree(..)
                | Self::Node(..)
                | Self::PreheatStatus(..)
        )
    }

    /// Answers the command with `e` without doing it.
    pub fn refuse(self, e: ApiError) {
        match self {
            Self::RegisterImage(_, r) => drop(r.send(Err(e))),
            Self::Images(r) => drop(r.send(Err(e))),
            Self::Image(_, r) => drop(r.send(Err(e))),
            Self::Join(_, _, r) => drop(r.send(Err(e))),
            Self::Leave(_, _, r) => drop(r.send(Err(e))),
            Self::Report(_, _, r) => drop(r.send(Err(e))),
            Self::Heartbeat(_, r) => drop(r.send(Err(e))),
            Self::Tree(_, r) => drop(r.send(Err(e))),
            Self::Node(_, r) => drop(r.send(Err(e))),
            Self::Ban(_, _, r) => drop(r.send(Err(e))),
            Self::Preheat(_, _, r) => drop(r.send(Err(e))),
            Self::PreheatStatus(_, r) => drop(r.send(Err(e))),
            Self::CancelPreheat(_, r) => drop(r.send(Err(e))),
        }
    }
}

/// The API layer's way in: cheap to clone, one per handler call.
#[derive(Debug, Clone)]
pub struct Handle {
    pub(super) tx: mpsc::Sender<Command>,
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

    /// Bans `node` (`banned`) or lifts its ban; answers its state after.
    pub async fn ban(&self, node: String, banned: bool) -> Result<NodeState, ApiError> {
        self.call(|r| Command::Ban(node, banned, r)).await
    }

    /// Orders `image`'s preheat (replacing any).
    pub async fn preheat(
        &self,
        image: String,
        req: PreheatRequest,
    ) -> Result<PreheatStatus, ApiError> {
        self.call(|r| Command::Preheat(image, req, r)).await
    }

    /// `image`'s preheat and its hosts.
    pub async fn preheat_status(&self, image: String) -> Result<PreheatStatus, ApiError> {
        self.call(|r| Command::PreheatStatus(image, r)).await
    }

    /// Cancels `image`'s preheat.
    pub async fn cancel_preheat(&self, image: String) -> Result<(), ApiError> {
        self.call(|r| Command::CancelPreheat(image, r)).await
    }
}
