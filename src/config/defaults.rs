//! Every default of the configuration, written once.

use super::{
    CheckpointConfig, CodecConfig, ColumnNames, Compatibility, Compression, Delivery, KeyFormat, LeaderConfig,
    LogFormat, OutboxConfig, PayloadFormat, Readiness, RetentionConfig, RoutingConfig, SourceConfig, SourceMode,
    SubjectStrategy, TelemetryConfig,
};

pub fn shutdown_timeout_ms() -> u64 {
    10_000
}
pub fn connect_timeout_ms() -> u64 {
    5_000
}
pub fn compression() -> Compression {
    Compression::Lz4
}
pub fn max_held_entities() -> usize {
    10_000
}
pub fn linger_ms(delivery: Delivery) -> u64 {
    match delivery {
        Delivery::AtLeastOnce => 5,
        Delivery::ExactlyOnce => 1,
    }
}
pub fn batch_size_bytes() -> u64 {
    1_000_000
}
pub fn message_timeout_ms() -> u64 {
    0
}
pub fn queue_max_messages() -> u64 {
    100_000
}
pub fn transaction_interval_ms() -> u64 {
    100
}
pub fn transaction_max_rows() -> usize {
    20_000
}
pub fn transaction_max_bytes() -> usize {
    16 << 20
}
pub fn progress_topic() -> String {
    "outbox-relay-progress".into()
}
pub fn source_mode() -> SourceMode {
    SourceMode::Logical
}
pub fn slot_name() -> String {
    "outbox_relay".into()
}
pub fn publication_name() -> String {
    "outbox_relay_pub".into()
}
pub fn create_slot() -> bool {
    true
}
pub fn status_interval_ms() -> u64 {
    1_000
}
pub fn poll_interval_ms() -> u64 {
    1_000
}
pub fn source_batch_rows() -> usize {
    1_000
}
pub fn source_batch_max_bytes() -> usize {
    1 << 20
}
pub fn outbox_schema() -> String {
    "public".into()
}
pub fn outbox_table() -> String {
    "outbox".into()
}
pub fn topic_template() -> String {
    "outbox.{aggregate_type}".into()
}
pub fn state_topic_template() -> String {
    "outbox.{aggregate_type}.state".into()
}
pub fn create_topics() -> bool {
    true
}
pub fn topic_partitions() -> i32 {
    -1
}
pub fn topic_replication_factor() -> i32 {
    -1
}
pub fn payload_format() -> PayloadFormat {
    PayloadFormat::Json
}
pub fn schemas_dir() -> std::path::PathBuf {
    "schemas".into()
}
pub fn subject_strategy() -> SubjectStrategy {
    SubjectStrategy::TopicRecord
}
pub fn compatibility() -> Compatibility {
    Compatibility::Backward
}
pub fn key_format() -> KeyFormat {
    KeyFormat::String
}
pub fn checkpoint_batch_rows() -> usize {
    1_000
}
pub fn checkpoint_flush_interval_ms() -> u64 {
    50
}
pub fn max_in_flight() -> usize {
    50_000
}
pub fn http_listen() -> String {
    "127.0.0.1:9187".into()
}
pub fn log_format() -> LogFormat {
    LogFormat::Text
}
pub fn readiness() -> Readiness {
    Readiness::Lenient
}
pub fn progress_timeout_secs() -> u64 {
    300
}
pub fn lag_sample_interval_ms() -> u64 {
    5_000
}
pub fn retention_enabled() -> bool {
    true
}
pub fn retention_max_age_secs() -> u64 {
    5 * 24 * 3600
}
pub fn retention_batch_rows() -> i64 {
    1_000
}
pub fn retention_interval_secs() -> u64 {
    60
}
pub fn renew_interval_ms() -> u64 {
    1_000
}
pub fn lease_timeout_ms() -> u64 {
    5_000
}

impl Default for SourceConfig {
    fn default() -> Self {
        Self {
            mode: source_mode(),
            slot_name: slot_name(),
            publication_name: publication_name(),
            create_slot: create_slot(),
            status_interval_ms: status_interval_ms(),
            poll_interval_ms: poll_interval_ms(),
            batch_rows: source_batch_rows(),
            batch_max_bytes: source_batch_max_bytes(),
            max_slot_wal_bytes: 0,
        }
    }
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self { schema: outbox_schema(), table: outbox_table(), columns: ColumnNames::default() }
    }
}

impl Default for ColumnNames {
    fn default() -> Self {
        Self {
            id: "id".into(),
            event_id: "event_id".into(),
            aggregate_type: "aggregate_type".into(),
            aggregate_id: "aggregate_id".into(),
            event_type: "event_type".into(),
            kind: "kind".into(),
            entity_version: "entity_version".into(),
            payload: "payload".into(),
            headers: "headers".into(),
            occurred_at: "occurred_at".into(),
        }
    }
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            topic_template: topic_template(),
            topics: Default::default(),
            state_topic_template: state_topic_template(),
            state_topics: Default::default(),
            topic_settings: Default::default(),
            create_topics: create_topics(),
            topic_partitions: topic_partitions(),
            topic_replication_factor: topic_replication_factor(),
            dead_letter_topic: None,
            max_held_entities: max_held_entities(),
        }
    }
}

impl Default for CodecConfig {
    fn default() -> Self {
        Self {
            format: payload_format(),
            schemas_dir: schemas_dir(),
            schemas: Default::default(),
            state_schemas: Default::default(),
            subject_strategy: subject_strategy(),
            compatibility: compatibility(),
            auto_register: false,
            key_format: key_format(),
        }
    }
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            batch_rows: checkpoint_batch_rows(),
            flush_interval_ms: checkpoint_flush_interval_ms(),
            max_in_flight: max_in_flight(),
            publish_state: Default::default(),
        }
    }
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            http_listen: http_listen(),
            log_format: log_format(),
            readiness: readiness(),
            progress_timeout_secs: progress_timeout_secs(),
            lag_sample_interval_ms: lag_sample_interval_ms(),
        }
    }
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            enabled: retention_enabled(),
            max_age_secs: retention_max_age_secs(),
            batch_rows: retention_batch_rows(),
            interval_secs: retention_interval_secs(),
        }
    }
}

impl Default for LeaderConfig {
    fn default() -> Self {
        Self { renew_interval_ms: renew_interval_ms(), lease_timeout_ms: lease_timeout_ms() }
    }
}
