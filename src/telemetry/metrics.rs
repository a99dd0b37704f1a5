//! Metric names, each described once, and the helpers the stages call.
//! Listed for users in METRICS.md.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter, Gauge, Histogram, Unit,
};

pub const PUBLISHED_TOTAL: &str = "outbox_relay_published_total";
pub const PUBLISHED_BYTES_TOTAL: &str = "outbox_relay_published_bytes_total";
pub const PUBLISH_LATENCY_SECONDS: &str = "outbox_relay_publish_latency_seconds";
pub const SOURCE_DELAY_SECONDS: &str = "outbox_relay_source_delay_seconds";
pub const KAFKA_ACK_SECONDS: &str = "outbox_relay_kafka_ack_seconds";
pub const PUBLISH_ERRORS_TOTAL: &str = "outbox_relay_publish_errors_total";
pub const HELD_ROWS_TOTAL: &str = "outbox_relay_held_rows_total";
pub const HELD_ENTITIES: &str = "outbox_relay_held_entities";
pub const IN_FLIGHT: &str = "outbox_relay_in_flight";
pub const PRODUCER_QUEUE_FULL_TOTAL: &str = "outbox_relay_producer_queue_full_total";
pub const PRODUCER_QUEUE_MESSAGES: &str = "outbox_relay_producer_queue_messages";
pub const CHECKPOINT_BATCH_ROWS: &str = "outbox_relay_checkpoint_batch_rows";
pub const CHECKPOINT_BATCH_SECONDS: &str = "outbox_relay_checkpoint_batch_seconds";
pub const SOURCE_POSITION: &str = "outbox_relay_source_position_bytes";
pub const CONFIRMED_POSITION: &str = "outbox_relay_confirmed_position_bytes";
pub const LAST_PUBLISH_TIMESTAMP_SECONDS: &str = "outbox_relay_last_publish_timestamp_seconds";
pub const RESTARTS_TOTAL: &str = "outbox_relay_pipeline_restarts_total";
pub const ACTIVE: &str = "outbox_relay_active";
pub const UNPUBLISHED_ROWS: &str = "outbox_relay_unpublished_rows";
pub const OLDEST_UNPUBLISHED_AGE_SECONDS: &str = "outbox_relay_oldest_unpublished_age_seconds";
pub const HELD_ROWS: &str = "outbox_relay_held_rows";
pub const SLOT_RETAINED_WAL_BYTES: &str = "outbox_relay_slot_retained_wal_bytes";
pub const REGISTRY_ERRORS_TOTAL: &str = "outbox_relay_registry_errors_total";
pub const RETENTION_DELETED_ROWS_TOTAL: &str = "outbox_relay_retention_deleted_rows_total";
pub const SLOT_RECOVERIES_TOTAL: &str = "outbox_relay_slot_recoveries_total";
pub const RESEND_SKIPPED_TOTAL: &str = "outbox_relay_resend_skipped_total";
pub const UNRECORDED_ROWS: &str = "outbox_relay_unrecorded_rows";
pub const LEADER: &str = "outbox_relay_leader";
pub const LEADER_TAKEOVERS_TOTAL: &str = "outbox_relay_leader_takeovers_total";
pub const LEADER_LOST_TOTAL: &str = "outbox_relay_leader_lost_total";
pub const TRANSACTIONS_TOTAL: &str = "outbox_relay_transactions_total";
pub const TRANSACTION_ROWS: &str = "outbox_relay_transaction_rows";
pub const TRANSACTION_COMMIT_SECONDS: &str = "outbox_relay_transaction_commit_seconds";

