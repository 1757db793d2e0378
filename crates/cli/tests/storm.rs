//! `virtman storm` and `virtman cluster` as a user runs them.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_virtman");

/// `virtman cluster up --dir DIR --image IMAGE EXTRA...`; asserts success and
/// returns the recorded `cluster.json`.
fn cluster_up(image: &Path, cdir: &Path, extra: &[&str]) -> serde_json::Value {
    let up = Command::new(BIN)
        .args(["cluster", "up"])
        .args(extra)
        .arg("--image")
        .arg(image)
        .arg("--dir")
        .arg(cdir)
        .env("VIRTMAN_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    serde_json::from_slice(&std::fs::read(cdir.join("cluster.json")).unwrap()).unwrap()
}

/// `virtman cluster down --dir DIR`.
fn cluster_down(cdir: &Path) -> std::process::Output {
    Command::new(BIN)
        .args(["cluster", "down", "--dir"])
        .arg(cdir)
        .output()
        .unwrap()
}

/// The README's main command, as a new user runs it: no argument at all.
#[test]
fn the_default_storm_writes_its_table() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .arg("storm")
        .current_dir(dir.path())
        .env("VIRTMAN_LOG", "warn")
        .env("TMPDIR", dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .filter(|w: &Vec<&str>| matches!(w.first(), Some(&("virtman" | "cache-only" | "direct"))))
        .collect();
    assert_eq!(rows.len(), 3, "{table}");
    for r in &rows {
        assert_eq!(&r[1..3], ["8", "48"], "{table}");
    }
    // What the image server sent: once for virtman, per host for
    // cache-only, per VM for direct.
    let origin: Vec<f64> = rows.iter().map(|r| r[6].parse().unwrap()).collect();
    assert!(origin[0] < origin[1] && origin[1] < origin[2], "{table}");
    let results = dir.path().join("storm-results");
    for f in ["report.json", "boots.csv", "chart.svg"] {
        assert!(results.join(f).exists(), "{f}");
    }
}

/// Without namespaces, `--link-rate` gives every host (and the plain server)
/// a link in user space: what the image server sends leaves no faster than
/// the rate (a lower bound on the time, which a slow machine cannot fail).
#[test]
fn a_user_space_link_holds_every_mode_to_its_rate() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("results");
    let out = Command::new(BIN)
        .args(["storm", "--hosts", "2", "--vms", "4", "--image-size", "16M"])
        .args(["--synthetic", "--working-set", "4M", "--back-to-back"])
        .args([
            "--link-rate",
            "64mbit",
            "--mode",
            "all",
            "--no-tls",
            "--out",
        ])
        .arg(&out_dir)
        .env("VIRTMAN_LOG", "warn")
        .env("TMPDIR", dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reports: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("report.json")).unwrap()).unwrap();
    let rate = 8_000_000.0; // 64 Mbit/s
    let burst = 1_048_576.0; // the caps' burst: four 256 KiB chunks
    for r in reports.as_array().unwrap() {
        let mode = r["mode"].as_str().unwrap();
        let sent = r["origin_bytes"].as_u64().unwrap() as f64;
        let secs = r["all_booted_secs"].as_f64().unwrap();
        let least = (sent - burst) / rate;
        assert!(
            secs >= least * 0.95,
            "{mode}: {sent} bytes in {secs:.2} s, faster than the link allows ({least:.2} s)"
        );
        assert!(sent >= 4.0 * 1_048_576.0, "{mode}: the origin sent {sent}");
    }
}

