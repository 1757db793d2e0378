//! Config files of `virtman agent` and `virtman coordinator` through the
//! real binary: `--print-config` output loads back to the same, flags
//! override the file, bad files are refused naming file, line and key, a
//! missing `--config` is an error while a missing default file is not, the
//! shipped examples in `dist/` are what `--example-config` writes and load,
//! and a coordinator runs from a file alone.

#![allow(missing_docs, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use virtman_testkit::ChildGuard;

const BIN: &str = env!("CARGO_BIN_EXE_virtman");

/// `virtman ARGS` with the default config directory `config_dir` (so that
/// a file in /etc/virtman on the test machine plays no part).
fn virtman(config_dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("VIRTMAN_CONFIG_DIR", config_dir)
        .env_remove("VIRTMAN_DATA_DIR")
        .env("VIRTMAN_LOG", "warn")
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn refused(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "accepted: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stderr.clone()).unwrap()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn print_config_loads_back_to_the_same_for_both_daemons() {
    let dir = tempfile::tempdir().unwrap();
    let agent = write(
        dir.path(),
        "a.toml",
        "cache_size = \"512M\"\nlisten = \"0.0.0.0:10900\"\nlabels = [\"rack=r1\"]\n\
         upload_rate = \"1G\"\nlink_delay = \"0.2ms\"\nno_hedge = true\n",
    );
    let coordinator = write(
        dir.path(),
        "c.toml",
        "fanout = 8\nheartbeat_timeout = \"3s\"\netcd = [\"http://10.0.0.1:2379\"]\n",
    );
    for (daemon, file) in [("agent", &agent), ("coordinator", &coordinator)] {
        let first = ok(&virtman(
            dir.path(),
            &[daemon, "--config", s(file), "--print-config"],
        ));
        let printed = write(dir.path(), &format!("{daemon}-printed.toml"), &first);
        let second = ok(&virtman(
            dir.path(),
            &[daemon, "--config", s(&printed), "--print-config"],
        ));
        assert_eq!(
            first, second,
            "{daemon}: the printed file loads back to the same"
        );
        assert_ne!(
            first,
            ok(&virtman(dir.path(), &[daemon, "--print-config"])),
            "{daemon}: the file changed the configuration"
        );
    }
    let printed = std::fs::read_to_string(dir.path().join("agent-printed.toml")).unwrap();
    for line in [
        "cache_size = \"512M\"",
        "listen = \"0.0.0.0:10900\"",
        "upload_rate = \"125000000B/s\"",
        "link_delay = \"0.2ms\"",
        "no_hedge = true",
    ] {
        assert!(printed.lines().any(|l| l == line), "{line} in {printed}");
    }
}

#[test]
fn flags_on_the_command_line_override_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "agent.toml",
        "cache_size = \"5G\"\nlisten = \"0.0.0.0:10900\"\n",
    );
    let out = ok(&virtman(
        dir.path(),
        &[
            "agent",
            "--config",
            s(&file),
            "--cache-size",
            "20G",
            "--print-config",
        ],
    ));
    assert!(out.contains("\ncache_size = \"20G\"\n"), "{out}");
    assert!(out.contains("\nlisten = \"0.0.0.0:10900\"\n"), "{out}");
    // The file in the default directory is read when --config is not given.
    let out = ok(&virtman(dir.path(), &["agent", "--print-config"]));
    assert!(out.contains("\ncache_size = \"5G\"\n"), "{out}");
    // An environment variable counts as given, like a flag.
    let out = Command::new(BIN)
        .args(["agent", "--config", s(&file), "--print-config"])
        .env("VIRTMAN_DATA_DIR", "/srv/from-env")
        .output()
        .unwrap();
    let out = ok(&out);
    assert!(out.contains("\ndata_dir = \"/srv/from-env\"\n"), "{out}");
}

