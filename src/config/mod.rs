//! The one typed configuration tree.
//!
//! Loaded from a TOML file, then overridden by environment variables named
//! `RELAY__SECTION__KEY` (double underscores separate levels), so a sidecar can
//! take secrets such as `RELAY__POSTGRES__URL` from its environment. Unknown
//! keys are rejected by name; [`Config::validate`] checks values and names the
//! key and what is allowed. Every default is written once, in the `defaults`
//! module, and documented in `relay.example.toml`.

mod defaults;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// Prefix of environment overrides: `RELAY__KAFKA__BOOTSTRAP_SERVERS`.
pub const ENV_PREFIX: &str = "RELAY__";

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file named by `--config` does not exist or cannot be read.
    #[error("cannot read config file {path}: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    /// The file or an environment override does not fit the schema
    /// (unknown key, wrong type).
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

/// Where the outbox lives.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// `postgres://user:password@host:port/database`; a secret, never logged.
    pub url: SecretString,
    /// Timeout for establishing a connection, in milliseconds.
    #[serde(default = "defaults::connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// PEM file of the CA(s) that sign the server's certificate. When set,
    /// TLS connections verify the certificate and host name against it (as
    /// libpq's `verify-full`); when not, TLS (`sslmode=prefer`, the default,
    /// or `require` in the URL) encrypts without verifying, as libpq does.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
}

/// The Kafka producer. Options not typed here go through `librdkafka`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Comma-separated `host:port` list.
    pub bootstrap_servers: String,
    /// `none`, `gzip`, `snappy`, `lz4` or `zstd`.
    #[serde(default = "defaults::compression")]
    pub compression: String,
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

/// The Confluent-compatible schema registry (used by the Avro codec).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// Base URL of the Confluent API, e.g. `http://127.0.0.1:58081/apis/ccompat/v7`.
    /// Empty when no registry is used (`codec.format = "json"`).
    #[serde(default)]
    pub url: String,
    /// Basic-auth user, if the registry requires one.
    #[serde(default)]
    pub username: Option<String>,
    /// Basic-auth password; a secret, never logged.
    #[serde(default)]
    pub password: Option<SecretString>,
    /// PEM file of the CA(s) that sign an `https://` registry's certificate.
    /// When set, only these CAs are trusted (as `postgres.tls_ca_file`: the
    /// file pins trust, the system's roots no longer count); when not, the
    /// system's roots are. The certificate and host name are verified
    /// either way.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
}

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

/// Where each row goes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    /// Topic name template; `{aggregate_type}` is replaced by the row's entity type.
    #[serde(default = "defaults::topic_template")]
    pub topic_template: String,
    /// Per-aggregate-type topic, overriding the template.
    #[serde(default)]
    pub topics: BTreeMap<String, String>,
    /// Topic name template of state messages (rows of `kind = 'state'`):
    /// created compacted, so it must never be an event topic too.
    #[serde(default = "defaults::state_topic_template")]
    pub state_topic_template: String,
    /// Per-aggregate-type state topic, overriding `state_topic_template`.
    #[serde(default)]
    pub state_topics: BTreeMap<String, String>,
    /// Extra settings of the topics the relay creates, per aggregate type
    /// (both its event and state topic), e.g. `min.compaction.lag.ms`.
    /// `cleanup.policy` is the relay's: `compact` for state, `delete` else.
    #[serde(default)]
    pub topic_settings: BTreeMap<String, BTreeMap<String, String>>,
    /// Create a missing topic on first use. When false, a missing topic holds its
    /// rows with an error naming the topic.
    #[serde(default = "defaults::create_topics")]
    pub create_topics: bool,
    /// Partitions of created topics; -1 takes the broker's `num.partitions`.
    #[serde(default = "defaults::topic_partitions")]
    pub topic_partitions: i32,
    /// Replication factor of created topics; -1 takes the broker's default.
    #[serde(default = "defaults::topic_replication_factor")]
    pub topic_replication_factor: i32,
    /// Optional topic that receives a JSON copy (with the reason) of every
    /// row held for its own error. The row stays held either way.
    #[serde(default)]
    pub dead_letter_topic: Option<String>,
    /// How many entities may be held at once. A topic-wide failure (an ACL,
    /// a deleted topic) holds every entity that writes to it; past this
    /// bound the relay stops and asks for an operator instead of keeping
    /// an ever larger set in memory.
    #[serde(default = "defaults::max_held_entities")]
    pub max_held_entities: usize,
}

