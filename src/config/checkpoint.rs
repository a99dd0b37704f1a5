//! `[checkpoint]`: publish-state recording and position confirmation.

use serde::Deserialize;

use super::{at_least_one, defaults, invalid, ConfigError, SourceMode};

/// Publish-state recording and position confirmation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Acknowledged rows recorded in one round trip at most.
    #[serde(default = "defaults::checkpoint_batch_rows")]
    pub batch_rows: usize,
    /// Longest wait before acknowledged rows are recorded, in milliseconds.
    #[serde(default = "defaults::checkpoint_flush_interval_ms")]
    pub flush_interval_ms: u64,
    /// Deliveries awaiting their acknowledgement at most (bounds memory).
    #[serde(default = "defaults::max_in_flight")]
    pub max_in_flight: usize,
    /// Where a published row's state is recorded.
    #[serde(default)]
    pub publish_state: PublishStateLayout,
}

/// Where the relay records that a row was published (`checkpoint.publish_state`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PublishStateLayout {
    /// In the outbox row itself (`published_at`, `kafka_topic`,
    /// `kafka_partition`, `kafka_offset`, `attempts`): one `UPDATE` of
    /// the row per published row.
    #[default]
    OutboxRow,
    /// In the side table `<table>_relay_published`, one `INSERT` per
    /// published row; the outbox row is written only for held rows. About
    /// a third of the Postgres work; logical mode only. The view
    /// `<table>_publish_state` shows both layouts alike.
    SideTable,
}

impl CheckpointConfig {
    /// The batch bounds, and checkpoint.publish_state against `source_mode`
    /// (`source.mode`).
    pub fn validate(&self, source_mode: SourceMode) -> Result<(), ConfigError> {
        at_least_one(&[("checkpoint.batch_rows", self.batch_rows), ("checkpoint.max_in_flight", self.max_in_flight)])?;
        if self.publish_state == PublishStateLayout::SideTable && source_mode == SourceMode::Poll {
            return invalid(
                "checkpoint.publish_state",
                "\"side_table\" needs source.mode = \"logical\": poll mode finds the rows to publish through the outbox row's own `published_at`. Use \"outbox_row\" (the default) with poll mode",
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, MINIMAL};

    #[test]
    fn the_side_table_layout_is_refused_in_poll_mode_and_names_the_key() {
        let side = format!("{MINIMAL}\n[checkpoint]\npublish_state = \"side_table\"");
        let config = Config::from_toml_str(&side).expect("side table in logical mode");
        assert_eq!(config.checkpoint.publish_state, PublishStateLayout::SideTable);
        let err =
            Config::from_toml_str(&format!("{side}\n[source]\nmode = \"poll\"")).expect_err("must fail").to_string();
        assert!(err.contains("checkpoint.publish_state") && err.contains("source.mode"), "{err}");
        let err = Config::from_toml_str(&format!("{MINIMAL}\n[checkpoint]\npublish_state = \"beside\""))
            .expect_err("unknown layout")
            .to_string();
        assert!(err.contains("side_table") && err.contains("outbox_row"), "{err}");
    }
}
