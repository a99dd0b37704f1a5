//! `[source]`: how outbox rows are read.

use serde::Deserialize;

use super::{at_least_one, defaults, identifiers, ConfigError};

/// How outbox rows are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceMode {
    /// Logical replication with `pgoutput`: rows in commit order, pushed.
    Logical,
    /// Ordered polling, for databases without logical replication.
    Poll,
}

/// The source stage.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// `logical` (default) or `poll`.
    #[serde(default = "defaults::source_mode")]
    pub mode: SourceMode,
    /// Name of the logical replication slot.
    #[serde(default = "defaults::slot_name")]
    pub slot_name: String,
    /// Name of the publication on the outbox table (inserts only).
    #[serde(default = "defaults::publication_name")]
    pub publication_name: String,
    /// Create the publication and slot at start-up when they are missing.
    #[serde(default = "defaults::create_slot")]
    pub create_slot: bool,
    /// How often the relay reports its confirmed position to Postgres, in milliseconds.
    #[serde(default = "defaults::status_interval_ms")]
    pub status_interval_ms: u64,
    /// Poll mode: fallback interval when no notification arrives, in milliseconds.
    #[serde(default = "defaults::poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// Rows read per batch.
    #[serde(default = "defaults::source_batch_rows")]
    pub batch_rows: usize,
    /// Poll mode and the catch-up phase: upper bound of one batch's payloads,
    /// in bytes, cut in the query by stored size (a single larger row still
    /// goes, alone).
    #[serde(default = "defaults::source_batch_max_bytes")]
    pub batch_max_bytes: usize,
    /// Logical mode: WAL the slot may retain, in bytes, before the relay
    /// drops it to protect the database's disk and recovers through the
    /// catch-up phase (no loss, some duplicates). 0 = no budget (default):
    /// Postgres' own `max_slot_wal_keep_size` still applies.
    #[serde(default)]
    pub max_slot_wal_bytes: u64,
}

impl SourceConfig {
    /// The slot and publication names, and the batch bounds.
    pub fn validate(&self) -> Result<(), ConfigError> {
        identifiers(&[("source.slot_name", &self.slot_name), ("source.publication_name", &self.publication_name)])?;
        at_least_one(&[("source.batch_rows", self.batch_rows), ("source.batch_max_bytes", self.batch_max_bytes)])
    }
}
