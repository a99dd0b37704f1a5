//! The one typed configuration tree.
//!
//! Loaded from a TOML file, then overridden by environment variables named
//! `RELAY__SECTION__KEY` (double underscores separate levels), so a sidecar can
//! take secrets such as `RELAY__POSTGRES__URL` from its environment. Unknown
//! keys are rejected by name; [`Config::validate`] checks values and names the
//! key and what is allowed. Every default is written once, in the `defaults`
//! module, and documented in `relay.example.toml`.
//!
//! One file per section, each with its own `validate()`. Validation is pure:
//! the files the config names (CA certificates) are checked by
//! [`crate::preflight`] at start-up. The module imports nothing from the
//! crate but the routing rules ([`crate::routing`]), which import nothing.

mod checkpoint;
mod codec;
mod defaults;
mod kafka;
mod leader;
mod outbox;
mod postgres;
mod registry;
mod retention;
mod routing;
mod source;
mod telemetry;

use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use secrecy::ExposeSecret;
use serde::Deserialize;

pub use checkpoint::{CheckpointConfig, PublishStateLayout};
pub use codec::{CodecConfig, Compatibility, KeyFormat, PayloadFormat, SubjectStrategy};
pub use kafka::{
    owned_librdkafka_key, Compression, Delivery, KafkaConfig, KafkaSaslConfig, SaslMechanism, SecurityProtocol,
};
pub use leader::LeaderConfig;
pub use outbox::{ColumnNames, OutboxConfig};
pub use postgres::PostgresConfig;
pub use registry::RegistryConfig;
pub use retention::RetentionConfig;
pub use routing::RoutingConfig;
pub use source::{SourceConfig, SourceMode};
pub use telemetry::{LogFormat, Readiness, TelemetryConfig};

/// Prefix of environment overrides: `RELAY__KAFKA__BOOTSTRAP_SERVERS`.
pub const ENV_PREFIX: &str = "RELAY__";

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file named by `--config` does not exist or cannot be read.
    #[error("cannot read config file {path}: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    /// The file or an environment override does not fit the schema
    /// (unknown key, wrong type, a value outside a fixed list).
    #[error("invalid configuration: {0}")]
    Parse(String),
    /// A value is outside what is allowed.
    #[error("invalid value for `{key}`: {message}")]
    Invalid { key: String, message: String },
}

/// The whole configuration of one relay process.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub postgres: PostgresConfig,
    pub kafka: KafkaConfig,
    #[serde(default)]
    pub registry: RegistryConfig,
    #[serde(default)]
    pub source: SourceConfig,
    #[serde(default)]
    pub outbox: OutboxConfig,
    #[serde(default)]
    pub routing: RoutingConfig,
    #[serde(default)]
    pub codec: CodecConfig,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    #[serde(default)]
    pub retention: RetentionConfig,
    #[serde(default)]
    pub leader: LeaderConfig,
    /// How long a graceful shutdown may take before the relay exits anyway
    /// (keep it below the pod's termination grace period).
    #[serde(default = "defaults::shutdown_timeout_ms")]
    pub shutdown_timeout_ms: u64,
}