#[test]
fn a_small_storm_in_every_mode_reads_the_image_and_ranks_origin_load() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("results");
    // TLS on every link, as by default.
    let out = Command::new(BIN)
        .args([
            "storm",
            "--hosts",
            "4",
            "--vms",
            "16",
            "--image-size",
            "16M",
        ])
        .args([
            "--synthetic",
            "--working-set",
            "4M",
            "--think-ms",
            "200",
            "--mode",
            "all",
            "--out",
        ])
        .arg(&out_dir)
        .env("VIRTMAN_LOG", "warn")
        // The storm's work directory goes under ours, to look for leftovers.
        .env("TMPDIR", dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    for mode in ["virtman", "cache-only", "direct"] {
        assert!(table.lines().any(|l| l.starts_with(mode)), "{table}");
    }
    let reports: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("report.json")).unwrap()).unwrap();
    let reports = reports.as_array().unwrap();
    assert_eq!(reports.len(), 3);
    let mut origin = Vec::new();
    for r in reports {
        let vms = r["vm_results"].as_array().unwrap();
        assert_eq!(vms.len(), 16);
        // Every VM read its whole trace (each read was checked against the image).
        let first = vms[0]["bytes"].as_u64().unwrap();
        assert!(first > 0 && vms.iter().all(|v| v["bytes"] == first));
        origin.push(r["origin_bytes"].as_u64().unwrap());
    }
    // virtman < cache-only < direct in what the image server sent.
    assert!(origin[0] < origin[1] && origin[1] < origin[2], "{origin:?}");
    let csv = std::fs::read_to_string(out_dir.join("boots.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 3 * 16);
    let svg = std::fs::read_to_string(out_dir.join("chart.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("cache-only"));
    // Every cluster process's log is kept, per mode (direct has no cluster).
    for mode in ["virtman", "cache-only"] {
        for name in ["coordinator", "origin", "host1", "host2", "host3", "host4"] {
            let log = out_dir.join("logs").join(mode).join(format!("{name}.log"));
            assert!(log.is_file(), "no {}", log.display());
        }
        let log = out_dir.join("logs").join(mode).join("coordinator.log");
        let log = std::fs::read_to_string(log).unwrap();
        assert!(log.contains("listening on https://"), "{log}");
    }
    // No process of the storm is left: every cluster was stopped.
    let ps = Command::new("pgrep")
        .args(["-f", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    let pids = String::from_utf8_lossy(&ps.stdout)
        .trim()
        .replace('\n', ",");
    if !pids.is_empty() {
        let info = Command::new("ps")
            .args(["-o", "pid,stat,args", "-p", &pids])
            .output()
            .unwrap();
        panic!("left running: {}", String::from_utf8_lossy(&info.stdout));
    }
}

/// A storm of 8 hosts with kills, a stop, a restart, a liar and a
/// coordinator restart at once: no VM reads a wrong byte, none fails on a
/// host that stayed up, and none on a host never hit waits long on a read.
#[test]
fn a_chaos_storm_loses_nothing_on_the_hosts_that_stay_up() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("results");
    let out = Command::new(BIN)
        .args(["storm", "--hosts", "8", "--vms", "16", "--mode", "virtman"])
        .args(["--synthetic", "--working-set", "8M", "--think-ms", "3000"])
        .args(["--image-size", "32M", "--seed", "3", "--chaos"])
        .arg("kill:2@0.5s,stop:1@0.7s+2s,restart:1@0.6s+1s,lie:1,coordinator:restart@0.8s+1s")
        .arg("--out")
        .arg(&out_dir)
        .env("VIRTMAN_LOG", "warn")
        .env("TMPDIR", dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("promise held"), "{err}");
    let reports: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("report.json")).unwrap()).unwrap();
    let chaos = &reports[0]["chaos"];
    assert_eq!(chaos["wrong_bytes"], 0, "{chaos}");
    assert_eq!(chaos["failed_on_live_hosts"], 0, "{chaos}");
    assert_eq!(chaos["held"], true, "{chaos}");
    let actions: Vec<&str> = chaos["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    for what in [
        "kill host",
        "stop host",
        "continue host",
        "restart host",
        "restart coordinator",
        "lies to its children",
    ] {
        assert!(
            actions.iter().any(|a| a.contains(what)),
            "{what}: {actions:?}"
        );
    }
    // Reads on hosts never hit: no request timeout (2 s) was waited out.
    let longest = chaos["longest_read_ms"].as_f64().unwrap();
    assert!(longest < 1500.0, "{chaos}");
    // Every VM of a host never killed booted with every byte.
    let vms = reports[0]["vm_results"].as_array().unwrap();
    let booted = vms.iter().filter(|v| v["error"].is_null()).count();
    assert_eq!(
        booted + chaos["lost_with_host"].as_u64().unwrap() as usize,
        16
    );
    assert!(booted >= 10, "{vms:?}");
}

#[test]
fn the_default_trace_is_the_real_debian_boot_and_bad_traces_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    // A bad trace file: a clear error naming it, nothing started.
    let bad = dir.path().join("bad.trace");
    std::fs::write(&bad, "virtman-trace 1\nimage-size 1024\n0 0\n").unwrap();
    let out = Command::new(BIN)
        .args(["storm", "--trace"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.trace"), "{err}");
    // A trace larger than the image given.
    let small = dir.path().join("small.raw");
    std::fs::write(&small, vec![0u8; 1 << 20]).unwrap();
    let out = Command::new(BIN)
        .args([
            "storm", "--hosts", "1", "--vms", "1", "--mode", "direct", "--image",
        ])
        .arg(&small)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("larger than"), "{err}");
}

#[test]
fn cluster_up_with_a_profile_prefetches_its_chunks_before_any_vm_reads() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("img.raw");
    // 16 chunks of 256 KiB, none all-zero.
    std::fs::write(&image, vec![7u8; 4 << 20]).unwrap();
    let chunk = 256 << 10;
    let trace = dir.path().join("boot.trace");
    std::fs::write(
        &trace,
        format!(
            "virtman-trace 1\nimage-size {}\n0 {} 4096\n10 {} 512\n20 {} 8192\n",
            4 << 20,
            2 * chunk,
            9 * chunk + 100,
            5 * chunk
        ),
    )
    .unwrap();
    let cdir = dir.path().join("cluster");
    // A bad profile is refused with its name, and nothing is left running.
    let bad = dir.path().join("bad.trace");
    std::fs::write(&bad, "not a trace\n").unwrap();
    let out = Command::new(BIN)
        .args(["cluster", "up", "--hosts", "1", "--profile"])
        .arg(&bad)
        .arg("--image")
        .arg(&image)
        .arg("--dir")
        .arg(&cdir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.trace"), "{err}");
    assert_eq!(err.matches("error:").count(), 1, "{err}");
    assert!(!cdir.exists(), "a refused cluster left its directory");
    // A directory holding anything else is refused and left alone (down
    // removes a cluster's directory whole).
    let busy = dir.path().join("busy");
    std::fs::create_dir(&busy).unwrap();
    std::fs::write(busy.join("notes.txt"), "mine").unwrap();
    let out = Command::new(BIN)
        .args(["cluster", "up", "--hosts", "1", "--image"])
        .arg(&image)
        .arg("--dir")
        .arg(&busy)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not empty"), "{err}");
    assert_eq!(
        std::fs::read_to_string(busy.join("notes.txt")).unwrap(),
        "mine"
    );

    let state = cluster_up(
        &image,
        &cdir,
        &["--hosts", "1", "--profile", trace.to_str().unwrap()],
    );
    let host = state["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "host1")
        .unwrap();
    let data_dir = host["data_dir"].as_str().unwrap().to_owned();
    let out = Command::new(BIN)
        .args([
            "vm",
            "create",
            "vm1",
            "--image",
            "img",
            "--data-dir",
            &data_dir,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // Nobody reads the VM's disk, yet the host fetches the profile's three
    // chunks (and only those) from the tree.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let image_status = loop {
        let out = Command::new(BIN)
            .args(["status", "--json", "--data-dir", &data_dir])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let img = s["images"][0].clone();
        if img["prefetch"]["profile_done"] == true {
            break img;
        }
        assert!(std::time::Instant::now() < deadline, "no prefetch: {s}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let p = &image_status["prefetch"];
    assert_eq!(p["profile_chunks"], 3, "{image_status}");
    assert_eq!(p["prefetched_chunks"], 3, "{image_status}");
    assert!(
        (image_status["progress"].as_f64().unwrap() - 3.0 / 16.0).abs() < 1e-9,
        "{image_status}"
    );
    assert!(cluster_down(&cdir).status.success());
}

#[test]
fn cluster_down_leaves_no_process_and_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("img.raw");
    std::fs::write(&image, vec![7u8; 4 << 20]).unwrap();
    let cdir = dir.path().join("cluster");
    let state = cluster_up(&image, &cdir, &["--hosts", "2"]);
    let pids: Vec<u32> = state["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| u32::try_from(m["pid"].as_u64().unwrap()).unwrap())
        .collect();
    assert_eq!(pids.len(), 4, "coordinator, origin, two hosts");
    assert!(pids.iter().all(|&p| virtman_storm::cluster::alive(p)));
    // A second `up` in the same directory is refused.
    let again = Command::new(BIN)
        .args(["cluster", "up", "--hosts", "1", "--image"])
        .arg(&image)
        .arg("--dir")
        .arg(&cdir)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("cluster down"));

    let down = cluster_down(&cdir);
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    assert!(
        pids.iter().all(|&p| !virtman_storm::cluster::alive(p)),
        "a process survived `cluster down`"
    );
    assert!(!Path::new(&cdir).exists(), "the cluster directory is gone");
    let down = cluster_down(&cdir);
    assert!(!down.status.success(), "a second down has nothing to stop");
}

/// `cluster up --store` serves an image already in a store under its own
/// name, importing nothing; a store with several images needs --name, and
/// an unknown name is refused naming the store.
#[test]
fn cluster_up_serves_an_image_from_a_store_under_its_own_name() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("images");
    let import = |name: &str, byte: u8| {
        let raw = dir.path().join(format!("{name}.raw"));
        std::fs::write(&raw, vec![byte; 2 << 20]).unwrap();
        let out = Command::new(BIN)
            .args(["image", "import"])
            .arg(&raw)
            .args(["--name", name, "--store"])
            .arg(&store)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    import("debian12", 3);
    let up = |extra: &[&str]| {
        Command::new(BIN)
            .args(["cluster", "up", "--hosts", "1", "--no-tls", "--store"])
            .arg(&store)
            .args(extra)
            .arg("--dir")
            .arg(dir.path().join("cluster"))
            .env("VIRTMAN_LOG", "warn")
            .output()
            .unwrap()
    };
    // The store's only image, by default.
    let out = up(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("cluster/cluster.json")).unwrap())
            .unwrap();
    assert_eq!(state["image"], "debian12");
    // Served as it is: a VM of it on host1.
    let host1 = dir.path().join("cluster/host1");
    let vm = Command::new(BIN)
        .args(["vm", "create", "vm1", "--image", "debian12", "--data-dir"])
        .arg(&host1)
        .output()
        .unwrap();
    assert!(
        vm.status.success(),
        "{}",
        String::from_utf8_lossy(&vm.stderr)
    );
    assert!(
        !dir.path().join("cluster/origin/images/debian12").exists(),
        "imported again"
    );
    assert!(cluster_down(&dir.path().join("cluster")).status.success());
    // Two images: which one must be said; an unknown one is refused.
    import("alpine", 4);
    let out = up(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--name") && err.contains("alpine"),
        "{err}"
    );
    let out = up(&["--name", "nope"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("\"nope\"") && err.contains("images"),
        "{err}"
    );
    assert!(
        !dir.path().join("cluster").exists(),
        "a refused up leaves nothing"
    );
}

/// `virtman image preheat` as an operator runs it against a local cluster:
/// two named hosts preheat and `--wait` returns when both are done; the
/// order shows with `--status` and goes with `--cancel`; bad input fails
/// with a clear message.
#[test]
fn image_preheat_warms_the_named_hosts_and_waits_for_them() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("img.raw");
    std::fs::write(&image, virtman_testkit::pattern(4 << 20, 9)).unwrap();
    let cdir = dir.path().join("cluster");
    let state = cluster_up(&image, &cdir, &["--hosts", "3"]);
    let url = state["coordinator"].as_str().unwrap().to_owned();
    let op = state["operator_tls"].as_str().unwrap().to_owned();
    let preheat = |args: &[&str]| {
        Command::new(BIN)
            .args(["image", "preheat"])
            .args(args)
            .args(["--coordinator", &url, "--tls", &op])
            .env("VIRTMAN_LOG", "warn")
            .output()
            .unwrap()
    };
    // The hosts heartbeat each second: wait until the coordinator knows them.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let out = loop {
        let out = preheat(&["img", "--hosts", "host1,host3", "--whole", "--wait"]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        if out.status.success() || !err.contains("no_host") && !err.contains("no live host") {
            break out;
        }
        assert!(std::time::Instant::now() < deadline, "{err}");
        std::thread::sleep(std::time::Duration::from_millis(300));
    };
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("preheating img on 2 hosts (every chunk)"),
        "{text}"
    );
    for h in ["host1", "host3"] {
        let line = text
            .lines()
            .find(|l| l.starts_with(h))
            .unwrap_or_else(|| panic!("{text}"));
        assert!(line.contains("done") && line.contains("100.0%"), "{text}");
    }
    assert!(!text.contains("host2"), "{text}");
    // Not on a terminal: a summary line a second on stderr.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("preheat img: "), "{err}");
    let status = preheat(&["img", "--status"]);
    assert!(status.status.success());
    assert!(String::from_utf8_lossy(&status.stdout).contains("host3"));
    let cancel = preheat(&["img", "--cancel"]);
    assert!(
        cancel.status.success(),
        "{}",
        String::from_utf8_lossy(&cancel.stderr)
    );
    let again = preheat(&["img", "--status"]);
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        !again.status.success() && err.contains("no preheat order"),
        "{err}"
    );
    let bad = preheat(&["nope"]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("\"nope\""), "{err}");
    let bad = preheat(&["img", "--labels", "rack"]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("KEY=VALUE"), "{err}");
    assert!(cluster_down(&cdir).status.success());
}

fn namespaces() -> String {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn links() -> String {
    let out = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn with_namespaces_down_removes_every_namespace_and_link() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("img.raw");
    std::fs::write(&image, vec![3u8; 4 << 20]).unwrap();
    let cdir = dir.path().join("cluster");
    let state = cluster_up(
        &image,
        &cdir,
        &["--hosts", "2", "--netns", "--link-rate", "100mbit"],
    );
    let ns: Vec<String> = state["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_owned())
        .collect();
    let bridge = state["bridge"].as_str().unwrap().to_owned();
    assert_eq!(ns.len(), 3, "origin and two hosts");
    let listed = namespaces();
    assert!(ns.iter().all(|n| listed.contains(n.as_str())), "{listed}");
    assert!(links().contains(&bridge));
    // Hosts listen on their namespace's address, not loopback.
    let host1 = state["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "host1")
        .unwrap();
    assert!(
        host1["addr"].as_str().unwrap().starts_with("10.201."),
        "{host1}"
    );

    let down = cluster_down(&cdir);
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    let listed = namespaces();
    assert!(
        ns.iter().all(|n| !listed.contains(n.as_str())),
        "left: {listed}"
    );
    assert!(!links().contains(&bridge), "bridge {bridge} left behind");
    assert!(!cdir.exists());
}

#[test]
fn a_storm_on_shaped_links_reads_the_image_and_ranks_origin_load() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("results");
    // Namespaces of other clusters on this machine are not ours to check.
    let before = namespaces();
    let out = Command::new(BIN)
        .args(["storm", "--hosts", "2", "--vms", "4", "--image-size", "8M"])
        .args([
            "--synthetic",
            "--working-set",
            "2M",
            "--think-ms",
            "100",
            "--mode",
            "all",
            "--netns",
        ])
        .args(["--link-rate", "200mbit", "--out"])
        .arg(&out_dir)
        .env("VIRTMAN_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reports: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("report.json")).unwrap()).unwrap();
    let origin: Vec<u64> = reports
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r["vm_results"].as_array().unwrap().len(), 4);
            r["origin_bytes"].as_u64().unwrap()
        })
        .collect();
    assert!(
        origin[0] <= origin[1] && origin[1] < origin[2],
        "{origin:?}"
    );
    let after = namespaces();
    let left: Vec<&str> = after
        .lines()
        .filter(|l| !before.lines().any(|b| b == *l))
        .collect();
    assert!(left.is_empty(), "namespaces left: {left:?}");
}

/// `virtman storm EXTRA... --qemu` of the test guest booting from `disk`
/// (a guest is done when it prints its done line), work files under `dir`;
/// asserts success and returns report.json.
fn real_guest_storm(dir: &Path, disk: &Path, extra: &[&str]) -> serde_json::Value {
    let assets = virtman_testkit::guest::assets().unwrap();
    let out_dir = dir.join("results");
    let out = Command::new(BIN)
        .arg("storm")
        .args(extra)
        .arg("--qemu")
        .arg("--image")
        .arg(disk)
        .arg("--kernel")
        .arg(&assets.kernel)
        .arg("--initrd")
        .arg(&assets.initrd)
        .args(["--append", "console=ttyS0 panic=-1 quiet virtman.id=storm"])
        .args(["--boot-marker", virtman_testkit::guest::DONE_LINE])
        .args(["--boot-timeout", "120s", "--out"])
        .arg(&out_dir)
        .env("VIRTMAN_LOG", "warn")
        .env("TMPDIR", dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&std::fs::read(out_dir.join("report.json")).unwrap()).unwrap()
}

#[test]
fn a_storm_of_real_guests_boots_every_vm_in_every_mode() {
    let assets = virtman_testkit::guest::assets().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    assets.copy_disk(&disk).unwrap();
    let before = std::fs::read(&disk).unwrap();
    let reports = real_guest_storm(
        dir.path(),
        &disk,
        &["--hosts", "2", "--vms", "2", "--mode", "all"],
    );
    let reports = reports.as_array().unwrap();
    assert_eq!(reports.len(), 3);
    for r in reports {
        let vms = r["vm_results"].as_array().unwrap();
        assert_eq!(vms.len(), 2, "{r}");
        // Every guest printed the done line, after its write was synced.
        for v in vms {
            let t = v["boot_secs"].as_f64().unwrap();
            assert!(t > 0.0 && t < 120.0, "{v}");
        }
        // qemu-nbd on loopback counts nothing: no figure rather than a wrong one.
        if r["mode"] == "direct" {
            assert_eq!(r["origin_measured"], false);
        } else {
            assert!(r["origin_bytes"].as_u64().unwrap() > 0, "{}", r["mode"]);
        }
    }
    // The guests' writes stayed in their snapshots (or qemu's overlays).
    assert!(std::fs::read(&disk).unwrap() == before, "the image changed");
    // Every qemu is gone.
    let ps = Command::new("pgrep")
        .args(["-f", &disk.display().to_string()])
        .output()
        .unwrap();
    assert!(
        ps.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&ps.stdout)
    );
    // Refused before anything starts: more guests than memory holds.
    let out = Command::new(BIN)
        .args(["storm", "--hosts", "1", "--vms", "64", "--qemu"])
        .arg("--image")
        .arg(&disk)
        .arg("--kernel")
        .arg(&assets.kernel)
        .args(["--memory", "1048576"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("use fewer VMs"),
        "{err}"
    );
}

#[test]
fn a_host_that_dies_mid_storm_is_reported_not_waited_for() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("results");
    let storm = Command::new(BIN)
        .args(["storm", "--hosts", "3", "--vms", "6", "--image-size", "16M"])
        .args(["--synthetic", "--working-set", "4M", "--think-ms", "4000"])
        .args(["--mode", "virtman", "--out"])
        .arg(&out_dir)
        .env("VIRTMAN_LOG", "warn")
        .env("TMPDIR", dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Once host3's two VMs exist (the storm starts right after), kill it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let host3 = loop {
        assert!(std::time::Instant::now() < deadline, "no cluster came up");
        let state = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| e.path().join("virtman/cluster.json"))
            .find(|p| p.exists())
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
        let host = state.and_then(|s| {
            s["members"]
                .as_array()?
                .iter()
                .find(|m| m["name"] == "host3")
                .cloned()
        });
        if let Some(h) = host {
            let ls = Command::new(BIN)
                .args(["vm", "ls", "--data-dir", h["data_dir"].as_str().unwrap()])
                .output()
                .unwrap();
            if String::from_utf8_lossy(&ls.stdout).matches("img").count() == 2 {
                break h;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    std::thread::sleep(std::time::Duration::from_millis(500));
    let pid = host3["pid"].as_u64().unwrap().to_string();
    assert!(
        Command::new("kill")
            .args(["-9", &pid])
            .status()
            .unwrap()
            .success()
    );
    let out = storm.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The storm ends with an error status, after reporting what happened.
    assert!(!out.status.success(), "{stdout}{stderr}");
    assert!(stderr.contains("2 VMs did not boot"), "{stderr}");
    assert!(
        stdout.contains("virtman: 2 of 6 VMs did not boot (dead: host3); vm3 on host3"),
        "{stdout}"
    );
    let reports: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("report.json")).unwrap()).unwrap();
    let r = &reports[0];
    assert_eq!(r["dead"], serde_json::json!(["host3"]));
    for v in r["vm_results"].as_array().unwrap() {
        // The other hosts' VMs read their whole trace.
        assert_eq!(v["host"] == "host3", v.get("error").is_some(), "{v}");
    }
    // Nothing of the cluster is left running.
    let ps = Command::new("pgrep")
        .args(["-f", &dir.path().display().to_string()])
        .output()
        .unwrap();
    assert!(
        ps.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&ps.stdout)
    );
}

