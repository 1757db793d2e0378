//! Checks of request values beyond what their types say, so that absurd
//! input is refused with a message before it reaches the state machines.
//!
//! ```text
//!   image name   1..=128 of  A-Z a-z 0-9 . _ : -
//!   node name    1..=128 of  A-Z a-z 0-9 . _ -      (":" is kept for origin:N)
//!   address      1..=256 printable, no spaces        labels <= 32, 1..=64 chars each
//!   digest       64 lowercase hex                     origins 1..=16, distinct
//!   progress     0..=1                                sessions per heartbeat <= 1024
//! ```

use std::collections::BTreeSet;

use crate::api::{HeartbeatRequest, JoinRequest, PreheatRequest, RegisterImage};
use crate::error::ApiError;

const MAX_NAME: usize = 128;
const MAX_ADDR: usize = 256;
const MAX_LABELS: usize = 32;
const MAX_LABEL: usize = 64;
const MAX_ORIGINS: usize = 16;
/// The most sessions one heartbeat may carry.
pub const MAX_SESSIONS: usize = 1024;

fn name_with(what: &str, s: &str, extra: &[char]) -> Result<(), ApiError> {
    let ok_char =
        |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') || extra.contains(&c);
    if s.is_empty() || s.len() > MAX_NAME || !s.chars().all(ok_char) {
        return Err(ApiError::bad_request(format!(
            "{what} {s:?} must be 1 to {MAX_NAME} characters of A-Z a-z 0-9 . _ -{}",
            if extra.is_empty() { "" } else { " :" }
        )));
    }
    Ok(())
}

/// An image name.
pub fn image_name(s: &str) -> Result<(), ApiError> {
    name_with("image name", s, &[':'])
}

/// A node name.
pub fn node_name(s: &str) -> Result<(), ApiError> {
    name_with("node name", s, &[])
}

fn addr(s: &str) -> Result<(), ApiError> {
    if s.is_empty() || s.len() > MAX_ADDR || !s.chars().all(|c| c.is_ascii_graphic()) {
        return Err(ApiError::bad_request(format!(
            "address {s:?} must be 1 to {MAX_ADDR} printable characters without spaces"
        )));
    }
    Ok(())
}

/// An image registration.
pub fn image(req: &RegisterImage) -> Result<(), ApiError> {
    image_name(&req.name)?;
    if req.size == 0 {
        return Err(ApiError::bad_request("image size must be above zero"));
    }
    let d = &req.manifest_digest;
    if d.len() != 64
        || !d
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    {
        return Err(ApiError::bad_request(
            "manifest digest must be 64 lowercase hex digits (BLAKE3)",
        ));
    }
    if req.origins.is_empty() || req.origins.len() > MAX_ORIGINS {
        return Err(ApiError::bad_request(format!(
            "an image needs 1 to {MAX_ORIGINS} origins"
        )));
    }
    let mut seen = BTreeSet::new();
    for o in &req.origins {
        addr(o)?;
        if !seen.insert(o) {
            return Err(ApiError::bad_request(format!(
                "origin {o:?} is listed twice"
            )));
        }
    }
    Ok(())
}

/// A join.
pub fn join(req: &JoinRequest) -> Result<(), ApiError> {
    node_name(&req.node)?;
    addr(&req.addr)?;
    labels(&req.labels)
}

fn labels(labels: &std::collections::BTreeMap<String, String>) -> Result<(), ApiError> {
    if labels.len() > MAX_LABELS {
        return Err(ApiError::bad_request(format!(
            "at most {MAX_LABELS} labels"
        )));
    }
    for (k, v) in labels {
        for s in [k, v] {
            if s.is_empty() || s.len() > MAX_LABEL || s.chars().any(char::is_control) {
                return Err(ApiError::bad_request(format!(
                    "label {s:?} must be 1 to {MAX_LABEL} characters, no control characters"
                )));
            }
        }
    }
    Ok(())
}

/// The most hosts one preheat order may name.
pub const MAX_PREHEAT_HOSTS: usize = 10_000;

/// A preheat order.
pub fn preheat(req: &PreheatRequest) -> Result<(), ApiError> {
    labels(&req.labels)?;
    if req.hosts.len() > MAX_PREHEAT_HOSTS {
        return Err(ApiError::bad_request(format!(
            "at most {MAX_PREHEAT_HOSTS} hosts per preheat"
        )));
    }
    for h in &req.hosts {
        node_name(h)?;
    }
    Ok(())
}

/// A heartbeat.
pub fn heartbeat(req: &HeartbeatRequest) -> Result<(), ApiError> {
    node_name(&req.node)?;
    if req.sessions.len() > MAX_SESSIONS {
        return Err(ApiError::bad_request(format!(
            "at most {MAX_SESSIONS} sessions per heartbeat"
        )));
    }
    let mut seen = BTreeSet::new();
    for beat in &req.sessions {
        image_name(&beat.image)?;
        if !seen.insert(beat.image.as_str()) {
            return Err(ApiError::bad_request(format!(
                "image {:?} is listed twice",
                beat.image
            )));
        }
        if !beat.progress.is_finite() || !(0.0..=1.0).contains(&beat.progress) {
            return Err(ApiError::bad_request(format!(
                "progress {} of image {:?} must be between 0 and 1",
                beat.progress, beat.image
            )));
        }
    }
    labels(&req.labels)?;
    if req.preheats.len() > MAX_SESSIONS {
        return Err(ApiError::bad_request(format!(
            "at most {MAX_SESSIONS} preheat reports per heartbeat"
        )));
    }
    for r in &req.preheats {
        image_name(&r.image)?;
        if r.message.len() > 1024 {
            return Err(ApiError::bad_request(
                "a preheat report's message is at most 1024 bytes",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(image_name("debian-12:amd64").is_ok());
        assert!(node_name("host-01.rack2").is_ok());
        assert!(node_name("origin:0").is_err());
        assert!(node_name("").is_err());
        assert!(node_name("a b").is_err());
        assert!(node_name(&"x".repeat(129)).is_err());
        assert!(image_name("../etc").is_err());
    }
}
