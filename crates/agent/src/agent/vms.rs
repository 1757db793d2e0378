//! VMs: each is a snapshot (a copy-on-write overlay) over a member image's
//! cached volume, exported on the VM socket for qemu. Creating one joins its
//! image first if needed; removing one is refused while qemu holds it,
//! unless forced (its connections are then ended first).

use std::sync::Arc;

use virtman_cache::Snapshot;
use virtman_nbd::Export;

use super::{Agent, AgentError, Role, lock};

/// How long a forced removal waits for the ended connections to let go.
const FORCE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// A VM as the agent reports it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmInfo {
    /// The VM's name (its snapshot's name).
    pub name: String,
    /// Its image.
    pub image: String,
    /// Its NBD URI (qemu syntax).
    pub uri: String,
    /// Bytes the VM has written (allocated in its overlay).
    pub written_bytes: u64,
}

impl Agent {
    /// Creates a VM's snapshot over `image`, joining the image first if needed.
    pub async fn create_vm(
        self: &Arc<Self>,
        name: &str,
        image: &str,
    ) -> Result<VmInfo, AgentError> {
        if self.group.snapshot(name).is_some() {
            return Err(AgentError::VmExists(name.to_owned()));
        }
        let origin = matches!(
            lock(&self.images)
                .get(image)
                .map(|e| matches!(e.role, Role::Origin { .. })),
            Some(true)
        );
        if origin {
            return Err(AgentError::Invalid(format!(
                "image {image:?} is an origin image on this host; VMs run on member hosts"
            )));
        }
        self.ensure_image(image).await?;
        let snap = self.group.create_snapshot(name, image)?;
        self.vms
            .add_export(name.to_owned(), Arc::clone(&snap) as Arc<dyn Export>);
        Ok(self.vm_info(&snap))
    }

    fn vm_info(&self, s: &Snapshot) -> VmInfo {
        VmInfo {
            name: s.name().to_owned(),
            image: s.base().name().to_owned(),
            uri: format!(
                "nbd+unix:///{}?socket={}",
                s.name(),
                self.vm_socket.display()
            ),
            written_bytes: s.allocated_blocks() * 4096,
        }
    }

    /// The VMs of this host.
    pub fn list_vms(&self) -> Vec<VmInfo> {
        self.group
            .snapshots()
            .iter()
            .map(|s| self.vm_info(s))
            .collect()
    }

    /// Removes a VM's snapshot. A client that still has it open (a qemu)
    /// makes this fail, unless `force`: then its connections are ended first
    /// and their handles waited for (up to 5 s).
    pub async fn remove_vm(&self, name: &str, force: bool) -> Result<(), AgentError> {
        if self.group.snapshot(name).is_none() {
            return Err(AgentError::NoVm(name.to_owned()));
        }
        // Drop the server's handle first: deletion is refused while any is held.
        let was_exported = self.vms.remove_export(name).is_some();
        let mut deleted = self.group.delete_snapshot(name);
        if force && deleted.is_err() {
            let deadline = tokio::time::Instant::now() + FORCE_WAIT;
            while deleted.is_err() && tokio::time::Instant::now() < deadline {
                // Again each time: a connection still in its handshake when
                // the last kick came takes its token only after it.
                self.vms.disconnect_export(name);
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                deleted = self.group.delete_snapshot(name);
            }
        }
        match deleted {
            Ok(()) => Ok(()),
            Err(e) => {
                if was_exported && let Some(s) = self.group.snapshot(name) {
                    self.vms.add_export(name.to_owned(), s as Arc<dyn Export>);
                }
                Err(AgentError::InUse(format!(
                    "VM {name:?} is still in use (stop its qemu first, or force it): {e}"
                )))
            }
        }
    }
}
