//! A read-only Kafka consumer of one topic, for tools that show what the
//! relay published (`relay tail`, the `state_cache` example): it assigns the
//! topic's partitions itself and never joins a group or commits an offset,
//! so reading changes nothing any real consumer group sees, and it knows
//! when it has read up to the end offsets the partitions had at start.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::config::KafkaConfig;

/// How long metadata and watermark requests may take at start.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a topic could not be read. All of them end the read; none is about
/// one record.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// librdkafka refused the client configuration.
    #[error("cannot create a Kafka consumer")]
    Client(#[source] KafkaError),
    /// The brokers did not answer a metadata request: unreachable, or the
    /// credentials were refused (`relay check` tells which).
    #[error("cannot read the metadata of topic `{topic}` (run `relay check` to diagnose the connection)")]
    Metadata {
        topic: String,
        #[source]
        source: KafkaError,
    },
    /// The topic does not exist, or the principal may not describe it.
    #[error("topic `{topic}` cannot be read: {reason}")]
    NoSuchTopic { topic: String, reason: String },
    /// The end offsets of a partition could not be read.
    #[error("cannot read the offsets of {topic}/{partition}")]
    Watermarks {
        topic: String,
        partition: i32,
        #[source]
        source: KafkaError,
    },
    /// The partitions could not be assigned.
    #[error("cannot assign the partitions of `{topic}`")]
    Assign {
        topic: String,
        #[source]
        source: KafkaError,
    },
    /// Reading failed for a reason a retry cannot cure (authorization, the
    /// topic was deleted).
    #[error("reading `{topic}` failed")]
    Consume {
        topic: String,
        #[source]
        source: KafkaError,
    },
}

/// The relay's connection properties (bootstrap servers, TLS, SASL, the
/// raw `kafka.librdkafka` map) for a consumer that never commits: a group
/// id of its own is set because librdkafka wants one, but partitions are
/// assigned, not subscribed, so the group never joins or stores offsets.
pub fn consumer_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut client = super::connection::client_config(kafka);
    reader_settings(&mut client);
    client
}

/// A read-only consumer of `bootstrap` with no other settings (for tools
/// that are given brokers instead of a relay config).
pub fn plain_consumer_config(bootstrap: &str) -> ClientConfig {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", bootstrap);
    reader_settings(&mut client);
    client
}

fn reader_settings(client: &mut ClientConfig) {
    client
        .set("group.id", format!("relay-tail-{}", uuid::Uuid::new_v4().simple()))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("allow.auto.create.topics", "false")
        // Only committed records of exactly-once transactions (what a
        // consumer of the relay should see).
        .set("isolation.level", "read_committed");
}

/// Where a [`TopicReader`] starts on each partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The first offset each partition still holds.
    Beginning,
    /// The end offset at start: only records written later are read.
    End,
}

/// Reads every partition of one topic by assignment (no group membership,
/// no commits) and knows when it has read up to the end offsets the
/// partitions had when it started.
pub struct TopicReader {
    consumer: Arc<StreamConsumer>,
    topic: String,
    /// (partition, end offset when the reader started).
    ends: Vec<(i32, i64)>,
    /// Per partition, the offset after the last record returned.
    next: HashMap<i32, i64>,
}

impl TopicReader {
    /// Looks up the topic's partitions and their end offsets, and assigns
    /// every partition at `start`.
    pub async fn open(client: ClientConfig, topic: &str, start: Start) -> Result<Self, ReadError> {
        let consumer: Arc<StreamConsumer> = Arc::new(client.create().map_err(ReadError::Client)?);
        let lookup = consumer.clone();
        let name = topic.to_string();
        // Metadata and watermark requests block: off the async threads.
        let offsets = tokio::task::spawn_blocking(move || partition_offsets(&lookup, &name)).await.map_err(|e| {
            ReadError::NoSuchTopic { topic: topic.to_string(), reason: format!("the lookup failed: {e}") }
        })??;
        let mut assignment = TopicPartitionList::new();
        let mut next = HashMap::new();
        for &(partition, low, high) in &offsets {
            let (offset, from) = match start {
                Start::Beginning => (Offset::Beginning, low),
                Start::End => (Offset::Offset(high), high),
            };
            assignment
                .add_partition_offset(topic, partition, offset)
                .map_err(|source| ReadError::Assign { topic: topic.to_string(), source })?;
            next.insert(partition, from);
        }
        consumer.assign(&assignment).map_err(|source| ReadError::Assign { topic: topic.to_string(), source })?;
        let ends = offsets.iter().map(|&(partition, _, high)| (partition, high)).collect();
        Ok(Self { consumer, topic: topic.to_string(), ends, next })
    }