/// What a topic carries: one kind only, because compaction keeps the latest
/// record per key and would destroy an event stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TopicKind {
    /// Event and command messages (`kind` 'event' or 'command'): every one
    /// matters; `cleanup.policy=delete`.
    Event,
    /// State messages (`kind = 'state'`): only the latest per key matters;
    /// `cleanup.policy=compact`, and a NULL payload is a tombstone.
    State,
}

impl TopicKind {
    /// The kind of topic a row of outbox `kind` goes to.
    pub fn of_row(kind: &str) -> Self {
        if kind == "state" {
            Self::State
        } else {
            Self::Event
        }
    }

    /// The `cleanup.policy` the relay gives topics of this kind.
    pub fn cleanup_policy(self) -> &'static str {
        match self {
            Self::Event => "delete",
            Self::State => "compact",
        }
    }

    /// How messages call it: "event" or "state".
    pub fn name(self) -> &'static str {
        match self {
            Self::Event => "event",
            Self::State => "state",
        }
    }
}

impl RoutingConfig {
    /// The topic of rows of `aggregate_type` and `kind`: the override of
    /// `topics` / `state_topics`, else the template.
    pub fn topic_for(&self, aggregate_type: &str, kind: TopicKind) -> String {
        let (overrides, template) = match kind {
            TopicKind::Event => (&self.topics, &self.topic_template),
            TopicKind::State => (&self.state_topics, &self.state_topic_template),
        };
        match overrides.get(aggregate_type) {
            Some(topic) => topic.clone(),
            None => template.replace("{aggregate_type}", aggregate_type),
        }
    }

    /// The kind and aggregate type of the rows this config routes to an
    /// existing `topic`, if any: an override names it, or it fits a
    /// template (the state template first: it is usually the longer).
    pub fn kind_of_topic(&self, topic: &str) -> Option<(TopicKind, String)> {
        for (kind, overrides) in [(TopicKind::State, &self.state_topics), (TopicKind::Event, &self.topics)] {
            if let Some((aggregate_type, _)) = overrides.iter().find(|(_, t)| *t == topic) {
                return Some((kind, aggregate_type.clone()));
            }
        }
        [TopicKind::State, TopicKind::Event]
            .into_iter()
            .find_map(|kind| self.fits_template(topic, kind).map(|aggregate_type| (kind, aggregate_type)))
    }

    /// The aggregate type for which the template of `kind` makes `topic`.
    pub fn fits_template(&self, topic: &str, kind: TopicKind) -> Option<String> {
        let template = match kind {
            TopicKind::Event => &self.topic_template,
            TopicKind::State => &self.state_topic_template,
        };
        match template.split_once("{aggregate_type}") {
            None => (template == topic).then(String::new),
            Some((prefix, suffix)) => {
                let middle = topic.strip_prefix(prefix).and_then(|rest| rest.strip_suffix(suffix));
                middle.filter(|m| !m.is_empty()).map(str::to_string)
            }
        }
    }
}

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
    pub compatibility: String,
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

/// How the entity id is written as the record key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyFormat {
    String,
    Avro,
}

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

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// How strict `/readyz` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Readiness {
    /// Ready once started (active or standby), and stays ready through Kafka
    /// or Postgres outages: a sidecar's failing probe would take the
    /// application's pod out of service.
    Lenient,
    /// Ready only while the pipeline is connected and running.
    Strict,
}

/// Metrics, health endpoints and logs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Address of the HTTP endpoint (`/metrics`, `/healthz`, `/readyz`);
    /// use `0.0.0.0:9187` inside a pod so the kubelet and Prometheus reach it.
    #[serde(default = "defaults::http_listen")]
    pub http_listen: String,
    /// `text` or `json`.
    #[serde(default = "defaults::log_format")]
    pub log_format: LogFormat,
    /// `lenient` (default, safe for sidecars) or `strict`.
    #[serde(default = "defaults::readiness")]
    pub readiness: Readiness,
    /// `/health/progress` fails when rows are pending and nothing was
    /// published for this long, in seconds.
    #[serde(default = "defaults::progress_timeout_secs")]
    pub progress_timeout_secs: u64,
    /// How often the lag gauges are sampled from Postgres, in milliseconds.
    #[serde(default = "defaults::lag_sample_interval_ms")]
    pub lag_sample_interval_ms: u64,
}

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

