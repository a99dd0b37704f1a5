//! The one place a row becomes a Kafka record, and the one produce loop:
//! used by the sink, `relay replay` and the dead-letter copy, so all three
//! send the same topic, key bytes and headers.

use std::time::Duration;

use bytes::Bytes;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};

use crate::codec::{Codec, CodecError};
use crate::delivery::RoutedRow;
use crate::outbox::OutboxRow;
use crate::routing::TopicRouter;
use crate::telemetry::metrics;

/// A record ready for the producer.
pub struct Outbound {
    pub topic: String,
    pub key: Bytes,
    /// `None`: a tombstone (null value).
    pub payload: Option<Bytes>,
    pub headers: OwnedHeaders,
    /// The partition, when the sink chose it; `None`: librdkafka's
    /// partitioner (the same murmur2) chooses.
    pub partition: Option<i32>,
}

/// What a record adds to its key, value and headers in a record batch,
/// generously (batch header 61 bytes, record framing varints).
const RECORD_OVERHEAD: usize = 100;

impl Outbound {
    /// The record's size as the broker counts it against
    /// `max.message.bytes`, before compression (as librdkafka counts
    /// `message.max.bytes`): an upper bound of the compressed batch.
    pub fn size(&self) -> usize {
        use rdkafka::message::Headers;
        let headers: usize = self.headers.iter().map(|h| h.key.len() + h.value.map_or(0, <[u8]>::len)).sum();
        self.key.len() + self.payload.as_ref().map_or(0, Bytes::len) + headers + RECORD_OVERHEAD
    }

    /// Adds a header (e.g. `replayed`).
    pub fn with_header(mut self, key: &str, value: &str) -> Self {
        self.headers = self.headers.insert(Header { key, value: Some(value.as_bytes()) });
        self
    }
}

/// Builds records: topic by routing, key and value by the codec, headers
/// from the row.
#[derive(Debug, Clone)]
pub struct RecordBuilder {
    router: TopicRouter,
    codec: Codec,
}

impl RecordBuilder {
    pub fn new(router: TopicRouter, codec: Codec) -> Self {
        Self { router, codec }
    }

    /// The topic of `row`.
    pub fn topic(&self, row: &OutboxRow) -> String {
        self.router.topic_of(row)
    }

    /// The record of `row` on `topic`: the value encoded by the codec, the
    /// key (entity id, as text or Avro; partitioning hashes these bytes) and
    /// the headers.
    pub fn build(&self, row: &OutboxRow, topic: &str) -> Result<Outbound, CodecError> {
        let payload = self.codec.encode(row, topic)?;
        let key = self.codec.encode_key(row, topic)?;
        Ok(Outbound { topic: topic.to_string(), key, payload, headers: record_headers(row), partition: None })
    }
}

/// The dead-letter copy of a held row: JSON with the reason, the row's
/// headers plus `held_reason`, and the key the record had (or would have had).
pub fn dead_letter(topic: &str, routed: &RoutedRow, reason: &str) -> Outbound {
    let row = &routed.row;
    let payload = row.payload.as_deref().map_or(serde_json::Value::Null, |payload| {
        serde_json::from_slice::<serde_json::Value>(payload)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(payload).into_owned()))
    });
    let body = serde_json::json!({
        "row_id": row.id,
        "event_id": row.event_id,
        "aggregate_type": row.aggregate_type,
        "aggregate_id": row.aggregate_id,
        "event_type": row.event_type,
        "kind": row.kind,
        "entity_version": row.entity_version,
        "occurred_at": row.occurred_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "topic": routed.topic,
        "reason": reason,
        "payload": payload,
    });
    Outbound {
        topic: topic.to_string(),
        key: routed.key.clone().unwrap_or_else(|| Bytes::copy_from_slice(row.aggregate_id.as_bytes())),
        payload: Some(Bytes::from(body.to_string())),
        headers: record_headers(row),
        partition: None,
    }
    .with_header("held_reason", reason)
}

/// Hands `record` to the producer. While librdkafka's queue is full it
/// waits for deliveries to drain it (backpressure) instead of buffering.
pub async fn produce(producer: &FutureProducer, record: Outbound) -> Result<DeliveryFuture, KafkaError> {
    let mut future_record =
        FutureRecord::<[u8], [u8]>::to(&record.topic).key(record.key.as_ref()).headers(record.headers);
    if let Some(payload) = record.payload.as_deref() {
        future_record = future_record.payload(payload);
    }
    if let Some(partition) = record.partition {
        future_record = future_record.partition(partition);
    }
    loop {
        match producer.send_result(future_record) {
            Ok(delivery) => return Ok(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                metrics::queue_full();
                future_record = returned;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err((err, _)) => return Err(err),
        }
    }
}

/// The headers every record carries, plus each key of the row's `headers`
/// JSON object (so a W3C `traceparent` travels along).
pub fn record_headers(row: &OutboxRow) -> OwnedHeaders {
    let event_id = row.event_id.to_string();
    let occurred_at = row.occurred_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let mut headers = OwnedHeaders::new()
        .insert(Header { key: "event_id", value: Some(event_id.as_bytes()) })
        .insert(Header { key: "event_type", value: Some(row.event_type.as_bytes()) })
        .insert(Header { key: "kind", value: Some(row.kind.as_bytes()) })
        .insert(Header { key: "aggregate_type", value: Some(row.aggregate_type.as_bytes()) })
        .insert(Header { key: "occurred_at", value: Some(occurred_at.as_bytes()) });
    if let Some(version) = row.entity_version {
        let version = version.to_string();
        headers = headers.insert(Header { key: "entity_version", value: Some(version.as_bytes()) });
    }
    if let Some(extra) = row.headers.as_ref() {
        if let Ok(serde_json::Value::Object(map)) = serde_json::from_slice::<serde_json::Value>(extra) {
            for (key, value) in map {
                let text = match value {
                    serde_json::Value::String(s) => s,
                    serde_json::Value::Null => continue,
                    other => other.to_string(),
                };
                headers = headers.insert(Header { key: &key, value: Some(text.as_bytes()) });
            }
        }
    }
    headers
}
