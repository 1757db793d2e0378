//! Storm results as a comparison table, CSV and JSON.
//!
//! The table puts the modes side by side, with each mode's time until all VMs
//! booted and its origin bytes as ratios to `virtman`'s, so one run answers
//! "how much faster, how much less load on the image server".

use std::fmt::Write as _;

use crate::storm::StormReport;

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

/// The comparison table of one run's modes.
pub fn table(reports: &[StormReport]) -> String {
    let mut out = String::new();
    let base = reports
        .iter()
        .find(|r| r.mode == crate::StormMode::Virtman)
        .or(reports.first());
    let _ = writeln!(
        out,
        "{:<11} {:>5} {:>5} {:>8} {:>8} {:>10} {:>11} {:>9} {:>9}",
        "mode", "hosts", "VMs", "p50 s", "p90 s", "all s", "origin MiB", "x WS", "time x"
    );
    for r in reports {
        let ratio = base.map_or(1.0, |b| r.all_booted_secs / b.all_booted_secs.max(1e-9));
        // Real guests without a trace: the working set is not known.
        let ws = match r.working_set {
            0 => "-".to_owned(),
            _ if !r.origin_measured => "-".to_owned(),
            w => format!("{:.2}", r.origin_bytes as f64 / w as f64),
        };
        let sent = if r.origin_measured {
            format!("{:.1}", mib(r.origin_bytes))
        } else {
            "-".to_owned()
        };
        let _ = writeln!(
            out,
            "{:<11} {:>5} {:>5} {:>8.2} {:>8.2} {:>10.2} {:>11} {:>9} {:>8.2}x",
            r.mode.name(),
            r.hosts,
            r.vms,
            r.percentile(0.5),
            r.percentile(0.9),
            r.all_booted_secs,
            sent,
            ws,
            ratio
        );
    }
    for r in reports {
        let failed: Vec<&crate::storm::VmResult> = r.failed().collect();
        if let Some(first) = failed.first() {
            let _ = writeln!(
                out,
                "{}: {} of {} VMs did not boot{}; {} on {}: {}",
                r.mode.name(),
                failed.len(),
                r.vms,
                if r.dead.is_empty() {
                    String::new()
                } else {
                    format!(" (dead: {})", r.dead.join(", "))
                },
                first.vm,
                first.host,
                first.error.as_deref().unwrap_or_default()
            );
        }
    }
    out
}

/// An SVG chart of booted VMs over time, one line per mode (the VirtMan
/// paper's boot-time figure).
pub fn chart(reports: &[StormReport]) -> String {
    let points: Vec<Vec<(f64, u64)>> = reports
        .iter()
        .map(|r| {
            let mut t: Vec<f64> = r
                .vm_results
                .iter()
                .filter(|v| v.error.is_none())
                .map(|v| v.boot_secs)
                .collect();
            t.sort_by(f64::total_cmp);
            std::iter::once((0.0, 0))
                .chain(t.into_iter().zip(1u64..))
                .collect()
        })
        .collect();
    let lines: Vec<virtman_sim::ChartLine<'_>> = reports
        .iter()
        .zip(&points)
        .map(|(r, p)| virtman_sim::ChartLine {
            label: r.mode.name().to_owned(),
            vms: u64::try_from(r.vms).unwrap_or(u64::MAX),
            points: p,
        })
        .collect();
    virtman_sim::booted_chart_svg(&lines, "time since the storm started")
}

/// One CSV row per VM per mode.
pub fn csv(reports: &[StormReport]) -> String {
    let mut out = String::from("mode,vm,host,boot_secs,bytes,booted\n");
    for r in reports {
        for v in &r.vm_results {
            let _ = writeln!(
                out,
                "{},{},{},{:.6},{},{}",
                r.mode.name(),
                v.vm,
                v.host,
                v.boot_secs,
                v.bytes,
                v.error.is_none()
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storm::{StormMode, VmResult};

    fn report(mode: StormMode, secs: f64, origin: u64) -> StormReport {
        StormReport {
            mode,
            hosts: 2,
            vms: 2,
            image_size: 1 << 20,
            working_set: 1 << 19,
            back_to_back: true,
            vm_results: vec![
                VmResult {
                    vm: "vm1".into(),
                    host: "host1".into(),
                    boot_secs: secs / 2.0,
                    bytes: 10,
                    error: None,
                    wrong_bytes: 0,
                    longest_read_ms: None,
                },
                VmResult {
                    vm: "vm2".into(),
                    host: "host2".into(),
                    boot_secs: secs,
                    bytes: 10,
                    error: None,
                    wrong_bytes: 0,
                    longest_read_ms: None,
                },
            ],
            host_results: vec![],
            origin_bytes: origin,
            all_booted_secs: secs,
            dead: vec![],
            origin_measured: true,
            chaos: None,
        }
    }

    #[test]
    fn failed_vms_are_reported_and_left_out_of_times() {
        let mut r = report(StormMode::Virtman, 2.0, 1 << 19);
        r.vm_results[1].error = Some("connection reset".into());
        r.vm_results[1].boot_secs = 0.5;
        r.dead = vec!["host2".into()];
        let t = table(std::slice::from_ref(&r));
        assert!(
            t.contains(
                "virtman: 1 of 2 VMs did not boot (dead: host2); vm2 on host2: connection reset"
            ),
            "{t}"
        );
        // The failed VM's time counts in no percentile, and the CSV says so.
        assert_eq!(r.percentile(0.0), 1.0);
        assert!(csv(&[r]).contains("virtman,vm2,host2,0.500000,10,false"));
    }

    #[test]
    fn table_has_ratios_to_virtman() {
        let t = table(&[
            report(StormMode::Virtman, 2.0, 1 << 19),
            report(StormMode::Direct, 6.0, 1 << 21),
        ]);
        let direct = t.lines().find(|l| l.starts_with("direct")).unwrap();
        assert!(direct.ends_with("3.00x"), "{t}");
        assert!(
            direct.contains(" 4.00 "),
            "origin bytes over the working set: {t}"
        );
        let svg = chart(&[
            report(StormMode::Virtman, 2.0, 0),
            report(StormMode::Direct, 6.0, 0),
        ]);
        assert!(svg.starts_with("<svg") && svg.contains("virtman") && svg.contains("direct"));
        let c = csv(&[report(StormMode::Virtman, 2.0, 0)]);
        assert_eq!(c.lines().count(), 3);
        assert!(c.contains("virtman,vm2,host2,2.000000,10"));
    }
}
