//! `virtman coordinator status`: who leads, since when, the term, and the
//! etcd endpoints' health, as each coordinator given sees it.
//!
//! ```text
//!   coordinator-127.0.0.1:7601  http://127.0.0.1:7601  leader    term 12  since 10:04:05 (2m13s ago)  2 leader changes seen
//!   coordinator-127.0.0.1:7602  http://127.0.0.1:7602  follower  leader coordinator-127.0.0.1:7601 (term 12)
//!   etcd http://127.0.0.1:2379  healthy  3.4.23  raft leader  1 ms
//! ```
//!
//! Exit status 1 when no coordinator answered or none knows a leader.

use std::fmt::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Args;
use virtman_coordinator::api::CoordinatorStatus;

use crate::remote::{Remote, runtime};

/// Arguments of `virtman coordinator status`.
#[derive(Debug, Args)]
#[command(after_help = "\
Each coordinator in --coordinator (comma-separated) is asked on its own, so a
split view (two coordinators naming different leaders) shows.

Examples:
  virtman coordinator status --coordinator http://127.0.0.1:7601,http://127.0.0.1:7602
  virtman coordinator status --json")]
pub struct StatusArgs {
    #[command(flatten)]
    pub remote: Remote,

    /// Print the answers as JSON (a list of the API's CoordinatorStatus,
    /// null where a coordinator did not answer).
    #[arg(long)]
    pub json: bool,
}

/// Asks each coordinator and prints what they say.
pub fn run(args: &StatusArgs) -> anyhow::Result<()> {
    let (client, urls) = args.remote.client()?;
    let answers: Vec<(String, Result<CoordinatorStatus, String>)> = runtime()?.block_on(async {
        let mut out = Vec::new();
        for url in client.urls() {
            let one = client.only(url);
            let answer = match one {
                Ok(c) => c.coordinator_status().await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            out.push((url.clone(), answer));
        }
        out
    });
    let answered = answers.iter().any(|(_, a)| a.is_ok());
    let leader_known = answers.iter().any(|(_, a)| {
        a.as_ref()
            .is_ok_and(|s| s.leader.is_some() || s.role == "standalone")
    });
    if args.json {
        let list: Vec<Option<&CoordinatorStatus>> =
            answers.iter().map(|(_, a)| a.as_ref().ok()).collect();
        let mut s = serde_json::to_string_pretty(&list).context("encoding JSON")?;
        s.push('\n');
        print!("{s}");
    } else {
        print!("{}", render(&answers, SystemTime::now()));
    }
    if !answered {
        anyhow::bail!("no coordinator answered at {urls}");
    }
    if !leader_known {
        anyhow::bail!("no coordinator knows a leader");
    }
    Ok(())
}

fn render(answers: &[(String, Result<CoordinatorStatus, String>)], now: SystemTime) -> String {
    let mut out = String::new();
    let mut endpoints = Vec::new();
    for (url, answer) in answers {
        match answer {
            Err(e) => {
                let _ = writeln!(out, "{url}  no answer: {e}");
            }
            Ok(s) if s.role == "standalone" => {
                let _ = writeln!(out, "{url}  standalone (redb): decides alone");
            }
            Ok(s) => {
                let _ = write!(out, "{}  {}  {:<9}", s.name, s.url, s.role);
                match &s.leader {
                    Some(l) if l.name == s.name => {
                        let _ = write!(
                            out,
                            "  term {}  since {}",
                            l.term,
                            since(l.since_unix_ms, now)
                        );
                    }
                    Some(l) => {
                        let _ = write!(out, "  leader {} (term {})", l.name, l.term);
                    }
                    None => out.push_str("  no leader known"),
                }
                let _ = write!(out, "  {} leader changes seen", s.leader_changes);
                if let Some(e) = &s.etcd_error {
                    let _ = write!(out, "  etcd error: {e}");
                }
                out.push('\n');
                if endpoints.is_empty() {
                    endpoints.clone_from(&s.endpoints);
                }
            }
        }
    }
    for e in &endpoints {
        if e.healthy {
            let _ = writeln!(
                out,
                "etcd {}  healthy  {}{}  {} ms",
                e.endpoint,
                e.version.as_deref().unwrap_or("?"),
                if e.raft_leader { "  raft leader" } else { "" },
                e.latency_ms.unwrap_or(0)
            );
        } else {
            let _ = writeln!(
                out,
                "etcd {}  DOWN  {}",
                e.endpoint,
                e.error.as_deref().unwrap_or("")
            );
        }
    }
    out
}

fn since(unix_ms: u64, now: SystemTime) -> String {
    let now_ms = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let ago = Duration::from_millis(now_ms.saturating_sub(unix_ms));
    let secs = unix_ms / 1000;
    format!(
        "{:02}:{:02}:{:02} UTC ({}s ago)",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60,
        ago.as_secs()
    )
}

#[cfg(test)]
mod tests {
    use virtman_coordinator::api::{EndpointHealth, LeaderView};

    use super::*;

    fn status(name: &str, role: &str, leader: &str, term: i64) -> CoordinatorStatus {
        CoordinatorStatus {
            name: name.into(),
            url: format!("http://{name}"),
            role: role.into(),
            store: "etcd".into(),
            leader: Some(LeaderView {
                name: leader.into(),
                url: format!("http://{leader}"),
                term,
                since_unix_ms: 3_600_000 + 61_000,
            }),
            leader_changes: 1,
            etcd_error: None,
            endpoints: vec![EndpointHealth {
                endpoint: "http://e1".into(),
                healthy: true,
                version: Some("3.4.23".into()),
                raft_leader: true,
                latency_ms: Some(2),
                error: None,
            }],
        }
    }

    #[test]
    fn names_the_leader_its_term_and_the_endpoints() {
        let now = UNIX_EPOCH + Duration::from_millis(3_600_000 + 71_000);
        let text = render(
            &[
                ("http://a".into(), Ok(status("a", "leader", "a", 7))),
                ("http://b".into(), Ok(status("b", "follower", "a", 7))),
                ("http://c".into(), Err("connection refused".into())),
            ],
            now,
        );
        assert!(
            text.contains("a  http://a  leader     term 7  since 01:01:01 UTC (10s ago)"),
            "{text}"
        );
        assert!(
            text.contains("b  http://b  follower   leader a (term 7)"),
            "{text}"
        );
        assert!(
            text.contains("http://c  no answer: connection refused"),
            "{text}"
        );
        assert!(
            text.contains("etcd http://e1  healthy  3.4.23  raft leader  2 ms"),
            "{text}"
        );
    }
}
