//! `virtman vm` and `virtman status`: the agent's control API from the shell.
//!
//! ```text
//!   virtman vm create NAME --image IMAGE ─► POST /v1/vms ─► prints the NBD URI
//!                     [--libvirt]        ─► then `virsh define` (snapshot removed if that fails)
//!   virtman vm xml NAME                  ─► GET /v1/vms ─► the libvirt domain XML
//!   virtman vm ls | rm NAME | boot NAME  ─► GET / DELETE /v1/vms, then qemu
//!   virtman vm rm NAME [--force]         ─► refused while its domain runs; DELETE, then
//!                                           `virsh undefine` of the domains virtman made
//!   virtman status [--json]              ─► GET /v1/status
//! ```

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use virtman_agent::control::ControlClient;
use virtman_storm::guest::{Accel, Console, Guest};

use crate::agent::DEFAULT_DATA_DIR;
use crate::libvirt::domain_xml;
use crate::units::human;
use crate::vm_domain::{Connect, DomainArgs, remove};

/// Where to find the agent.
#[derive(Debug, Args)]
pub struct AgentSocket {
    /// The agent's data directory (its control socket is DATA_DIR/agent.sock).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_DATA_DIR, global = true, env = "VIRTMAN_DATA_DIR")]
    pub data_dir: PathBuf,
}

impl AgentSocket {
    fn client(&self) -> ControlClient {
        ControlClient::new(self.data_dir.join("agent.sock"))
    }
}

/// Arguments of `virtman vm`.
#[derive(Debug, Args)]
pub struct VmArgs {
    #[command(flatten)]
    agent: AgentSocket,
    #[command(subcommand)]
    command: VmCommand,
}

#[derive(Debug, Subcommand)]
enum VmCommand {
    /// Create a VM's copy-on-write snapshot of an image and print its NBD URI.
    /// Joins the image's relay tree first if this host has not yet.
    #[command(after_help = "\
Examples:
  virtman vm create vm1 --image debian
  virtman vm create vm1 --image debian --libvirt --memory 2048 --vcpus 2 && virsh start vm1")]
    Create {
        /// The VM's name (letters, digits, `. _ : -`).
        name: String,
        /// The image it boots.
        #[arg(long)]
        image: String,
        /// Also define a libvirt domain whose disk is the snapshot (`virsh
        /// define`; see `virtman vm xml`). If that fails the snapshot is
        /// removed again.
        #[arg(long)]
        libvirt: bool,
        #[command(flatten)]
        domain: DomainArgs,
        #[command(flatten)]
        connect: Connect,
    },
    /// Print a libvirt domain XML whose disk is the VM's snapshot (NBD over
    /// the agent's VM socket), for `virsh define`.
    #[command(after_help = "\
Examples:
  virtman vm xml vm1 > vm1.xml && virsh define vm1.xml
  virtman vm xml vm1 --kernel /boot/vmlinuz --initrd /boot/initrd.img --append 'root=/dev/vda console=ttyS0'

libvirt's qemu runs as libvirt-qemu: start the agent with --socket-group libvirt-qemu
so that it may open the VM socket (and see README, \"libvirt\").")]
    Xml {
        /// The VM.
        name: String,
        #[command(flatten)]
        domain: DomainArgs,
    },
    /// List this host's VMs.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a VM's snapshot (its writes are lost) and undefine the libvirt
    /// domain virtman defined for it. Refused while that domain runs, and
    /// while a client (qemu) has the snapshot open unless --force.
    Rm {
        /// The VM.
        name: String,
        /// End the connections of clients still using the snapshot first
        /// (their disk goes away). A running domain virtman defined is
        /// still refused: stop it first.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        connect: Connect,
    },
    /// Boot a VM under qemu from its snapshot, in the foreground.
    #[command(after_help = "\
Examples:
  virtman vm boot vm1 --kernel vmlinuz --initrd initrd.img --append 'root=/dev/vda console=ttyS0'
  virtman vm boot vm1                 # a guest with its own bootloader")]
    Boot {
        /// The VM.
        name: String,
        /// Kernel to boot directly (without it, the disk's bootloader runs).
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// Initial ramdisk (with --kernel).
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// Kernel command line (with --kernel).
        #[arg(long, default_value = "console=ttyS0")]
        append: String,
        /// Memory in MiB.
        #[arg(long, default_value_t = 512)]
        memory: u32,
        /// Extra qemu arguments (repeat for each).
        #[arg(long = "qemu-arg", allow_hyphen_values = true)]
        qemu_args: Vec<String>,
        /// The qemu binary.
        #[arg(long, default_value = "qemu-system-x86_64")]
        qemu: String,
    },
}

