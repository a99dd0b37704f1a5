//! `[leader]`: the lease of the active relay of a group.

use serde::Deserialize;

use super::{defaults, invalid, ConfigError};

/// The lease that makes one relay of a group (the sidecars sharing an
/// outbox and `source.slot_name`) the active one.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaderConfig {
    /// How often the active relay renews its lease, in milliseconds; a
    /// standby looks for an expired lease this often too (a released one
    /// wakes it at once).
    #[serde(default = "defaults::renew_interval_ms")]
    pub renew_interval_ms: u64,
    /// How long a lease lasts from its last renewal, in milliseconds. The
    /// active relay stops producing when it could not renew within this
    /// time; a standby takes over only once it ran out. Failover after a
    /// crash or a pause takes about this long.
    #[serde(default = "defaults::lease_timeout_ms")]
    pub lease_timeout_ms: u64,
}

impl LeaderConfig {
    /// The renewal interval, and a lease of at least two renewals.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.renew_interval_ms < 10 {
            return invalid("leader.renew_interval_ms", "must be at least 10");
        }
        if self.lease_timeout_ms < 2 * self.renew_interval_ms {
            return invalid(
                "leader.lease_timeout_ms",
                format!(
                    "must be at least twice leader.renew_interval_ms ({} ms), so one late renewal does not cost the lease",
                    self.renew_interval_ms
                ),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, MINIMAL};

    #[test]
    fn lease_shorter_than_two_renewals_is_refused() {
        let config = Config::from_toml_str(MINIMAL).expect("minimal config");
        assert_eq!((config.leader.renew_interval_ms, config.leader.lease_timeout_ms), (1_000, 5_000));
        let toml = format!("{MINIMAL}\n[leader]\nrenew_interval_ms = 1000\nlease_timeout_ms = 1500");
        let err = Config::from_toml_str(&toml).expect_err("must fail").to_string();
        assert!(err.contains("leader.lease_timeout_ms") && err.contains("twice"), "{err}");
        let toml = format!("{MINIMAL}\n[leader]\nrenew_interval = 1000");
        let err = Config::from_toml_str(&toml).expect_err("must fail").to_string();
        assert!(err.contains("leader.renew_interval") && err.contains("lease_timeout_ms"), "{err}");
    }
}
