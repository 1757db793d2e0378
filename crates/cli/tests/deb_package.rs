//! The Debian package, for real: `dist/build-deb.sh` packages the binary
//! under test (the dev profile, no second build), `dpkg -i` installs it into
//! this machine, and the test checks what an operator would: `virtman
//! --version`, `man -w virtman-agent`, the units (`systemd-analyze verify`,
//! man pages included), the example configs as conffiles, the completions;
//! then `dpkg -r` keeps only the conffiles and `dpkg -P` leaves nothing.
//!
//! It installs into the real system, so it needs root (CI is a throw-away
//! machine) and refuses to run over an installed `virtman` package.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use virtman_testkit::tool;

const BIN: &str = env!("CARGO_BIN_EXE_virtman");

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn installed() -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "virtman"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("installed"))
}

/// Purges the package if the test stops half-way, so that a failure does not
/// leave it installed.
struct PurgeOnDrop;

impl Drop for PurgeOnDrop {
    fn drop(&mut self) {
        if installed() {
            let _ = Command::new("dpkg").args(["-P", "virtman"]).output();
        }
    }
}

#[test]
fn deb_installs_works_and_removes_cleanly() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test installs the .deb with dpkg into the running system: run it as root \
         (CI runs as root on a throw-away machine)"
    );
    assert!(
        !installed(),
        "a virtman package is installed already; remove it (dpkg -P virtman) before this test"
    );
    let dpkg = tool("dpkg", "dpkg");
    let man = tool("man", "man-db");
    let analyze = tool("systemd-analyze", "systemd");
    assert!(
        Command::new("cargo-deb").arg("--version").output().is_ok(),
        "cargo-deb is missing: cargo install cargo-deb --locked (scripts/test.sh does)"
    );

    // The binary under test is TARGET/debug/virtman: package it as it is.
    let bin = Path::new(BIN);
    let profile_dir = bin.parent().unwrap();
    assert_eq!(
        profile_dir.file_name().and_then(|n| n.to_str()),
        Some("debug"),
        "the test binary {BIN} is not of the dev profile"
    );
    let target_dir = profile_dir.parent().unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let started = Instant::now();
    let built = run(Command::new(root.join("dist/build-deb.sh"))
        .args(["--profile", "dev", "--no-build", "--output"])
        .arg(out_dir.path())
        .env("CARGO_TARGET_DIR", target_dir));
    let deb = PathBuf::from(stdout(&built).lines().last().unwrap().trim());
    assert!(deb.is_file(), "no .deb at {}", deb.display());
    let packaged = started.elapsed();

    // What the package holds, and which of it (shared directories) was here
    // before: the rest must be gone after the purge.
    let listing = stdout(&run(Command::new("dpkg-deb").arg("-c").arg(&deb)));
    let files: Vec<PathBuf> = listing
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .map(|p| Path::new("/").join(p.trim_start_matches("./")))
        .filter(|p| p != Path::new("/"))
        .collect();
    let there_before: Vec<bool> = files.iter().map(|p| p.exists()).collect();
    assert!(
        files.iter().any(|p| p.ends_with("usr/bin/virtman")),
        "{listing}"
    );

    let _purge = PurgeOnDrop;
    let started = Instant::now();
    run(Command::new(&dpkg).arg("-i").arg(&deb));
    let install = started.elapsed();

    // It works.
    let version = stdout(&run(Command::new("/usr/bin/virtman").arg("--version")));
    assert_eq!(
        version.trim(),
        format!("virtman {}", env!("CARGO_PKG_VERSION"))
    );
    // Every command has its page where man finds it.
    for page in [
        "virtman",
        "virtman-agent",
        "virtman-coordinator",
        "virtman-vm-create",
    ] {
        let path = stdout(&run(Command::new(&man).args(["-w", page])));
        assert!(
            path.trim().starts_with("/usr/share/man/man1/"),
            "man -w {page}: {path}"
        );
    }
    for path in [
        "/usr/share/bash-completion/completions/virtman",
        "/usr/share/zsh/vendor-completions/_virtman",
        "/usr/share/fish/vendor_completions.d/virtman.fish",
    ] {
        let text = std::fs::read_to_string(path).unwrap();
        assert!(text.contains("cache-size"), "{path}");
    }
    // The units as installed, man pages and /usr/bin/virtman included.
    let units = [
        "/usr/lib/systemd/system/virtman-agent.service",
        "/usr/lib/systemd/system/virtman-coordinator.service",
    ];
    let out = Command::new(&analyze)
        .args(["verify", "--man=yes"])
        .args(units)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "verify: {said}"
    );
    // The example configs are conffiles: an operator's edits survive upgrades.
    let conffiles = stdout(&run(Command::new("dpkg-query").args([
        "-W",
        "-f=${Conffiles}",
        "virtman",
    ])));
    for conf in ["/etc/virtman/agent.toml", "/etc/virtman/coordinator.toml"] {
        assert!(
            conffiles.contains(conf),
            "{conf} is no conffile: {conffiles}"
        );
        assert!(Path::new(conf).is_file(), "{conf}");
    }
    // Nothing is enabled or started by the installation.
    assert!(
        !Path::new("/etc/systemd/system/multi-user.target.wants/virtman-agent.service").exists()
    );

    // Remove: the program goes, the conffiles stay (Debian's rule).
    let started = Instant::now();
    run(Command::new(&dpkg).args(["-r", "virtman"]));
    assert!(!Path::new("/usr/bin/virtman").exists());
    assert!(!Path::new(units[0]).exists());
    assert!(Path::new("/etc/virtman/agent.toml").exists());
    // Purge: nothing of the package is left.
    run(Command::new(&dpkg).args(["-P", "virtman"]));
    let removal = started.elapsed();
    assert!(!installed());
    let left: Vec<&PathBuf> = files
        .iter()
        .zip(&there_before)
        .filter(|(p, before)| !**before && p.exists())
        .map(|(p, _)| p)
        .collect();
    assert!(left.is_empty(), "left after purge: {left:?}");
    assert!(!Path::new("/etc/virtman").exists(), "/etc/virtman is left");
    for dir in [
        "/etc/systemd/system",
        "/var/lib/systemd/deb-systemd-helper-enabled",
        "/var/lib/systemd/deb-systemd-helper-masked",
    ] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            let ours: Vec<String> = entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("virtman"))
                .collect();
            assert!(ours.is_empty(), "{dir} keeps {ours:?}");
        }
    }
    eprintln!(
        "packaging {:.1} s, dpkg -i {:.1} s, dpkg -r and -P {:.1} s",
        packaged.as_secs_f64(),
        install.as_secs_f64(),
        removal.as_secs_f64()
    );
}