#[test]
fn a_storm_larger_than_the_open_file_limit_is_refused_before_it_starts() {
    let dir = tempfile::tempdir().unwrap();
    // A hard limit of 512 open files cannot hold 200 VMs' connections.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n 512 && exec {BIN} storm --hosts 2 --vms 200 --image-size 16M \
             --synthetic --working-set 4M --mode virtman"
        ))
        .env("VIRTMAN_LOG", "warn")
        .env("TMPDIR", dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("200 VMs need about 1056 open files") && err.contains("limit is 512"),
        "{err}"
    );
    // Nothing was started.
    let ps = Command::new("pgrep")
        .args(["-f", &dir.path().display().to_string()])
        .output()
        .unwrap();
    assert!(ps.stdout.is_empty());
}

#[test]
fn with_namespaces_a_real_guest_is_counted_on_the_plain_servers_link() {
    let assets = virtman_testkit::guest::assets().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    assets.copy_disk(&disk).unwrap();
    let reports = real_guest_storm(
        dir.path(),
        &disk,
        &["--hosts", "1", "--vms", "1", "--mode", "direct", "--netns"],
    );
    let r = &reports[0];
    // The guest's reads of its disk (ext4 metadata and its two files) crossed
    // the origin's link: counted, and far less than the whole disk.
    assert_eq!(r["origin_measured"], true, "{r}");
    let sent = r["origin_bytes"].as_u64().unwrap();
    let disk_len = std::fs::metadata(&disk).unwrap().len();
    assert!(sent > 16 << 10 && sent < disk_len, "{sent} bytes");
}

