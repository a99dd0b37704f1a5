//! `[kafka]`: the producer, its security and delivery mode, and the raw
//! librdkafka passthrough with the keys the relay owns.

use std::collections::BTreeMap;
use std::path::PathBuf;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::{at_least_one, defaults, invalid, ConfigError};

/// The Kafka producer. Options not typed here go through `librdkafka`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Comma-separated `host:port` list.
    pub bootstrap_servers: String,
    /// `none`, `gzip`, `snappy`, `lz4` or `zstd`.
    #[serde(default = "defaults::compression")]
    pub compression: Compression,
    /// How long the producer waits to fill a batch, in milliseconds; see
    /// [`KafkaConfig::linger_ms`] for the default.
    #[serde(default, rename = "linger_ms")]
    pub linger_ms_setting: Option<u64>,
    /// Upper bound of one produce batch, in bytes (librdkafka `batch.size`).
    #[serde(default = "defaults::batch_size_bytes")]
    pub batch_size_bytes: u64,
    /// How long librdkafka keeps retrying one message, in milliseconds;
    /// 0 retries until delivered (safe with idempotence; the relay stops reading
    /// while the queue is full instead of losing anything).
    #[serde(default = "defaults::message_timeout_ms")]
    pub message_timeout_ms: u64,
    /// Messages the producer may hold in its queue before the relay pauses reading.
    #[serde(default = "defaults::queue_max_messages")]
    pub queue_max_messages: u64,
    /// `plaintext` (default), `ssl`, `sasl_plaintext` or `sasl_ssl` (Kafka's
    /// upper-case names are accepted too).
    #[serde(default)]
    pub security_protocol: SecurityProtocol,
    /// PEM file of the CA(s) that sign the brokers' certificates (`ssl` and
    /// `sasl_ssl`); when not set, librdkafka's default trust store.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// SASL credentials, for `sasl_plaintext` and `sasl_ssl`.
    #[serde(default)]
    pub sasl: Option<KafkaSaslConfig>,
    /// `at_least_once` (default) or `exactly_once`: Kafka transactions, so
    /// `read_committed` consumers see each row once, across crashes and
    /// failovers (see README, Exactly-once delivery).
    #[serde(default)]
    pub delivery: Delivery,
    /// Exactly-once: the producer's `transactional.id`; by default derived
    /// from the outbox's identity (database, table, slot), the same for
    /// every relay of a group, so a new leader fences the old one.
    #[serde(default)]
    pub transactional_id: Option<String>,
    /// Exactly-once: a transaction commits at the latest this long after
    /// its first row, in milliseconds.
    #[serde(default = "defaults::transaction_interval_ms")]
    pub transaction_interval_ms: u64,
    /// Exactly-once: rows per transaction at most.
    #[serde(default = "defaults::transaction_max_rows")]
    pub transaction_max_rows: usize,
    /// Exactly-once: payload bytes per transaction at most (a single larger
    /// row goes alone).
    #[serde(default = "defaults::transaction_max_bytes")]
    pub transaction_max_bytes: usize,
    /// Exactly-once: the compacted topic of progress records, one per
    /// transaction, keyed by the transactional id.
    #[serde(default = "defaults::progress_topic")]
    pub progress_topic: String,
    /// Raw librdkafka properties for everything else (client certificates,
    /// OAUTHBEARER, ...). Keys the typed options above or the relay's
    /// guarantees own are refused.
    #[serde(default)]
    pub librdkafka: BTreeMap<String, String>,
}

impl KafkaConfig {
    /// `linger.ms`: as set, else 5 at least once and 1 in exactly-once
    /// mode, where a transaction sends its rows in one burst and waits for
    /// every acknowledgement before its commit, so lingering adds latency
    /// twice per transaction (the rows, then the progress record); 0 would
    /// send a drain's rows in many small requests.
    pub fn linger_ms(&self) -> u64 {
        self.linger_ms_setting.unwrap_or_else(|| defaults::linger_ms(self.delivery))
    }