#[test]
fn bad_files_are_refused_naming_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let head = "# comment\nlisten = \"127.0.0.1:0\"\n";
    let cases = [
        (
            "agent",
            "unknown.toml",
            format!("{head}cache_sise = \"1G\"\n"),
            "3: key `cache_sise`: unknown field",
        ),
        (
            "agent",
            "type.toml",
            format!("{head}\ncache_size = true\n"),
            "4: key `cache_size`: invalid type: boolean",
        ),
        (
            "coordinator",
            "type2.toml",
            "fanout = \"eight\"\n".to_owned(),
            "1: key `fanout`: invalid type: string",
        ),
        (
            "agent",
            "negative.toml",
            format!("{head}cache_size = -5\n"),
            "3: key `cache_size`: a size cannot be negative",
        ),
        (
            "agent",
            "listen.toml",
            "\nlisten = \"10810\"\n".to_owned(),
            "2: key `listen`: \"10810\" is not a listen address",
        ),
        (
            "coordinator",
            "listen2.toml",
            "listen = \"0.0.0.0:99999\"\n".to_owned(),
            "1: key `listen`: \"0.0.0.0:99999\" is not a listen address",
        ),
    ];
    for (daemon, name, text, want) in cases {
        let file = write(dir.path(), name, &text);
        let err = refused(&virtman(dir.path(), &[daemon, "--config", s(&file)]));
        let want = format!("{}:{want}", file.display());
        assert!(
            err.contains(&want),
            "{daemon} {name}: want {want:?} in {err}"
        );
    }
    // The same checks on the command line.
    let err = refused(&virtman(
        dir.path(),
        &["coordinator", "--listen", "nowhere"],
    ));
    assert!(err.contains("is not a listen address"), "{err}");
}

#[test]
fn a_missing_config_file_is_an_error_only_when_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.toml");
    let err = refused(&virtman(
        dir.path(),
        &["agent", "--config", s(&missing), "--print-config"],
    ));
    assert!(err.contains("missing.toml does not exist"), "{err}");
    let err = refused(&virtman(
        dir.path(),
        &["coordinator", "--config", s(&missing)],
    ));
    assert!(err.contains("missing.toml does not exist"), "{err}");
    // No file in the default directory: the defaults.
    let out = ok(&virtman(dir.path(), &["coordinator", "--print-config"]));
    assert!(out.contains("\nlisten = \"127.0.0.1:7600\"\n"), "{out}");
}

fn workspace_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

#[test]
fn the_shipped_examples_are_generated_and_load() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &[&str]); 2] = [
        ("agent", &["agent", "--example-config"]),
        (
            "coordinator",
            &[
                "coordinator",
                "--example-config",
                "--data-dir",
                "/var/lib/virtman/coordinator",
            ],
        ),
    ];
    for (daemon, command) in cases {
        let path = workspace_file(&format!("dist/{daemon}.toml"));
        let shipped = std::fs::read_to_string(&path).unwrap();
        let generated = ok(&virtman(dir.path(), command));
        assert_eq!(
            shipped,
            generated,
            "dist/{daemon}.toml is out of date: write it again with `virtman {}`",
            command.join(" ")
        );
        // It loads, and means the defaults except what it sets.
        let loaded = ok(&virtman(
            dir.path(),
            &[daemon, "--config", s(&path), "--print-config"],
        ));
        let args: Vec<&str> = command
            .iter()
            .copied()
            .filter(|a| *a != "--example-config")
            .collect();
        let expected = ok(&virtman(
            dir.path(),
            &[&args[..], &["--print-config"]].concat(),
        ));
        assert_eq!(loaded, expected, "dist/{daemon}.toml");
    }
}

#[test]
fn a_coordinator_runs_from_a_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let token = write(dir.path(), "token", "config-test-token-0123456789\n");
    let data = dir.path().join("state");
    let file = write(
        dir.path(),
        "coordinator.toml",
        &format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = {:?}\ntoken_file = {:?}\nfanout = 3\n",
            s(&data),
            s(&token)
        ),
    );
    let child = Command::new(BIN)
        .args(["coordinator", "--config", s(&file)])
        .env("VIRTMAN_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut guard = ChildGuard::new(child);
    let mut line = String::new();
    BufReader::new(guard.child_mut().stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(
        line.starts_with("listening on http://127.0.0.1:"),
        "{line:?}"
    );
    assert!(!line.contains(":7600"), "port 0 from the file: {line}");
    assert!(data.is_dir(), "the file's data_dir is used");
    let addr = line.trim().trim_start_matches("listening on http://");
    std::net::TcpStream::connect(addr).unwrap();
    guard.stop().unwrap();
}