impl Config {
    /// Reads `path`, applies `RELAY__*` environment overrides and validates.
    /// The files the config names are not read: that is
    /// [`crate::preflight`], the next start-up step.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        if let Err(err) = std::fs::metadata(path) {
            return Err(ConfigError::Unreadable { path: path.to_path_buf(), reason: err.to_string() });
        }
        let figment = Figment::new().merge(Toml::file_exact(path)).merge(Env::prefixed(ENV_PREFIX).split("__"));
        Self::from_figment(figment)
    }

    /// Parses a TOML document (no environment) and validates it, for tests
    /// and tools.
    pub fn from_toml_str(toml: &str) -> Result<Self, ConfigError> {
        Self::from_figment(Figment::new().merge(Toml::string(toml)))
    }

    fn from_figment(figment: Figment) -> Result<Self, ConfigError> {
        let config: Config = figment.extract().map_err(|err| {
            let msgs: Vec<String> = err.into_iter().map(describe_figment_error).collect();
            ConfigError::Parse(msgs.join("; "))
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every value and names the key that is wrong and what is
    /// allowed, section by section; a section whose rule involves another
    /// (`checkpoint.publish_state` and `source.mode`) is given it. Reads no
    /// file.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.postgres.validate()?;
        self.kafka.validate()?;
        self.source.validate()?;
        self.outbox.validate()?;
        self.routing.validate(&self.codec)?;
        self.codec.validate(&self.registry)?;
        self.retention.validate()?;
        self.telemetry.validate()?;
        self.checkpoint.validate(self.source.mode)?;
        self.leader.validate()
    }

    /// The Kafka `transactional.id` of exactly-once mode:
    /// `kafka.transactional_id`, or `outbox-relay:<database>:<schema>.<table>:<slot>`.
    pub fn transactional_id(&self) -> String {
        if let Some(id) = &self.kafka.transactional_id {
            return id.clone();
        }
        let database = self
            .postgres
            .url
            .expose_secret()
            .parse::<tokio_postgres::Config>()
            .ok()
            .and_then(|c| c.get_dbname().map(str::to_string))
            .unwrap_or_default();
        format!("outbox-relay:{database}:{}.{}:{}", self.outbox.schema, self.outbox.table, self.source.slot_name)
    }

    /// The outbox table as a quoted, schema-qualified SQL name,
    /// `"<schema>"."<table>"`, for statements on it. Safe to splice into
    /// SQL: validation allows only lower-case identifiers in both names.
    pub fn outbox_table_sql(&self) -> String {
        format!("\"{}\".\"{}\"", self.outbox.schema, self.outbox.table)
    }
}

/// The error of `key`, with what is allowed.
fn invalid(key: impl Into<String>, message: impl Into<String>) -> Result<(), ConfigError> {
    Err(ConfigError::Invalid { key: key.into(), message: message.into() })
}

/// 1 at least, for counts, sizes and intervals: the first `(key, value)`
/// that is 0 is refused.
fn at_least_one<T: Copy + Default + PartialEq>(values: &[(&str, T)]) -> Result<(), ConfigError> {
    match values.iter().find(|(_, value)| *value == T::default()) {
        Some((key, _)) => invalid(*key, "must be at least 1"),
        None => Ok(()),
    }
}

/// Lower-case SQL identifiers (`[a-z_][a-z0-9_]*`, up to 63 characters):
/// the names the relay splices into SQL and replication commands. The first
/// `(key, name)` that is not one is refused.
fn identifiers(names: &[(&str, &str)]) -> Result<(), ConfigError> {
    let is_identifier = |name: &str| {
        let mut chars = name.chars();
        matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
            && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            && name.len() <= 63
    };
    match names.iter().find(|(_, name)| !is_identifier(name)) {
        Some((key, name)) => invalid(
            *key,
            format!("`{name}` must be a lower-case SQL identifier ([a-z_][a-z0-9_]*, up to 63 characters)"),
        ),
        None => Ok(()),
    }
}

/// Figment reports unknown fields as "unknown field `x`, expected one of ..."
/// with the path of the containing table; join both so the message names
/// the full key, e.g. `kafka.bootstrap_server`. A value outside a fixed list
/// names its key and the allowed values.
fn describe_figment_error(err: figment::Error) -> String {
    use figment::error::Kind;
    let path = err.path.join(".");
    // The path usually ends with the offending field already.
    let at = |field: &str| {
        if path.is_empty() {
            field.to_string()
        } else if err.path.last().map(String::as_str) == Some(field) {
            path.clone()
        } else {
            format!("{path}.{field}")
        }
    };
    match &err.kind {
        Kind::UnknownField(field, expected) => {
            format!("unknown key `{}`; allowed here: {}", at(field), expected.join(", "))
        }
        Kind::MissingField(field) => format!("missing required key `{}`", at(field)),
        // The fixed lists (`kafka.compression`, `source.mode`, ...), worded
        // as the checks of values are.
        Kind::UnknownVariant(found, allowed) if !path.is_empty() => {
            format!("key `{path}`: `{found}` is not one of {}", allowed.join(", "))
        }
        _ if !path.is_empty() => format!("key `{path}`: {}", err.kind),
        _ => err.kind.to_string(),
    }
}

/// A configuration with only the required keys, for the sections' tests.
#[cfg(test)]
pub(crate) const MINIMAL: &str = r#"
        [postgres]
        url = "postgres://relay:relay@127.0.0.1:55432/outbox"
        [kafka]
        bootstrap_servers = "127.0.0.1:59092"
    "#;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::{RouteTable, TopicKind};

    #[test]
    fn minimal_config_takes_defaults() {
        let config = Config::from_toml_str(MINIMAL).expect("minimal config");
        assert_eq!(config.source.mode, SourceMode::Logical);
        assert_eq!(config.routing.topic_template, "outbox.{aggregate_type}");
        assert_eq!(config.kafka.compression, Compression::Lz4);
        assert_eq!(config.outbox.columns.aggregate_id, "aggregate_id");
    }

    #[test]
    fn misspelled_key_is_named() {
        let toml = MINIMAL.replace("bootstrap_servers", "bootstrap_server");
        let err = Config::from_toml_str(&toml).expect_err("must fail").to_string();
        assert!(err.contains("kafka.bootstrap_server"), "{err}");
    }

    #[test]
    fn missing_file_is_a_one_line_error() {
        let err = Config::load(Path::new("/nonexistent/relay.toml")).expect_err("must fail");
        let text = err.to_string();
        assert!(text.contains("/nonexistent/relay.toml") && !text.contains('\n'), "{text}");
    }

    #[test]
    fn example_config_is_valid() {
        let text = include_str!("../../relay.example.toml");
        Config::from_toml_str(text).expect("relay.example.toml must load");
        let avro = Config::from_toml_str(include_str!("../../relay.avro.example.toml"))
            .expect("relay.avro.example.toml must load");
        assert_eq!(avro.codec.format, PayloadFormat::Avro);
        assert_eq!(avro.routing.topic_for("order", TopicKind::State), "outbox.order.state");
    }
}
