//! libvirt domains on virtman disks: the domain XML of `virtman vm xml` and
//! `virtman vm create --libvirt`, and the metadata element that marks a
//! domain as made by virtman (so `virtman vm rm` undefines only those).
//!
//! ```text
//!   <domain type='kvm'|'qemu'>             kvm when /dev/kvm works, else TCG
//!     <name>DOMAIN</name>
//!     <metadata><virtman:vm xmlns:virtman=NS name=VM image=IMAGE socket=SOCK/></metadata>
//!     <memory unit='MiB'>, <vcpu>, <os> (direct kernel or the disk's bootloader)
//!     <features><acpi/></features>          without it libvirt passes -no-acpi,
//!                                           which qemu 10 refuses
//!     <devices>
//!       <disk type='network'> nbd over the agent's unix socket, export = VM </disk>
//!       <serial> to a log file, or a pty </serial>
//! ```
//!
//! The writer escapes every value it puts in text or an attribute; values
//! XML cannot carry (control characters) are refused, never dropped.

use std::path::{Path, PathBuf};

/// The namespace of virtman's element in a domain's `<metadata>`.
pub const METADATA_NS: &str = "urn:virtman:libvirt:vm:1";

/// What a domain for a VM holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainSpec {
    /// The domain's name.
    pub domain: String,
    /// The VM (its snapshot, and its export on the VM socket).
    pub vm: String,
    /// The VM's image (recorded in the metadata, for people).
    pub image: String,
    /// The agent's VM socket.
    pub socket: PathBuf,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// `type='kvm'` (hardware) or `type='qemu'` (TCG emulation).
    pub kvm: bool,
    /// Direct kernel boot; without one the disk's bootloader runs.
    pub kernel: Option<DirectKernel>,
    /// The serial console's log file; without one, a pty (`virsh console`).
    pub console_log: Option<PathBuf>,
}

/// A kernel booted directly by qemu.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectKernel {
    /// The kernel image.
    pub kernel: PathBuf,
    /// Its initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Its command line.
    pub append: String,
}

/// A value XML 1.0 cannot hold.
#[derive(Debug, PartialEq, Eq)]
pub struct XmlError {
    /// Which value.
    pub what: &'static str,
    /// The value.
    pub value: String,
    /// The first character refused.
    pub ch: char,
}

impl std::fmt::Display for XmlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} holds a character XML cannot carry ({:?}): {:?}",
            self.what, self.ch, self.value
        )
    }
}

impl std::error::Error for XmlError {}

/// Characters XML 1.0 allows: tab, newline, carriage return and everything
/// from space up except the surrogates (not `char`s) and U+FFFE/U+FFFF.
fn xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r') || (c >= ' ' && c != '\u{FFFE}' && c != '\u{FFFF}')
}

/// `value` escaped for text content or an attribute in single or double
/// quotes.
pub fn escape(what: &'static str, value: &str) -> Result<String, XmlError> {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            // Newlines and tabs in attributes would be normalised to spaces.
            '\n' => out.push_str("&#10;"),
            '\r' => out.push_str("&#13;"),
            '\t' => out.push_str("&#9;"),
            c if xml_char(c) => out.push(c),
            ch => {
                return Err(XmlError {
                    what,
                    value: value.to_owned(),
                    ch,
                });
            }
        }
    }
    Ok(out)
}

fn path(what: &'static str, p: &Path) -> Result<String, XmlError> {
    escape(what, &p.to_string_lossy())
}

