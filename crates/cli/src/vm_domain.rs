//! The libvirt side of `virtman vm`: the options that shape a domain
//! (`vm xml`, `vm create --libvirt`), the connection, and `vm rm`, which
//! must not pull a disk from under a running domain and undefines the
//! domains virtman defined.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use virtman_agent::control::ControlClient;

use crate::libvirt::{DirectKernel, DomainSpec, parse_vm_uri};
use crate::virsh::Virsh;
use crate::vm::find_vm;

/// The libvirt connection.
#[derive(Debug, Args)]
pub struct Connect {
    /// The libvirt connection URI (as `virsh --connect`); default: virsh's
    /// own (`LIBVIRT_DEFAULT_URI`, else qemu:///system for root).
    #[arg(long, value_name = "URI")]
    connect: Option<String>,
}

impl Connect {
    pub fn virsh(&self) -> Virsh {
        Virsh {
            connect: self.connect.clone(),
        }
    }
}

/// What a libvirt domain for a VM looks like.
#[derive(Debug, Args)]
pub struct DomainArgs {
    /// The domain's name (default: the VM's).
    #[arg(long = "name", value_name = "DOMAIN")]
    domain: Option<String>,
    /// Memory in MiB.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(16..))]
    memory: u32,
    /// Virtual CPUs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=512))]
    vcpus: u32,
    /// Kernel to boot directly (without it, the disk's bootloader runs);
    /// libvirt's qemu user must be able to read it.
    #[arg(long, value_name = "FILE")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk (with --kernel).
    #[arg(long, value_name = "FILE", requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Kernel command line (with --kernel).
    #[arg(long, default_value = "console=ttyS0", requires = "kernel")]
    append: String,
    /// Write the serial console to this file (default: a pty, for `virsh
    /// console`).
    #[arg(long, value_name = "FILE")]
    console_log: Option<PathBuf>,
    /// `kvm` (type='kvm'), `tcg` (type='qemu', emulation) or `auto`: kvm
    /// when /dev/kvm works here.
    #[arg(long, default_value = "auto", value_parser = ["auto", "kvm", "tcg"])]
    accel: String,
}

impl DomainArgs {
    /// The kernel and console log, made absolute (libvirt resolves relative
    /// paths against its own directory); kernel and initrd must exist.
    pub fn files(&self) -> anyhow::Result<(Option<DirectKernel>, Option<PathBuf>)> {
        let existing = |what: &str, p: &PathBuf| {
            std::fs::canonicalize(p).with_context(|| format!("{what} {}", p.display()))
        };
        let kernel = match &self.kernel {
            Some(k) => Some(DirectKernel {
                kernel: existing("--kernel", k)?,
                initrd: self
                    .initrd
                    .as_ref()
                    .map(|i| existing("--initrd", i))
                    .transpose()?,
                append: self.append.clone(),
            }),
            None => None,
        };
        let console_log = self
            .console_log
            .as_ref()
            .map(|p| {
                std::path::absolute(p).with_context(|| format!("--console-log {}", p.display()))
            })
            .transpose()?;
        Ok((kernel, console_log))
    }

    /// The domain of VM `vm`.
    pub fn spec(&self, vm: &virtman_agent::agent::VmInfo) -> anyhow::Result<DomainSpec> {
        let Some((export, socket)) = parse_vm_uri(&vm.uri) else {
            bail!("VM {:?} has a URI this cannot use: {}", vm.name, vm.uri);
        };
        let (kernel, console_log) = self.files()?;
        Ok(DomainSpec {
            domain: self.domain.clone().unwrap_or_else(|| vm.name.clone()),
            vm: export,
            image: vm.image.clone(),
            socket,
            memory_mib: self.memory,
            vcpus: self.vcpus,
            kvm: match self.accel.as_str() {
                "kvm" => true,
                "tcg" => false,
                _ => virtman_storm::guest::kvm_usable(),
            },
            kernel,
            console_log,
        })
    }
}

/// `virtman vm rm`: refused while a domain virtman defined for the VM runs;
/// the snapshot removed (forced: its clients cut off); then those domains
/// undefined. Without virsh on the host there are no domains to look at.
pub fn remove(
    rt: &tokio::runtime::Runtime,
    c: &ControlClient,
    name: &str,
    force: bool,
    virsh: &Virsh,
) -> anyhow::Result<()> {
    let vm = find_vm(rt, c, name)?;
    // A daemon that does not answer runs no domain (a qemu it left running
    // still holds the snapshot, which the agent refuses to remove).
    let domains = match parse_vm_uri(&vm.uri) {
        Some((export, socket)) if Virsh::installed() => match virsh.own_domains(&export, &socket) {
            Ok(d) => d,
            // No daemon there (its socket absent or refusing): it runs no
            // domain. Any other failure with --force, which cuts the
            // snapshot's clients off, is not a guess worth making.
            Err(e) if force && !no_daemon(&e) => {
                return Err(e.context(format!(
                    "looking for libvirt domains of VM {name:?} before a forced removal"
                )));
            }
            Err(e) => {
                eprintln!(
                    "warning: could not look for libvirt domains of VM {name:?} ({e:#}); \
                     a domain virtman defined for it stays defined"
                );
                Vec::new()
            }
        },
        _ => Vec::new(),
    };
    if let Some(d) = domains.iter().find(|d| d.active()) {
        bail!(
            "VM {name:?} is the disk of libvirt domain {:?}, which is {}: stop it first \
             (virsh destroy {}), then remove the VM",
            d.name,
            d.state,
            d.name
        );
    }
    let removed = if force {
        rt.block_on(c.remove_vm_forced(name))
    } else {
        rt.block_on(c.remove_vm(name))
    };
    removed.map_err(|e| match e {
        virtman_agent::control::ControlError::Api { status: 409, .. } if !force => {
            anyhow::Error::new(e).context(format!(
                "VM {name:?} is still open (a qemu, or another client, uses its disk); \
                 stop it, or --force to cut it off"
            ))
        }
        e => e.into(),
    })?;
    for d in &domains {
        virsh.undefine(&d.name)?;
        eprintln!("undefined libvirt domain {:?}", d.name);
    }
    Ok(())
}

/// Whether `e` (from virsh, run with `LC_ALL=C`) says no libvirt daemon
/// listens: its socket is missing or refuses connections.
fn no_daemon(e: &anyhow::Error) -> bool {
    let text = format!("{e:#}");
    text.contains("failed to connect to the hypervisor")
        && (text.contains("No such file or directory") || text.contains("Connection refused"))
}
