//! What a run reports, as text, JSON (serde) and an SVG chart.
//!
//! ```text
//!   engine state at the end ──build()──► Report ──text()──► the storm's table
//!                                           │ serde_json ──► JSON
//!                                           └ chart_svg(several) ──► booted VMs over time
//! ```
//!
//! The chart is written by hand as plain SVG (axes, polylines, `<text>`
//! labels left to the viewer's fonts): no font files, no plotting crate.

use std::fmt::Write;

use serde::Serialize;

use crate::config::{Config, Mode};
use crate::net::Net;
pub use crate::record::Raw;
use crate::record::{ImageState, Vm};

/// Boot-time percentiles, in seconds from each VM's start to its last read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Slowest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

/// VMs grouped by their host's depth in the tree when they booted.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DepthRow {
    /// Depth (1 = a child of the origin; in cache-only and direct modes every host is at 1).
    pub depth: u32,
    /// VMs booted at this depth.
    pub vms: u64,
    /// Their boot times.
    pub boot_s: Percentiles,
}

/// Figures per image (two when a second image arrives mid-storm).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ImageRow {
    /// 0 or 1.
    pub image: u32,
    /// VMs of this image.
    pub vms: u64,
    /// Of which booted.
    pub booted: u64,
    /// Boot times.
    pub boot_s: Percentiles,
    /// Bytes its origin sent.
    pub origin_bytes: u64,
    /// Time the last VM of the image booted, if all did.
    pub all_booted_s: Option<f64>,
}

/// The tree at the end (virtman mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TreeRow {
    /// Deepest member (of any stripe, in a forest).
    pub max_depth: u32,
    /// `ceil(log_k N) + 1` (in a forest, the largest of the stripes' bounds).
    pub depth_bound: u32,
    /// Members declared dead.
    pub deaths: u64,
    /// Reports acted on.
    pub reports: u64,
    /// Parent-list changes of existing members.
    pub parent_changes: u64,
}

/// The result of one run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// Mode.
    pub mode: Mode,
    /// Hosts.
    pub hosts: u32,
    /// VMs (both images).
    pub vms: u64,
    /// Fan-out k (virtman mode).
    pub fanout: u32,
    /// Parents per node p (virtman mode).
    pub parents: u32,
    /// Stripes of the forest (virtman mode; 1: one tree).
    pub stripes: u32,
    /// Hosts replayed the boot profile (virtman mode with prefetch).
    pub prefetch: bool,
    /// Seed.
    pub seed: u64,
    /// VMs that read their whole trace.
    pub booted: u64,
    /// VMs that died with their host (not counted as booted or never booted).
    pub lost: u64,
    /// VMs on live hosts that had not booted when the run ended.
    pub never_booted: u64,
    /// The first 100 of them, by VM number.
    pub never_booted_ids: Vec<u32>,
    /// Boot times of the booted VMs.
    pub boot_s: Percentiles,
    /// Time until every VM (not lost) booted; `None` if some never did.
    pub all_booted_s: Option<f64>,
    /// Virtual time at the end of the run.
    pub end_s: f64,
    /// Bytes sent by the origins.
    pub origin_bytes: u64,
    /// Bytes sent by every node.
    pub bytes_sent: u64,
    /// Bytes received by every node.
    pub bytes_received: u64,
    /// Distinct chunk bytes of one boot (the working set at chunk granularity).
    pub working_set_bytes: u64,
    /// Origin bytes per image over the working set: copies the origin sent.
    pub origin_copies: f64,
    /// VMs whose reads added up to the whole trace.
    pub vms_read_whole_trace: u64,
    /// The longest any single read waited, in seconds.
    pub max_read_wait_s: f64,
    /// Per depth.
    pub depths: Vec<DepthRow>,
    /// Per image.
    pub images: Vec<ImageRow>,
    /// The tree at the end (virtman mode).
    pub tree: Option<TreeRow>,
    /// Engine counters.
    pub counters: Raw,
    /// Rate recomputations of the network model.
    pub rate_recomputes: u64,
    /// Booted VMs over time: (seconds, count), at most ~200 points.
    pub booted_over_time: Vec<(f64, u64)>,
    /// Remarks on the scenario (a failure that came after the last boot).
    pub notes: Vec<String>,
}

