//! How option values look in a config file, shared by the agent's and the
//! coordinator's options: sizes (`"10G"` or bytes), durations (`"5s"`,
//! `"250ms"`), rates (`"1G"`: bits a second, or `"60MB/s"`) and listen
//! addresses (`"0.0.0.0:10810"`). Each reads what the command line takes (the
//! same parsers) and writes a form that reads back to the same value.

use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serializer};

/// Checks a listen address: `IP:PORT`, `[IPv6]:PORT` or `HOST:PORT` (a host
/// name is resolved when the server binds).
pub fn parse_listen(s: &str) -> Result<String, String> {
    let bad =
        || format!("{s:?} is not a listen address (e.g. 0.0.0.0:10810, [::]:7600, localhost:7600)");
    if s.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(s.to_owned());
    }
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host
            .split('.')
            .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    if !host_ok || port.parse::<u16>().is_err() {
        return Err(bad());
    }
    Ok(s.to_owned())
}

/// A size as the file writes it: the largest binary unit that divides it
/// exactly (`10G`, `512M`), else bytes.
pub fn format_size(bytes: u64) -> String {
    for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        let n = 1u64 << shift;
        if bytes >= n && bytes.is_multiple_of(n) {
            return format!("{}{unit}", bytes / n);
        }
    }
    bytes.to_string()
}

/// A duration as the file writes it: whole seconds (`5s`), else
/// milliseconds, with a fraction where needed (`250ms`, `0.2ms`).
pub fn format_duration(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos.is_multiple_of(1_000_000_000) {
        return format!("{}s", nanos / 1_000_000_000);
    }
    let (ms, frac) = (nanos / 1_000_000, nanos % 1_000_000);
    if frac == 0 {
        return format!("{ms}ms");
    }
    let frac = format!("{frac:06}");
    format!("{ms}.{}ms", frac.trim_end_matches('0'))
}

/// `#[serde(with)]` for a size in bytes.
pub mod size {
    use super::{Deserializer, Serializer, Visitor, de, format_size};

    /// Writes `format_size(bytes)`.
    pub fn serialize<S: Serializer>(bytes: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_size(*bytes))
    }

    /// Reads a number of bytes or a size string; a negative one is refused.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        d.deserialize_any(SizeVisitor)
    }

    struct SizeVisitor;

    impl Visitor<'_> for SizeVisitor {
        type Value = u64;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a size such as \"10G\" or \"512M\", or a number of bytes")
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::custom(format!("a size cannot be negative ({v})")))
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
            if v.trim_start().starts_with('-') {
                return Err(E::custom(format!("a size cannot be negative ({v:?})")));
            }
            crate::units::parse_size(v).map_err(E::custom)
        }
    }
}

/// `#[serde(with)]` for a duration.
pub mod duration {
    use super::{Deserialize, Deserializer, Duration, Serializer, de, format_duration};

    /// Writes `format_duration(d)`.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(*d))
    }

    /// Reads `500ms`, `2s`, `1m` (as the command line does).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        crate::coordinator::parse_duration(&s).map_err(de::Error::custom)
    }
}

/// `#[serde(with)]` for an optional duration.
pub mod opt_duration {
    use super::{Deserializer, Duration, Serializer};

    /// Writes the duration (a `None` field is left out of the file).
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::duration::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    /// Reads a duration (a missing key is `None`).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        super::duration::deserialize(d).map(Some)
    }
}

/// `#[serde(with)]` for an optional rate in bytes a second.
pub mod opt_rate {
    use super::{Deserialize, Deserializer, Serializer, de};

    /// Writes `N B/s` in whole bytes (the rate kept, without rounding).
    pub fn serialize<S: Serializer>(r: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match r {
            Some(b) => s.serialize_str(&format!("{b}B/s")),
            None => s.serialize_none(),
        }
    }

    /// Reads a rate as the command line does (`1G`, `500mbit`, `60MB/s`).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        let s = String::deserialize(d)?;
        crate::units::parse_rate_bytes(&s)
            .map(Some)
            .map_err(de::Error::custom)
    }
}

/// `#[serde(deserialize_with = "count_in::<_, LO, HI>")]`: a whole number
/// from `LO` to `HI` (fan-outs, parents).
pub fn count_in<'de, D: Deserializer<'de>, const LO: u32, const HI: u32>(
    d: D,
) -> Result<u32, D::Error> {
    let v = i64::deserialize(d)?;
    u32::try_from(v)
        .ok()
        .filter(|v| (LO..=HI).contains(v))
        .ok_or_else(|| de::Error::custom(format!("{v} is out of range ({LO} to {HI})")))
}

/// `#[serde(deserialize_with)]` for a listen address.
pub fn listen<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    parse_listen(&s).map_err(de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        for ok in [
            "0.0.0.0:10810",
            "127.0.0.1:0",
            "[::]:7600",
            "localhost:7600",
            "a-b.c:1",
        ] {
            assert_eq!(parse_listen(ok).as_deref(), Ok(ok));
        }
        for bad in [
            "",
            "10810",
            "0.0.0.0",
            "host:",
            ":80",
            "host:70000",
            "a b:1",
            "1.2.3.4:x",
        ] {
            let e = parse_listen(bad).unwrap_err();
            assert!(e.contains("is not a listen address"), "{bad}: {e}");
        }
    }

    #[test]
    fn sizes_and_durations_read_back_to_the_same() {
        for b in [0, 1, 1000, 4096, 10 << 30, 3 << 29, 5 << 40, u64::MAX] {
            assert_eq!(crate::units::parse_size(&format_size(b)), Ok(b), "{b}");
        }
        assert_eq!(format_size(10 << 30), "10G");
        for d in [
            Duration::ZERO,
            Duration::from_secs(5),
            Duration::from_millis(250),
            Duration::from_micros(200),
            Duration::from_micros(1500),
            Duration::from_secs(600),
        ] {
            let text = format_duration(d);
            assert_eq!(crate::coordinator::parse_duration(&text), Ok(d), "{text}");
        }
        assert_eq!(format_duration(Duration::from_micros(200)), "0.2ms");
    }
}
