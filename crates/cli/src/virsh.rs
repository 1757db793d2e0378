//! Talking to libvirt through `virsh` (Debian's `libvirt-clients`): define,
//! undefine, domain state, and finding the domains virtman defined for a VM
//! by the metadata element `libvirt.rs` writes.
//!
//! `virsh` rather than a libvirt binding: the C library's bindings need
//! `libvirt-dev` to build, and these few calls are not on any hot path.
//! The connection is `--connect URI` when given; otherwise virsh's own
//! default (`LIBVIRT_DEFAULT_URI`, then `qemu:///system` for root).

use std::path::Path;
use std::process::{Command, Output, Stdio};

use anyhow::{Context, bail};

use crate::libvirt::{METADATA_NS, Marker, parse_marker};

/// A libvirt connection, as `virsh` reaches it.
#[derive(Clone, Debug, Default)]
pub struct Virsh {
    /// `virsh --connect URI`; none: virsh's default.
    pub connect: Option<String>,
}

/// A domain virtman defined for a VM, and whether it runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnDomain {
    /// Its name.
    pub name: String,
    /// `virsh domstate`: `running`, `paused`, `shut off`, ...
    pub state: String,
}

impl OwnDomain {
    /// Whether a qemu runs for it (anything but shut off: running, paused,
    /// in shutdown, crashed with its process kept, ...).
    pub fn active(&self) -> bool {
        self.state != "shut off"
    }
}

impl Virsh {
    /// Whether `virsh` is on the PATH (a host without libvirt has no
    /// domains to look at).
    pub fn installed() -> bool {
        std::env::var_os("PATH")
            .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join("virsh").is_file()))
    }

    fn describe(&self) -> String {
        match &self.connect {
            Some(uri) => format!("libvirt at {uri}"),
            None => match std::env::var("LIBVIRT_DEFAULT_URI") {
                Ok(uri) if !uri.is_empty() => format!("libvirt at {uri} (LIBVIRT_DEFAULT_URI)"),
                _ => "libvirt (virsh's default connection)".to_owned(),
            },
        }
    }

    /// Runs `virsh ARGS`; its output whatever the exit status.
    fn output(&self, args: &[&str]) -> anyhow::Result<Output> {
        let mut cmd = Command::new("virsh");
        // Domain states are read in English ("shut off"): no translation.
        cmd.env("LC_ALL", "C").arg("--quiet");
        if let Some(uri) = &self.connect {
            cmd.args(["--connect", uri]);
        }
        cmd.args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => anyhow::anyhow!(
                    "virsh not found: install libvirt-clients (and a libvirt daemon, \
                     libvirt-daemon-system)"
                ),
                _ => anyhow::anyhow!("running virsh: {e}"),
            })
    }

    /// Runs `virsh ARGS`, failing with its message.
    fn run(&self, what: &str, args: &[&str]) -> anyhow::Result<String> {
        let out = self.output(args)?;
        if !out.status.success() {
            bail!(
                "{what} on {}: {}",
                self.describe(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Checks that the daemon answers (before anything is made for it).
    pub fn check(&self) -> anyhow::Result<()> {
        let out = self.output(&["uri"])?;
        if !out.status.success() {
            bail!(
                "no libvirt daemon answers: {} ({}); start libvirtd (or virtqemud), \
                 or give --connect URI",
                self.describe(),
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .collect::<Vec<_>>()
                    .join("; ")
            );
        }
        Ok(())
    }

    /// Defines the domain `xml` (persistent, not started).
    pub fn define(&self, xml: &str) -> anyhow::Result<()> {
        let dir = tempfile::tempdir().context("a temporary directory for the domain XML")?;
        let file = dir.path().join("domain.xml");
        std::fs::write(&file, xml).with_context(|| format!("writing {}", file.display()))?;
        self.run("defining the domain", &["define", path_arg(&file)?])
            .map(drop)
    }

    /// Undefines domain `name`.
    pub fn undefine(&self, name: &str) -> anyhow::Result<()> {
        self.run(
            &format!("undefining domain {name:?}"),
            &["undefine", "--domain", name],
        )
        .map(drop)
    }

    /// The domains virtman defined for VM `vm` of the agent whose VM
    /// socket is `socket`, with their states.
    pub fn own_domains(&self, vm: &str, socket: &Path) -> anyhow::Result<Vec<OwnDomain>> {
        let names = self.run("listing domains", &["list", "--all", "--name"])?;
        let mut own = Vec::new();
        for name in names.lines().map(str::trim).filter(|n| !n.is_empty()) {
            // A domain without virtman's element fails here: not ours.
            let out = self.output(&["metadata", "--domain", name, "--uri", METADATA_NS])?;
            if !out.status.success() {
                continue;
            }
            let text = String::from_utf8_lossy(&out.stdout);
            match parse_marker(&text) {
                Some(Marker { vm: v, socket: s }) if v == vm && s == socket => {
                    let state = self.run(
                        &format!("asking domain {name:?}'s state"),
                        &["domstate", "--domain", name],
                    )?;
                    own.push(OwnDomain {
                        name: name.to_owned(),
                        state: state.trim().to_owned(),
                    });
                }
                _ => {}
            }
        }
        Ok(own)
    }
}

fn path_arg(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}