/// The domain XML for `spec`.
pub fn domain_xml(spec: &DomainSpec) -> Result<String, XmlError> {
    let mut x = String::new();
    // Writing to a String cannot fail.
    let mut line = |s: &str| {
        x.push_str(s);
        x.push('\n');
    };
    let kind = if spec.kvm { "kvm" } else { "qemu" };
    line(&format!("<domain type='{kind}'>"));
    line(&format!(
        "  <name>{}</name>",
        escape("the domain name", &spec.domain)?
    ));
    line("  <metadata>");
    line(&format!(
        "    <virtman:vm xmlns:virtman='{METADATA_NS}' name='{}' image='{}' socket='{}'/>",
        escape("the VM name", &spec.vm)?,
        escape("the image name", &spec.image)?,
        path("the VM socket", &spec.socket)?
    ));
    line("  </metadata>");
    line(&format!(
        "  <memory unit='MiB'>{}</memory>",
        spec.memory_mib
    ));
    line(&format!("  <vcpu>{}</vcpu>", spec.vcpus));
    line("  <os>");
    line("    <type>hvm</type>");
    match &spec.kernel {
        Some(k) => {
            line(&format!(
                "    <kernel>{}</kernel>",
                path("--kernel", &k.kernel)?
            ));
            if let Some(i) = &k.initrd {
                line(&format!("    <initrd>{}</initrd>", path("--initrd", i)?));
            }
            line(&format!(
                "    <cmdline>{}</cmdline>",
                escape("--append", &k.append)?
            ));
        }
        None => line("    <boot dev='hd'/>"),
    }
    line("  </os>");
    line("  <features>");
    line("    <acpi/>");
    line("  </features>");
    if spec.kvm {
        line("  <cpu mode='host-passthrough'/>");
    }
    line("  <on_poweroff>destroy</on_poweroff>");
    line("  <on_reboot>restart</on_reboot>");
    line("  <on_crash>destroy</on_crash>");
    line("  <devices>");
    line("    <disk type='network' device='disk'>");
    line("      <driver name='qemu' type='raw' discard='unmap'/>");
    line(&format!(
        "      <source protocol='nbd' name='{}'>",
        escape("the VM name", &spec.vm)?
    ));
    line(&format!(
        "        <host transport='unix' socket='{}'/>",
        path("the VM socket", &spec.socket)?
    ));
    line("      </source>");
    line("      <target dev='vda' bus='virtio'/>");
    line("    </disk>");
    match &spec.console_log {
        Some(log) => {
            line("    <serial type='file'>");
            line(&format!(
                "      <source path='{}'/>",
                path("--console-log", log)?
            ));
            line("      <target port='0'/>");
            line("    </serial>");
        }
        None => {
            line("    <serial type='pty'>");
            line("      <target port='0'/>");
            line("    </serial>");
            line("    <console type='pty'>");
            line("      <target type='serial' port='0'/>");
            line("    </console>");
        }
    }
    line("  </devices>");
    line("</domain>");
    Ok(x)
}

/// The VM's export name and socket from its NBD URI
/// (`nbd+unix:///NAME?socket=PATH`, as the agent gives it).
pub fn parse_vm_uri(uri: &str) -> Option<(String, PathBuf)> {
    let rest = uri.strip_prefix("nbd+unix:///")?;
    let (export, socket) = rest.split_once("?socket=")?;
    Some((export.to_owned(), PathBuf::from(socket)))
}

/// virtman's element in a domain's metadata, as `virsh metadata` prints it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Marker {
    /// The VM.
    pub vm: String,
    /// The VM socket of the agent that holds it.
    pub socket: PathBuf,
}

/// Reads [`Marker`] from the text of virtman's metadata element (only the
/// attributes this writer puts there; entities it writes are undone). In a
/// domain's XML it is `<virtman:vm ...>`; `virsh metadata --uri NS` prints
/// it without the prefix, `<vm ...>`.
pub fn parse_marker(xml: &str) -> Option<Marker> {
    let start = xml.find("<virtman:vm ").or_else(|| xml.find("<vm "))?;
    let elem = &xml[start..];
    let elem = &elem[..elem.find('>')?];
    Some(Marker {
        vm: attribute(elem, "name")?,
        socket: PathBuf::from(attribute(elem, "socket")?),
    })
}

