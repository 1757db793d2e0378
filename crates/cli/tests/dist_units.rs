//! The systemd units in `dist/` pass `systemd-analyze verify` (which needs
//! the `systemd` package, not a running systemd), with no warning at all,
//! and say what the packaging promises: `Type=notify`, after the network,
//! restart on failure, the state directory, the hardening.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use virtman_testkit::tool;

const BIN: &str = env!("CARGO_BIN_EXE_virtman");

fn dist() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../dist")
}

/// Runs `systemd-analyze verify` on `units` (paths) and returns its status
/// and everything it printed.
fn verify(units: &[PathBuf], man: bool) -> (bool, String) {
    let out = Command::new(tool("systemd-analyze", "systemd"))
        .arg("verify")
        .arg(if man { "--man=yes" } else { "--man=no" })
        .args(units)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Copies the unit `name` into `dir` with its ExecStart pointed at the
/// binary under test (`/usr/bin/virtman` exists only once the package is
/// installed: `deb_package.rs` verifies the installed units as they are).
fn copy_for_test(name: &str, dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(dist().join(name)).unwrap();
    assert!(text.contains("ExecStart=/usr/bin/virtman "), "{name}");
    let path = dir.join(name);
    std::fs::write(&path, text.replace("/usr/bin/virtman", BIN)).unwrap();
    path
}

#[test]
fn units_verify_without_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let units: Vec<PathBuf> = ["virtman-agent.service", "virtman-coordinator.service"]
        .iter()
        .map(|n| copy_for_test(n, dir.path()))
        .collect();
    let (ok, text) = verify(&units, false);
    assert!(ok, "systemd-analyze verify failed:\n{text}");
    assert!(
        text.trim().is_empty(),
        "systemd-analyze verify warned:\n{text}"
    );
}

#[test]
fn a_broken_unit_is_caught() {
    // The check above can fail: a misspelt directive is reported.
    let dir = tempfile::tempdir().unwrap();
    let path = copy_for_test("virtman-agent.service", dir.path());
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("NoNewPrivileges=", "NoNewPrivilege=")).unwrap();
    let (_, text) = verify(&[path], false);
    assert!(text.contains("NoNewPrivilege"), "{text}");
}

#[test]
fn units_say_what_the_package_promises() {
    for (name, command) in [
        (
            "virtman-agent.service",
            "ExecStart=/usr/bin/virtman agent --config /etc/virtman/agent.toml",
        ),
        (
            "virtman-coordinator.service",
            "ExecStart=/usr/bin/virtman coordinator --config /etc/virtman/coordinator.toml",
        ),
    ] {
        let text = std::fs::read_to_string(dist().join(name)).unwrap();
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        for want in [
            command,
            "Type=notify",
            "After=network-online.target",
            "Wants=network-online.target",
            "Restart=on-failure",
            "StateDirectory=virtman",
            "ProtectSystem=strict",
            "PrivateTmp=yes",
            "NoNewPrivileges=yes",
            "ProtectHome=yes",
            "WantedBy=multi-user.target",
        ] {
            assert!(lines.contains(&want), "{name} lacks {want:?}");
        }
        let caps = lines
            .iter()
            .find(|l| l.starts_with("CapabilityBoundingSet="))
            .unwrap_or_else(|| panic!("{name} keeps every capability"));
        assert!(caps.contains("CAP_NET_BIND_SERVICE"), "{name}: {caps}");
        assert!(!caps.contains("CAP_SYS_ADMIN"), "{name}: {caps}");
    }
}
