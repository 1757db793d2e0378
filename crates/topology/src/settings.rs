//! Tunables of a session's tree, and their validation.
//!
//! The defaults are tuned for a boot storm on one rack-scale cluster: fan-out 4
//! keeps a tree of 1,000 hosts at depth 5 (each hop adds latency, not a copy
//! time, because data flows through the tree chunk by chunk), two parents per
//! node let every miss fail over without asking the coordinator, and a 4 s
//! heartbeat timeout (four 1 s heartbeats) repairs the tree well inside a boot.

use std::time::Duration;

/// The largest fan-out accepted; wider trees make one host serve too many.
pub const MAX_FANOUT: u32 = 1024;
/// The largest number of parents per node accepted.
pub const MAX_PARENTS: u32 = 16;

/// Settings of one session's tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Fan-out k: the most tree (primary) children a node may have. At least 2,
    /// so that the depth bound `ceil(log_k N) + 1` means something.
    pub fanout: u32,
    /// The most tree children an origin takes (1 to `fanout`). With 1 (the
    /// default) the origin feeds one relay head, which feeds the rest of the
    /// tree, so each chunk leaves the origin about once per storm; with k
    /// children it would leave k times, once per child. Complete members that
    /// became roots take `fanout` children like any node.
    pub origin_fanout: u32,
    /// Parents per node p: one primary parent (the node's place in the tree)
    /// and up to p - 1 secondary parents in other subtrees, for failover and
    /// load spreading. A node serves at most `fanout * (parents - 1)` secondary
    /// children, so that with every child spreading its reads over its p
    /// parents a node carries about the load of k children.
    pub parents: u32,
    /// A member that has not heartbeated for longer than this is dead.
    pub heartbeat_timeout: Duration,
    /// Distinct children that must report a parent unreachable (within one
    /// heartbeat timeout) before the coordinator declares it dead; below that,
    /// only the reporting child is moved away from it.
    pub report_threshold: u32,
    /// A reported parent whose last heartbeat is older than this is declared
    /// dead at the first report, without waiting for the timeout.
    pub suspect_after: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            fanout: 4,
            origin_fanout: 1,
            parents: 2,
            heartbeat_timeout: Duration::from_secs(4),
            report_threshold: 2,
            suspect_after: Duration::from_secs(2),
        }
    }
}

/// Why a [`Settings`] value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    /// The fan-out is below 2 or above [`MAX_FANOUT`].
    #[error("fan-out must be between 2 and {MAX_FANOUT}, got {0}")]
    Fanout(u32),
    /// The origins' fan-out is 0 or above the fan-out.
    #[error("origin fan-out must be between 1 and the fan-out {fanout}, got {origin_fanout}")]
    OriginFanout {
        /// The origins' fan-out asked for.
        origin_fanout: u32,
        /// The fan-out of other nodes.
        fanout: u32,
    },
    /// The number of parents is 0 or above [`MAX_PARENTS`].
    #[error("parents per node must be between 1 and {MAX_PARENTS}, got {0}")]
    Parents(u32),
    /// The heartbeat timeout is zero.
    #[error("heartbeat timeout must be above zero")]
    Timeout,
    /// The report threshold is zero.
    #[error("report threshold must be at least 1")]
    ReportThreshold,
}

impl Settings {
    /// Checks that the settings describe a tree that can be built.
    pub fn validate(&self) -> Result<(), SettingsError> {
        if !(2..=MAX_FANOUT).contains(&self.fanout) {
            return Err(SettingsError::Fanout(self.fanout));
        }
        if !(1..=self.fanout).contains(&self.origin_fanout) {
            return Err(SettingsError::OriginFanout {
                origin_fanout: self.origin_fanout,
                fanout: self.fanout,
            });
        }
        if !(1..=MAX_PARENTS).contains(&self.parents) {
            return Err(SettingsError::Parents(self.parents));
        }
        if self.heartbeat_timeout.is_zero() {
            return Err(SettingsError::Timeout);
        }
        if self.report_threshold == 0 {
            return Err(SettingsError::ReportThreshold);
        }
        Ok(())
    }

    /// The most secondary children one node may have.
    pub fn secondary_capacity(&self) -> usize {
        usize::try_from(self.fanout.saturating_mul(self.parents.saturating_sub(1)))
            .unwrap_or(usize::MAX)
    }

    /// The deepest a member may sit in a session of `nodes` live nodes
    /// (origins and complete nodes included): `ceil(log_k nodes) + 1`.
    pub fn depth_bound(&self, nodes: usize) -> u32 {
        depth_bound(self.fanout, nodes)
    }
}

/// `ceil(log_k n) + 1`, computed in integers; `n` below 1 counts as 1.
pub fn depth_bound(fanout: u32, n: usize) -> u32 {
    let k = u128::from(fanout.max(2));
    let n = u128::try_from(n.max(1)).unwrap_or(u128::MAX);
    let mut power: u128 = 1;
    let mut exp = 0u32;
    while power < n {
        power = power.saturating_mul(k);
        exp += 1;
    }
    exp + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_bound_matches_the_formula() {
        assert_eq!(depth_bound(2, 1), 1);
        assert_eq!(depth_bound(2, 2), 2);
        assert_eq!(depth_bound(2, 3), 3);
        assert_eq!(depth_bound(2, 4), 3);
        assert_eq!(depth_bound(4, 16), 3);
        assert_eq!(depth_bound(4, 17), 4);
        assert_eq!(depth_bound(10, 10_000), 5);
        assert_eq!(depth_bound(10, 10_001), 6);
    }

    #[test]
    fn absurd_settings_are_refused() {
        let ok = Settings::default();
        assert_eq!(ok.validate(), Ok(()));
        for fanout in [0, 1, MAX_FANOUT + 1] {
            let s = Settings { fanout, ..ok };
            assert_eq!(s.validate(), Err(SettingsError::Fanout(fanout)));
        }
        for origin_fanout in [0, ok.fanout + 1] {
            let s = Settings {
                origin_fanout,
                ..ok
            };
            assert_eq!(
                s.validate(),
                Err(SettingsError::OriginFanout {
                    origin_fanout,
                    fanout: ok.fanout
                })
            );
        }
        let s = Settings { parents: 0, ..ok };
        assert_eq!(s.validate(), Err(SettingsError::Parents(0)));
        let s = Settings {
            heartbeat_timeout: Duration::ZERO,
            ..ok
        };
        assert_eq!(s.validate(), Err(SettingsError::Timeout));
        let s = Settings {
            report_threshold: 0,
            ..ok
        };
        assert_eq!(s.validate(), Err(SettingsError::ReportThreshold));
    }

    #[test]
    fn secondary_capacity_is_k_times_p_minus_one() {
        let s = Settings {
            fanout: 4,
            parents: 3,
            ..Settings::default()
        };
        assert_eq!(s.secondary_capacity(), 8);
        let s = Settings {
            parents: 1,
            ..Settings::default()
        };
        assert_eq!(s.secondary_capacity(), 0);
    }
}