    /// Whether every record below the end offsets seen at start was read.
    /// The consumer's position counts too: it moves past offsets that are
    /// never returned (transaction markers, aborted records).
    pub fn caught_up(&self) -> bool {
        let positions = self.consumer.position().ok();
        self.ends.iter().all(|&(partition, end)| {
            let seen = self.next.get(&partition).copied().unwrap_or(0);
            let position = positions
                .as_ref()
                .and_then(|p| p.find_partition(&self.topic, partition))
                .and_then(|e| e.offset().to_raw())
                .unwrap_or(-1);
            seen.max(position) >= end
        })
    }

    /// The partitions read and their end offsets when the reader started.
    pub fn end_offsets(&self) -> &[(i32, i64)] {
        &self.ends
    }

    /// The next record, or `None` when none arrived within `wait`. Errors
    /// a retry may cure (a broker restarting) are logged and read past;
    /// the others end the read.
    pub async fn next(&mut self, wait: Duration) -> Result<Option<OwnedMessage>, ReadError> {
        match tokio::time::timeout(wait, self.consumer.recv()).await {
            Err(_) => Ok(None),
            Ok(Ok(message)) => {
                let slot = self.next.entry(message.partition()).or_insert(0);
                *slot = (*slot).max(message.offset() + 1);
                Ok(Some(message.detach()))
            }
            Ok(Err(err)) if is_fatal(&err) => Err(ReadError::Consume { topic: self.topic.clone(), source: err }),
            Ok(Err(err)) => {
                tracing::warn!(topic = %self.topic, error = %err, "consumer error; retrying");
                Ok(None)
            }
        }
    }
}

/// Errors that waiting cannot cure.
fn is_fatal(err: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        err.rdkafka_error_code(),
        Some(
            C::TopicAuthorizationFailed
                | C::GroupAuthorizationFailed
                | C::ClusterAuthorizationFailed
                | C::UnknownTopicOrPartition
                | C::UnknownTopic
                | C::UnknownPartition
                | C::Authentication
                | C::SaslAuthenticationFailed
        )
    )
}

/// (partition, low, high) of every partition of `topic`.
fn partition_offsets(consumer: &StreamConsumer, topic: &str) -> Result<Vec<(i32, i64, i64)>, ReadError> {
    let metadata = consumer
        .fetch_metadata(Some(topic), METADATA_TIMEOUT)
        .map_err(|source| ReadError::Metadata { topic: topic.to_string(), source })?;
    let entry = metadata.topics().iter().find(|t| t.name() == topic).ok_or_else(|| ReadError::NoSuchTopic {
        topic: topic.to_string(),
        reason: "not in the brokers' metadata".into(),
    })?;
    if let Some(err) = entry.error() {
        let reason = RDKafkaErrorCode::from(err).to_string();
        return Err(ReadError::NoSuchTopic { topic: topic.to_string(), reason });
    }
    if entry.partitions().is_empty() {
        return Err(ReadError::NoSuchTopic { topic: topic.to_string(), reason: "it has no partitions".into() });
    }
    let mut offsets = Vec::new();
    for partition in entry.partitions() {
        let (low, high) = consumer
            .fetch_watermarks(topic, partition.id(), METADATA_TIMEOUT)
            .map_err(|source| ReadError::Watermarks { topic: topic.to_string(), partition: partition.id(), source })?;
        offsets.push((partition.id(), low, high));
    }
    offsets.sort_unstable();
    Ok(offsets)
}
