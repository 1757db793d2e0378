//! `virtman doctor`: checks that this host can run the agent, with what the
//! agent would use (its config file and flags), one line per check.
//!
//! ```text
//!   flags + agent.toml ─► AgentOptions (as `virtman agent` resolves them)
//!     host:   qemu --version, KVM (/dev/kvm and the CPU's vmx/svm flags)
//!     disk:   data dir writable, sparse files, punch-hole, O_DIRECT, free space
//!     net:    --listen free
//!     remote: coordinator /v1/health, credentials (a heartbeat), clock skew
//!   ─► "ok | warn | FAIL  CHECK  what was found -> what to do"
//! ```
//!
//! A `FAIL` is something that stops the agent or its VMs (a read-only or
//! full data dir, a port in use, a coordinator that does not answer or
//! refuses the credentials); the exit status is then non-zero. A `warn`
//! (no KVM: VMs run under TCG; no punch-hole: evicted chunks keep their
//! space) does not change it.

mod disk;
mod host;
mod remote;

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;

use crate::agent::AgentOptions;

/// Arguments of `virtman doctor`.
#[derive(Debug, Args)]
#[command(after_help = "\
Checks this host before (or after) `virtman agent` runs on it, with the same
options: the agent's config file (--config, else /etc/virtman/agent.toml when
present) and any agent flag given here. Prints one line per check: ok, warn or
FAIL, and what to do about each problem. Exits non-zero when a check FAILs
(something would stop the agent); warnings alone do not.

The coordinator is asked /v1/health and sent one heartbeat as this node with no
session (what an idle agent sends), which shows whether the token or the
certificate is accepted. A port in --listen that is in use is a FAIL: stop the
agent first when checking a host it already runs on.

Examples:
  virtman doctor
  virtman doctor --data-dir /srv/virtman --cache-size 200G
  virtman doctor --config /etc/virtman/agent.toml --coordinator https://10.0.0.1:7600")]
pub struct DoctorArgs {
    /// The agent's options to check (the agent's flags).
    #[command(flatten)]
    pub options: AgentOptions,

    /// The agent's config file (default: /etc/virtman/agent.toml when it
    /// exists); flags given here override it, as for `virtman agent`.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Fine.
    Ok,
    /// Works, but worse than it could (no KVM, no punch-hole).
    Warn,
    /// Would stop the agent or its VMs.
    Fail,
}

/// One check's outcome: a line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// How it came out.
    pub level: Level,
    /// What was checked (`data dir`, `kvm`, ...).
    pub name: &'static str,
    /// What was found.
    pub detail: String,
    /// What to do about it (warn and FAIL).
    pub fix: Option<String>,
}

impl Check {
    fn ok(name: &'static str, detail: impl Into<String>) -> Self {
        Self {
            level: Level::Ok,
            name,
            detail: detail.into(),
            fix: None,
        }
    }

    fn warn(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            level: Level::Warn,
            name,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            level: Level::Fail,
            name,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    /// The report's line: `LEVEL  NAME  DETAIL -> FIX`.
    pub fn line(&self) -> String {
        let level = match self.level {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Fail => "FAIL",
        };
        let mut line = format!("{level:<4}  {:<12} {}", self.name, self.detail);
        if let Some(fix) = &self.fix {
            line.push_str(" -> ");
            line.push_str(fix);
        }
        line
    }
}

/// Runs every check, prints the report, and fails if a check failed.
pub fn run(args: DoctorArgs) -> anyhow::Result<()> {
    let matches = crate::config::subcommand_matches("doctor")?;
    let (options, file) = crate::config::resolve(args.options, &matches, args.config.as_deref())?;
    let mut checks = vec![match file {
        Some(f) => Check::ok("config", format!("{} loads", f.display())),
        None => Check::ok("config", "no config file: defaults and flags"),
    }];
    checks.push(host::qemu());
    checks.push(host::kvm());
    checks.extend(disk::checks(&options.data_dir, options.cache_size));
    checks.push(host::listen(&options.listen));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    checks.extend(runtime.block_on(remote::checks(&options)));
    for c in &checks {
        println!("{}", c.line());
    }
    let failed = checks.iter().filter(|c| c.level == Level::Fail).count();
    if failed > 0 {
        bail!("{failed} check(s) FAILed: the agent would not start or its VMs would not run");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_says_level_check_finding_and_fix() {
        let c = Check::fail("listen", "127.0.0.1:1 is in use", "stop it");
        assert_eq!(
            c.line(),
            "FAIL  listen       127.0.0.1:1 is in use -> stop it"
        );
        assert_eq!(
            Check::ok("kvm", "usable").line(),
            "ok    kvm          usable"
        );
    }
}
