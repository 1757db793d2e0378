//! Parsing of sizes given on the command line.

/// Parses a byte size: `65536`, `64K`, `64KiB`, `512M`, `10G`, `1T` (powers
/// of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_uppercase();
    let t = t
        .strip_suffix("IB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(&t);
    let (num, shift) = match t.chars().last() {
        Some('K') => (&t[..t.len() - 1], 10),
        Some('M') => (&t[..t.len() - 1], 20),
        Some('G') => (&t[..t.len() - 1], 30),
        Some('T') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1u64 << shift))
        .ok_or_else(|| format!("{s:?} is not a size (e.g. 65536, 256K, 512M, 10G)"))
}

/// Parses a cap or link rate (`1G`, `100M`, `1gbit`, `125MB/s`: bits a
/// second unless given in bytes) into bytes a second. 0, negative and
/// unparsable rates are refused.
pub fn parse_rate_bytes(s: &str) -> Result<u64, String> {
    let bits = virtman_sim::config::parse_rate(s)?;
    // Whole bytes a second; a rate is far below 2^53.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let bytes = (bits / 8.0).round() as u64;
    if bytes == 0 {
        return Err(format!(
            "{s:?} is no rate: a cap of 0 would stop all traffic (leave the cap out, or say off, for none)"
        ));
    }
    Ok(bytes)
}

/// A cap given to `virtman agent set`: bytes a second, or none (`off`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cap(pub Option<u64>);

/// Parses a [`Cap`]: a rate, or `off`.
pub fn parse_cap(s: &str) -> Result<Cap, String> {
    match s.trim() {
        "off" | "none" => Ok(Cap(None)),
        r => parse_rate_bytes(r).map(|b| Cap(Some(b))),
    }
}

/// Bytes a second, for a human (`125.0 MB/s (1 Gbit/s)`).
pub fn human_rate(bytes_per_sec: u64) -> String {
    #[allow(clippy::cast_precision_loss)]
    let b = bytes_per_sec as f64;
    let (v, unit) = if b >= 1e9 {
        (b / 1e9, "GB/s")
    } else if b >= 1e6 {
        (b / 1e6, "MB/s")
    } else if b >= 1e3 {
        (b / 1e3, "kB/s")
    } else {
        (b, "B/s")
    };
    let bits = b * 8.0;
    let (bv, bunit) = if bits >= 1e9 {
        (bits / 1e9, "Gbit/s")
    } else if bits >= 1e6 {
        (bits / 1e6, "Mbit/s")
    } else {
        (bits / 1e3, "kbit/s")
    };
    format!("{v:.1} {unit} ({bv:.3} {bunit})")
}

/// Parses `KEY=VALUE` labels (as `--labels` takes them).
pub fn parse_labels(list: &[String]) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    let mut labels = std::collections::BTreeMap::new();
    for l in list {
        let Some((k, v)) = l.split_once('=') else {
            anyhow::bail!("label {l:?} is not KEY=VALUE");
        };
        labels.insert(k.trim().to_owned(), v.trim().to_owned());
    }
    Ok(labels)
}

/// Bytes in binary units: exact when the size is a whole number of the unit
/// (`256 KiB`), else with one decimal (`1.5 GiB`).
pub fn human(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut u = 0;
    while u + 1 < UNITS.len() && b >= 1u64 << (10 * (u + 1)) {
        u += 1;
    }
    let unit = 1u64 << (10 * u);
    if b.is_multiple_of(unit) {
        format!("{} {}", b / unit, UNITS[u])
    } else {
        format!("{:.1} {}", b as f64 / unit as f64, UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::{human, human_rate, parse_cap, parse_rate_bytes, parse_size};

    #[test]
    fn rates_in_bits_or_bytes_and_bad_ones_refused() {
        assert_eq!(parse_rate_bytes("1G"), Ok(125_000_000));
        assert_eq!(parse_rate_bytes("1gbit"), Ok(125_000_000));
        assert_eq!(parse_rate_bytes("100mbit"), Ok(12_500_000));
        assert_eq!(parse_rate_bytes("125MB/s"), Ok(125_000_000));
        for bad in ["0", "0M", "-5M", "fast", "", "1.5.2G"] {
            let e = parse_rate_bytes(bad).unwrap_err();
            assert!(e.contains(bad) || bad.is_empty(), "{bad}: {e}");
        }
        assert!(
            parse_rate_bytes("0")
                .unwrap_err()
                .contains("stop all traffic")
        );
        assert_eq!(parse_cap("off"), Ok(super::Cap(None)));
        assert_eq!(parse_cap("8kbit"), Ok(super::Cap(Some(1000))));
        assert!(parse_cap("-1").is_err());
        assert_eq!(human_rate(125_000_000), "125.0 MB/s (1.000 Gbit/s)");
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1000), "1000 B");
        assert_eq!(human(256 << 10), "256 KiB");
        assert_eq!(human(3 << 29), "1.5 GiB");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("1m"), Ok(1 << 20));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("2TB"), Ok(2 << 40));
        assert!(parse_size("ten").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
