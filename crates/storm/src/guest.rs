//! The one qemu command line virtman starts guests with: `virtman vm boot`,
//! `virtman trace record` and `virtman storm --qemu` all boot a guest whose
//! disk is an NBD export.
//!
//! ```text
//!  Guest { qemu, accel, memory, kernel?, initrd?, append, extra args }
//!    .command(uri, overlay, console)
//!      qemu -machine accel=kvm|tcg -m MiB
//!           (Console::Interactive: -nographic  |  Console::Captured:
//!            -nodefaults -no-user-config -display none -serial stdio)
//!           -no-reboot [-kernel K -append A [-initrd I]]
//!           -drive file=URI,format=raw,if=virtio,cache=none[,snapshot=on]
//! ```

use std::path::PathBuf;
use std::process::Command;

/// Which accelerator qemu uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// KVM when this machine can run it (see [`kvm_usable`]), else TCG.
    Auto,
    /// Hardware virtualisation (a working /dev/kvm).
    Kvm,
    /// Emulation: works everywhere, slower.
    Tcg,
}

impl Accel {
    fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
            Accel::Auto if kvm_usable() => "kvm",
            Accel::Auto => "tcg",
        }
    }
}

/// Where the guest's serial console goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Console {
    /// The user's terminal (`-nographic`: console and monitor on stdio).
    Interactive,
    /// qemu's standard output, for a program to read; no other devices.
    Captured,
}

/// How to boot a guest.
#[derive(Clone, Debug)]
pub struct Guest {
    /// The qemu binary.
    pub qemu: String,
    /// The accelerator.
    pub accel: Accel,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// A kernel to boot directly; without it the disk's bootloader runs.
    pub kernel: Option<PathBuf>,
    /// Its initial ramdisk (with `kernel`).
    pub initrd: Option<PathBuf>,
    /// The kernel command line (with `kernel`).
    pub append: String,
    /// More qemu arguments, last on the command line.
    pub extra_args: Vec<String>,
}

impl Guest {
    /// The qemu command that boots this guest from the NBD export `uri`. With
    /// `overlay`, the guest's writes go to a temporary file of qemu's
    /// (`snapshot=on`), for a shared read-only server.
    ///
    /// # Errors
    /// An initrd without a kernel.
    pub fn command(&self, uri: &str, overlay: bool, console: Console) -> Result<Command, String> {
        let mut cmd = Command::new(&self.qemu);
        cmd.args(["-machine", &format!("accel={}", self.accel.name())])
            .args(["-m", &self.memory_mib.to_string()]);
        match console {
            Console::Interactive => cmd.arg("-nographic"),
            Console::Captured => cmd
                .args(["-nodefaults", "-no-user-config", "-display", "none"])
                .args(["-serial", "stdio"]),
        };
        cmd.arg("-no-reboot");
        match (&self.kernel, &self.initrd) {
            (Some(k), initrd) => {
                cmd.arg("-kernel")
                    .arg(k)
                    .args(["-append", self.append.trim()]);
                if let Some(i) = initrd {
                    cmd.arg("-initrd").arg(i);
                }
            }
            (None, Some(_)) => return Err("an initrd needs a kernel".into()),
            (None, None) => {}
        }
        // qemu's option syntax: a comma in a value is written twice.
        let file = uri.replace(',', ",,");
        let snapshot = if overlay { ",snapshot=on" } else { "" };
        cmd.arg("-drive")
            .arg(format!(
                "file={file},format=raw,if=virtio,cache=none{snapshot}"
            ))
            .args(&self.extra_args);
        Ok(cmd)
    }
}

/// Whether KVM can run guests here: the device opens and the CPU advertises
/// hardware virtualisation (a /dev/kvm without vmx/svm hangs guests).
pub fn kvm_usable() -> bool {
    let device = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags = cpu
        .lines()
        .find(|l| l.starts_with("flags"))
        .unwrap_or_default();
    device && flags.split_whitespace().any(|f| f == "vmx" || f == "svm")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(cmd: &Command) -> Vec<String> {
        cmd.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn the_command_line_has_what_each_use_needs() {
        let g = Guest {
            qemu: "qemu-system-x86_64".into(),
            accel: Accel::Tcg,
            memory_mib: 256,
            kernel: Some("/k".into()),
            initrd: Some("/i".into()),
            append: " console=ttyS0 ".into(),
            extra_args: vec!["-smp".into(), "2".into()],
        };
        let a = args(
            &g.command("nbd+unix:///vm1?socket=/a,b.sock", true, Console::Captured)
                .unwrap(),
        )
        .join(" ");
        assert_eq!(
            a,
            "-machine accel=tcg -m 256 -nodefaults -no-user-config -display none \
             -serial stdio -no-reboot -kernel /k -append console=ttyS0 -initrd /i \
             -drive file=nbd+unix:///vm1?socket=/a,,b.sock,format=raw,if=virtio,cache=none,snapshot=on \
             -smp 2"
        );
        // A disk with its own bootloader, on the user's terminal.
        let g = Guest {
            kernel: None,
            initrd: None,
            extra_args: vec![],
            ..g
        };
        let a = args(
            &g.command("nbd://h:1/x", false, Console::Interactive)
                .unwrap(),
        )
        .join(" ");
        assert_eq!(
            a,
            "-machine accel=tcg -m 256 -nographic -no-reboot \
             -drive file=nbd://h:1/x,format=raw,if=virtio,cache=none"
        );
        let g = Guest {
            initrd: Some("/i".into()),
            ..g
        };
        assert!(g.command("x", false, Console::Captured).is_err());
    }
}