/// A cluster runs TLS on every link by default: VMs read the image through
/// the tree with every byte right; every base export refuses a plaintext
/// client, a client of another CA, a node of the cluster outside the
/// image's session, an operator and (from the next heartbeat on) a banned
/// node, while a member (with its own certificate) reads it; nodes cannot
/// act as each other at the coordinator. The local sockets are owner-only.
#[tokio::test]
async fn a_tls_cluster_reads_through_the_tree_and_refuses_outsiders() {
    use virtman_nbd::{Client, ClientConfig, ClientTls, Endpoint};
    use virtman_pki::{Ca, IssueRequest, NodeTls, Role, write_node_dir};

    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("img.raw");
    let data = virtman_testkit::pattern(6 << 20, 11);
    std::fs::write(&image, &data).unwrap();
    let cdir = dir.path().join("cluster");
    let state = cluster_up(&image, &cdir, &["--hosts", "3", "--fanout", "2"]);
    let members = state["members"].as_array().unwrap();
    let member = |name: &str| members.iter().find(|m| m["name"] == name).unwrap().clone();

    // Every host's VM reads the whole image right, fetched over TLS.
    for host in ["host1", "host2", "host3"] {
        let m = member(host);
        // The VM and control sockets are for the agent's user only.
        for sock in ["vms.sock", "agent.sock"] {
            use std::os::unix::fs::PermissionsExt;
            let p = Path::new(m["data_dir"].as_str().unwrap()).join(sock);
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", p.display());
        }
        let ctl = virtman_agent::control::ControlClient::new(
            Path::new(m["data_dir"].as_str().unwrap()).join("agent.sock"),
        );
        let info = ctl.create_vm(&format!("vm-{host}"), "img").await.unwrap();
        let sock = info.uri.split("socket=").nth(1).unwrap().to_owned();
        let c = Client::connect(
            &Endpoint::Unix(sock.into()),
            &ClientConfig {
                export: format!("vm-{host}"),
                ..ClientConfig::default()
            },
        )
        .await
        .unwrap();
        assert!(
            c.read(0, data.len() as u64).await.unwrap()[..] == data[..],
            "{host}"
        );
    }

    let base = Endpoint::Tcp(member("host1")["addr"].as_str().unwrap().to_owned());
    let tls_of =
        |node: &Path| ClientTls::new(NodeTls::load(node).unwrap().client_config().unwrap());
    let config = |tls: Option<ClientTls>| ClientConfig {
        export: "img".into(),
        tls,
        ..ClientConfig::default()
    };
    // Plaintext: refused, with the reason.
    let e = Client::connect(&base, &config(None))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("NBD_REP_ERR_TLS_REQD"), "{e}");
    // A certificate of another CA: refused at the TLS handshake.
    let other = Ca::init(&dir.path().join("other-ca"), 1).unwrap();
    let issued = other
        .issue(&IssueRequest {
            name: "host2".into(),
            role: Role::Node,
            ips: vec![],
            dns: vec![],
            days: 1,
        })
        .unwrap();
    let stranger = dir.path().join("stranger");
    write_node_dir(&stranger, other.cert_pem(), &issued).unwrap();
    let e = Client::connect(&base, &config(Some(tls_of(&stranger))))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("TLS handshake"), "{e}");
    // A node of the cluster, with its own certificate, reads.
    let node = cdir.join("pki").join("host2");
    let c = Client::connect(&base, &config(Some(tls_of(&node))))
        .await
        .unwrap();
    assert!(c.read(0, 1 << 20).await.unwrap()[..] == data[..1 << 20]);

    // A node of the cluster's CA that is not in the image's session reads
    // nothing: not the image, its manifest or its profile, and LIST hides them.
    let ca = Ca::load(&cdir.join("pki").join("ca")).unwrap();
    let issue = |name: &str, role: Role| {
        virtman_testkit::pki::issue(&ca, &dir.path().join(name), name, role)
    };
    let outsider = issue("host9", Role::Node);
    for export in ["img", "manifest/img", "profile/img"] {
        let e = Client::connect(
            &base,
            &ClientConfig {
                export: export.into(),
                tls: Some(tls_of(&outsider)),
                ..ClientConfig::default()
            },
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("NBD_REP_ERR_POLICY")
                && e.contains("node \"host9\" is not a member of image \"img\"'s session"),
            "{export}: {e}"
        );
    }
    let listed = virtman_nbd::client::list_exports(&base, Some(&tls_of(&outsider)))
        .await
        .unwrap();
    assert!(listed.is_empty(), "{listed:?}");
    // Nor does an operator.
    let operator = issue("alice", Role::Operator);
    let e = Client::connect(&base, &config(Some(tls_of(&operator))))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("operator certificate"), "{e}");

    // A node cannot heartbeat, report or leave as another.
    let url = state["coordinator"].as_str().unwrap().to_owned();
    assert!(url.starts_with("https://"), "{url}");
    let coord_as = |node: &Path| {
        virtman_coordinator::Client::with_tls(
            &url,
            None,
            Some(NodeTls::load(node).unwrap().client_config().unwrap()),
        )
        .unwrap()
    };
    let host1 = coord_as(&cdir.join("pki").join("host1"));
    let e = host1
        .leave(
            "img",
            &virtman_coordinator::api::LeaveRequest {
                node: "host2".into(),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("forbidden"), "{e}");

    // Banned (by the operator, with the CLI): host1 refuses host2 from its
    // next heartbeat on, and the coordinator drops host2 from the tree.
    let operator_dir = cdir.join("pki").join("operator");
    let ban = Command::new(BIN)
        .args(["node", "ban", "host2", "--coordinator", &url, "--tls"])
        .arg(&operator_dir)
        .output()
        .unwrap();
    assert!(
        ban.status.success(),
        "{}",
        String::from_utf8_lossy(&ban.stderr)
    );
    // The origin, in no session, learns it too.
    let origin = Endpoint::Tcp(member("origin")["addr"].as_str().unwrap().to_owned());
    for (host, at) in [("host1", &base), ("origin", &origin)] {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let e = loop {
            match Client::connect(at, &config(Some(tls_of(&node)))).await {
                Err(e) => break e.to_string(),
                Ok(_) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Ok(_) => panic!("{host} still serves banned host2"),
            }
        };
        assert!(e.contains("node \"host2\" is banned"), "{host}: {e}");
    }
    let tree = coord_as(&operator_dir).tree("img").await.unwrap();
    assert!(!tree.nodes.iter().any(|n| n.node == "host2"), "{tree:?}");
    let e = coord_as(&node)
        .heartbeat(&virtman_coordinator::api::HeartbeatRequest {
            node: "host2".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("banned"), "{e}");

    let down = cluster_down(&cdir);
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
}

/// Runs a 6-host storm on 3 coordinators over a 3-member etcd with `chaos`
/// aimed at the leader; returns the report and the logs' directory.
fn leader_storm(dir: &std::path::Path, chaos: &str) -> (serde_json::Value, std::path::PathBuf) {
    let out_dir = dir.join("results");
    let out = Command::new(BIN)
        .args(["storm", "--hosts", "6", "--vms", "12", "--mode", "virtman"])
        .args(["--coordinators", "3", "--chaos", chaos])
        .args(["--synthetic", "--working-set", "8M", "--think-ms", "5000"])
        .args(["--image-size", "32M", "--seed", "5", "--out"])
        .arg(&out_dir)
        .env("VIRTMAN_LOG", "warn")
        .env("TMPDIR", dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("promise held"), "{err}");
    let reports: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("report.json")).unwrap()).unwrap();
    let report = reports[0].clone();
    // Every VM booted with every byte right: a coordinator is no host.
    let vms = report["vm_results"].as_array().unwrap();
    assert_eq!(vms.len(), 12);
    assert!(
        vms.iter()
            .all(|v| v["error"].is_null() && v["wrong_bytes"] == 0),
        "{vms:?}"
    );
    let control = &report["chaos"]["control"];
    // A follower led within 5 s.
    let failover = control["failovers_ms"][0].as_f64().expect("a failover");
    assert!(failover < 5000.0, "{control}");
    // The new leader has the same members, declared nobody dead, took no
    // join again (nobody was told it had died), and moved at most a few
    // parents.
    let after = &control["after"];
    assert_eq!(after["members"], control["before"]["members"], "{control}");
    assert_eq!(control["before"]["members"].as_array().unwrap().len(), 6);
    assert_eq!(after["deaths"], 0, "{control}");
    assert_eq!(after["joins"], 0, "{control}");
    assert!(after["parent_changes"].as_u64().unwrap() <= 3, "{control}");
    (report, out_dir.join("logs").join("virtman"))
}

