//! libvirt domains on virtman disks, for real: Debian's libvirtd, started by
//! the test in a private mount namespace (its sockets, state, logs and domain
//! configurations in the test's directory), a local virtman cluster (origin
//! -> host1 -> host2), and the test guest defined by `virtman vm create
//! --libvirt` on host2, booted by `virsh start` under TCG.
//!
//! Needs root (unshare, and libvirt's qemu:///system) and the Debian packages
//! `libvirt-daemon-system` (libvirtd, the `libvirt-qemu` user), `libvirt-clients`
//! (virsh) and `qemu-system-x86`.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use virtman_storm::cluster::{Cluster, ClusterConfig};
use virtman_testkit::ChildGuard;
use virtman_testkit::guest::{self, BOOTS_FILE, MARKER};

/// The binary under test (`VIRTMAN_TEST_BIN` runs another build of it).
fn bin() -> PathBuf {
    std::env::var_os("VIRTMAN_TEST_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_virtman")),
        PathBuf::from,
    )
}

/// A libvirtd of the test's own: `unshare --mount` gives it private copies
/// of /run, /var/lib/libvirt, /var/cache/libvirt, /var/log/libvirt and
/// /etc/libvirt/qemu (bound from DIR), its sockets go to DIR/sock, and its
/// qemu.conf hands qemu's output to files rather than virtlogd (so no second
/// daemon is needed). Domains left are destroyed and the daemon stopped on
/// drop; the namespace goes with it.
///
/// /dev/kvm, where there is one, is seen as Debian's udev makes it (root:kvm
/// 0660, and libvirt-qemu is in kvm): with a root-only node, as in some
/// containers, libvirt finds KVM "present" when qemu probes it but not
/// usable by its qemu user, throws its capability cache away on every call
/// and probes qemu again: each `virsh define` then took 44 s here.
struct Libvirtd {
    dir: PathBuf,
    virsh: PathBuf,
    uri: String,
    daemon: ChildGuard,
}

impl Libvirtd {
    fn start(dir: &Path) -> Libvirtd {
        let libvirtd = virtman_testkit::tool("libvirtd", "libvirt-daemon-system");
        let virsh = virtman_testkit::tool("virsh", "libvirt-clients");
        let unshare = virtman_testkit::tool("unshare", "util-linux");
        for sub in [
            "run",
            "lib/qemu",
            "cache/qemu",
            "log/qemu",
            "etc-qemu",
            "sock",
        ] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        // As Debian's package makes it: qemu (as libvirt-qemu) keeps its
        // per-domain state there.
        let st = Command::new("chown")
            .args(["libvirt-qemu:libvirt-qemu"])
            .arg(dir.join("lib/qemu"))
            .status()
            .unwrap();
        assert!(st.success());
        let mut qemu_conf = std::fs::read_to_string("/etc/libvirt/qemu.conf").unwrap_or_default();
        qemu_conf.push_str("\nstdio_handler = \"file\"\n");
        std::fs::write(dir.join("qemu.conf"), qemu_conf).unwrap();
        let sock = dir.join("sock");
        std::fs::write(
            dir.join("libvirtd.conf"),
            format!(
                "unix_sock_dir = \"{}\"\nunix_sock_ro_perms = \"0700\"\n\
                 auth_unix_rw = \"none\"\nauth_unix_ro = \"none\"\n",
                sock.display()
            ),
        )
        .unwrap();
        let d = dir.display();
        let script = format!(
            "set -e
mount -t tmpfs -o mode=755 tmpfs /run
mount --bind {d}/lib /var/lib/libvirt
mount --bind {d}/cache /var/cache/libvirt
mount --bind {d}/log /var/log/libvirt
mount --bind {d}/etc-qemu /etc/libvirt/qemu
mount --bind {d}/qemu.conf /etc/libvirt/qemu.conf
if [ -c /dev/kvm ]; then
  mknod {d}/kvm c $((0x$(stat -c %t /dev/kvm))) $((0x$(stat -c %T /dev/kvm)))
  chown root:kvm {d}/kvm && chmod 0660 {d}/kvm
  mount --bind {d}/kvm /dev/kvm
fi
exec {} --config {d}/libvirtd.conf --pid-file {d}/libvirtd.pid",
            libvirtd.display()
        );
        let log = std::fs::File::create(dir.join("libvirtd.log")).unwrap();
        // unshare and sh exec in turn: the guarded process is libvirtd.
        let child = Command::new(unshare)
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut l = Libvirtd {
            dir: dir.to_owned(),
            virsh,
            uri: format!(
                "qemu:///system?socket={}",
                sock.join("libvirt-sock").display()
            ),
            daemon: ChildGuard::new(child).with_grace(Duration::from_secs(10)),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if l.virsh(&["uri"]).status.success() {
                return l;
            }
            let exited = l.daemon.try_wait().unwrap();
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "libvirtd did not start ({exited:?}): {}",
                l.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("libvirtd.log")).unwrap_or_default()
    }