/// The value of attribute `name` in the start tag `elem` (either quote).
fn attribute(elem: &str, name: &str) -> Option<String> {
    let mut rest = elem;
    loop {
        let at = rest.find(name)?;
        let before = rest[..at].chars().last();
        let after = &rest[at + name.len()..];
        let after_eq = after.trim_start().strip_prefix('=').map(str::trim_start);
        if matches!(before, Some(c) if c.is_whitespace())
            && let Some(v) = after_eq
            && let Some(q) = v.chars().next().filter(|q| *q == '\'' || *q == '"')
        {
            let v = &v[1..];
            return Some(unescape(&v[..v.find(q)?]));
        }
        rest = &rest[at + name.len()..];
    }
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let Some(end) = rest.find(';') else { break };
        let entity = &rest[1..end];
        let c = match entity {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "apos" => Some('\''),
            "quot" => Some('"'),
            e => e
                .strip_prefix("#x")
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .or_else(|| e.strip_prefix('#').and_then(|d| d.parse().ok()))
                .and_then(char::from_u32),
        };
        match c {
            Some(c) => {
                out.push(c);
                rest = &rest[end + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> DomainSpec {
        DomainSpec {
            domain: "vm1".into(),
            vm: "vm1".into(),
            image: "debian".into(),
            socket: "/var/lib/virtman/vms.sock".into(),
            memory_mib: 512,
            vcpus: 2,
            kvm: false,
            kernel: None,
            console_log: None,
        }
    }

    #[test]
    fn escaping_covers_markup_quotes_and_whitespace_and_refuses_control_characters() {
        assert_eq!(
            escape("x", r#"a&b<c>d'e"f"#).unwrap(),
            "a&amp;b&lt;c&gt;d&apos;e&quot;f"
        );
        assert_eq!(escape("x", "a\tb\nc").unwrap(), "a&#9;b&#10;c");
        assert_eq!(escape("x", "ünï ✓").unwrap(), "ünï ✓");
        let err = escape("--append", "a\u{1}b").unwrap_err();
        assert_eq!(err.ch, '\u{1}');
        assert!(err.to_string().contains("--append"), "{err}");
        assert!(escape("x", "\u{FFFF}").is_err());
    }

    #[test]
    fn the_domain_has_the_nbd_disk_acpi_and_the_marker() {
        let x = domain_xml(&spec()).unwrap();
        assert!(x.starts_with("<domain type='qemu'>\n"), "{x}");
        assert!(x.contains("<features>\n    <acpi/>\n  </features>"), "{x}");
        assert!(
            x.contains(
                "<disk type='network' device='disk'>\n      <driver name='qemu' type='raw' discard='unmap'/>\n      <source protocol='nbd' name='vm1'>\n        <host transport='unix' socket='/var/lib/virtman/vms.sock'/>\n      </source>\n      <target dev='vda' bus='virtio'/>"
            ),
            "{x}"
        );
        assert!(x.contains("<boot dev='hd'/>"), "{x}");
        assert!(x.contains("<serial type='pty'>"), "{x}");
        assert!(x.contains("<memory unit='MiB'>512</memory>\n  <vcpu>2</vcpu>"));
        assert_eq!(
            parse_marker(&x),
            Some(Marker {
                vm: "vm1".into(),
                socket: "/var/lib/virtman/vms.sock".into()
            })
        );
        let kvm = domain_xml(&DomainSpec {
            kvm: true,
            ..spec()
        })
        .unwrap();
        assert!(kvm.starts_with("<domain type='kvm'>"), "{kvm}");
    }

    #[test]
    fn hostile_values_are_escaped_and_read_back() {
        let s = DomainSpec {
            domain: "a<b>&'c'".into(),
            socket: "/tmp/it's \"here\" & <there>/vms.sock".into(),
            kernel: Some(DirectKernel {
                kernel: "/boot/vm'linuz".into(),
                initrd: Some("/boot/in&itrd".into()),
                append: "console=ttyS0 x=\"</cmdline><evil/>\"".into(),
            }),
            console_log: Some("/var/log/a'b.log".into()),
            ..spec()
        };
        let x = domain_xml(&s).unwrap();
        assert!(
            x.contains("<name>a&lt;b&gt;&amp;&apos;c&apos;</name>"),
            "{x}"
        );
        assert!(x.contains("<kernel>/boot/vm&apos;linuz</kernel>"), "{x}");
        assert!(x.contains("<initrd>/boot/in&amp;itrd</initrd>"), "{x}");
        assert!(
            x.contains(
                "<cmdline>console=ttyS0 x=&quot;&lt;/cmdline&gt;&lt;evil/&gt;&quot;</cmdline>"
            ),
            "{x}"
        );
        assert!(!x.contains("<evil/>"), "{x}");
        assert!(x.contains("<source path='/var/log/a&apos;b.log'/>"), "{x}");
        // Every quote in an attribute is escaped: the tag still parses.
        let m = parse_marker(&x).unwrap();
        assert_eq!(m.socket, s.socket);
        // A value XML cannot hold is refused, naming it.
        let err = domain_xml(&DomainSpec {
            kernel: Some(DirectKernel {
                kernel: "/k".into(),
                initrd: None,
                append: "a\u{7}".into(),
            }),
            ..spec()
        })
        .unwrap_err();
        assert_eq!(err.what, "--append");
    }

    #[test]
    fn markers_as_virsh_prints_them_and_vm_uris_parse() {
        // As `virsh metadata --uri urn:virtman:libvirt:vm:1` prints it.
        let printed = "<vm name=\"vm&amp;1\" image=\"img\" socket=\"/d/vms.sock\"/>\n";
        assert_eq!(
            parse_marker(printed),
            Some(Marker {
                vm: "vm&1".into(),
                socket: "/d/vms.sock".into()
            })
        );
        assert_eq!(parse_marker("<other/>"), None);
        assert_eq!(parse_marker("<vmx name='a' socket='/s'/>"), None);
        // `filename=` does not count as `name=`.
        assert_eq!(parse_marker("<virtman:vm filename='x' socket='/s'/>"), None);
        assert_eq!(
            parse_vm_uri("nbd+unix:///vm1?socket=/var/lib/virtman/vms.sock"),
            Some(("vm1".into(), "/var/lib/virtman/vms.sock".into()))
        );
        assert_eq!(parse_vm_uri("nbd://host/vm1"), None);
    }
}
