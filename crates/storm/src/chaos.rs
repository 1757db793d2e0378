//! Chaos in a storm: hosts killed, stopped or restarted, and the coordinator
//! killed or restarted, at given times, while the VMs read.
//!
//! ```text
//!   --chaos kill:2@1s,stop:1@1.5s+3s,restart:1@2s+1s,coordinator:restart@1s+2s
//!     parse ─► [Event] ─► plan(hosts, seed) ─► [Action{at, what, target}] (hosts picked
//!     with the seed, each at most once) ─► run from t0: SIGKILL | SIGSTOP..SIGCONT |
//!     SIGKILL..start again on the same data directory and address
//! ```
//!
//! SPEC is `kill:N@T`, `stop:N@T+D`, `restart:N@T+D` (N hosts, or `P%` of
//! them), `coordinator:kill@T`, `coordinator:restart@T+D`, `leader:kill@T`,
//! `leader:stop@T+D`, `leader:restart@T+D` (whichever coordinator leads at
//! that moment, with several), and `lie:N` (N
//! hosts run from the start with the agent's test-only `--test-lie`: they
//! serve their children corrupted chunks); times are durations like `1.5s`
//! or `500ms` from the storm's start.

use std::time::Duration;

use virtman_sim::rng::Rng;

/// How many hosts an event hits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Count {
    /// This many.
    Hosts(usize),
    /// This share of them (rounded, at least one).
    Percent(f64),
}

impl Count {
    fn of(self, hosts: usize) -> usize {
        match self {
            Count::Hosts(n) => n,
            // A share of a small count: rounding is what is meant.
            #[allow(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                clippy::cast_precision_loss
            )]
            Count::Percent(p) => ((hosts as f64 * p / 100.0).round() as usize).max(1),
        }
    }
}

/// What happens to whom.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum What {
    /// SIGKILL, for good.
    Kill,
    /// SIGSTOP, then SIGCONT after the duration.
    Stop(Duration),
    /// SIGKILL, then started again after the duration.
    Restart(Duration),
    /// Serve children corrupted chunks, from the start.
    Lie,
}

/// One event of a chaos spec.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// When, from the storm's start.
    pub at: Duration,
    /// What.
    pub what: What,
    /// Hosts hit, or `None` for a coordinator.
    pub hosts: Option<Count>,
    /// The coordinator that leads when it happens (else the first one).
    pub leader: bool,
}

/// One thing to do to one process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Action {
    /// When, from the storm's start.
    pub at: Duration,
    /// What.
    pub what: What,
    /// `hostN`, `coordinator`, or `leader` (found when it happens).
    pub target: String,
}

fn duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else {
        return Err(format!("{s:?} needs a unit: ms or s"));
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 1.5s or 500ms"))?;
    Duration::try_from_secs_f64(v * scale).map_err(|e| format!("{s:?}: {e}"))
}

/// `T` or `T+D`.
fn times(s: &str, with_duration: bool) -> Result<(Duration, Option<Duration>), String> {
    match (s.split_once('+'), with_duration) {
        (Some((t, d)), true) => Ok((duration(t)?, Some(duration(d)?))),
        (None, false) => Ok((duration(s)?, None)),
        (None, true) => Err(format!("{s:?} needs a duration too: T+D, e.g. 1s+2s")),
        (Some(_), false) => Err(format!("{s:?}: a kill takes only a time, e.g. 1s")),
    }
}

/// Parses one SPEC (see the module's documentation).
fn parse_event(spec: &str) -> Result<Event, String> {
    let bad = |why: String| format!("chaos {spec:?}: {why}");
    if let Some(n) = spec.strip_prefix("lie:") {
        let n: usize = n
            .parse()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| bad(format!("{n:?} is not a count of hosts")))?;
        return Ok(Event {
            at: Duration::ZERO,
            what: What::Lie,
            hosts: Some(Count::Hosts(n)),
            leader: false,
        });
    }
    let (kind, rest) = spec
        .split_once(':')
        .ok_or_else(|| bad("expected KIND:N@T, coordinator:KIND@T or leader:KIND@T".into()))?;
    let (who, when) = rest
        .split_once('@')
        .ok_or_else(|| bad("expected @ and a time".into()))?;
    let leader = kind == "leader";
    let (kind, hosts) = if kind == "coordinator" || leader {
        (who, None)
    } else {
        let count = match who.strip_suffix('%') {
            Some(p) => {
                let p: f64 = p
                    .parse()
                    .map_err(|_| bad(format!("{who:?} is not a share")))?;
                if !(p > 0.0 && p <= 100.0) {
                    return Err(bad(format!("{who} is not between 0 and 100%")));
                }
                Count::Percent(p)
            }
            None => {
                let n: usize = who
                    .parse()
                    .map_err(|_| bad(format!("{who:?} is not a count of hosts")))?;
                if n == 0 {
                    return Err(bad("hits no host".into()));
                }
                Count::Hosts(n)
            }
        };
        (kind, Some(count))
    };
    let what = match kind {
        "kill" => {
            times(when, false).map_err(bad)?;
            What::Kill
        }
        "stop" => What::Stop(times(when, true).map_err(bad)?.1.unwrap_or_default()),
        "restart" => What::Restart(times(when, true).map_err(bad)?.1.unwrap_or_default()),
        other => {
            return Err(bad(format!(
                "unknown kind {other:?} (kill, stop, restart, lie)"
            )));
        }
    };
    if hosts.is_none() && !leader && matches!(what, What::Stop(_)) {
        return Err(bad(
            "the coordinator can be killed or restarted (the leader stopped too)".into(),
        ));
    }
    let at = times(when, !matches!(what, What::Kill)).map_err(bad)?.0;
    Ok(Event {
        at,
        what,
        hosts,
        leader,
    })
}

