//! `[retention]`: deletion of old published rows.

use serde::Deserialize;

use super::{defaults, invalid, ConfigError};

/// Deletion of old published rows. Held rows are never deleted.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Delete published rows at all.
    #[serde(default = "defaults::retention_enabled")]
    pub enabled: bool,
    /// Published rows older than this are deleted, in seconds (default 5 days).
    #[serde(default = "defaults::retention_max_age_secs")]
    pub max_age_secs: u64,
    /// Rows deleted per statement: small, so no long locks.
    #[serde(default = "defaults::retention_batch_rows")]
    pub batch_rows: i64,
    /// Pause between retention rounds, in seconds.
    #[serde(default = "defaults::retention_interval_secs")]
    pub interval_secs: u64,
}

impl RetentionConfig {
    /// `batch_rows` is at least 1.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.batch_rows < 1 {
            return invalid("retention.batch_rows", "must be at least 1");
        }
        Ok(())
    }
}
