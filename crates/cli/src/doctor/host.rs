//! Checks of the host itself: qemu, KVM, the listen port.

use std::io::ErrorKind;
use std::process::Command;

use super::Check;

/// The qemu the VMs run on, and its version.
pub fn qemu() -> Check {
    let program = "qemu-system-x86_64";
    match Command::new(program).arg("--version").output() {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            Check::ok("qemu", text.lines().next().unwrap_or("").trim().to_owned())
        }
        Ok(out) => Check::warn(
            "qemu",
            format!("{program} --version failed ({})", out.status),
            "reinstall qemu-system-x86",
        ),
        Err(e) if e.kind() == ErrorKind::NotFound => Check::warn(
            "qemu",
            format!("{program} not found: this host cannot boot VMs (it can still relay)"),
            "apt-get install qemu-system-x86",
        ),
        Err(e) => Check::warn(
            "qemu",
            format!("running {program}: {e}"),
            "check the qemu install",
        ),
    }
}

/// Whether VMs get KVM: the CPU must offer vmx (Intel) or svm (AMD) and
/// /dev/kvm must open read-write. Without it qemu falls back to TCG
/// (works, many times slower): a warning.
pub fn kvm() -> Check {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    kvm_from(&cpuinfo, open_kvm())
}

fn open_kvm() -> Result<(), std::io::Error> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
}

/// The KVM verdict from /proc/cpuinfo's text and opening /dev/kvm.
fn kvm_from(cpuinfo: &str, dev: Result<(), std::io::Error>) -> Check {
    let flag = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(str::split_whitespace)
        .find(|f| *f == "vmx" || *f == "svm");
    match (flag, dev) {
        (Some(f), Ok(())) => Check::ok(
            "kvm",
            format!("usable (CPU flag {f}, /dev/kvm opens read-write)"),
        ),
        (None, dev) => Check::warn(
            "kvm",
            format!(
                "not usable: the CPU shows no vmx or svm flag{}; VMs run under TCG (slow)",
                if dev.is_ok() {
                    " (although /dev/kvm exists)"
                } else {
                    ""
                }
            ),
            "enable virtualization in the firmware, or nested virtualization on the hypervisor",
        ),
        (Some(f), Err(e)) => Check::warn(
            "kvm",
            format!(
                "CPU flag {f} but /dev/kvm does not open read-write ({e}); VMs run under TCG (slow)"
            ),
            "modprobe kvm_intel (or kvm_amd), and run as a member of the kvm group",
        ),
    }
}

/// Whether the agent can listen on `listen` (port 0: any free port).
pub fn listen(listen: &str) -> Check {
    match std::net::TcpListener::bind(listen) {
        Ok(l) => {
            let bound = l
                .local_addr()
                .map_or_else(|_| listen.to_owned(), |a| a.to_string());
            Check::ok("listen", format!("{listen} is free (bound {bound})"))
        }
        Err(e) if e.kind() == ErrorKind::AddrInUse => Check::fail(
            "listen",
            format!("{listen} is in use: {e}"),
            "stop what listens there (another agent?) or change --listen (listen in the config)",
        ),
        Err(e) => Check::fail(
            "listen",
            format!("cannot listen on {listen}: {e}"),
            "use an address of this host in --listen (listen in the config)",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::super::Level;
    use super::*;

    #[test]
    fn kvm_needs_the_cpu_flag_and_the_device() {
        let vmx = "processor: 0\nflags\t\t: fpu vme vmx sse\n";
        let none = "processor: 0\nflags\t\t: fpu vme sse hypervisor\n";
        let denied = || Err(std::io::Error::from(ErrorKind::PermissionDenied));
        assert_eq!(kvm_from(vmx, Ok(())).level, Level::Ok);
        let c = kvm_from(none, Ok(()));
        assert_eq!(c.level, Level::Warn);
        assert!(
            c.detail.contains("no vmx or svm") && c.detail.contains("TCG"),
            "{c:?}"
        );
        let c = kvm_from(vmx, denied());
        assert_eq!(c.level, Level::Warn);
        assert!(c.detail.contains("/dev/kvm does not open"), "{c:?}");
    }

    #[test]
    fn a_port_in_use_fails() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        let c = listen(&addr);
        assert_eq!(c.level, Level::Fail);
        assert!(c.detail.contains("is in use"), "{c:?}");
        drop(taken);
        assert_eq!(listen("127.0.0.1:0").level, Level::Ok);
    }
}