#[allow(clippy::cast_precision_loss)]
fn secs(ns: u64) -> f64 {
    ns as f64 * 1e-9
}

fn percentiles(mut v: Vec<u64>) -> Percentiles {
    if v.is_empty() {
        return Percentiles::default();
    }
    v.sort_unstable();
    let at = |q: f64| {
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
        secs(v[i])
    };
    let sum: u128 = v.iter().map(|&x| u128::from(x)).sum();
    #[allow(clippy::cast_precision_loss)]
    let mean = sum as f64 / v.len() as f64 * 1e-9;
    Percentiles {
        p50: at(0.5),
        p90: at(0.9),
        p99: at(0.99),
        max: at(1.0),
        mean,
    }
}

pub(crate) fn build(
    cfg: &Config,
    end: u64,
    vms: &[Vm],
    images: &[ImageState],
    net: &Net,
    origins: Vec<u32>,
    raw: Raw,
) -> Report {
    let boot_of = |v: &Vm| v.boot.map(|b| b.saturating_sub(v.start));
    // Times are counted from the VMs' start (after a join lead, if any).
    let epoch = u64::try_from(cfg.epoch().as_nanos()).unwrap_or(u64::MAX);
    let since = |t: u64| secs(t.saturating_sub(epoch));
    let booted: Vec<&Vm> = vms.iter().filter(|v| v.boot.is_some()).collect();
    let lost = vms.iter().filter(|v| v.lost).count() as u64;
    let never: Vec<u32> = vms
        .iter()
        .enumerate()
        .filter(|(_, v)| v.boot.is_none() && !v.lost)
        .filter_map(|(i, v)| {
            let _ = v;
            u32::try_from(i).ok()
        })
        .collect();
    let mut by_depth: std::collections::BTreeMap<u32, Vec<u64>> = Default::default();
    for v in &booted {
        by_depth.entry(v.depth).or_default().extend(boot_of(v));
    }
    let depths = by_depth
        .into_iter()
        .map(|(depth, t)| DepthRow {
            depth,
            vms: t.len() as u64,
            boot_s: percentiles(t),
        })
        .collect();
    let last_boot = booted.iter().filter_map(|v| v.boot).max().unwrap_or(0);
    let all_booted_s = never.is_empty().then(|| since(last_boot));
    let image_rows = (0..images.len())
        .map(|i| {
            let i32_ = u32::try_from(i).unwrap_or(0);
            let mine: Vec<&Vm> = vms.iter().filter(|v| v.image == i32_).collect();
            let b: Vec<u64> = mine.iter().filter_map(|v| boot_of(v)).collect();
            let none_left = mine.iter().all(|v| v.boot.is_some() || v.lost);
            let last = mine.iter().filter_map(|v| v.boot).max().unwrap_or(0);
            ImageRow {
                image: i32_,
                vms: mine.len() as u64,
                booted: b.len() as u64,
                boot_s: percentiles(b),
                origin_bytes: net
                    .sent
                    .get(images[i].origin as usize)
                    .copied()
                    .unwrap_or(0),
                all_booted_s: none_left.then(|| since(last)),
            }
        })
        .collect();
    let origin_bytes: u64 = origins
        .iter()
        .map(|&o| net.sent.get(o as usize).copied().unwrap_or(0))
        .sum();
    let working_set_bytes = cfg.trace.chunk_bytes(cfg.chunk_size);
    let tree = images[0].session.as_ref().map(|s| {
        let st = s.stats();
        TreeRow {
            max_depth: s.max_depth(),
            depth_bound: s.depth_bound(),
            deaths: st.deaths,
            reports: st.reports,
            parent_changes: st.parent_changes,
        }
    });
    // Booted over time, thinned to about 200 points (always keeping the last).
    let mut times: Vec<u64> = booted.iter().filter_map(|v| v.boot).collect();
    times.sort_unstable();
    let step = (times.len() / 200).max(1);
    let mut series: Vec<(f64, u64)> = vec![(0.0, 0)];
    for (i, &t) in times.iter().enumerate() {
        if (i + 1) % step == 0 || i + 1 == times.len() {
            series.push((since(t), i as u64 + 1));
        }
    }
    let trace_bytes = cfg.trace.bytes();
    let mut notes = Vec::new();
    for w in &cfg.failures {
        if (cfg.epoch() + w.at).as_nanos() > u128::from(end) {
            notes.push(format!(
                "the failure wave at {:?} came after the run ended at {:.2} s: it changed nothing",
                w.at,
                secs(end)
            ));
        }
    }
    if let Some(t) = cfg.origin_fail_at
        && (cfg.epoch() + t).as_nanos() > u128::from(end)
    {
        notes.push(format!(
            "the origin's failure at {t:?} came after the run ended at {:.2} s",
            secs(end)
        ));
    }
    #[allow(clippy::cast_precision_loss)]
    let origin_copies =
        origin_bytes as f64 / (working_set_bytes as f64 * images.len() as f64).max(1.0);
    Report {
        mode: cfg.mode,
        hosts: cfg.hosts,
        vms: vms.len() as u64,
        fanout: cfg.topology.fanout,
        parents: cfg.topology.parents,
        stripes: cfg.stripes,
        prefetch: cfg.prefetching(),
        seed: cfg.seed,
        booted: booted.len() as u64,
        lost,
        never_booted: never.len() as u64,
        never_booted_ids: never.iter().take(100).copied().collect(),
        boot_s: percentiles(booted.iter().filter_map(|v| boot_of(v)).collect()),
        all_booted_s,
        end_s: secs(end),
        origin_bytes,
        bytes_sent: net.sent.iter().sum(),
        bytes_received: net.received.iter().sum(),
        working_set_bytes,
        origin_copies,
        vms_read_whole_trace: vms.iter().filter(|v| v.bytes_read == trace_bytes).count() as u64,
        max_read_wait_s: secs(vms.iter().map(|v| v.max_wait).max().unwrap_or(0)),
        depths,
        images: image_rows,
        tree,
        counters: raw,
        rate_recomputes: net.recomputes,
        booted_over_time: series,
        notes,
    }
}

