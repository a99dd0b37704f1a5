//! The one place a row becomes a Kafka record, and the one produce loop:
//! used by the sink, `relay replay` and the dead-letter copy, so all three
//! send the same topic, key bytes and headers.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer};

use crate::codec::{Codec, CodecError};
use crate::delivery::RoutedRow;
use crate::outbox::OutboxRow;
use crate::routing::TopicRouter;
use crate::telemetry::metrics;

use super::reports::{KafkaProducer, Report};

/// A record ready for the producer.
pub struct Outbound {
    pub topic: Arc<str>,
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
    pub fn topic(&self, row: &OutboxRow) -> Arc<str> {
        self.router.topic_of(&row.aggregate_type, &row.kind)
    }

    /// The record of `row` on `topic`: the value encoded by the codec, the
    /// key (entity id, as text or Avro; partitioning hashes these bytes) and
    /// the headers.
    pub fn build(&self, row: &OutboxRow, topic: &Arc<str>) -> Result<Outbound, CodecError> {
        let payload = self.codec.encode(row, topic)?;
        let key = self.codec.encode_key(row, topic)?;
        Ok(Outbound { topic: Arc::clone(topic), key, payload, headers: record_headers(row), partition: None })
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
        "aggregate_type": &*row.aggregate_type,
        "aggregate_id": row.aggregate_id,
        "event_type": &*row.event_type,
        "kind": &*row.kind,
        "entity_version": row.entity_version,
        "occurred_at": row.occurred_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "topic": &*routed.topic,
        "reason": reason,
        "payload": payload,
    });
    Outbound {
        topic: topic.into(),
        key: routed.key.clone().unwrap_or_else(|| Bytes::copy_from_slice(row.aggregate_id.as_bytes())),
        payload: Some(Bytes::from(body.to_string())),
        headers: record_headers(row),
        partition: None,
    }
    .with_header("held_reason", reason)
}

/// Hands `record` to the producer; the [`Report`] resolves with its
/// delivery report. While librdkafka's queue is full it waits for
/// deliveries to drain it (backpressure) instead of buffering.
pub async fn produce(producer: &KafkaProducer, record: Outbound) -> Result<Report, KafkaError> {
    let mut report = producer.context().reserve();
    let mut base_record = BaseRecord::<[u8], [u8], usize>::with_opaque_to(&record.topic, report.ticket())
        .key(record.key.as_ref())
        .headers(record.headers);
    if let Some(payload) = record.payload.as_deref() {
        base_record = base_record.payload(payload);
    }
    if let Some(partition) = record.partition {
        base_record = base_record.partition(partition);
    }
    loop {
        match producer.send(base_record) {
            Ok(()) => {
                report.mark_sent();
                return Ok(report);
            }
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                metrics::queue_full();
                base_record = returned;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err((err, _)) => return Err(err),
        }
    }
}