/// Arguments of `virtman status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    agent: AgentSocket,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Runs `virtman vm`.
pub fn run(args: VmArgs) -> anyhow::Result<()> {
    let c = args.agent.client();
    let rt = runtime()?;
    match args.command {
        VmCommand::Create {
            name,
            image,
            libvirt,
            domain,
            connect,
        } => {
            let virsh = connect.virsh();
            if libvirt {
                // Before anything is made: a daemon that is not there, a
                // kernel that is not there.
                virsh.check()?;
                domain.files()?;
            }
            let vm = rt.block_on(c.create_vm(&name, &image))?;
            if libvirt {
                let defined = domain
                    .spec(&vm)
                    .and_then(|spec| Ok((domain_xml(&spec)?, spec.domain)))
                    .and_then(|(xml, dom)| virsh.define(&xml).map(|()| dom));
                match defined {
                    Ok(dom) => {
                        eprintln!("defined libvirt domain {dom:?} (start it: virsh start {dom})")
                    }
                    Err(e) => {
                        let undone = match rt.block_on(c.remove_vm(&name)) {
                            Ok(()) => "the VM's snapshot was removed again".to_owned(),
                            Err(r) => format!("removing the VM's snapshot failed too: {r}"),
                        };
                        return Err(e.context(format!(
                            "VM {name:?}: the libvirt domain was not defined; {undone}"
                        )));
                    }
                }
            }
            println!("{}", vm.uri);
        }
        VmCommand::Xml { name, domain } => {
            let vm = find_vm(&rt, &c, &name)?;
            print!("{}", domain_xml(&domain.spec(&vm)?)?);
        }
        VmCommand::Ls { json } => {
            let vms = rt.block_on(c.list_vms())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&vms)?);
            } else {
                println!("{:<20} {:<20} {:>12}  URI", "NAME", "IMAGE", "WRITTEN");
                for v in vms {
                    println!(
                        "{:<20} {:<20} {:>12}  {}",
                        v.name,
                        v.image,
                        human(v.written_bytes),
                        v.uri
                    );
                }
            }
        }
        VmCommand::Rm {
            name,
            force,
            connect,
        } => remove(&rt, &c, &name, force, &connect.virsh())?,
        VmCommand::Boot {
            name,
            kernel,
            initrd,
            append,
            memory,
            qemu_args,
            qemu,
        } => {
            let vm = find_vm(&rt, &c, &name)?;
            let guest = Guest {
                qemu: qemu.clone(),
                accel: Accel::Auto,
                memory_mib: memory,
                kernel,
                initrd,
                append,
                extra_args: qemu_args,
            };
            let status = guest
                .command(&vm.uri, false, Console::Interactive)
                .map_err(|e| anyhow::anyhow!("--initrd: {e}"))?
                .status()
                .with_context(|| format!("starting {qemu} (install qemu-system-x86)"))?;
            if !status.success() {
                bail!("qemu exited with {status}");
            }
        }
    }
    Ok(())
}

/// The VM called `name` on this host.
pub(crate) fn find_vm(
    rt: &tokio::runtime::Runtime,
    c: &ControlClient,
    name: &str,
) -> anyhow::Result<virtman_agent::agent::VmInfo> {
    let vms = rt.block_on(c.list_vms())?;
    match vms.into_iter().find(|v| v.name == name) {
        Some(vm) => Ok(vm),
        None => bail!("no VM named {name:?} on this host (see `virtman vm ls`)"),
    }
}

/// Runs `virtman status`.
pub fn status(args: StatusArgs) -> anyhow::Result<()> {
    let s = runtime()?.block_on(args.agent.client().status())?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print!("{}", status_text(&s));
    }
    Ok(())
}

/// Where a member image fetches from: its parents, else its origins.
fn sources(i: &virtman_agent::agent::ImageStatus) -> String {
    match (i.parents.is_empty(), i.origins.is_empty()) {
        (false, _) => i.parents.join(", "),
        (true, false) => format!("origin {}", i.origins.join(", ")),
        (true, true) => "none yet".to_owned(),
    }
}