    /// The principal the brokers' ACLs name for this relay, for messages
    /// that say which ACL is missing.
    pub fn principal(&self) -> String {
        match &self.sasl {
            Some(sasl) if self.security_protocol.uses_sasl() => format!("User:{}", sasl.username),
            _ => "the relay's principal".to_string(),
        }
    }

    /// kafka.*: the brokers, the raw map, the queue, security and delivery.
    /// `kafka.tls_ca_file` is read by [`crate::preflight`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.bootstrap_servers.trim().is_empty() {
            return invalid("kafka.bootstrap_servers", "must list at least one host:port");
        }
        for key in self.librdkafka.keys() {
            if let Some(owner) = owned_librdkafka_key(key) {
                return invalid(
                    format!("kafka.librdkafka.\"{key}\""),
                    format!("this property is set by the relay ({owner}); remove it from the map"),
                );
            }
        }
        at_least_one(&[("kafka.queue_max_messages", self.queue_max_messages)])?;
        self.validate_security()?;
        self.validate_delivery()
    }

    /// kafka.security_protocol, kafka.tls_ca_file, kafka.sasl.*: every
    /// combination that would fail only at the first connection, or send a
    /// password in a way the operator did not ask for, is refused here.
    fn validate_security(&self) -> Result<(), ConfigError> {
        let protocol = self.security_protocol;
        if self.tls_ca_file.is_some() && !protocol.uses_tls() {
            return invalid(
                "kafka.tls_ca_file",
                format!(
                    "is used only with TLS; kafka.security_protocol is `{}`: set it to \"ssl\" or \"sasl_ssl\"",
                    protocol.librdkafka_name()
                ),
            );
        }
        let Some(sasl) = &self.sasl else {
            if protocol.uses_sasl() {
                return invalid(
                    "kafka.sasl.username",
                    format!(
                        "missing: kafka.security_protocol = \"{}\" needs [kafka.sasl] with username and password",
                        protocol.librdkafka_name()
                    ),
                );
            }
            return Ok(());
        };
        if !protocol.uses_sasl() {
            return invalid(
                "kafka.sasl",
                format!(
                    "is used only with SASL; kafka.security_protocol is `{}`: set it to \"sasl_ssl\" (or \"sasl_plaintext\")",
                    protocol.librdkafka_name()
                ),
            );
        }
        if sasl.username.trim().is_empty() {
            return invalid("kafka.sasl.username", "missing: the SASL user the brokers' ACLs name");
        }
        if sasl.password.as_ref().is_none_or(|p| p.expose_secret().is_empty()) {
            return invalid("kafka.sasl.password", "missing: set it in the file or as RELAY__KAFKA__SASL__PASSWORD");
        }
        Ok(())
    }

    /// kafka.delivery and its transactions.
    fn validate_delivery(&self) -> Result<(), ConfigError> {
        if self.delivery != Delivery::ExactlyOnce {
            return Ok(());
        }
        at_least_one(&[("kafka.transaction_interval_ms", self.transaction_interval_ms)])?;
        at_least_one(&[
            ("kafka.transaction_max_rows", self.transaction_max_rows),
            ("kafka.transaction_max_bytes", self.transaction_max_bytes),
        ])?;
        if self.progress_topic.trim().is_empty() {
            return invalid("kafka.progress_topic", "must name a topic");
        }
        if self.transactional_id.as_deref().is_some_and(|id| id.trim().is_empty()) {
            return invalid("kafka.transactional_id", "must not be empty (leave it out to derive it)");
        }
        Ok(())
    }
}

/// Compression of produce batches (`kafka.compression`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Batches sent as they are.
    None,
    /// `gzip`.
    Gzip,
    /// `snappy`.
    Snappy,
    /// `lz4`, the default.
    Lz4,
    /// `zstd`.
    Zstd,
}

impl Compression {
    /// The librdkafka `compression.type` value.
    pub fn librdkafka_name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Gzip => "gzip",
            Self::Snappy => "snappy",
            Self::Lz4 => "lz4",
            Self::Zstd => "zstd",
        }
    }
}

