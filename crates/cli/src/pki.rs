//! `virtman pki`: the cluster's certificate authority and its certificates.
//!
//! ```text
//!   virtman pki init CADIR                       a new CA (ca-cert.pem, ca-key.pem 0600)
//!   virtman pki issue CADIR --name host7 --ip 10.0.0.7 --out NODEDIR
//!   virtman pki show NODEDIR                     names, addresses, role, expiry
//! ```

use std::fmt::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use time::OffsetDateTime;
use virtman_pki::{
    CA_CERT, CLIENT_CERT, Ca, CertInfo, DEFAULT_CA_DAYS, DEFAULT_NODE_DAYS, IssueRequest, Role,
    SERVER_CERT, write_node_dir,
};

/// Arguments of `virtman pki`.
#[derive(Debug, Args)]
#[command(after_help = "\
A node directory holds ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem and
client-key.pem: the layout qemu's tls-creds-x509 object reads, so one directory serves the
node's agent (virtman agent --tls NODEDIR) and its qemu VMs. A node's identity in the
cluster is the name in its certificate. Keep the CA directory off the nodes.

Examples:
  virtman pki init /etc/virtman/ca
  virtman pki issue /etc/virtman/ca --name host7 --ip 10.0.0.7 --dns host7.dc1 --out /tmp/host7
  virtman pki issue /etc/virtman/ca --name alice --operator --out ~/.config/virtman/tls
  virtman pki show /tmp/host7")]
pub struct PkiArgs {
    #[command(subcommand)]
    command: PkiCommand,
}

#[derive(Debug, Subcommand)]
enum PkiCommand {
    /// Make a new cluster CA in a directory (refuses to overwrite one).
    Init {
        /// Where the CA's certificate and key go.
        dir: PathBuf,
        /// Days the CA is valid.
        #[arg(long, default_value_t = DEFAULT_CA_DAYS)]
        days: u32,
    },
    /// Issue a node's (or an operator's) certificate and key into a node directory.
    Issue {
        /// The CA's directory.
        ca: PathBuf,
        /// The node's name: its identity in the cluster (the name it runs the agent with).
        #[arg(long)]
        name: String,
        /// An address peers reach it at (repeatable).
        #[arg(long = "ip", value_name = "IP")]
        ips: Vec<IpAddr>,
        /// A DNS name peers reach it at (repeatable; the name itself is added when it is one).
        #[arg(long = "dns", value_name = "NAME")]
        dns: Vec<String>,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = DEFAULT_NODE_DAYS)]
        days: u32,
        /// An operator's certificate (registers images, bans nodes) instead of a node's.
        #[arg(long)]
        operator: bool,
        /// The node directory to write (created; existing files are not overwritten).
        #[arg(long, value_name = "NODEDIR")]
        out: PathBuf,
    },
    /// Print the certificates of a node or CA directory (or one PEM file).
    Show {
        /// A node directory, a CA directory or a certificate file.
        path: PathBuf,
    },
}

/// Runs `virtman pki`.
pub fn run(args: PkiArgs) -> anyhow::Result<()> {
    match args.command {
        PkiCommand::Init { dir, days } => {
            let ca = Ca::init(&dir, days).context("making the CA")?;
            println!("made a CA in {}", ca.dir().display());
            print!("{}", describe(&dir.join(CA_CERT))?);
        }
        PkiCommand::Issue {
            ca,
            name,
            ips,
            dns,
            days,
            operator,
            out,
        } => {
            let authority = Ca::load(&ca).context("loading the CA")?;
            let role = if operator { Role::Operator } else { Role::Node };
            let issued = authority
                .issue(&IssueRequest {
                    name,
                    role,
                    ips,
                    dns,
                    days,
                })
                .context("issuing the certificate")?;
            write_node_dir(&out, authority.cert_pem(), &issued)
                .context("writing the node directory")?;
            println!("wrote {}", out.display());
            print!("{}", describe(&out.join(SERVER_CERT))?);
        }
        PkiCommand::Show { path } => {
            let files: Vec<PathBuf> = if path.is_dir() {
                [SERVER_CERT, CLIENT_CERT, CA_CERT]
                    .iter()
                    .map(|f| path.join(f))
                    .filter(|p| p.exists())
                    .collect()
            } else {
                vec![path.clone()]
            };
            anyhow::ensure!(
                !files.is_empty(),
                "{} holds none of {SERVER_CERT}, {CLIENT_CERT}, {CA_CERT}",
                path.display()
            );
            // The client certificate is usually the server's: print it once.
            let mut seen = Vec::new();
            for f in files {
                let info = CertInfo::from_pem_file(&f)?;
                if !seen.contains(&info.serial) {
                    print!("{}", format_info(&f, &info, OffsetDateTime::now_utc()));
                    seen.push(info.serial);
                }
            }
        }
    }
    Ok(())
}

