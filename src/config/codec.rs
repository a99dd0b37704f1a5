//! `[codec]`: how payloads and keys are encoded.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;

use super::{defaults, invalid, ConfigError, RegistryConfig};

/// Payload encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PayloadFormat {
    /// The row's JSON payload as UTF-8 bytes.
    Json,
    /// Avro in the Confluent wire format, schemas from the registry.
    Avro,
}

/// How registry subjects are named (Confluent's subject name strategies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubjectStrategy {
    /// `<topic>-value`: one schema per topic.
    Topic,
    /// `<record full name>`: one schema per record type, across topics.
    Record,
    /// `<topic>-<record full name>`: several event types on one topic, which
    /// per-entity order needs (one topic per entity type).
    TopicRecord,
}

/// A registry subject's compatibility level (`codec.compatibility`), named
/// as the registry's API names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Compatibility {
    /// A new schema reads data written with the latest one (the default).
    Backward,
    /// A new schema reads data written with every earlier one.
    BackwardTransitive,
    /// Data written with a new schema is read with the latest one.
    Forward,
    /// Data written with a new schema is read with every earlier one.
    ForwardTransitive,
    /// Backward and forward against the latest schema.
    Full,
    /// Backward and forward against every earlier schema.
    FullTransitive,
    /// No check.
    None,
}

impl Compatibility {
    /// The registry's name of the level, e.g. `BACKWARD_TRANSITIVE`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Backward => "BACKWARD",
            Self::BackwardTransitive => "BACKWARD_TRANSITIVE",
            Self::Forward => "FORWARD",
            Self::ForwardTransitive => "FORWARD_TRANSITIVE",
            Self::Full => "FULL",
            Self::FullTransitive => "FULL_TRANSITIVE",
            Self::None => "NONE",
        }
    }
}

impl fmt::Display for Compatibility {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The codec stage.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CodecConfig {
    /// `json` (default) or `avro`.
    #[serde(default = "defaults::payload_format")]
    pub format: PayloadFormat,
    /// Folder of the `.avsc` files named in `schemas`.
    #[serde(default = "defaults::schemas_dir")]
    pub schemas_dir: PathBuf,
    /// Schema file per `"<aggregate_type>/<event_type>"`, with a default per
    /// `"<aggregate_type>"`.
    #[serde(default)]
    pub schemas: BTreeMap<String, String>,
    /// The same, for state messages (rows of `kind = 'state'`, on the state
    /// topics): schema file per `"<aggregate_type>/<event_type>"` or
    /// `"<aggregate_type>"`. A tombstone (NULL payload) needs no schema.
    #[serde(default)]
    pub state_schemas: BTreeMap<String, String>,
    /// `topic_record` (default), `topic` or `record`.
    #[serde(default = "defaults::subject_strategy")]
    pub subject_strategy: SubjectStrategy,
    /// Compatibility level `relay schemas register` sets on each subject
    /// (BACKWARD, FORWARD, FULL, their _TRANSITIVE forms, or NONE).
    #[serde(default = "defaults::compatibility")]
    pub compatibility: Compatibility,
    /// Register missing schemas at start-up instead of requiring
    /// `relay schemas register` (off: schemas are governed, not improvised).
    #[serde(default)]
    pub auto_register: bool,
    /// The record key: `string` (the entity id as UTF-8, default) or `avro`
    /// (an Avro string in the Confluent wire format, subject `<topic>-key`),
    /// for consumers that use a registry-aware key deserializer.
    #[serde(default = "defaults::key_format")]
    pub key_format: KeyFormat,
}

impl CodecConfig {
    /// codec.*, and `registry.url` where the codec needs a registry.
    pub fn validate(&self, registry: &RegistryConfig) -> Result<(), ConfigError> {
        if self.format == PayloadFormat::Avro && self.schemas.is_empty() && self.state_schemas.is_empty() {
            return invalid(
                "codec.schemas",
                "codec.format = \"avro\" needs at least one schema, e.g. order = \"order/OrderPlaced.avsc\"",
            );
        }
        if self.format == PayloadFormat::Avro && registry.url.is_empty() {
            return invalid(
                "registry.url",
                "codec.format = \"avro\" needs a schema registry URL (or set codec.format = \"json\")",
            );
        }
        Ok(())
    }
}

/// How the entity id is written as the record key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyFormat {
    String,
    Avro,
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, MINIMAL};

    #[test]
    fn avro_without_registry_is_refused() {
        let toml =
            format!("{MINIMAL}\n[codec]\nformat = \"avro\"\n[codec.schemas]\norder = \"order/OrderPlaced.avsc\"");
        let err = Config::from_toml_str(&toml).expect_err("must fail").to_string();
        assert!(err.contains("registry.url"), "{err}");
        let toml = format!("{MINIMAL}\n[codec]\nformat = \"avro\"\n[registry]\nurl = \"http://127.0.0.1:1\"");
        let err = Config::from_toml_str(&toml).expect_err("must fail").to_string();
        assert!(err.contains("codec.schemas"), "{err}");
    }
}
