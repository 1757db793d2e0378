//! Who may read this host's base exports: only nodes the coordinator has
//! admitted to the image's session, never a banned one.
//!
//! ```text
//!   TLS handshake ─► client certificate ─► Identity (name, role)
//!     export IMAGE | manifest/IMAGE | profile/IMAGE ─► image
//!     banned (heartbeat's list)?        ─► refused
//!     admitted before (cache)?          ─► served
//!     refused in the last second?       ─► refused (definite answers only)
//!     coordinator: GET /v1/nodes/NAME   ─► member of IMAGE's session? admit : refuse
//! ```
//!
//! The coordinator is asked on the first connection of a node for an image,
//! not at each heartbeat: a child that has just joined connects to its parent
//! at once, before the parent's next heartbeat could name it. The answer is
//! kept while this host serves the image (a node that leaves keeps the
//! connections it has; one banned is refused from the next heartbeat on).
//! A coordinator that cannot be reached admits nobody new (and the refusal
//! is not kept: the next connection asks again): children fail over to other
//! parents, which may know them already, and fetch again a moment later.
//! Concurrent first connections of one node for one image ask once.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls_pki_types::CertificateDer;
use virtman_nbd::{Export, ExportAccess};
use virtman_pki::{Identity, Role};

use crate::loop_guard::{Guarded, PeerView};

/// How long a refusal stands before the coordinator is asked again.
const REFUSAL_TTL: Duration = Duration::from_secs(1);

/// One node and one image.
type Key = (String, String);

#[derive(Default)]
struct Decisions {
    admitted: BTreeSet<Key>,
    refused: HashMap<Key, (Instant, String)>,
    /// One lock per key being asked about, so concurrent connections ask once.
    asking: HashMap<Key, Arc<tokio::sync::Mutex<()>>>,
}

/// The base exports' policy: session members only.
pub struct MemberAccess {
    coord: virtman_coordinator::Client,
    me: String,
    banned: Mutex<BTreeSet<String>>,
    decisions: Mutex<Decisions>,
    /// Member images, for the loop guard of each child's view.
    guarded: Mutex<HashMap<String, Guarded>>,
}

impl std::fmt::Debug for MemberAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemberAccess")
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The image an export of the base server belongs to.
pub fn image_of(export: &str) -> &str {
    export
        .strip_prefix("manifest/")
        .or_else(|| export.strip_prefix("profile/"))
        .unwrap_or(export)
}

impl MemberAccess {
    /// A policy for node `me` that asks `coord` about nodes it does not know.
    pub fn new(coord: virtman_coordinator::Client, me: String) -> Arc<MemberAccess> {
        Arc::new(MemberAccess {
            coord,
            me,
            banned: Mutex::new(BTreeSet::new()),
            decisions: Mutex::new(Decisions::default()),
            guarded: Mutex::new(HashMap::new()),
        })
    }

    /// Replaces the ban list (each heartbeat brings the whole list) and
    /// forgets what was admitted for the banned nodes.
    pub fn set_banned(&self, banned: impl IntoIterator<Item = String>) {
        let banned: BTreeSet<String> = banned.into_iter().collect();
        lock(&self.decisions)
            .admitted
            .retain(|(node, _)| !banned.contains(node));
        let mut current = lock(&self.banned);
        if *current != banned {
            tracing::warn!(banned = ?banned, "banned nodes changed");
            *current = banned;
        }
    }

    /// Children's connections to member image `image` see it through the
    /// loop guard ([`crate::loop_guard`]).
    pub fn guard(&self, image: &str, guarded: Guarded) {
        lock(&self.guarded).insert(image.to_owned(), guarded);
    }

    /// Forgets every decision about `image` (this host no longer serves it).
    pub fn forget_image(&self, image: &str) {
        lock(&self.guarded).remove(image);
        let mut d = lock(&self.decisions);
        d.admitted.retain(|(_, i)| i != image);
        d.refused.retain(|(_, i), _| i != image);
    }