/// What a consumer can count on (`kafka.delivery`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// Every row at least once; duplicates only from the in-flight window
    /// after a crash or failover (consumers dedupe on `event_id`).
    #[default]
    AtLeastOnce,
    /// Kafka transactions: `read_committed` consumers see each row once.
    ExactlyOnce,
}

/// How the relay connects to the brokers (librdkafka `security.protocol`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecurityProtocol {
    /// No encryption, no authentication.
    #[default]
    #[serde(alias = "PLAINTEXT")]
    Plaintext,
    /// TLS, no SASL (a client certificate may go through `kafka.librdkafka`).
    #[serde(alias = "SSL")]
    Ssl,
    /// SASL without encryption: the credentials cross the network in the
    /// clear with `PLAIN`; for trusted networks only.
    #[serde(alias = "SASL_PLAINTEXT")]
    SaslPlaintext,
    /// SASL over TLS: what managed clusters require.
    #[serde(alias = "SASL_SSL")]
    SaslSsl,
}

impl SecurityProtocol {
    /// The librdkafka value.
    pub fn librdkafka_name(self) -> &'static str {
        match self {
            Self::Plaintext => "plaintext",
            Self::Ssl => "ssl",
            Self::SaslPlaintext => "sasl_plaintext",
            Self::SaslSsl => "sasl_ssl",
        }
    }

    /// Whether connections are encrypted (and `kafka.tls_ca_file` applies).
    pub fn uses_tls(self) -> bool {
        matches!(self, Self::Ssl | Self::SaslSsl)
    }

    /// Whether the relay authenticates with `[kafka.sasl]`.
    pub fn uses_sasl(self) -> bool {
        matches!(self, Self::SaslPlaintext | Self::SaslSsl)
    }
}

/// `[kafka.sasl]`: how the relay authenticates to the brokers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSaslConfig {
    /// `SCRAM-SHA-512` (default), `SCRAM-SHA-256` or `PLAIN`.
    #[serde(default)]
    pub mechanism: SaslMechanism,
    /// The SASL user; the ACLs name it as `User:<username>`.
    #[serde(default)]
    pub username: String,
    /// A secret, never logged.
    #[serde(default)]
    pub password: Option<SecretString>,
}

/// SASL mechanisms with a user name and password.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum SaslMechanism {
    #[default]
    #[serde(rename = "SCRAM-SHA-512", alias = "scram-sha-512")]
    ScramSha512,
    #[serde(rename = "SCRAM-SHA-256", alias = "scram-sha-256")]
    ScramSha256,
    #[serde(rename = "PLAIN", alias = "plain")]
    Plain,
}

impl SaslMechanism {
    /// The librdkafka (and Kafka) name.
    pub fn librdkafka_name(self) -> &'static str {
        match self {
            Self::ScramSha512 => "SCRAM-SHA-512",
            Self::ScramSha256 => "SCRAM-SHA-256",
            Self::Plain => "PLAIN",
        }
    }
}

