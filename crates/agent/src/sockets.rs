//! Who may connect to the agent's local unix sockets: the VMs' snapshot
//! socket (`DATA_DIR/vms.sock`, read-write access to every VM's disk) and
//! the control socket (`DATA_DIR/agent.sock`, creates and removes VMs).
//!
//! ```text
//!   no group        srw-------  root (the agent's user) only
//!   --socket-group  srw-rw----  root and the group (e.g. the group libvirt's
//!                               qemu runs as)
//! ```
//!
//! Connecting to a unix socket needs write permission on it, so these modes
//! are the whole policy. They are set right after `bind`, before any
//! connection is accepted; the file exists with the process's umask for
//! that instant (022 by default: owner-only writable as well).

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Mode of the sockets without a group.
const OWNER_ONLY: u32 = 0o600;
/// Mode of the sockets with a group.
const OWNER_AND_GROUP: u32 = 0o660;

/// Restricts the socket at `path` to its owner, and `group` if given.
pub fn restrict(path: &Path, group: Option<u32>) -> io::Result<()> {
    let mode = match group {
        Some(gid) => {
            let gid = rustix::fs::Gid::from_raw(gid);
            rustix::fs::chown(path, None, Some(gid)).map_err(io::Error::from)?;
            OWNER_AND_GROUP
        }
        None => OWNER_ONLY,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// The id of group `name` (a number, or a name in `/etc/group`).
pub fn group_id(name: &str) -> Result<u32, String> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    let groups = std::fs::read_to_string("/etc/group")
        .map_err(|e| format!("reading /etc/group for group {name:?}: {e}"))?;
    find_group(&groups, name).ok_or_else(|| format!("no group {name:?} in /etc/group"))
}

/// `name`'s id in the text of an `/etc/group` file (`name:x:gid:members`).
fn find_group(groups: &str, name: &str) -> Option<u32> {
    groups.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == name).then_some(())?;
        fields.nth(1)?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_are_found_by_name_or_number() {
        let groups = "root:x:0:\nkvm:x:104:\nlibvirt-qemu:x:64055:libvirt-qemu\n";
        assert_eq!(find_group(groups, "kvm"), Some(104));
        assert_eq!(find_group(groups, "libvirt-qemu"), Some(64055));
        assert_eq!(find_group(groups, "kv"), None);
        assert_eq!(group_id("0"), Ok(0));
        assert_eq!(group_id("root"), Ok(0));
        assert!(
            group_id("no-such-group-here")
                .unwrap_err()
                .contains("no group")
        );
    }

    #[test]
    fn sockets_are_owner_only_or_owner_and_group() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let _l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        restrict(&path, None).unwrap();
        assert_eq!(mode(&path), 0o600);
        restrict(&path, Some(0)).unwrap();
        assert_eq!(mode(&path), 0o660);
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&path).unwrap().gid(), 0);
    }
}
