//! Checks against the coordinator: it answers, it accepts this node's
//! credentials (token or certificate), and the clocks agree.

use std::time::{Duration, SystemTime};

use virtman_coordinator::api::HeartbeatRequest;
use virtman_coordinator::{Client, ClientError};
use virtman_pki::PeerVerification;

use super::Check;
use crate::agent::{AgentOptions, node_name, read_token};
use crate::tls::NodeTlsHandles;

/// Clock skew above which the report warns: certificates are issued
/// valid from the CA's now, and logs of hosts are compared by time.
const SKEW_WARN: Duration = Duration::from_secs(2);

/// The coordinator checks, one line each (per coordinator URL for those
/// about a coordinator).
pub async fn checks(o: &AgentOptions) -> Vec<Check> {
    let mut out = Vec::new();
    let token = match &o.token_file {
        Some(p) => match read_token(p) {
            Ok(t) => Some(t),
            Err(e) => {
                out.push(Check::fail(
                    "token",
                    format!("{e:#}"),
                    "put the coordinator's token in --token-file (token_file in the config)",
                ));
                return out;
            }
        },
        None => None,
    };
    let https = o.coordinator.starts_with("https://");
    let tls = match &o.tls {
        Some(dir) => match NodeTlsHandles::load(dir, PeerVerification::Required, true, true) {
            Ok(t) => {
                let name = t.identity.as_ref().map_or("?", |i| i.name.as_str());
                out.push(Check::ok(
                    "tls",
                    format!("{} loads: certificate of {name}", dir.display()),
                ));
                Some(t)
            }
            Err(e) => {
                out.push(Check::fail(
                    "tls",
                    format!("{}: {e:#}", dir.display()),
                    "issue the node's directory again with `virtman pki issue`",
                ));
                return out;
            }
        },
        None => None,
    };
    let name = match node_name(
        o.name.as_deref(),
        tls.as_ref().and_then(|t| t.identity.as_ref()),
    ) {
        Ok(n) => n,
        Err(e) => {
            out.push(Check::fail(
                "name",
                format!("{e:#}"),
                "drop --name, or use the certificate's",
            ));
            return out;
        }
    };
    let coordinator_tls = match &tls {
        Some(t) if https => match t.coordinator_config() {
            Ok(c) => Some(c),
            Err(e) => {
                out.push(Check::fail(
                    "tls",
                    format!("{e:#}"),
                    "check the node directory",
                ));
                return out;
            }
        },
        _ => None,
    };
    if https && coordinator_tls.is_none() {
        out.push(Check::warn(
            "tls",
            "https:// coordinator without --tls: the system's roots verify it and no certificate is presented",
            "give the node directory with --tls (tls in the config)",
        ));
    }
    let client = match Client::with_tls(&o.coordinator, token.clone(), coordinator_tls) {
        Ok(c) => c,
        Err(e) => {
            out.push(Check::fail(
                "coordinator",
                e.to_string(),
                "fix --coordinator (coordinator in the config)",
            ));
            return out;
        }
    };
    let labels = crate::units::parse_labels(&o.labels).unwrap_or_default();
    for url in client.urls().to_vec() {
        let Ok(one) = client.only(&url) else { continue };
        out.extend(
            one_coordinator(&one, &url, &name, &labels, token.is_some(), tls.is_some()).await,
        );
    }
    out
}

async fn one_coordinator(
    client: &Client,
    url: &str,
    node: &str,
    labels: &std::collections::BTreeMap<String, String>,
    has_token: bool,
    has_cert: bool,
) -> Vec<Check> {
    let sent = SystemTime::now();
    let health = match client.health().await {
        Ok(h) => h,
        Err(e) => {
            return vec![Check::fail(
                "coordinator",
                format!("{url} cannot be reached: {e}"),
                "start the coordinator, or fix --coordinator (coordinator in the config); \
                 with https, check --tls and the coordinator's certificate",
            )];
        }
    };
    let answered = SystemTime::now();
    let mut out = vec![Check::ok(
        "coordinator",
        format!("{url} answers ({})", health.status),
    )];
    let beat = HeartbeatRequest {
        node: node.to_owned(),
        sessions: Vec::new(),
        labels: labels.clone(),
        preheats: Vec::new(),
    };
    let how = match (has_cert, has_token) {
        (true, _) => "the certificate",
        (false, true) => "the token",
        (false, false) => "no credentials",
    };
    out.push(match client.heartbeat(&beat).await {
        // Unknown or dead: the call got past authentication.
        Ok(_) | Err(ClientError::Api { status: 404 | 410, .. }) => {
            Check::ok("credentials", format!("{url} accepts {how} (heartbeat as {node})"))
        }
        Err(ClientError::Api { status: 401, message, .. }) => Check::fail(
            "credentials",
            format!("{url} refuses {how}: {message}"),
            if has_token {
                "the token file must hold the coordinator's token (--token-file, token_file)"
            } else {
                "give the coordinator's token with --token-file, or a node certificate with --tls"
            },
        ),
        Err(ClientError::Api { status: 403, message, .. }) => Check::fail(
            "credentials",
            format!("{url} forbids {node}: {message}"),
            "a banned node needs `virtman node unban`; a certificate acts only as the node it names",
        ),
        Err(e) => Check::fail("credentials", format!("{url}: heartbeat failed: {e}"), "see the coordinator's log"),
    });
    out.push(skew(url, health.date.as_deref(), sent, answered));
    out
}

/// The clock check from the coordinator's `Date` header, taken as the
/// middle of the request (the header has whole seconds).
fn skew(url: &str, date: Option<&str>, sent: SystemTime, answered: SystemTime) -> Check {
    let Some(date) = date else {
        return Check::warn(
            "clock",
            format!("{url} sent no Date header"),
            "compare the clocks by hand",
        );
    };
    let Ok(theirs) = httpdate::parse_http_date(date) else {
        return Check::warn(
            "clock",
            format!("{url} sent a Date header {date:?} that does not parse"),
            "compare the clocks by hand",
        );
    };
    let half = answered.duration_since(sent).unwrap_or_default() / 2;
    let ours = sent + half;
    let (skew, ahead) = match theirs.duration_since(ours) {
        Ok(d) => (d, "ahead of"),
        Err(e) => (e.duration(), "behind"),
    };
    // Date has whole seconds: up to a second of the difference is rounding.
    let said = format!(
        "{url}'s clock is {:.1} s {ahead} this host's",
        skew.as_secs_f64()
    );
    if skew <= SKEW_WARN {
        Check::ok("clock", said)
    } else {
        Check::warn(
            "clock",
            said,
            "run NTP (chrony or systemd-timesyncd) on both hosts",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::Level;
    use super::*;

    #[test]
    fn skew_is_measured_from_the_date_header() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let date = |t: SystemTime| httpdate::fmt_http_date(t);
        assert_eq!(skew("u", Some(&date(now)), now, now).level, Level::Ok);
        let c = skew("u", Some(&date(now + Duration::from_secs(30))), now, now);
        assert_eq!(c.level, Level::Warn);
        assert!(c.detail.contains("30.0 s ahead of"), "{}", c.line());
        let c = skew("u", Some(&date(now - Duration::from_secs(90))), now, now);
        assert!(c.detail.contains("90.0 s behind"), "{}", c.line());
        assert_eq!(skew("u", None, now, now).level, Level::Warn);
        assert_eq!(skew("u", Some("yesterday"), now, now).level, Level::Warn);
    }
}