/// librdkafka properties the relay sets itself, with the config key or
/// guarantee that owns each. The raw `kafka.librdkafka` map may not set them.
pub fn owned_librdkafka_key(key: &str) -> Option<&'static str> {
    Some(match key {
        "bootstrap.servers" | "metadata.broker.list" => "kafka.bootstrap_servers",
        "compression.type" | "compression.codec" => "kafka.compression",
        "linger.ms" | "queue.buffering.max.ms" => "kafka.linger_ms",
        "batch.size" => "kafka.batch_size_bytes",
        "message.timeout.ms" | "delivery.timeout.ms" => "kafka.message_timeout_ms",
        "queue.buffering.max.messages" => "kafka.queue_max_messages",
        "security.protocol" => "kafka.security_protocol",
        "ssl.ca.location" | "ssl.ca.pem" => "kafka.tls_ca_file",
        "sasl.mechanism" | "sasl.mechanisms" => "kafka.sasl.mechanism",
        "sasl.username" => "kafka.sasl.username",
        "sasl.password" => "kafka.sasl.password",
        "enable.idempotence"
        | "acks"
        | "request.required.acks"
        | "max.in.flight"
        | "max.in.flight.requests.per.connection" => "the no-loss, in-order guarantee",
        "partitioner" => "per-key order compatible with the Java client",
        "transactional.id" => "kafka.transactional_id",
        "transaction.timeout.ms" => "kafka.delivery",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, MINIMAL};
    use crate::tests::start_up;

    #[test]
    fn invalid_value_names_key_and_allowed_values() {
        let toml = format!("{MINIMAL}\ncompression = \"brotli\"");
        let err = Config::from_toml_str(&toml).expect_err("must fail").to_string();
        assert!(err.contains("kafka.compression") && err.contains("zstd"), "{err}");
    }

    #[test]
    fn librdkafka_map_refuses_owned_keys() {
        let toml = format!("{MINIMAL}\n[kafka.librdkafka]\n\"enable.idempotence\" = \"false\"");
        let err = Config::from_toml_str(&toml).expect_err("must fail").to_string();
        assert!(err.contains("enable.idempotence"), "{err}");
    }

    /// A SASL-over-TLS configuration with its password in the file.
    const SASL: &str = r#"
        [postgres]
        url = "postgres://relay:relay@127.0.0.1:55432/outbox"
        [kafka]
        bootstrap_servers = "127.0.0.1:59094"
        security_protocol = "sasl_ssl"
        [kafka.sasl]
        username = "relay"
        password = "kafka-secret-in-config"
    "#;

    #[test]
    fn sasl_settings_are_typed_and_the_password_is_never_printed() {
        let config = Config::from_toml_str(SASL).expect("sasl config");
        assert_eq!(config.kafka.security_protocol, SecurityProtocol::SaslSsl);
        let upper = Config::from_toml_str(&SASL.replace("\"sasl_ssl\"", "\"SASL_SSL\"")).expect("Kafka's name");
        assert_eq!(upper.kafka.security_protocol, SecurityProtocol::SaslSsl);
        let sasl = config.kafka.sasl.as_ref().expect("sasl");
        assert_eq!(sasl.mechanism, SaslMechanism::ScramSha512);
        assert_eq!(config.kafka.principal(), "User:relay");
        let debug = format!("{config:?}");
        assert!(!debug.contains("kafka-secret-in-config"), "{debug}");
    }

    #[test]
    fn inconsistent_kafka_security_names_the_key() {
        let cases = [
            // SASL credentials with a protocol that never sends them.
            (SASL.replace("\"sasl_ssl\"", "\"plaintext\""), "kafka.sasl"),
            (SASL.replace("username = \"relay\"", ""), "kafka.sasl.username"),
            (SASL.replace("password = \"kafka-secret-in-config\"", ""), "kafka.sasl.password"),
            (
                MINIMAL.replace("bootstrap_servers", "security_protocol = \"sasl_ssl\"\nbootstrap_servers"),
                "kafka.sasl.username",
            ),
            (format!("{MINIMAL}\ntls_ca_file = \"/etc/hosts\""), "kafka.tls_ca_file"),
            (SASL.replace("[kafka.sasl]", "tls_ca_file = \"/nonexistent/ca.pem\"\n[kafka.sasl]"), "kafka.tls_ca_file"),
            (SASL.replace("username", "mechanism = \"GSSAPI\"\nusername"), "kafka.sasl.mechanism"),
        ];
        for (toml, key) in cases {
            let err = start_up(&toml).expect_err(key).to_string();
            assert!(err.contains(key), "{key}: {err}");
            assert!(!err.contains("kafka-secret-in-config"), "{err}");
        }
    }

    #[test]
    fn librdkafka_map_refuses_the_typed_security_keys() {
        for key in ["security.protocol", "sasl.password", "sasl.mechanisms", "ssl.ca.location"] {
            let toml = format!("{MINIMAL}\n[kafka.librdkafka]\n\"{key}\" = \"x\"");
            let err = Config::from_toml_str(&toml).expect_err(key).to_string();
            assert!(err.contains(key) && err.contains("kafka."), "{err}");
        }
    }
}