/// `virtman status` for a person: the host, then one line per image (held
/// fraction, parents or what an origin sent, prefetch), then the VMs.
fn status_text(s: &virtman_agent::agent::Status) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(
        out,
        "node {} at {}  (coordinator {})",
        s.node,
        s.advertise,
        if s.coordinator_ok {
            "reachable"
        } else {
            "UNREACHABLE"
        }
    );
    let _ = writeln!(
        out,
        "cache {} of {} used; served {} to children, {} to VMs{}",
        human(s.cache_used),
        human(s.cache_capacity),
        human(s.served_to_children),
        human(s.served_to_vms),
        if s.served_to_others > 0 {
            format!(", {} to other readers", human(s.served_to_others))
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        out,
        "\n{:<20} {:<7} {:>10} {:>7}  PARENTS / SENT",
        "IMAGE", "ROLE", "SIZE", "HELD"
    );
    for i in &s.images {
        let detail = match &i.sent {
            Some(o) => format!(
                "sent {} ({} chunks, at most {}x each)",
                human(o.bytes),
                o.chunks_sent,
                o.max_per_chunk
            ),
            None if i.on_saved_parents => format!(
                "{} (saved before a restart; waiting for the coordinator; failovers {})",
                sources(i),
                i.failovers
            ),
            None => format!("{} (failovers {})", sources(i), i.failovers),
        };
        let detail = match &i.prefetch {
            Some(p) if p.pinned || p.prefetched_chunks > 0 || p.profile_chunks > 0 => format!(
                "{detail}; prefetched {} ({} chunks, profile {} chunks){}",
                human(p.prefetched_bytes),
                p.prefetched_chunks,
                p.profile_chunks,
                match (p.pinned, p.pin_done) {
                    (true, true) => ", pinned",
                    (true, false) => ", pinning",
                    _ => "",
                }
            ),
            _ => detail,
        };
        let _ = writeln!(
            out,
            "{:<20} {:<7} {:>10} {:>6.1}%  {}",
            i.name,
            i.role,
            human(i.size),
            i.progress * 100.0,
            detail
        );
    }
    let _ = writeln!(out, "\n{} VMs", s.vms.len());
    for v in &s.vms {
        let _ = writeln!(out, "  {:<20} {:<20} {}", v.name, v.image, v.uri);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_text_says_where_each_image_comes_from() {
        let image = |name: &str, extra: serde_json::Value| {
            let mut v = serde_json::json!({
                "name": name, "role": "member", "size": 1u64 << 30, "progress": 0.25,
                "parents": ["h1", "h2"], "fetched": [], "from_origins": 0,
                "failovers": 3, "sent": null,
            });
            v.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            v
        };
        let s: virtman_agent::agent::Status = serde_json::from_value(serde_json::json!({
            "node": "h3", "advertise": "10.0.0.3:10809",
            "images": [
                image("saved", serde_json::json!({"on_saved_parents": true})),
                image("joined", serde_json::json!({"prefetch": {
                    "profile_chunks": 240, "profile_done": true, "recorded_chunks": 0,
                    "prefetched_chunks": 200, "prefetched_bytes": 200u64 << 18,
                    "pinned": true, "pin_done": false}})),
                image("leaf", serde_json::json!({"parents": [], "origins": ["origin"]})),
                image("base", serde_json::json!({"role": "origin", "progress": 1.0,
                    "parents": [], "sent": {"bytes": 1u64 << 20, "chunks_sent": 4,
                    "max_per_chunk": 1}})),
            ],
            "vms": [{"name": "vm1", "image": "joined", "uri": "nbd+unix:///vm1?socket=/s",
                     "written_bytes": 0}],
            "cache_used": 1u64 << 28, "cache_capacity": 1u64 << 31,
            "served_to_children": 0, "served_to_vms": 0, "coordinator_ok": false,
        }))
        .unwrap();
        let text = status_text(&s);
        let line = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name))
                .unwrap_or_else(|| panic!("no line for {name}: {text}"))
                .to_owned()
        };
        assert!(text.contains("(coordinator UNREACHABLE)"), "{text}");
        assert!(
            line("saved").contains(
                "h1, h2 (saved before a restart; waiting for the coordinator; failovers 3)"
            ),
            "{text}"
        );
        let joined = line("joined");
        assert!(joined.contains("h1, h2 (failovers 3)"), "{text}");
        assert!(joined.contains("25.0%"), "{text}");
        assert!(
            joined.contains("prefetched 50 MiB (200 chunks, profile 240 chunks), pinning"),
            "{text}"
        );
        assert!(
            line("leaf").contains("origin origin (failovers 3)"),
            "{text}"
        );
        assert!(
            line("base").contains("sent 1 MiB (4 chunks, at most 1x each)"),
            "{text}"
        );
        assert!(text.contains("1 VMs\n  vm1"), "{text}");
    }
}
