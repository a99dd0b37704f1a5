//! `[outbox]`: the outbox table and its column names.

use serde::Deserialize;

use super::{defaults, identifiers, invalid, ConfigError};

/// The outbox table and, for teams with an existing outbox, its column names.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxConfig {
    /// Schema of the outbox table.
    #[serde(default = "defaults::outbox_schema")]
    pub schema: String,
    /// Name of the outbox table.
    #[serde(default = "defaults::outbox_table")]
    pub table: String,
    /// Column names of the read side, when they differ from the default layout.
    #[serde(default)]
    pub columns: ColumnNames,
}

/// Column names of the outbox table's read side.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ColumnNames {
    pub id: String,
    pub event_id: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    pub kind: String,
    pub entity_version: String,
    pub payload: String,
    pub headers: String,
    pub occurred_at: String,
}

impl OutboxConfig {
    /// The table's schema and name (spliced into SQL, so identifiers), and
    /// the column names (quoted wherever used).
    pub fn validate(&self) -> Result<(), ConfigError> {
        identifiers(&[("outbox.schema", &self.schema), ("outbox.table", &self.table)])?;
        let c = &self.columns;
        for (key, name) in [
            ("outbox.columns.id", &c.id),
            ("outbox.columns.event_id", &c.event_id),
            ("outbox.columns.aggregate_type", &c.aggregate_type),
            ("outbox.columns.aggregate_id", &c.aggregate_id),
            ("outbox.columns.event_type", &c.event_type),
            ("outbox.columns.kind", &c.kind),
            ("outbox.columns.entity_version", &c.entity_version),
            ("outbox.columns.payload", &c.payload),
            ("outbox.columns.headers", &c.headers),
            ("outbox.columns.occurred_at", &c.occurred_at),
        ] {
            // Quoted wherever used, so any name Postgres accepts is safe.
            if name.is_empty() || name.len() > 63 || name.contains('\0') {
                return invalid(key, format!("`{name}` is not a column name (1 to 63 bytes, no NUL)"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, MINIMAL};

    #[test]
    fn column_names_are_checked() {
        let toml = format!("{MINIMAL}\n[outbox.columns]\nid = \"\"");
        let err = Config::from_toml_str(&toml).expect_err("must fail").to_string();
        assert!(err.contains("outbox.columns.id"), "{err}");
        // Any name Postgres accepts is fine: it is quoted wherever used.
        let toml = format!("{MINIMAL}\n[outbox.columns]\naggregate_id = \"Aggregate \\\"Id\\\"\"");
        assert!(Config::from_toml_str(&toml).is_ok());
    }
}