/// Registers descriptions and units with the installed recorder.
pub fn describe() {
    describe_counter!(PUBLISHED_TOTAL, "Rows acknowledged by Kafka, by topic.");
    describe_counter!(PUBLISHED_BYTES_TOTAL, Unit::Bytes, "Record value bytes handed to the producer.");
    describe_histogram!(
        PUBLISH_LATENCY_SECONDS,
        Unit::Seconds,
        "From the row's commit (or occurred_at) to Kafka's acknowledgement."
    );
    describe_histogram!(
        SOURCE_DELAY_SECONDS,
        Unit::Seconds,
        "Logical mode: from a transaction's commit to the relay reading its commit from the slot, once per transaction with outbox rows (the Postgres side of the publish latency)."
    );
    describe_histogram!(
        KAFKA_ACK_SECONDS,
        Unit::Seconds,
        "From handing a record to the producer to its delivery report (linger, broker, network; the Kafka side of the publish latency)."
    );
    describe_counter!(PUBLISH_ERRORS_TOTAL, "Failed deliveries, by class (retriable, permanent).");
    describe_counter!(TRANSACTIONS_TOTAL, "Exactly-once mode: Kafka transactions, by outcome (committed, aborted).");
    describe_histogram!(TRANSACTION_ROWS, "Exactly-once mode: rows per committed transaction.");
    describe_histogram!(
        TRANSACTION_COMMIT_SECONDS,
        Unit::Seconds,
        "Exactly-once mode: from the last row's delivery report to the commit's acknowledgement."
    );
    describe_counter!(HELD_ROWS_TOTAL, "Rows held because they cannot be published (their own error).");
    describe_gauge!(HELD_ENTITIES, "Entities whose rows wait behind a held row.");
    describe_gauge!(IN_FLIGHT, "Items between the source and their recorded publish state.");
    describe_counter!(PRODUCER_QUEUE_FULL_TOTAL, "Times the producer queue was full and reading paused.");
    describe_gauge!(
        PRODUCER_QUEUE_MESSAGES,
        "Messages in the producer's queue, not yet acknowledged (fill level against kafka.queue_max_messages)."
    );
    describe_histogram!(CHECKPOINT_BATCH_ROWS, "Rows recorded per publish-state batch.");
    describe_histogram!(CHECKPOINT_BATCH_SECONDS, Unit::Seconds, "Time to record one publish-state batch.");
    describe_gauge!(SOURCE_POSITION, Unit::Bytes, "Last WAL position read from the slot (logical mode).");
    describe_gauge!(CONFIRMED_POSITION, Unit::Bytes, "Last WAL position confirmed to Postgres (logical mode).");
    describe_gauge!(LAST_PUBLISH_TIMESTAMP_SECONDS, Unit::Seconds, "Unix time of the last acknowledged row.");
    describe_counter!(RESTARTS_TOTAL, "Pipeline restarts after an error, by component.");
    describe_gauge!(ACTIVE, "1 when this instance is the active relay, 0 when standby.");
    describe_gauge!(UNPUBLISHED_ROWS, "Rows not yet published and not held (sampled from Postgres).");
    describe_gauge!(
        OLDEST_UNPUBLISHED_AGE_SECONDS,
        Unit::Seconds,
        "Age of the oldest unpublished, not held row; 0 when none."
    );
    describe_gauge!(HELD_ROWS, "Rows held with an error (sampled from Postgres).");
    describe_gauge!(SLOT_RETAINED_WAL_BYTES, Unit::Bytes, "WAL the replication slot retains (logical mode).");
    describe_counter!(REGISTRY_ERRORS_TOTAL, "Failed schema registry requests.");
    describe_counter!(RETENTION_DELETED_ROWS_TOTAL, "Published rows deleted by retention.");
    describe_gauge!(
        UNRECORDED_ROWS,
        "Rows Kafka acknowledged whose transaction is not visible yet, so their publish state cannot be recorded; the commit boundary after them waits."
    );
    describe_counter!(
        RESEND_SKIPPED_TOTAL,
        "Rows the slot streamed again after a restart that were recorded as published already, so not sent again."
    );
    describe_gauge!(LEADER, "1 while this instance holds the leader lease, 0 otherwise.");
    describe_counter!(
        LEADER_TAKEOVERS_TOTAL,
        "Leases this instance acquired, by what came before (first, released, expired, own)."
    );
    describe_counter!(
        LEADER_LOST_TOTAL,
        "Terms this instance lost without releasing them, by reason (taken_over, not_renewed); each time it stopped producing at once."
    );
    describe_counter!(SLOT_RECOVERIES_TOTAL, "Replication slots recreated and caught up through the poll path, by reason (missing, invalidated, wal_budget).");
}

/// Handles of the metrics updated for every message, looked up once: the
/// `counter!` family hashes the name and labels into the registry on every
/// call, five times per message before. Taken at the first message, after
/// the recorder is installed at start-up.
struct PerMessage {
    published_by_topic: Mutex<HashMap<String, Counter>>,
    published_bytes: Counter,
    latency: Histogram,
    last_publish: Gauge,
    in_flight: Gauge,
    producer_queue: Gauge,
    /// Set per source transaction (logical mode).
    source_position: Gauge,
    confirmed_position: Gauge,
}

fn per_message() -> &'static PerMessage {
    static HANDLES: OnceLock<PerMessage> = OnceLock::new();
    HANDLES.get_or_init(|| PerMessage {
        published_by_topic: Mutex::default(),
        published_bytes: counter!(PUBLISHED_BYTES_TOTAL),
        latency: histogram!(PUBLISH_LATENCY_SECONDS),
        last_publish: gauge!(LAST_PUBLISH_TIMESTAMP_SECONDS),
        in_flight: gauge!(IN_FLIGHT),
        producer_queue: gauge!(PRODUCER_QUEUE_MESSAGES),
        source_position: gauge!(SOURCE_POSITION),
        confirmed_position: gauge!(CONFIRMED_POSITION),
    })
}

pub fn published(topic: &str, since: chrono::DateTime<chrono::Utc>) {
    let handles = per_message();
    if let Ok(mut by_topic) = handles.published_by_topic.lock() {
        match by_topic.get(topic) {
            Some(counter) => counter.increment(1),
            None => {
                let counter = counter!(PUBLISHED_TOTAL, "topic" => topic.to_string());
                counter.increment(1);
                by_topic.insert(topic.to_string(), counter);
            }
        }
    }
    let now = chrono::Utc::now();
    let latency = (now - since).to_std().unwrap_or_default();
    handles.latency.record(latency.as_secs_f64());
    handles.last_publish.set(now.timestamp_millis() as f64 / 1000.0);
}

