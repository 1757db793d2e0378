//! `virtman image preheat`: warm an image on a cluster's hosts before the rush.
//!
//! ```text
//!   virtman image preheat IMAGE [--labels K=V] [--hosts A,B] [--whole]
//!        ─► POST /v1/images/IMAGE/preheat ─► the matching hosts' heartbeats
//!           carry the order; each joins the image and fetches its boot
//!           profile (or every chunk) through the tree
//!   --wait    ─► GET .../preheat every half second: a bar per host (a line a
//!               second when not on a terminal) until all are done or one fails
//!   --status  ─► GET .../preheat once      --cancel ─► DELETE .../preheat
//! ```

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use virtman_coordinator::api::{PreheatRequest, PreheatState, PreheatStatus};

use crate::remote::{Remote, runtime};

/// Arguments of `virtman image preheat`.
#[derive(Debug, Args)]
#[command(after_help = "\
Hosts match when they are among --hosts (if given) and carry every one of
--labels (if given); neither: every host. Hosts that start later and match
preheat too, until the order is cancelled. A new order for the image
replaces the old one. The exit status is non-zero if a host failed (say, the
image does not fit its cache); the others go on.

Examples:
  virtman image preheat debian-12 --labels rack=r1 --wait
  virtman image preheat debian-12 --hosts host1,host2 --whole
  virtman image preheat debian-12 --status
  virtman image preheat debian-12 --cancel")]
pub struct PreheatArgs {
    /// The image.
    pub image: String,
    /// Labels a host must carry (repeat or separate with commas).
    #[arg(long, value_name = "KEY=VALUE", value_delimiter = ',')]
    pub labels: Vec<String>,
    /// Host names (repeat or separate with commas).
    #[arg(long, value_name = "NAME", value_delimiter = ',')]
    pub hosts: Vec<String>,
    /// Fetch every chunk, not only the boot profile's (as `image pin`).
    #[arg(long)]
    pub whole: bool,
    /// Wait until every matching host is done (or one failed), showing
    /// progress.
    #[arg(long)]
    pub wait: bool,
    /// Show the image's preheat and its hosts, and exit.
    #[arg(long, conflicts_with_all = ["labels", "hosts", "whole", "cancel"])]
    pub status: bool,
    /// Cancel the image's preheat: its hosts stop fetching.
    #[arg(long, conflicts_with_all = ["labels", "hosts", "whole", "wait"])]
    pub cancel: bool,
    #[command(flatten)]
    pub remote: Remote,
}

/// Runs `virtman image preheat`.
pub fn run(args: PreheatArgs) -> anyhow::Result<()> {
    let (client, url) = args.remote.client()?;
    let rt = runtime()?;
    let image = args.image.as_str();
    if args.cancel {
        rt.block_on(client.cancel_preheat(image))
            .with_context(|| format!("cancelling the preheat of {image:?} at {url}"))?;
        println!("preheat of {image} cancelled");
        return Ok(());
    }
    let status = if args.status {
        rt.block_on(client.preheat_status(image))
            .with_context(|| format!("reading the preheat of {image:?} from {url}"))?
    } else {
        let req = PreheatRequest {
            labels: crate::units::parse_labels(&args.labels)?,
            hosts: args.hosts.clone(),
            whole: args.whole,
        };
        let s = rt
            .block_on(client.preheat(image, &req))
            .with_context(|| format!("ordering the preheat of {image:?} at {url}"))?;
        println!(
            "preheating {image} on {} hosts ({}), order {}",
            s.hosts.len(),
            if req.whole {
                "every chunk"
            } else {
                "its boot profile"
            },
            s.order.id
        );
        s
    };
    if !args.wait {
        print!("{}", table(&status));
        return failed(&status);
    }
    let status = rt.block_on(wait(&client, image))?;
    print!("{}", table(&status));
    failed(&status)
}

/// An error if a host failed.
fn failed(s: &PreheatStatus) -> anyhow::Result<()> {
    let bad: Vec<&str> = s
        .hosts
        .iter()
        .filter(|h| h.state == PreheatState::Failed)
        .map(|h| h.node.as_str())
        .collect();
    if bad.is_empty() {
        Ok(())
    } else {
        bail!("the preheat failed on {}", bad.join(", "))
    }
}

fn state_name(s: PreheatState) -> &'static str {
    match s {
        PreheatState::Waiting => "waiting",
        PreheatState::Running => "running",
        PreheatState::Done => "done",
        PreheatState::Failed => "FAILED",
    }
}

/// One line per host.
fn table(s: &PreheatStatus) -> String {
    use std::fmt::Write as _;
    let mut out = format!("{:<24} {:<8} {:>6}\n", "HOST", "STATE", "HELD");
    for h in &s.hosts {
        let _ = writeln!(
            out,
            "{:<24} {:<8} {:>5.1}%{}",
            h.node,
            state_name(h.state),
            h.held * 100.0,
            if h.message.is_empty() {
                String::new()
            } else {
                format!("  {}", h.message)
            }
        );
    }
    out
}

/// Polls until every host is done or one failed; a bar per host on a
/// terminal, else a summary line a second.
async fn wait(client: &virtman_coordinator::Client, image: &str) -> anyhow::Result<PreheatStatus> {
    let tty = std::io::stderr().is_terminal();
    let multi = MultiProgress::new();
    let mut bars: BTreeMap<String, ProgressBar> = BTreeMap::new();
    let style = ProgressStyle::with_template("{prefix:<16} [{bar:30}] {pos:>3}% {msg}")
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    let mut last_line = std::time::Instant::now() - Duration::from_secs(1);
    loop {
        let s = client
            .preheat_status(image)
            .await
            .with_context(|| format!("reading the preheat of {image:?}"))?;
        let done = s
            .hosts
            .iter()
            .filter(|h| h.state == PreheatState::Done)
            .count();
        let failed = s.hosts.iter().any(|h| h.state == PreheatState::Failed);
        if tty {
            for h in &s.hosts {
                let bar = bars.entry(h.node.clone()).or_insert_with(|| {
                    let b = multi.add(ProgressBar::new(100));
                    b.set_style(style.clone());
                    b.set_prefix(h.node.clone());
                    b
                });
                // A fraction times 100, as a whole percent.
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                bar.set_position((h.held * 100.0).round() as u64);
                bar.set_message(state_name(h.state));
            }
        } else if last_line.elapsed() >= Duration::from_secs(1) {
            last_line = std::time::Instant::now();
            let held: f64 =
                s.hosts.iter().map(|h| h.held).sum::<f64>() / s.hosts.len().max(1) as f64;
            eprintln!(
                "preheat {image}: {done}/{} hosts done, {:.0}% held on average",
                s.hosts.len(),
                held * 100.0
            );
        }
        if failed || (!s.hosts.is_empty() && done == s.hosts.len()) {
            for b in bars.values() {
                b.finish();
            }
            return Ok(s);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
