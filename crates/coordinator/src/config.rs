//! The coordinator's tunables, separate from its running state.
//!
//! Defaults are tuned for a boot storm that lasts tens of seconds: 1 s
//! heartbeats and a 4 s timeout find a dead parent within about 4 s (children
//! fail over to their other parents at once, without waiting for that), where
//! VMThunder's 20 s heartbeat lasted as long as a whole boot.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use virtman_topology::Settings;

/// Tunables of one coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorConfig {
    /// Fan-out k of every tree (2 to 1024).
    pub fanout: u32,
    /// The most tree children an origin takes (1 to the fan-out): 1 makes the
    /// origin feed a single relay head, so each chunk leaves it about once.
    pub origin_fanout: u32,
    /// Parents per node p (1 to 16).
    pub parents: u32,
    /// Stripes S of an image registered without its own (1 to 64): chunk i
    /// follows stripe i mod S's tree and every host relays one stripe; 1 is
    /// one tree. The default, 4, is the default fan-out: a forest whose
    /// hosts each upload about what they download. An image registered
    /// with its own fan-out gets as many stripes ([`Self::stripes_for`]).
    pub stripes: u32,
    /// How often nodes are told to heartbeat, in milliseconds.
    pub heartbeat_interval_ms: u64,
    /// Silence after which a node is dead, in milliseconds; above the interval.
    pub heartbeat_timeout_ms: u64,
    /// Distinct children that must report a parent before it is declared dead.
    pub report_threshold: u32,
    /// A reported parent silent for this long (ms) is declared dead at once.
    pub suspect_after_ms: u64,
    /// How often the state task checks for timeouts, in milliseconds.
    pub tick_ms: u64,
    /// The largest request body accepted, in bytes.
    pub max_body_bytes: usize,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            fanout: 4,
            origin_fanout: 1,
            parents: 2,
            stripes: 4,
            heartbeat_interval_ms: 1_000,
            heartbeat_timeout_ms: 4_000,
            report_threshold: 2,
            suspect_after_ms: 2_000,
            tick_ms: 250,
            max_body_bytes: 256 * 1024,
        }
    }
}

impl CoordinatorConfig {
    /// The stripe count of an image registered without one, with its own
    /// fan-out or none: one tree if the default is, else a forest of the
    /// image's fan-out (capped at [`virtman_topology::MAX_STRIPES`]), or
    /// of the default count. A forest needs its fan-out equal to its
    /// stripes, or its relays cannot upload what they download (16 hosts at
    /// 100 Mbit/s: 2 stripes at fan-out 4 took 1.5x as long as at 2).
    pub fn stripes_for(&self, fanout: Option<u32>) -> u32 {
        match fanout {
            Some(k) if self.stripes > 1 => k.clamp(1, virtman_topology::MAX_STRIPES),
            _ => self.stripes,
        }
    }

    /// The tree settings, checked.
    pub fn settings(&self) -> Result<Settings, String> {
        if self.heartbeat_interval_ms == 0 {
            return Err("heartbeat interval must be above zero".into());
        }
        if self.heartbeat_timeout_ms <= self.heartbeat_interval_ms {
            return Err(format!(
                "heartbeat timeout ({} ms) must be longer than the interval ({} ms)",
                self.heartbeat_timeout_ms, self.heartbeat_interval_ms
            ));
        }
        if self.tick_ms == 0 || self.tick_ms > self.heartbeat_timeout_ms {
            return Err("tick must be between 1 ms and the heartbeat timeout".into());
        }
        if !(1..=virtman_topology::MAX_STRIPES).contains(&self.stripes) {
            return Err(format!(
                "stripes must be between 1 and {}, got {}",
                virtman_topology::MAX_STRIPES,
                self.stripes
            ));
        }
        if self.max_body_bytes < 1024 {
            return Err("max body size must be at least 1024 bytes".into());
        }
        let settings = Settings {
            fanout: self.fanout,
            origin_fanout: self.origin_fanout,
            parents: self.parents,
            heartbeat_timeout: Duration::from_millis(self.heartbeat_timeout_ms),
            report_threshold: self.report_threshold,
            suspect_after: Duration::from_millis(self.suspect_after_ms),
        };
        settings.validate().map_err(|e| e.to_string())?;
        Ok(settings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_absurd_values_are_not() {
        assert!(CoordinatorConfig::default().settings().is_ok());
        let bad = [
            CoordinatorConfig {
                fanout: 0,
                ..Default::default()
            },
            CoordinatorConfig {
                fanout: 1,
                ..Default::default()
            },
            CoordinatorConfig {
                parents: 0,
                ..Default::default()
            },
            CoordinatorConfig {
                origin_fanout: 0,
                ..Default::default()
            },
            CoordinatorConfig {
                fanout: 4,
                origin_fanout: 5,
                ..Default::default()
            },
            CoordinatorConfig {
                heartbeat_interval_ms: 0,
                ..Default::default()
            },
            CoordinatorConfig {
                heartbeat_timeout_ms: 1_000,
                ..Default::default()
            },
            CoordinatorConfig {
                tick_ms: 0,
                ..Default::default()
            },
            CoordinatorConfig {
                max_body_bytes: 10,
                ..Default::default()
            },
        ];
        for c in bad {
            assert!(c.settings().is_err(), "{c:?}");
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = serde_json::from_str::<CoordinatorConfig>(r#"{"fanout": 3, "fan_out": 4}"#);
        assert!(err.is_err());
        let ok: CoordinatorConfig = serde_json::from_str(r#"{"fanout": 3}"#).expect("parse");
        assert_eq!(ok.fanout, 3);
        assert_eq!(ok.parents, 2);
    }
}
