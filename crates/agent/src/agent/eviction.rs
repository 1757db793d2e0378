//! Eviction and pins: the operator's say over what stays cached. Evicting
//! drops an image's cached volume and leaves its session (refused while VMs
//! or children use it); pinning fetches the whole image in the background so
//! the host no longer needs its parents.

use std::sync::Arc;

use tracing::{info, warn};
use virtman_coordinator::api::LeaveRequest;

use super::{Agent, AgentError, Role, lock};
use crate::known;
use crate::prefetch;

impl Agent {
    /// Drops an image's cached volume and leaves its session. Refused while VMs
    /// use it.
    pub async fn evict_image(self: &Arc<Self>, image: &str) -> Result<(), AgentError> {
        let vms: Vec<String> = self
            .list_vms()
            .into_iter()
            .filter(|v| v.image == image)
            .map(|v| v.name)
            .collect();
        if !vms.is_empty() {
            return Err(AgentError::InUse(format!(
                "image {image:?} is used by VMs {vms:?}; remove them first"
            )));
        }
        let entry = lock(&self.images).get(image).cloned();
        match entry.as_deref().map(|e| &e.role) {
            Some(Role::Origin { .. }) => {
                return Err(AgentError::Invalid(format!(
                    "image {image:?} is an origin image here; remove it from the image store instead"
                )));
            }
            Some(Role::Member {
                volume, prefetch, ..
            }) => {
                prefetch.stop().await;
                volume.set_upstream(None);
            }
            None if self.group.volume(image).is_none() => {
                return Err(AgentError::NotCached(image.to_owned()));
            }
            None => {}
        }
        // Drop every handle of ours: removal is refused while any is held.
        self.unexport(image);
        lock(&self.images).remove(image);
        drop(entry);
        let leave = LeaveRequest {
            node: self.config.name.clone(),
        };
        if let Err(e) = self.coord.leave(image, &leave).await {
            warn!(image, error = %e, "leaving the session failed");
        }
        let known = known::known_path(&self.config.data_dir, image);
        if let Err(e) = std::fs::remove_file(&known)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!(image, file = %known.display(), error = %e, "removing the saved parents failed");
        }
        if let Err(e) = self.group.remove_volume(image) {
            // Children still connected hold it: keep serving it as before.
            if let Err(re) = self.ensure_image(image).await {
                warn!(image, error = %re, "re-joining after a refused eviction failed");
            }
            return Err(AgentError::InUse(format!(
                "image {image:?} is still in use by children, so it stays cached: {e}"
            )));
        }
        Ok(())
    }

    /// Fetches the whole image in the background (joining it first if
    /// needed), so that this host no longer needs its parents. Progress shows
    /// in [`Agent::status`]. Asking again while a pin runs is a no-op.
    pub async fn pin_image(self: &Arc<Self>, image: &str) -> Result<(), AgentError> {
        if self.is_origin(image) {
            return Err(AgentError::Invalid(format!(
                "image {image:?} is an origin image here: it is already whole"
            )));
        }
        self.ensure_image(image).await?;
        let entry = lock(&self.images).get(image).cloned();
        if let Some(Role::Member {
            volume,
            prefetch,
            parents,
            ..
        }) = entry.as_deref().map(|e| &e.role)
            && prefetch.start_pin()
        {
            info!(image, "pinning: fetching the whole image in the background");
            prefetch.tasks.spawn(prefetch::pin(
                image.to_owned(),
                Arc::clone(volume),
                Arc::clone(prefetch),
                lock(&self.prefetch).clone(),
                parents.stripe_count(),
            ));
        }
        Ok(())
    }
}