fn mib(b: u64) -> f64 {
    #[allow(clippy::cast_precision_loss)]
    let x = b as f64 / f64::from(1u32 << 20);
    x
}

impl Report {
    /// A short name for tables and the chart: `virtman k4 p2`, `virtman
    /// k5 p2 s4` (a forest of 4 stripes), `cache-only`, `direct`.
    pub fn label(&self) -> String {
        match self.mode {
            Mode::Virtman if self.stripes > 1 => format!(
                "virtman k{} p{} s{}",
                self.fanout, self.parents, self.stripes
            ),
            Mode::Virtman => format!("virtman k{} p{}", self.fanout, self.parents),
            m => m.name().to_string(),
        }
    }

    /// The report as a few lines of text.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let p = &self.boot_s;
        let _ = writeln!(
            s,
            "{}: {} hosts, {} VMs, seed {}",
            self.label(),
            self.hosts,
            self.vms,
            self.seed
        );
        let all = self
            .all_booted_s
            .map_or_else(|| "never (see below)".to_string(), |t| format!("{t:.2} s"));
        let _ = writeln!(
            s,
            "  booted {} of {} (lost with their host: {}); all booted at {}",
            self.booted, self.vms, self.lost, all
        );
        let _ = writeln!(
            s,
            "  boot time s: p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}  mean {:.2}",
            p.p50, p.p90, p.p99, p.max, p.mean
        );
        let _ = writeln!(
            s,
            "  origin sent {:.1} MiB ({:.2} x the {:.1} MiB working set); all nodes sent {:.1} MiB",
            mib(self.origin_bytes),
            self.origin_copies,
            mib(self.working_set_bytes),
            mib(self.bytes_sent)
        );
        let _ = writeln!(
            s,
            "  longest read wait {:.3} s; timeouts {}, failovers {}, hosts killed {}",
            self.max_read_wait_s,
            self.counters.timeouts,
            self.counters.failovers,
            self.counters.killed
        );
        if self.counters.cpu_jobs > 0 {
            #[allow(clippy::cast_precision_loss)]
            let cpu_s = self.counters.cpu_us as f64 / 1e6;
            let _ = writeln!(
                s,
                "  CPU: {} jobs, {:.2} s of one core in all",
                self.counters.cpu_jobs, cpu_s
            );
        }
        if self.prefetch {
            let _ = writeln!(
                s,
                "  prefetch: {} chunk fetches started ahead of the VMs",
                self.counters.prefetch_fetches
            );
        }
        if let Some(t) = &self.tree {
            let _ = writeln!(
                s,
                "  tree: depth {} (bound {}), deaths {}, reports {}, parent changes {}",
                t.max_depth, t.depth_bound, t.deaths, t.reports, t.parent_changes
            );
        }
        if self.mode == Mode::Virtman {
            for d in &self.depths {
                let _ = writeln!(
                    s,
                    "    depth {:>2}: {:>7} VMs  p50 {:.2} s  max {:.2} s",
                    d.depth, d.vms, d.boot_s.p50, d.boot_s.max
                );
            }
        }
        if self.images.len() > 1 {
            for i in &self.images {
                let all = i
                    .all_booted_s
                    .map_or_else(|| "never".to_string(), |t| format!("{t:.2} s"));
                let _ = writeln!(
                    s,
                    "    image {}: {} of {} booted, p50 {:.2} s, all at {}, origin {:.1} MiB",
                    i.image,
                    i.booted,
                    i.vms,
                    i.boot_s.p50,
                    all,
                    mib(i.origin_bytes)
                );
            }
        }
        for n in &self.notes {
            let _ = writeln!(s, "  note: {n}");
        }
        if self.never_booted > 0 {
            let ids: Vec<String> = self
                .never_booted_ids
                .iter()
                .map(|i| format!("vm{i}"))
                .collect();
            let more = if self.never_booted > self.never_booted_ids.len() as u64 {
                ", ..."
            } else {
                ""
            };
            let _ = writeln!(
                s,
                "  NEVER BOOTED by {:.1} s: {} VMs: {}{}",
                self.end_s,
                self.never_booted,
                ids.join(", "),
                more
            );
        }
        s
    }
}