/// The leading coordinator SIGKILLed in the middle of a storm.
#[test]
fn a_storm_goes_on_when_the_leading_coordinator_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let (report, _) = leader_storm(dir.path(), "leader:kill@1s");
    let actions = report["chaos"]["actions"].to_string();
    assert!(actions.contains("kill coordinator"), "{actions}");
}

/// The leading coordinator SIGSTOPped past its lease, then continued: it
/// must not act on what it believed before (it would declare every host
/// dead: none heard from for 4 s), must step down and follow the new
/// leader.
#[test]
fn a_leader_paused_past_its_lease_steps_down_and_follows() {
    let dir = tempfile::tempdir().unwrap();
    let (report, logs) = leader_storm(dir.path(), "leader:stop@1s+4s");
    let actions: Vec<String> = report["chaos"]["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    let stopped = actions
        .iter()
        .find_map(|a| a.split_once("stop ").map(|(_, n)| n.to_owned()))
        .expect("a stop");
    assert!(
        actions
            .iter()
            .any(|a| a.contains(&format!("continue {stopped}"))),
        "{actions:?}"
    );
    let log = std::fs::read_to_string(logs.join(format!("{stopped}.log"))).unwrap();
    let down = log.find("stepping down").unwrap_or_else(|| panic!("{log}"));
    // After stepping down it names another leader (it follows).
    let follows = log[down..]
        .lines()
        .any(|l| l.contains(" leader leader=") && !l.contains(&format!("leader={stopped} ")));
    assert!(follows, "{log}");
    assert!(!log.contains("declared dead"), "{log}");
}

/// `cluster up --coordinators 3`: a 3-member etcd and three coordinators,
/// one leading; `coordinator status` names it from every coordinator,
/// `tree` says who answered, an agent given every URL joins, and `cluster
/// down` stops etcd with the rest.
#[test]
fn a_cluster_with_three_coordinators_names_its_leader_and_goes_down_whole() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("img.raw");
    std::fs::write(&image, virtman_testkit::pattern(4 << 20, 9)).unwrap();
    let cdir = dir.path().join("c");
    let state = cluster_up(
        &image,
        &cdir,
        &["--hosts", "1", "--coordinators", "3", "--no-tls"],
    );
    let names: Vec<&str> = state["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    for n in [
        "etcd1",
        "etcd2",
        "etcd3",
        "coordinator",
        "coordinator2",
        "coordinator3",
        "origin",
        "host1",
    ] {
        assert!(names.contains(&n), "{n}: {names:?}");
    }
    let urls = state["coordinator"].as_str().unwrap().to_owned();
    assert_eq!(urls.split(',').count(), 3, "{urls}");
    let status = Command::new(BIN)
        .args(["coordinator", "status", "--coordinator", &urls])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert_eq!(
        text.lines().filter(|l| l.contains("  leader  ")).count(),
        1,
        "{text}"
    );
    assert_eq!(
        text.lines().filter(|l| l.contains("  follower ")).count(),
        2,
        "{text}"
    );
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("etcd ") && l.contains("healthy"))
            .count(),
        3,
        "{text}"
    );
    // The tree through a follower only: redirected, and it says who led.
    let follower = text
        .lines()
        .find(|l| l.contains("  follower "))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .to_owned();
    let token = cdir.join("token");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let tree = loop {
        let out = Command::new(BIN)
            .args(["tree", "img", "--coordinator", &follower, "--token-file"])
            .arg(&token)
            .output()
            .unwrap();
        let tree = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() && tree.contains("host1") {
            break tree;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{tree}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // host1 joins with its first VM; create one.
        let _ = Command::new(BIN)
            .args(["vm", "create", "vm1", "--image", "img", "--data-dir"])
            .arg(cdir.join("host1"))
            .output();
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert!(tree.starts_with("led by coordinator"), "{tree}");
    let pids: Vec<u64> = state["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["pid"].as_u64().unwrap())
        .collect();
    let down = cluster_down(&cdir);
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    assert!(!cdir.exists());
    // Every process is gone (or a zombie waiting for init), etcd included.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    for pid in pids {
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let running = stat
                .rsplit(')')
                .next()
                .is_some_and(|rest| !rest.trim_start().starts_with('Z'));
            if !running {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{pid} left running: {stat}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}