/// The headers every record carries, plus each key of the row's `headers`
/// JSON object (so a W3C `traceparent` travels along). Formatted on the
/// stack: this runs for every record.
pub fn record_headers(row: &OutboxRow) -> OwnedHeaders {
    let mut event_id = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let event_id = row.event_id.hyphenated().encode_lower(&mut event_id);
    let mut occurred_at = [0u8; RFC3339_MICROS_LEN];
    let occurred_at = rfc3339_micros(&row.occurred_at, &mut occurred_at);
    let mut headers = OwnedHeaders::new_with_capacity(6)
        .insert(Header { key: "event_id", value: Some(event_id.as_bytes()) })
        .insert(Header { key: "event_type", value: Some(row.event_type.as_bytes()) })
        .insert(Header { key: "kind", value: Some(row.kind.as_bytes()) })
        .insert(Header { key: "aggregate_type", value: Some(row.aggregate_type.as_bytes()) })
        .insert(Header { key: "occurred_at", value: Some(occurred_at.as_bytes()) });
    if let Some(version) = row.entity_version {
        let mut buffer = [0u8; 20];
        let mut cursor = std::io::Cursor::new(&mut buffer[..]);
        // An i64 always fits 20 bytes.
        let _ = std::io::Write::write_fmt(&mut cursor, format_args!("{version}"));
        let written = cursor.position() as usize;
        headers = headers.insert(Header { key: "entity_version", value: Some(&buffer[..written]) });
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

/// `2026-11-30T20:46:05.123456Z`.
const RFC3339_MICROS_LEN: usize = 27;

/// `at` as chrono's `to_rfc3339_opts(SecondsFormat::Micros, true)` prints
/// it, written into `out` without allocating (years 0-9999; chrono for the
/// others).
fn rfc3339_micros<'a>(
    at: &chrono::DateTime<chrono::Utc>,
    out: &'a mut [u8; RFC3339_MICROS_LEN],
) -> std::borrow::Cow<'a, str> {
    use chrono::{Datelike, Timelike};
    let year = at.year();
    if !(0..=9999).contains(&year) {
        return at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true).into();
    }
    // A leap second (nanosecond >= 1e9) prints as second 60, as chrono does.
    let nanos = at.nanosecond();
    let (second, micros) =
        if nanos >= 1_000_000_000 { (60, (nanos - 1_000_000_000) / 1_000) } else { (at.second(), nanos / 1_000) };
    let mut put = |at: usize, value: u32, width: usize| {
        let mut value = value;
        for i in (0..width).rev() {
            out[at + i] = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    put(0, year as u32, 4);
    put(5, at.month(), 2);
    put(8, at.day(), 2);
    put(11, at.hour(), 2);
    put(14, at.minute(), 2);
    put(17, second, 2);
    put(20, micros, 6);
    for (index, byte) in [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':'), (19, b'.'), (26, b'Z')] {
        out[index] = byte;
    }
    // Only ASCII digits and separators were written.
    std::str::from_utf8(&out[..])
        .map_or_else(|_| at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true).into(), Into::into)
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use rdkafka::message::Headers;

    use super::*;

    #[test]
    fn timestamps_print_as_chrono_prints_them() {
        let mut samples = vec![
            chrono::Utc.with_ymd_and_hms(2026, 11, 30, 20, 46, 5).single().expect("valid"),
            chrono::Utc.with_ymd_and_hms(1, 1, 1, 0, 0, 0).single().expect("valid"),
            chrono::Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).single().expect("valid"),
            chrono::Utc.with_ymd_and_hms(10000, 1, 1, 0, 0, 0).single().expect("valid"),
        ];
        let mut t = chrono::Utc.with_ymd_and_hms(1999, 12, 31, 23, 59, 58).single().expect("valid");
        for step in 0..2_000i64 {
            t += chrono::Duration::nanoseconds(step * 987_654_321 + 1);
            samples.push(t);
        }
        let leap = chrono::NaiveDate::from_ymd_opt(2016, 12, 31)
            .and_then(|d| d.and_hms_nano_opt(23, 59, 59, 1_500_000_000))
            .expect("leap second");
        samples.push(chrono::Utc.from_utc_datetime(&leap));
        for at in samples {
            let mut out = [0u8; RFC3339_MICROS_LEN];
            assert_eq!(rfc3339_micros(&at, &mut out), at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true));
        }
    }

    #[test]
    fn headers_carry_the_rows_facts() {
        let mut row = OutboxRow::for_test(7, "o-1");
        row.entity_version = Some(-9_223_372_036_854_775_808);
        row.headers = Some(Bytes::from_static(br#"{"traceparent":"00-abc-def-01","n":3,"gone":null}"#));
        let headers = record_headers(&row);
        let get = |name: &str| {
            headers
                .iter()
                .find(|h| h.key == name)
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        assert_eq!(get("event_id"), Some(row.event_id.to_string()));
        assert_eq!(get("occurred_at"), Some(row.occurred_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)));
        assert_eq!(get("entity_version").as_deref(), Some("-9223372036854775808"));
        assert_eq!(get("event_type"), Some(row.event_type.to_string()));
        assert_eq!(get("traceparent").as_deref(), Some("00-abc-def-01"));
        assert_eq!(get("n").as_deref(), Some("3"));
        assert_eq!(get("gone"), None);
    }
}