/// An SVG line chart of booted VMs over time, one line per report.
pub fn chart_svg(reports: &[Report]) -> String {
    let lines: Vec<ChartLine<'_>> = reports
        .iter()
        .map(|r| ChartLine {
            label: r.label(),
            vms: r.vms,
            points: &r.booted_over_time,
        })
        .collect();
    booted_chart_svg(&lines, "virtual time")
}

/// One line of a booted-VMs-over-time chart: a simulated or a measured storm.
#[derive(Debug, Clone)]
pub struct ChartLine<'a> {
    /// The legend.
    pub label: String,
    /// VMs in the storm (the y axis goes up to the largest).
    pub vms: u64,
    /// (seconds, VMs booted by then), in time order.
    pub points: &'a [(f64, u64)],
}

/// An SVG line chart of booted VMs over time, one line per [`ChartLine`].
pub fn booted_chart_svg(reports: &[ChartLine<'_>], x_title: &str) -> String {
    const W: f64 = 720.0;
    const H: f64 = 420.0;
    const L: f64 = 70.0;
    const R: f64 = 170.0;
    const T: f64 = 30.0;
    const B: f64 = 50.0;
    const COLORS: [&str; 8] = [
        "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    ];
    let xmax = reports
        .iter()
        .flat_map(|r| r.points.last().map(|p| p.0))
        .fold(0.0f64, f64::max)
        .max(1e-3)
        * 1.05;
    // The first boot of any run: modes differ by orders of magnitude, so a
    // wide range gets a logarithmic time axis starting at a power of ten.
    let first = reports
        .iter()
        .flat_map(|r| r.points.get(1).map(|p| p.0))
        .fold(f64::INFINITY, f64::min);
    let log = first.is_finite() && first > 0.0 && xmax / first > 20.0;
    let xmin = if log {
        10f64.powf(first.log10().floor())
    } else {
        0.0
    };
    #[allow(clippy::cast_precision_loss)]
    let ymax = reports.iter().map(|r| r.vms).max().unwrap_or(1).max(1) as f64;
    let x = |t: f64| {
        if log {
            let t = t.max(xmin);
            L + (W - L - R) * (t / xmin).log10() / (xmax / xmin).log10()
        } else {
            L + (W - L - R) * t / xmax
        }
    };
    let y = |n: f64| H - B - (H - T - B) * n / ymax;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="18" text-anchor="middle" font-size="14">booted VMs over time</text>"#,
        (W - R + L) / 2.0
    );
    // Axes and ticks.
    let _ = writeln!(
        s,
        r#"<path d="M{L} {T} V{} H{}" stroke="black" fill="none"/>"#,
        H - B,
        W - R
    );
    for i in 0..=5 {
        let f = f64::from(i) / 5.0;
        let ty = y(ymax * f);
        let _ = writeln!(
            s,
            r#"<path d="M{L} {ty:.1} h-5" stroke="black"/><text x="{}" y="{:.1}" text-anchor="end">{:.0}</text>"#,
            L - 8.0,
            ty + 4.0,
            ymax * f
        );
    }
    let ticks: Vec<f64> = if log {
        std::iter::successors(Some(xmin), |t| Some(t * 10.0))
            .take_while(|&t| t <= xmax)
            .collect()
    } else {
        // Round steps: 1, 2 or 5 times a power of ten, about five of them.
        let raw = xmax / 5.0;
        let mag = 10f64.powf(raw.log10().floor());
        let step = [1.0, 2.0, 5.0, 10.0]
            .into_iter()
            .map(|m| m * mag)
            .find(|&st| st >= raw)
            .unwrap_or(raw);
        // Multiples of the step, not a running sum, so 0.3 prints as 0.3.
        (0..)
            .map(|i| f64::from(i) * step)
            .take_while(|&t| t <= xmax)
            .collect()
    };
    // As many decimals as the step needs (a 0.05 step: two).
    let decimals = {
        let (mut d, mut v) = (0usize, xmax / 5.0);
        while !log && v < 1.0 && d < 6 {
            v *= 10.0;
            d += 1;
        }
        d
    };
    for t in ticks {
        let tx = x(t);
        let _ = writeln!(
            s,
            r#"<path d="M{tx:.1} {} v5" stroke="black"/><text x="{tx:.1}" y="{}" text-anchor="middle">{}</text>"#,
            H - B,
            H - B + 18.0,
            if t >= 10.0 || t == 0.0 {
                format!("{t:.0}")
            } else if log {
                format!("{t}")
            } else {
                let text = format!("{t:.decimals$}");
                text.trim_end_matches('0').trim_end_matches('.').to_owned()
            }
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{} (s{})</text>"#,
        (W - R + L) / 2.0,
        H - 10.0,
        xml_escape(x_title),
        if log { ", log scale" } else { "" }
    );
    for (i, r) in reports.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let mut d = String::new();
        for (k, &(t, n)) in r.points.iter().enumerate() {
            #[allow(clippy::cast_precision_loss)]
            let n = n as f64;
            // Steps: a count holds until the next boot.
            if k == 0 {
                let _ = write!(d, "M{:.1} {:.1}", x(t), y(n));
            } else {
                let _ = write!(d, " H{:.1} V{:.1}", x(t), y(n));
            }
        }
        let _ = writeln!(
            s,
            r#"<path d="{d}" stroke="{c}" stroke-width="2" fill="none"/>"#
        );
        #[allow(clippy::cast_precision_loss)]
        let ly = T + 20.0 * i as f64 + 10.0;
        let _ = writeln!(
            s,
            r#"<path d="M{} {ly:.1} h20" stroke="{c}" stroke-width="2"/><text x="{}" y="{:.1}">{}</text>"#,
            W - R + 10.0,
            W - R + 35.0,
            ly + 4.0,
            xml_escape(&r.label)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::percentiles;

    #[test]
    fn percentiles_of_one_to_hundred() {
        let p = percentiles((1..=100).map(|s| s * 1_000_000_000).collect());
        assert_eq!(p.p50, 50.0);
        assert_eq!(p.p90, 90.0);
        assert_eq!(p.p99, 99.0);
        assert_eq!(p.max, 100.0);
        assert!((p.mean - 50.5).abs() < 1e-9);
    }
}