    fn cached(&self, key: &Key) -> Option<Result<(), String>> {
        if lock(&self.banned).contains(&key.0) {
            return Some(Err(format!("node {:?} is banned", key.0)));
        }
        let mut d = lock(&self.decisions);
        if d.admitted.contains(key) {
            return Some(Ok(()));
        }
        match d.refused.get(key) {
            Some((at, why)) if at.elapsed() < REFUSAL_TTL => Some(Err(why.clone())),
            Some(_) => {
                d.refused.remove(key);
                None
            }
            None => None,
        }
    }

    async fn ask(&self, key: &Key) -> Result<(), String> {
        let (node, image) = key;
        let mut definite = true;
        let answer = match self.coord.node(node).await {
            Ok(state) if state.banned => Err(format!("node {node:?} is banned")),
            Ok(state) if state.sessions.iter().any(|s| &s.image == image) => Ok(()),
            Ok(_) => Err(format!(
                "node {node:?} is not a member of image {image:?}'s session"
            )),
            Err(e) if e.code() == Some("unknown_node") => Err(format!(
                "node {node:?} is not a member of image {image:?}'s session"
            )),
            Err(e) => {
                definite = false;
                Err(format!(
                    "the coordinator could not confirm that node {node:?} is a member of image \
                     {image:?}'s session: {e}"
                ))
            }
        };
        let mut d = lock(&self.decisions);
        match (&answer, definite) {
            (Ok(()), _) => {
                d.admitted.insert(key.clone());
            }
            (Err(why), true) => {
                tracing::info!(node, image, reason = %why, "refused a peer");
                d.refused.insert(key.clone(), (Instant::now(), why.clone()));
            }
            // The coordinator did not answer: the next connection asks again.
            (Err(why), false) => {
                tracing::info!(node, image, reason = %why, "refused a peer for now")
            }
        }
        answer
    }

    async fn decide(
        &self,
        peer: Option<&CertificateDer<'static>>,
        export: &str,
    ) -> Result<(), String> {
        let Some(id) = peer.and_then(|c| Identity::from_der(c)) else {
            return Err("the client presented no certificate naming a node".into());
        };
        if id.role != Role::Node {
            return Err(format!(
                "{:?} holds an operator certificate; only session members read images",
                id.name
            ));
        }
        let key = (id.name, image_of(export).to_owned());
        if key.0 == self.me {
            return Ok(());
        }
        if let Some(decided) = self.cached(&key) {
            return decided;
        }
        let gate = Arc::clone(lock(&self.decisions).asking.entry(key.clone()).or_default());
        let _asking = gate.lock().await;
        // Another connection may have asked while this one waited.
        let result = match self.cached(&key) {
            Some(decided) => decided,
            None => self.ask(&key).await,
        };
        lock(&self.decisions).asking.remove(&key);
        result
    }
}

impl ExportAccess for MemberAccess {
    fn check<'a>(
        &'a self,
        peer: Option<&'a CertificateDer<'static>>,
        export: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
        Box::pin(self.decide(peer, export))
    }

    fn view(
        &self,
        peer: Option<&CertificateDer<'static>>,
        name: &str,
        export: Arc<dyn Export>,
    ) -> Arc<dyn Export> {
        // Only a member image's chunks are fetched on a miss (an origin's
        // are all there; manifests and profiles are whole).
        let Some(guarded) = lock(&self.guarded).get(name).cloned() else {
            return export;
        };
        match peer.and_then(|c| Identity::from_der(c)) {
            Some(id) => Arc::new(PeerView::new(export, id.name, guarded)),
            None => export,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_map_to_their_image() {
        assert_eq!(image_of("debian"), "debian");
        assert_eq!(image_of("manifest/debian"), "debian");
        assert_eq!(image_of("profile/debian"), "debian");
        assert_eq!(image_of("manifest/"), "");
    }
}