/// Parses a comma-separated list of SPECs.
pub fn parse(specs: &str) -> Result<Vec<Event>, String> {
    specs
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(parse_event)
        .collect()
}

/// Picks the hosts (`host1..=hostN`) of every event with `seed`, each host at
/// most once in the whole plan; the actions in order of time.
pub fn plan(events: &[Event], hosts: usize, seed: u64) -> Result<Vec<Action>, String> {
    let mut pool: Vec<usize> = (1..=hosts).collect();
    Rng::new(seed, 0x000C_4A05).shuffle(&mut pool);
    let mut pool = pool.into_iter();
    let mut out = Vec::new();
    for e in events {
        match e.hosts {
            None => out.push(Action {
                at: e.at,
                what: e.what,
                target: if e.leader { "leader" } else { "coordinator" }.into(),
            }),
            Some(count) => {
                let n = count.of(hosts);
                for _ in 0..n {
                    let h = pool.next().ok_or_else(|| {
                        format!("the chaos spec hits more hosts than the storm's {hosts}")
                    })?;
                    out.push(Action {
                        at: e.at,
                        what: e.what,
                        target: format!("host{h}"),
                    });
                }
            }
        }
    }
    out.sort_by_key(|a| a.at);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_ones_say_why() {
        let e =
            parse("kill:25%@1s, stop:2@1.5s+3s,restart:1@2s+500ms,coordinator:restart@1s+2s,lie:1")
                .unwrap();
        assert_eq!(e.len(), 5);
        assert_eq!(e[4].what, What::Lie);
        assert_eq!(e[0].hosts, Some(Count::Percent(25.0)));
        assert_eq!(e[0].what, What::Kill);
        assert_eq!(e[1].what, What::Stop(Duration::from_secs(3)));
        assert_eq!(e[1].at, Duration::from_millis(1500));
        assert_eq!(e[2].what, What::Restart(Duration::from_millis(500)));
        assert_eq!(e[3].hosts, None);
        assert_eq!(parse("coordinator:kill@3s").unwrap()[0].what, What::Kill);
        let l = parse("leader:stop@1s+3s").unwrap();
        assert!(l[0].leader && l[0].hosts.is_none());
        assert_eq!(l[0].what, What::Stop(Duration::from_secs(3)));
        assert_eq!(plan(&l, 4, 1).unwrap()[0].target, "leader");
        for bad in [
            "kill:2",
            "kill:0@1s",
            "kill:2@1s+1s",
            "stop:1@1s",
            "stop:x@1s+1s",
            "explode:1@1s",
            "kill:150%@1s",
            "kill:1@1h",
            "coordinator:stop@1s+1s",
            "lie:0",
            "lie:x",
        ] {
            let err = parse(bad).unwrap_err();
            assert!(err.contains(bad), "{bad}: {err}");
        }
    }

    #[test]
    fn plans_pick_distinct_hosts_with_the_seed() {
        let e = parse("kill:25%@2s,stop:2@1s+1s,coordinator:restart@1s+1s").unwrap();
        let p = plan(&e, 8, 7).unwrap();
        assert_eq!(p.len(), 5);
        assert!(p.windows(2).all(|w| w[0].at <= w[1].at));
        let mut hosts: Vec<_> = p
            .iter()
            .filter(|a| a.target != "coordinator")
            .map(|a| &a.target)
            .collect();
        hosts.sort();
        hosts.dedup();
        assert_eq!(hosts.len(), 4);
        assert_eq!(plan(&e, 8, 7).unwrap(), p, "same seed, same plan");
        assert!(plan(&e, 2, 7).unwrap_err().contains("more hosts"));
    }
}