/// A certificate file, as text.
fn describe(path: &Path) -> anyhow::Result<String> {
    let info = CertInfo::from_pem_file(path)?;
    Ok(format_info(path, &info, OffsetDateTime::now_utc()))
}

fn format_info(path: &Path, info: &CertInfo, now: OffsetDateTime) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{}:", path.display());
    match (&info.identity, info.is_ca) {
        (_, true) => {
            let _ = writeln!(s, "  CA       {}", info.subject);
        }
        (Some(id), false) => {
            let _ = writeln!(s, "  name     {} ({})", id.name, id.role.name());
        }
        (None, false) => {
            let _ = writeln!(s, "  subject  {} (not issued by virtman pki)", info.subject);
        }
    }
    if !info.dns.is_empty() {
        let _ = writeln!(s, "  dns      {}", info.dns.join(", "));
    }
    if !info.ips.is_empty() {
        let ips: Vec<String> = info.ips.iter().map(ToString::to_string).collect();
        let _ = writeln!(s, "  ip       {}", ips.join(", "));
    }
    if !info.is_ca {
        let _ = writeln!(s, "  issuer   {}", info.issuer);
    }
    let left = (info.not_after - now).whole_days();
    let state = if now > info.not_after {
        "EXPIRED".to_owned()
    } else if now < info.not_before {
        "NOT YET VALID".to_owned()
    } else {
        format!("{left} days left")
    };
    let _ = writeln!(
        s,
        "  valid    {} to {} ({state})",
        date(info.not_before),
        date(info.not_after)
    );
    let _ = writeln!(s, "  serial   {}", info.serial);
    s
}

fn date(t: OffsetDateTime) -> String {
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02} UTC",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtman_pki::Identity;

    #[test]
    fn a_certificate_prints_its_name_addresses_and_time_left() {
        let t = |s: &str| {
            OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).unwrap()
        };
        let mut info = CertInfo {
            subject: "O=virtman, OU=node, CN=host7".into(),
            issuer: "O=virtman, CN=virtman cluster CA 0a0b".into(),
            identity: Some(Identity {
                name: "host7".into(),
                role: Role::Node,
            }),
            is_ca: false,
            dns: vec!["host7".into(), "host7.dc1".into()],
            ips: vec!["10.0.0.7".parse().unwrap()],
            not_before: t("2026-01-01T00:00:00Z"),
            not_after: t("2027-01-01T00:00:00Z"),
            serial: "01:02".into(),
        };
        let s = format_info(
            Path::new("d/server-cert.pem"),
            &info,
            t("2026-12-02T00:00:00Z"),
        );
        assert_eq!(
            s,
            "d/server-cert.pem:\n  name     host7 (node)\n  dns      host7, host7.dc1\n  \
             ip       10.0.0.7\n  issuer   O=virtman, CN=virtman cluster CA 0a0b\n  \
             valid    2026-01-01 00:00 UTC to 2027-01-01 00:00 UTC (30 days left)\n  \
             serial   01:02\n"
        );
        let s = format_info(Path::new("x"), &info, t("2027-02-01T00:00:00Z"));
        assert!(s.contains("(EXPIRED)"), "{s}");
        info.identity = None;
        let s = format_info(Path::new("x"), &info, t("2026-02-01T00:00:00Z"));
        assert!(s.contains("not issued by virtman pki"), "{s}");
    }
}