pub fn bytes_produced(bytes: usize) {
    per_message().published_bytes.increment(bytes as u64);
}

pub fn publish_error(permanent: bool) {
    let class = if permanent { "permanent" } else { "retriable" };
    counter!(PUBLISH_ERRORS_TOTAL, "class" => class).increment(1);
}

pub fn held_row() {
    counter!(HELD_ROWS_TOTAL).increment(1);
}

pub fn held_entities(n: usize) {
    gauge!(HELD_ENTITIES).set(n as f64);
}

pub fn in_flight_inc() {
    per_message().in_flight.increment(1.0);
}

pub fn in_flight_dec() {
    per_message().in_flight.decrement(1.0);
}

pub fn in_flight_reset() {
    per_message().in_flight.set(0.0);
}

pub fn producer_queue(messages: i32) {
    per_message().producer_queue.set(f64::from(messages));
}

/// A committed (with its rows and commit time) or aborted transaction.
pub fn transaction(committed: Option<(usize, Duration)>) {
    match committed {
        Some((rows, took)) => {
            counter!(TRANSACTIONS_TOTAL, "outcome" => "committed").increment(1);
            histogram!(TRANSACTION_ROWS).record(rows as f64);
            histogram!(TRANSACTION_COMMIT_SECONDS).record(took.as_secs_f64());
        }
        None => counter!(TRANSACTIONS_TOTAL, "outcome" => "aborted").increment(1),
    }
}

pub fn queue_full() {
    counter!(PRODUCER_QUEUE_FULL_TOTAL).increment(1);
}

pub fn checkpoint_batch(rows: usize, took: Duration) {
    histogram!(CHECKPOINT_BATCH_ROWS).record(rows as f64);
    histogram!(CHECKPOINT_BATCH_SECONDS).record(took.as_secs_f64());
}

/// A transaction with outbox rows, committed at `committed_at`, was read
/// from the slot just now.
pub fn source_delay(committed_at: chrono::DateTime<chrono::Utc>) {
    static DELAY: OnceLock<Histogram> = OnceLock::new();
    let delay = (chrono::Utc::now() - committed_at).to_std().unwrap_or_default();
    DELAY.get_or_init(|| histogram!(SOURCE_DELAY_SECONDS)).record(delay.as_secs_f64());
}

/// A record's delivery report came back `took` after it was handed to
/// the producer.
pub fn kafka_ack(took: Duration) {
    static ACK: OnceLock<Histogram> = OnceLock::new();
    ACK.get_or_init(|| histogram!(KAFKA_ACK_SECONDS)).record(took.as_secs_f64());
}

pub fn source_position(position: u64) {
    per_message().source_position.set(position as f64);
}

pub fn confirmed_position(position: u64) {
    per_message().confirmed_position.set(position as f64);
}

pub fn restart(component: &'static str) {
    counter!(RESTARTS_TOTAL, "component" => component).increment(1);
}

pub fn active(is_active: bool) {
    gauge!(ACTIVE).set(if is_active { 1.0 } else { 0.0 });
}

pub fn lag(status: &crate::store::Status) {
    gauge!(UNPUBLISHED_ROWS).set(status.pending as f64);
    gauge!(OLDEST_UNPUBLISHED_AGE_SECONDS).set(status.oldest_pending_age_seconds.unwrap_or(0.0));
    gauge!(HELD_ROWS).set(status.held_or_waiting as f64);
    if let Some(bytes) = status.slot_retained_wal_bytes {
        gauge!(SLOT_RETAINED_WAL_BYTES).set(bytes as f64);
    }
}

pub fn registry_error() {
    counter!(REGISTRY_ERRORS_TOTAL).increment(1);
}

pub fn retention_deleted(rows: u64) {
    counter!(RETENTION_DELETED_ROWS_TOTAL).increment(rows);
}

/// A slot was recreated (`reason` = missing | invalidated | wal_budget); the
/// catch-up phase follows.
pub fn slot_recovery(reason: &str) {
    counter!(SLOT_RECOVERIES_TOTAL, "reason" => reason.to_string()).increment(1);
}

/// Rows streamed again after a restart that were published already.
pub fn resend_skipped(rows: usize) {
    counter!(RESEND_SKIPPED_TOTAL).increment(rows as u64);
}

/// Rows acknowledged but not recordable yet (their transaction is not visible).
pub fn unrecorded_rows(rows: usize) {
    gauge!(UNRECORDED_ROWS).set(rows as f64);
}

/// Whether this instance holds the leader lease.
pub fn leader(holds: bool) {
    gauge!(LEADER).set(if holds { 1.0 } else { 0.0 });
}

/// This instance acquired the lease; `reason` says what came before
/// (first | released | expired | own).
pub fn leader_takeover(reason: &'static str) {
    counter!(LEADER_TAKEOVERS_TOTAL, "reason" => reason).increment(1);
}

/// This instance lost its term without releasing it (`reason` =
/// taken_over | not_renewed) and stopped producing.
pub fn leader_lost(reason: &'static str) {
    counter!(LEADER_LOST_TOTAL, "reason" => reason).increment(1);
}
