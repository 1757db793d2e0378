//! `virtman sim` as a user runs it: text, JSON, the chart, a trace file, and
//! clear errors for impossible scenarios and bad traces.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

fn sim(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_virtman"))
        .arg("sim")
        .args(args)
        .output()
        .unwrap()
}

const SMALL: &[&str] = &[
    "--hosts",
    "6",
    "--vms",
    "12",
    "--image-size",
    "64M",
    "--working-set",
    "4M",
    "--think",
    "1s",
];

#[test]
fn text_json_and_chart_for_every_mode() {
    let dir = tempfile::tempdir().unwrap();
    let chart = dir.path().join("storm.svg");
    let trace = dir.path().join("boot.trace");
    let mut args = SMALL.to_vec();
    let chart_s = chart.to_str().unwrap();
    let trace_s = trace.to_str().unwrap();
    args.extend([
        "--mode",
        "all",
        "--chart",
        chart_s,
        "--write-trace",
        trace_s,
    ]);
    let out = sim(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    for label in ["virtman k4 p2", "cache-only", "direct", "boot time s: p50"] {
        assert!(text.contains(label), "{label} missing from:\n{text}");
    }
    assert!(std::fs::read_to_string(&chart).unwrap().starts_with("<svg"));

    // The written trace replays to the same JSON report.
    let mut a = SMALL.to_vec();
    a.extend(["--json", "--seed", "1"]);
    let from_synthetic = sim(&a);
    let mut b = vec!["--hosts", "6", "--vms", "12", "--trace", trace_s];
    b.extend(["--json", "--seed", "1"]);
    let from_file = sim(&b);
    assert!(
        from_file.status.success(),
        "{}",
        String::from_utf8_lossy(&from_file.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&from_file.stdout).unwrap();
    assert_eq!(v[0]["booted"], 12);
    assert_eq!(from_synthetic.stdout, from_file.stdout);
}

#[test]
fn impossible_scenarios_and_bad_traces_fail_clearly() {
    let cases: &[(&[&str], &str)] = &[
        (&["--hosts", "2", "--vms", "1000"], "do not fit on 2 hosts"),
        (
            &["--hosts", "2", "--vms", "4", "--link-rate", "0"],
            "positive rate",
        ),
        (
            &["--hosts", "2", "--vms", "4", "--fail", "5%@2h"],
            "before the end of the run",
        ),
        (
            &["--hosts", "2", "--vms", "4", "--fail", "often"],
            "is not a failure",
        ),
    ];
    for (args, want) in cases {
        let out = sim(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?} printed before failing");
    }
    let dir = tempfile::tempdir().unwrap();
    let truncated = dir.path().join("t.trace");
    std::fs::write(
        &truncated,
        "virtman-trace 1\nimage-size 1048576\n0 0 4096\n10 4096",
    )
    .unwrap();
    let out = sim(&[
        "--hosts",
        "1",
        "--vms",
        "1",
        "--trace",
        truncated.to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 4"));
    let big = dir.path().join("big.trace");
    std::fs::write(
        &big,
        "virtman-trace 1\nimage-size 1048576\n0 1044480 8192\n",
    )
    .unwrap();
    let out = sim(&[
        "--hosts",
        "1",
        "--vms",
        "1",
        "--trace",
        big.to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("past the end"));
    // A trace that fits its own image but not the one given.
    let ok = dir.path().join("ok.trace");
    std::fs::write(&ok, "virtman-trace 1\nimage-size 1048576\n0 524288 8192\n").unwrap();
    let p = ok.to_str().unwrap();
    let out = sim(&[
        "--hosts",
        "1",
        "--vms",
        "1",
        "--trace",
        p,
        "--image-size",
        "256K",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--image-size"),
        "{err}"
    );
}

/// The storm's shipped trace, replayed as `virtman storm` replays it: with
/// its timing or back to back, with the CPU model on one machine's cores or
/// off; a CPU count that makes no sense is refused.
#[test]
fn storm_trace_back_to_back_and_cpu_flags() {
    let trace = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../traces/debian12-boot.trace"
    );
    let all_booted = |extra: &[&str]| -> f64 {
        let mut a = vec![
            "--hosts",
            "4",
            "--vms",
            "16",
            "--fanout",
            "2",
            "--stripes",
            "1",
            "--trace",
            trace,
            "--json",
        ];
        a.extend_from_slice(extra);
        let out = sim(&a);
        assert!(
            out.status.success(),
            "{extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v[0]["booted"], 16);
        v[0]["all_booted_s"].as_f64().unwrap()
    };
    let timed = all_booted(&[]);
    assert!(timed > 9.6, "the trace alone takes 9.6 s: {timed}");
    let b2b = all_booted(&["--back-to-back"]);
    assert!(b2b < 5.0, "{b2b}");
    let shared = all_booted(&["--back-to-back", "--shared-cores", "1"]);
    let free = all_booted(&["--back-to-back", "--no-cpu"]);
    assert!(shared > b2b && b2b > free, "{shared} {b2b} {free}");
    let overshoot = all_booted(&["--think-overhead", "1ms"]);
    assert!(
        overshoot > timed + 0.7,
        "806 sleeps of 1 ms more: {timed} {overshoot}"
    );
    let out = sim(&["--hosts", "2", "--vms", "4", "--shared-cores", "0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("shared cores"));
}

/// Prefetch of the boot profile (virtman mode, on by default): one host and
/// one VM booting the shipped trace take about the trace's own 9.62 s, not
/// that plus a fetch per chunk; `--no-prefetch` fetches on demand; the
/// profile can come from another trace; a zero in-flight limit is refused.
#[test]
fn prefetch_flags() {
    let trace = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../traces/debian12-boot.trace"
    );
    let one = |extra: &[&str]| -> serde_json::Value {
        let mut a = vec!["--hosts", "1", "--vms", "1", "--trace", trace, "--json"];
        a.extend_from_slice(extra);
        let out = sim(&a);
        assert!(
            out.status.success(),
            "{extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v[0]["booted"], 1);
        v[0].clone()
    };
    let on = one(&[]);
    assert_eq!(on["prefetch"], true);
    let t_on = on["all_booted_s"].as_f64().unwrap();
    // The trace's last read is at 9.62 s; the VM's own read CPU and the
    // first chunk's fetch add a little.
    assert!(t_on > 9.62 && t_on < 9.62 + 0.2, "{t_on}");
    // 238 chunks: the first read's on demand, the rest prefetched, each once.
    assert_eq!(on["counters"]["prefetch_fetches"], 237);
    assert_eq!(on["counters"]["fetches"], 238);
    let off = one(&["--no-prefetch"]);
    assert_eq!(off["prefetch"], false);
    assert_eq!(off["counters"]["prefetch_fetches"], 0);
    let t_off = off["all_booted_s"].as_f64().unwrap();
    assert!(t_off > t_on + 0.5, "{t_on} {t_off}");
    assert_eq!(on["origin_bytes"], off["origin_bytes"]);
    // A profile from another boot: here one read, of the chunk the trace's
    // last read touches, so only that one is prefetched (and the boot
    // fetches the rest on demand).
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("profile.trace");
    std::fs::write(
        &profile,
        "virtman-trace 1\nimage-size 1073741824\n0 37314560 4096\n",
    )
    .unwrap();
    let other = one(&["--profile-trace", profile.to_str().unwrap()]);
    assert!(other["counters"]["prefetch_fetches"].as_u64().unwrap() <= 1);
    // Joined 2 s before the VM starts, the host holds every chunk by then:
    // the boot is the trace's own time, counted from the VM's start.
    let early = one(&["--join-lead", "2s:2s"]);
    assert_eq!(early["counters"]["prefetch_fetches"], 238);
    let t_early = early["all_booted_s"].as_f64().unwrap();
    assert!(t_early > 9.62 && t_early < t_on, "{t_early} {t_on}");
    let out = sim(&["--hosts", "1", "--vms", "1", "--join-lead", "1s"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--join-lead"));
    let out = sim(&["--hosts", "1", "--vms", "1", "--prefetch-in-flight", "0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("chunks in flight"));
    for bad in ["", "100ms,", "none,1s", "soon"] {
        let out = sim(&["--hosts", "1", "--vms", "1", "--settle-heartbeats", bad]);
        assert!(
            !out.status.success(),
            "--settle-heartbeats {bad:?} accepted"
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("--settle-heartbeats"),
            "{bad:?}"
        );
    }
    for bad in ["0", "-1"] {
        let out = sim(&["--hosts", "1", "--vms", "1", "--parent-busy-at", bad]);
        assert!(!out.status.success(), "--parent-busy-at {bad} accepted");
    }
    // "none": no settling heartbeats, a valid run.
    let out = sim(&["--hosts", "2", "--vms", "2", "--settle-heartbeats", "none"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