    /// qemu's own log of domain `name`.
    fn qemu_log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("log/qemu/{name}.log"))).unwrap_or_default()
    }

    fn virsh(&self, args: &[&str]) -> Output {
        Command::new(&self.virsh)
            .args(["--quiet", "--connect", &self.uri])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// `virsh ARGS`, which must succeed; its standard output.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.virsh(args);
        assert!(
            out.status.success(),
            "virsh {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn domains(&self) -> Vec<String> {
        self.ok(&["list", "--all", "--name"])
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    }

    fn state(&self, name: &str) -> String {
        self.ok(&["domstate", name]).trim().to_owned()
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        if let Ok(out) = Command::new(&self.virsh)
            .args(["--quiet", "--connect", &self.uri, "list", "--name"])
            .output()
        {
            for name in String::from_utf8_lossy(&out.stdout).lines() {
                let name = name.trim();
                if !name.is_empty() {
                    let _ = self.virsh(&["destroy", name]);
                }
            }
        }
        let _ = self.daemon.stop();
    }
}

/// `virtman ARGS`.
fn virtman(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The VMs of the host at `data_dir`.
fn vms(data_dir: &str) -> Vec<String> {
    let out = virtman(&["vm", "ls", "--json", "--data-dir", data_dir]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|vm| vm["name"].as_str().unwrap().to_owned())
        .collect()
}

/// Gives everyone search (and read) permission on `p`: libvirt's qemu runs
/// as `libvirt-qemu` and must reach the VM socket, kernel and initrd.
fn open_up(p: &Path) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn a_libvirt_domain_boots_from_a_snapshot_two_levels_below_the_origin() {
    let assets = guest::assets().unwrap();
    let template = std::fs::read(&assets.disk_template).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    open_up(dir);
    // What the guest boots, readable by libvirt-qemu.
    let files = dir.join("guest");
    std::fs::create_dir(&files).unwrap();
    open_up(&files);
    let kernel = files.join("vmlinuz");
    let initrd = files.join("initrd.cpio");
    std::fs::copy(&assets.kernel, &kernel).unwrap();
    std::fs::copy(&assets.initrd, &initrd).unwrap();
    let image = dir.join("img.raw");
    assets.copy_disk(&image).unwrap();

    // origin -> host1 -> host2; the VM sockets open to libvirt's qemu.
    let cluster = Cluster::up(&ClusterConfig {
        bin: bin(),
        dir: dir.join("cluster"),
        hosts: 2,
        image: image.clone(),
        image_name: "img".into(),
        store: None,
        fanout: 2,
        origin_fanout: 1,
        parents: 1,
        stripes: 1,
        cache_size: "64M".into(),
        profile_trace: None,
        net: None,
        tls: false,
        liars: vec![],
        agent_args: vec!["--socket-group".into(), "libvirt-qemu".into()],
        coordinators: 1,
    })
    .unwrap();
    let host = |name: &str| {
        let m = cluster
            .state
            .members
            .iter()
            .find(|m| m.name == name)
            .unwrap();
        m.data_dir.to_str().unwrap().to_owned()
    };
    let (host1, host2) = (host("host1"), host("host2"));
    // host1 joins first and becomes the origin's relay head.
    let out = virtman(&[
        "vm",
        "create",
        "relay",
        "--image",
        "img",
        "--data-dir",
        &host1,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));

    // Bad input: a VM that does not exist has no XML.
    let out = virtman(&["vm", "xml", "nosuch", "--data-dir", &host2]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no VM named \"nosuch\""),
        "{}",
        stderr(&out)
    );

    // Bad input: --libvirt with no daemon at LIBVIRT_DEFAULT_URI is refused
    // with a clear message and leaves no snapshot.
    let nowhere = format!("qemu:///system?socket={}/nowhere/sock", dir.display());
    let out = Command::new(bin())
        .args([
            "vm",
            "create",
            "vm0",
            "--image",
            "img",
            "--libvirt",
            "--data-dir",
            &host2,
        ])
        .env("LIBVIRT_DEFAULT_URI", &nowhere)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("no libvirt daemon answers"), "{err}");
    assert!(err.contains(&nowhere), "the URI is named: {err}");
    assert!(vms(&host2).is_empty(), "{:?}", vms(&host2));

    let libvirt = Libvirtd::start(&dir.join("libvirt"));
    let console = files.join("console.log");
    let define = |vm: &str, domain: &str| {
        virtman(&[
            "vm",
            "create",
            vm,
            "--image",
            "img",
            "--libvirt",
            "--connect",
            &libvirt.uri,
            "--name",
            domain,
            "--memory",
            "256",
            "--accel",
            "tcg",
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--append",
            "console=ttyS0 panic=-1 quiet virtman.id=libvirt-1",
            "--console-log",
            console.to_str().unwrap(),
            "--data-dir",
            &host2,
        ])
    };
    let out = define("vm1", "virtman-vm1");
    assert!(out.status.success(), "{}", stderr(&out));
    let uri = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(uri.starts_with("nbd+unix:///vm1?socket="), "{uri}");
    assert_eq!(libvirt.domains(), ["virtman-vm1"]);
    let xml = libvirt.ok(&["dumpxml", "virtman-vm1"]);
    assert!(xml.contains("urn:virtman:libvirt:vm:1"), "{xml}");
    assert!(
        xml.contains("<acpi/>") && xml.contains("protocol='nbd'"),
        "{xml}"
    );

    // host2 sits two levels below the origin.
    let out = virtman(&[
        "tree",
        "img",
        "--json",
        "--coordinator",
        &cluster.state.coordinator,
        "--token-file",
        cluster.dir.join("token").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let tree: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let depth = |n: &str| {
        tree["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["node"] == n)
            .unwrap()["depth"]
            .clone()
    };
    assert_eq!(
        (depth("host1"), depth("host2")),
        (1.into(), 2.into()),
        "{tree}"
    );

    // A define that fails (the domain name is taken) leaves no snapshot.
    let out = define("vm2", "virtman-vm1");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("snapshot was removed again"), "{err}");
    assert_eq!(vms(&host2), ["vm1"]);
    // A kernel that is not there is refused before anything is made.
    let missing = files.join("no-such-kernel");
    let out = virtman(&[
        "vm",
        "create",
        "vm3",
        "--image",
        "img",
        "--libvirt",
        "--connect",
        &libvirt.uri,
        "--kernel",
        missing.to_str().unwrap(),
        "--data-dir",
        &host2,
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--kernel"), "{}", stderr(&out));
    assert_eq!(vms(&host2), ["vm1"]);
    assert_eq!(libvirt.domains(), ["virtman-vm1"]);

    // Bad input: removing a VM whose domain runs (here paused) is refused,
    // naming the domain, with or without --force.
    libvirt.ok(&["start", "--paused", "virtman-vm1"]);
    for force in [false, true] {
        let mut args = vec![
            "vm",
            "rm",
            "vm1",
            "--connect",
            &libvirt.uri,
            "--data-dir",
            &host2,
        ];
        if force {
            args.push("--force");
        }
        let out = virtman(&args);
        assert!(!out.status.success());
        let err = stderr(&out);
        assert!(
            err.contains("libvirt domain \"virtman-vm1\", which is paused"),
            "{err}"
        );
    }
    assert_eq!(vms(&host2), ["vm1"]);
    libvirt.ok(&["destroy", "virtman-vm1"]);

    // The real boot: TCG, the disk over host2's VM socket as libvirt-qemu.
    libvirt.ok(&["start", "virtman-vm1"]);
    let deadline = Instant::now() + Duration::from_secs(120);
    while libvirt.state("virtman-vm1") != "shut off" {
        assert!(
            Instant::now() < deadline,
            "the guest did not power off; console:\n{}\nqemu:\n{}",
            std::fs::read_to_string(&console).unwrap_or_default(),
            libvirt.qemu_log("virtman-vm1")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let text = std::fs::read_to_string(&console).unwrap();
    assert!(
        text.contains(&format!("VIRTMAN-MARKER: {MARKER}")) && text.contains("VIRTMAN-DONE"),
        "console:\n{text}\nqemu:\n{}",
        libvirt.qemu_log("virtman-vm1")
    );

    // Its write is in its snapshot; the image is unchanged.
    let copy = dir.join("vm1.raw");
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &uri])
        .arg(&copy)
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(
        guest::read_disk_file(&copy, BOOTS_FILE).unwrap(),
        "boot libvirt-1\n"
    );
    let origin = cluster
        .state
        .members
        .iter()
        .find(|m| m.name == "origin")
        .unwrap();
    let stored = origin.data_dir.join("images/img/image.raw");
    assert!(
        std::fs::read(&stored).unwrap() == template,
        "the origin's image changed"
    );
    assert!(
        std::fs::read(&image).unwrap() == template,
        "the imported file changed"
    );

    // vm rm removes the snapshot and undefines the domain virtman made; a
    // domain it did not make (no marker) is left alone.
    let foreign = dir.join("foreign.xml");
    std::fs::write(
        &foreign,
        xml.replace("virtman-vm1", "foreign")
            .lines()
            .filter(|l| !l.contains("<uuid>") && !l.contains("virtman:vm"))
            .collect::<Vec<_>>()
            .join("\n"),
    )
    .unwrap();
    libvirt.ok(&["define", foreign.to_str().unwrap()]);
    let out = virtman(&[
        "vm",
        "rm",
        "vm1",
        "--connect",
        &libvirt.uri,
        "--data-dir",
        &host2,
    ]);
    assert!(
        out.status.success(),
        "{}\nhost2's log:\n{}",
        stderr(&out),
        std::fs::read_to_string(Path::new(&host2).join("log")).unwrap_or_default()
    );
    assert!(stderr(&out).contains("undefined libvirt domain \"virtman-vm1\""));
    assert_eq!(libvirt.domains(), ["foreign"]);
    assert!(vms(&host2).is_empty());
    libvirt.ok(&["undefine", "foreign"]);
}

/// `vm rm` refuses while a client holds the snapshot open and says
/// --force; --force cuts the client off and removes it.
#[test]
fn vm_rm_refuses_an_open_snapshot_unless_forced() {
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("img.raw");
    std::fs::write(&image, virtman_testkit::pattern(4 << 20, 5)).unwrap();
    let cluster = Cluster::up(&ClusterConfig {
        bin: bin(),
        dir: tmp.path().join("cluster"),
        hosts: 1,
        image,
        image_name: "img".into(),
        store: None,
        fanout: 2,
        origin_fanout: 1,
        parents: 1,
        stripes: 1,
        cache_size: "64M".into(),
        profile_trace: None,
        net: None,
        tls: false,
        liars: vec![],
        agent_args: vec![],
        coordinators: 1,
    })
    .unwrap();
    let m = cluster
        .state
        .members
        .iter()
        .find(|m| m.name == "host1")
        .unwrap();
    let host = m.data_dir.to_str().unwrap();
    let out = virtman(&["vm", "create", "vm1", "--image", "img", "--data-dir", host]);
    assert!(out.status.success(), "{}", stderr(&out));
    let uri = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    // qemu-io holds the disk open while its standard input is.
    let mut io = ChildGuard::new(
        Command::new(virtman_testkit::tool("qemu-io", "qemu-utils"))
            .args(["-f", "raw", &uri])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Once it has read through the snapshot, it holds it open.
    use std::io::{BufRead, Write};
    let mut stdin = io.child_mut().stdin.take().unwrap();
    writeln!(stdin, "read 0 512").unwrap();
    let mut lines = std::io::BufReader::new(io.child_mut().stdout.take().unwrap()).lines();
    let line = lines.next().unwrap().unwrap();
    assert!(line.contains("read 512/512 bytes"), "{line}");
    let out = virtman(&["vm", "rm", "vm1", "--data-dir", host]);
    assert!(!out.status.success());
    let refused = stderr(&out);
    assert!(refused.contains("--force"), "{refused}");
    assert_eq!(vms(host), ["vm1"]);
    let out = virtman(&["vm", "rm", "vm1", "--force", "--data-dir", host]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(vms(host).is_empty());
    drop(stdin);
    let status = io.wait_timeout(Duration::from_secs(10)).unwrap();
    assert!(status.is_some(), "qemu-io did not end");
    drop(lines);
}