impl Config {
    /// Reads `path`, applies `RELAY__*` environment overrides and validates.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        if let Err(err) = std::fs::metadata(path) {
            return Err(ConfigError::Unreadable { path: path.to_path_buf(), reason: err.to_string() });
        }
        let figment = Figment::new().merge(Toml::file_exact(path)).merge(Env::prefixed(ENV_PREFIX).split("__"));
        Self::from_figment(figment)
    }

    /// Parses a TOML document (no environment), for tests and tools.
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

    /// Checks every value and names the key that is wrong and what is allowed.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_connections()?;
        self.validate_routing()?;
        self.validate_codec_and_limits()?;
        self.validate_delivery()?;
        self.validate_leader()?;
        self.validate_publish_state()
    }

    /// checkpoint.publish_state against source.mode.
    fn validate_publish_state(&self) -> Result<(), ConfigError> {
        if self.checkpoint.publish_state == PublishStateLayout::SideTable && self.source.mode == SourceMode::Poll {
            return Err(ConfigError::Invalid {
                key: "checkpoint.publish_state".into(),
                message: "\"side_table\" needs source.mode = \"logical\": poll mode finds the rows to publish through the outbox row's own `published_at`. Use \"outbox_row\" (the default) with poll mode".into(),
            });
        }
        Ok(())
    }

    /// kafka.delivery and its transactions.
    fn validate_delivery(&self) -> Result<(), ConfigError> {
        let invalid =
            |key: &str, message: &str| Err(ConfigError::Invalid { key: key.to_string(), message: message.into() });
        let kafka = &self.kafka;
        if kafka.delivery != Delivery::ExactlyOnce {
            return Ok(());
        }
        if kafka.transaction_interval_ms == 0 {
            return invalid("kafka.transaction_interval_ms", "must be at least 1");
        }
        if kafka.transaction_max_rows == 0 {
            return invalid("kafka.transaction_max_rows", "must be at least 1");
        }
        if kafka.transaction_max_bytes == 0 {
            return invalid("kafka.transaction_max_bytes", "must be at least 1");
        }
        if kafka.progress_topic.trim().is_empty() {
            return invalid("kafka.progress_topic", "must name a topic");
        }
        if kafka.transactional_id.as_deref().is_some_and(|id| id.trim().is_empty()) {
            return invalid("kafka.transactional_id", "must not be empty (leave it out to derive it)");
        }
        Ok(())
    }

    /// leader.*.
    fn validate_leader(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| Err(ConfigError::Invalid { key: key.to_string(), message });
        let leader = &self.leader;
        if leader.renew_interval_ms < 10 {
            return invalid("leader.renew_interval_ms", "must be at least 10".into());
        }
        if leader.lease_timeout_ms < 2 * leader.renew_interval_ms {
            return invalid(
                "leader.lease_timeout_ms",
                format!(
                    "must be at least twice leader.renew_interval_ms ({} ms), so one late renewal does not cost the lease",
                    leader.renew_interval_ms
                ),
            );
        }
        Ok(())
    }

    /// postgres.*, kafka.*.
    fn validate_connections(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| Err(ConfigError::Invalid { key: key.to_string(), message });
        let url = self.postgres.url.expose_secret();
        if url.parse::<tokio_postgres::Config>().is_err() {
            return invalid("postgres.url", "expected a URL such as postgres://user:password@127.0.0.1:5432/db".into());
        }
        if let Some(ca) = &self.postgres.tls_ca_file {
            if std::fs::metadata(ca).is_err() {
                return invalid("postgres.tls_ca_file", format!("cannot read {}", ca.display()));
            }
        }
        if self.kafka.bootstrap_servers.trim().is_empty() {
            return invalid("kafka.bootstrap_servers", "must list at least one host:port".into());
        }
        const COMPRESSIONS: [&str; 5] = ["none", "gzip", "snappy", "lz4", "zstd"];
        if !COMPRESSIONS.contains(&self.kafka.compression.as_str()) {
            return invalid(
                "kafka.compression",
                format!("`{}` is not one of {}", self.kafka.compression, COMPRESSIONS.join(", ")),
            );
        }
        for key in self.kafka.librdkafka.keys() {
            if let Some(owner) = owned_librdkafka_key(key) {
                return invalid(
                    &format!("kafka.librdkafka.\"{key}\""),
                    format!("this property is set by the relay ({owner}); remove it from the map"),
                );
            }
        }
        if self.kafka.queue_max_messages == 0 {
            return invalid("kafka.queue_max_messages", "must be at least 1".into());
        }
        self.validate_kafka_security()
    }

    /// kafka.security_protocol, kafka.tls_ca_file, kafka.sasl.*: every
    /// combination that would fail only at the first connection, or send a
    /// password in a way the operator did not ask for, is refused here.
    fn validate_kafka_security(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| Err(ConfigError::Invalid { key: key.to_string(), message });
        let kafka = &self.kafka;
        let protocol = kafka.security_protocol;
        if let Some(ca) = &kafka.tls_ca_file {
            if !protocol.uses_tls() {
                return invalid(
                    "kafka.tls_ca_file",
                    format!(
                        "is used only with TLS; kafka.security_protocol is `{}`: set it to \"ssl\" or \"sasl_ssl\"",
                        protocol.librdkafka_name()
                    ),
                );
            }
            if std::fs::metadata(ca).is_err() {
                return invalid("kafka.tls_ca_file", format!("cannot read {}", ca.display()));
            }
        }
        let Some(sasl) = &kafka.sasl else {
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
            return invalid("kafka.sasl.username", "missing: the SASL user the brokers' ACLs name".into());
        }
        if sasl.password.as_ref().is_none_or(|p| p.expose_secret().is_empty()) {
            return invalid(
                "kafka.sasl.password",
                "missing: set it in the file or as RELAY__KAFKA__SASL__PASSWORD".into(),
            );
        }
        Ok(())
    }

    /// Names of the outbox, slot and publication; routing.*.
    fn validate_routing(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| Err(ConfigError::Invalid { key: key.to_string(), message });
        for (key, name) in [
            ("source.slot_name", &self.source.slot_name),
            ("source.publication_name", &self.source.publication_name),
            ("outbox.schema", &self.outbox.schema),
            ("outbox.table", &self.outbox.table),
        ] {
            if !is_identifier(name) {
                return invalid(
                    key,
                    format!("`{name}` must be a lower-case SQL identifier ([a-z_][a-z0-9_]*, up to 63 characters)"),
                );
            }
        }
        let c = &self.outbox.columns;
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
        for (key, template) in [
            ("routing.topic_template", &self.routing.topic_template),
            ("routing.state_topic_template", &self.routing.state_topic_template),
        ] {
            if template.replace("{aggregate_type}", "").contains('{') {
                return invalid(key, "the only placeholder allowed is {aggregate_type}".into());
            }
        }
        self.validate_topic_kinds()?;
        if self.routing.dead_letter_topic.as_deref().is_some_and(|t| t.trim().is_empty()) {
            return invalid("routing.dead_letter_topic", "must be a topic name, or left out".into());
        }
        if self.routing.topic_partitions == 0 || self.routing.topic_partitions < -1 {
            return invalid("routing.topic_partitions", "must be -1 (broker default) or at least 1".into());
        }
        if self.routing.topic_replication_factor == 0 || self.routing.topic_replication_factor < -1 {
            return invalid("routing.topic_replication_factor", "must be -1 (broker default) or at least 1".into());
        }
        Ok(())
    }

    /// No topic carries both event and state messages, for every aggregate
    /// type the config names (a type it does not name can still collide: the
    /// sink holds such rows when it sees the topic's `cleanup.policy`).
    fn validate_topic_kinds(&self) -> Result<(), ConfigError> {
        let routing = &self.routing;
        if routing.topic_template == routing.state_topic_template {
            return Err(ConfigError::Invalid {
                key: "routing.state_topic_template".into(),
                message: format!(
                    "`{}` is also routing.topic_template: state topics are compacted, which would destroy the events on them; give state messages their own topics, e.g. \"outbox.{{aggregate_type}}.state\"",
                    routing.state_topic_template
                ),
            });
        }
        let of_key = |key: &String| key.split('/').next().unwrap_or(key).to_string();
        let named: std::collections::BTreeSet<String> = routing
            .topics
            .keys()
            .chain(routing.state_topics.keys())
            .chain(routing.topic_settings.keys())
            .chain(self.codec.schemas.keys())
            .chain(self.codec.state_schemas.keys())
            .map(of_key)
            .collect();
        // Who else would send rows of `kind` to `topic`: a type the config
        // names, or a plain name the template fits ("outbox.order" fits
        // "outbox.{aggregate_type}" as `order`; the default state topic
        // "outbox.order.state" fits it only as `order.state`, not a likely type).
        let owner = |topic: &str, kind: TopicKind| {
            if let Some(t) = named.iter().find(|t| routing.topic_for(t, kind) == topic) {
                return Some(t.clone());
            }
            let overrides = if kind == TopicKind::Event { &routing.topics } else { &routing.state_topics };
            if overrides.values().any(|t| t == topic) {
                return None;
            }
            let plain = |t: &str| t.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            routing.fits_template(topic, kind).filter(|t| plain(t))
        };
        for aggregate_type in &named {
            for (kind, other) in [(TopicKind::State, TopicKind::Event), (TopicKind::Event, TopicKind::State)] {
                let topic = routing.topic_for(aggregate_type, kind);
                let Some(other_type) = owner(&topic, other) else { continue };
                let (event_type, state_type) = match kind {
                    TopicKind::State => (other_type, aggregate_type.clone()),
                    TopicKind::Event => (aggregate_type.clone(), other_type),
                };
                return Err(ConfigError::Invalid {
                    key: format!("routing.state_topics.{state_type}"),
                    message: format!(
                        "topic `{topic}` would carry both the event messages of aggregate type `{event_type}` and the state messages of `{state_type}`; state topics are compacted, which would destroy the events: route one of them elsewhere (routing.state_topics.{state_type} or routing.topics.{event_type})"
                    ),
                });
            }
        }
        for (aggregate_type, settings) in &routing.topic_settings {
            if settings.contains_key("cleanup.policy") {
                return Err(ConfigError::Invalid {
                    key: format!("routing.topic_settings.{aggregate_type}"),
                    message: "cleanup.policy is the relay's: compact for state topics, delete for event and command topics; remove it".into(),
                });
            }
        }
        Ok(())
    }

    /// codec.*, registry.*, and the sizes and intervals elsewhere.
    fn validate_codec_and_limits(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| Err(ConfigError::Invalid { key: key.to_string(), message });
        const LEVELS: [&str; 7] =
            ["BACKWARD", "BACKWARD_TRANSITIVE", "FORWARD", "FORWARD_TRANSITIVE", "FULL", "FULL_TRANSITIVE", "NONE"];
        if !LEVELS.contains(&self.codec.compatibility.as_str()) {
            return invalid(
                "codec.compatibility",
                format!("`{}` is not one of {}", self.codec.compatibility, LEVELS.join(", ")),
            );
        }
        if self.codec.format == PayloadFormat::Avro
            && self.codec.schemas.is_empty()
            && self.codec.state_schemas.is_empty()
        {
            return invalid(
                "codec.schemas",
                "codec.format = \"avro\" needs at least one schema, e.g. order = \"order/OrderPlaced.avsc\"".into(),
            );
        }
        if let Some(ca) = &self.registry.tls_ca_file {
            if let Err(err) = crate::tls::ca_certificates(ca) {
                return invalid("registry.tls_ca_file", err.to_string());
            }
        }
        if self.codec.format == PayloadFormat::Avro && self.registry.url.is_empty() {
            return invalid(
                "registry.url",
                "codec.format = \"avro\" needs a schema registry URL (or set codec.format = \"json\")".into(),
            );
        }
        if self.retention.batch_rows < 1 {
            return invalid("retention.batch_rows", "must be at least 1".into());
        }
        if self.telemetry.lag_sample_interval_ms == 0 {
            return invalid("telemetry.lag_sample_interval_ms", "must be at least 1".into());
        }
        for (key, value) in [
            ("source.batch_rows", self.source.batch_rows),
            ("source.batch_max_bytes", self.source.batch_max_bytes),
            ("checkpoint.batch_rows", self.checkpoint.batch_rows),
            ("checkpoint.max_in_flight", self.checkpoint.max_in_flight),
            ("routing.max_held_entities", self.routing.max_held_entities),
        ] {
            if value == 0 {
                return invalid(key, "must be at least 1".into());
            }
        }
        if self.telemetry.http_listen.parse::<std::net::SocketAddr>().is_err() {
            return invalid(
                "telemetry.http_listen",
                format!("`{}` is not an address such as 127.0.0.1:9187", self.telemetry.http_listen),
            );
        }
        Ok(())
    }

    /// The outbox table as a quoted, schema-qualified SQL name.
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

    pub fn outbox_table_sql(&self) -> String {
        format!("\"{}\".\"{}\"", self.outbox.schema, self.outbox.table)
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

/// Figment reports unknown fields as "unknown field `x`, expected one of ..."
/// with the path of the containing table; join both so the message names
/// the full key, e.g. `kafka.bootstrap_server`.
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
        _ if !path.is_empty() => format!("key `{path}`: {}", err.kind),
        _ => err.kind.to_string(),
    }
}

fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 63
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [postgres]
        url = "postgres://relay:relay@127.0.0.1:55432/outbox"
        [kafka]
        bootstrap_servers = "127.0.0.1:59092"
    "#;

    #[test]
    fn minimal_config_takes_defaults() {
        let config = Config::from_toml_str(MINIMAL).expect("minimal config");
        assert_eq!(config.source.mode, SourceMode::Logical);
        assert_eq!(config.routing.topic_template, "outbox.{aggregate_type}");
        assert_eq!(config.kafka.compression, "lz4");
        assert_eq!(config.outbox.columns.aggregate_id, "aggregate_id");
    }

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

    #[test]
    fn a_topic_carrying_both_event_and_state_messages_is_refused() {
        let mixed = format!("{MINIMAL}\n[routing.state_topics]\ncustomer = \"outbox.order\"");
        let err = Config::from_toml_str(&mixed).expect_err("must fail").to_string();
        assert!(err.contains("routing.state_topics.customer"), "{err}");
        assert!(err.contains("`outbox.order`") && err.contains("`order`") && err.contains("`customer`"), "{err}");
        let same = format!("{MINIMAL}\n[routing]\nstate_topic_template = \"outbox.{{aggregate_type}}\"");
        let err = Config::from_toml_str(&same).expect_err("must fail").to_string();
        assert!(err.contains("routing.state_topic_template") && err.contains("compacted"), "{err}");
        let policy = format!("{MINIMAL}\n[routing.topic_settings.order]\n\"cleanup.policy\" = \"compact\"");
        let err = Config::from_toml_str(&policy).expect_err("must fail").to_string();
        assert!(err.contains("routing.topic_settings.order") && err.contains("cleanup.policy"), "{err}");
        let apart = format!(
            "{MINIMAL}\n[routing.state_topics]\ncustomer = \"customers.state\"\n[routing.topic_settings.customer]\n\"min.compaction.lag.ms\" = \"60000\""
        );
        let config = Config::from_toml_str(&apart).expect("separate topics are fine");
        assert_eq!(config.routing.kind_of_topic("customers.state"), Some((TopicKind::State, "customer".into())));
        assert_eq!(config.routing.kind_of_topic("outbox.order.state"), Some((TopicKind::State, "order".into())));
        assert_eq!(config.routing.kind_of_topic("outbox.order"), Some((TopicKind::Event, "order".into())));
        assert_eq!(config.routing.kind_of_topic("payments"), None);
    }

    #[test]
    fn misspelled_key_is_named() {
        let toml = MINIMAL.replace("bootstrap_servers", "bootstrap_server");
        let err = Config::from_toml_str(&toml).expect_err("must fail").to_string();
        assert!(err.contains("kafka.bootstrap_server"), "{err}");
    }

    #[test]
    fn column_names_are_checked() {
        let toml = format!("{MINIMAL}\n[outbox.columns]\nid = \"\"");
        let err = Config::from_toml_str(&toml).expect_err("must fail").to_string();
        assert!(err.contains("outbox.columns.id"), "{err}");
        // Any name Postgres accepts is fine: it is quoted wherever used.
        let toml = format!("{MINIMAL}\n[outbox.columns]\naggregate_id = \"Aggregate \\\"Id\\\"\"");
        assert!(Config::from_toml_str(&toml).is_ok());
    }

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
            let err = Config::from_toml_str(&toml).expect_err(key).to_string();
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

    #[test]
    fn registry_ca_file_is_read_at_start() {
        let toml = format!("{MINIMAL}\n[registry]\ntls_ca_file = \"/nonexistent/registry-ca.pem\"");
        let err = Config::from_toml_str(&toml).expect_err("must fail").to_string();
        assert!(err.contains("registry.tls_ca_file") && err.contains("/nonexistent/registry-ca.pem"), "{err}");
        let not_pem = tempfile::NamedTempFile::new().expect("temp file");
        let toml = format!("{MINIMAL}\n[registry]\ntls_ca_file = \"{}\"", not_pem.path().display());
        let err = Config::from_toml_str(&toml).expect_err("must fail").to_string();
        assert!(err.contains("registry.tls_ca_file") && err.contains("no PEM certificate"), "{err}");
    }

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
