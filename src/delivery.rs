//! What passes from the sink to the checkpoint stage: each row with its
//! pending delivery, or the reason it was not sent, in source order; and
//! how Kafka errors are classified. Imports no stage.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::outbox::{CommitBoundary, OutboxRow};

/// The acknowledgement of one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub partition: i32,
    pub offset: i64,
}

/// Why a record was not delivered.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PublishError {
    /// Retrying the same record can never succeed (too large, not authorized,
    /// missing topic): the row is held with this reason.
    #[error("{0}")]
    Permanent(String),
    /// The broker or network failed in a way librdkafka gave up on: the
    /// pipeline restarts from its last confirmed commit boundary.
    #[error("{0}")]
    Retriable(String),
}

/// Tells permanent Kafka errors (the same record can never succeed) from
/// transient ones. `InvalidMessage` (CORRUPT_MESSAGE, a CRC mismatch on the
/// way) is transient: the same record sent again succeeds. A timestamp the
/// topic refuses (`message.timestamp.*.max.ms`) needs the topic's settings
/// fixed: permanent.
pub fn classify(err: &KafkaError) -> PublishError {
    use RDKafkaErrorCode as C;
    let permanent = matches!(
        err.rdkafka_error_code(),
        Some(
            C::MessageSizeTooLarge
                | C::InvalidMessageSize
                | C::InvalidRecord
                | C::InvalidTimestamp
                | C::TopicAuthorizationFailed
                | C::ClusterAuthorizationFailed
                | C::InvalidTopic
                | C::UnknownTopic
                | C::UnknownTopicOrPartition
                | C::PolicyViolation
                | C::InvalidRequiredAcks
        )
    );
    if permanent {
        PublishError::Permanent(err.to_string())
    } else {
        PublishError::Retriable(err.to_string())
    }
}

/// [`classify`] for a record of `topic`, with an authorization refusal
/// spelled as its fix: which ACL, on which resource, for which principal
/// (`principal` as in `KafkaConfig::principal`). The broker refuses a
/// produce request with TOPIC_AUTHORIZATION_FAILED when the principal lacks
/// WRITE on the topic (librdkafka reports it in the delivery report; a
/// metadata refusal, no DESCRIBE, too). Both are permanent: the row is held
/// and `relay held retry` sends it again once the ACL is granted.
pub fn classify_for_topic(err: &KafkaError, topic: &str, principal: &str) -> PublishError {
    match err.rdkafka_error_code() {
        Some(RDKafkaErrorCode::TopicAuthorizationFailed) => PublishError::Permanent(format!(
            "not authorized to write to topic `{topic}` ({err}): grant WRITE on TOPIC {topic} to {principal} (and DESCRIBE, which it needs too), then `relay held retry`"
        )),
        Some(RDKafkaErrorCode::ClusterAuthorizationFailed) => PublishError::Permanent(format!(
            "not authorized on the cluster while writing to topic `{topic}` ({err}): brokers before Kafka 3.0 need IDEMPOTENT_WRITE on CLUSTER for {principal}; grant it, then `relay held retry`"
        )),
        _ => classify(err),
    }
}

/// A delivery in progress, resolving to the record's partition and offset.
pub type PendingDelivery = Pin<Box<dyn Future<Output = Result<Ack, PublishError>> + Send>>;

/// A row on its way through the sink: where it goes and with which key.
/// The row itself travels along so that a row held only when its delivery
/// report comes back gets the same dead-letter copy as one held at once.
#[derive(Debug, Clone)]
pub struct RoutedRow {
    pub row: OutboxRow,
    pub topic: Arc<str>,
    /// The record key, once encoded (the dead-letter copy reuses it).
    pub key: Option<Bytes>,
}

impl RoutedRow {
    pub fn new(row: OutboxRow, topic: Arc<str>) -> Self {
        Self { row, topic, key: None }
    }

    /// Commit time where known, else `occurred_at`: the start of the latency.
    pub fn since(&self) -> chrono::DateTime<chrono::Utc> {
        self.row.committed_at.unwrap_or(self.row.occurred_at)
    }

    /// The row's W3C trace context, carried into the relay's log lines.
    pub fn traceparent(&self) -> Option<String> {
        let headers = self.row.headers.as_ref()?;
        let value: serde_json::Value = serde_json::from_slice(headers).ok()?;
        value.get("traceparent")?.as_str().map(str::to_string)
    }
}

/// One item between the sink and the checkpoint stage, in source order.
pub enum InFlight {
    /// A record handed to the producer.
    Sent { row: RoutedRow, delivery: PendingDelivery },
    /// A row held for its own error (already counted and logged by the
    /// sink's holder).
    Held { row: RoutedRow, error: String },
    /// A row that waits behind held row `behind` of the same entity.
    Waiting { row: RoutedRow, behind: i64 },
    /// A commit boundary; see [`CommitBoundary`].
    Boundary(CommitBoundary),
}

/// The `last_error` text of a row waiting behind held row `behind`; the
/// typed fact is the `waiting_for` column.
pub fn waiting_reason(behind: i64) -> String {
    format!("waiting behind held row {behind} of the same entity")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(code: RDKafkaErrorCode) -> &'static str {
        match classify(&KafkaError::MessageProduction(code)) {
            PublishError::Permanent(_) => "permanent",
            PublishError::Retriable(_) => "retriable",
        }
    }

    #[test]
    fn kafka_errors_are_classified() {
        assert_eq!(class(RDKafkaErrorCode::MessageSizeTooLarge), "permanent");
        assert_eq!(class(RDKafkaErrorCode::TopicAuthorizationFailed), "permanent");
        assert_eq!(class(RDKafkaErrorCode::InvalidTimestamp), "permanent");
        // CORRUPT_MESSAGE: a CRC mismatch on the way; the same record sent again succeeds.
        assert_eq!(class(RDKafkaErrorCode::InvalidMessage), "retriable");
        assert_eq!(class(RDKafkaErrorCode::NotEnoughReplicas), "retriable");
        assert_eq!(class(RDKafkaErrorCode::RequestTimedOut), "retriable");
    }

    #[test]
    fn an_authorization_refusal_names_the_topic_and_the_acl() {
        let err = KafkaError::MessageProduction(RDKafkaErrorCode::TopicAuthorizationFailed);
        match classify_for_topic(&err, "orders", "User:relay") {
            PublishError::Permanent(text) => {
                assert!(text.contains("grant WRITE on TOPIC orders to User:relay"), "{text}");
                assert!(text.contains("not authorized to write to topic `orders`"), "{text}");
            }
            other => panic!("must be permanent: {other:?}"),
        }
        let err = KafkaError::MessageProduction(RDKafkaErrorCode::RequestTimedOut);
        assert!(matches!(classify_for_topic(&err, "orders", "User:relay"), PublishError::Retriable(_)));
    }
}
