//! Progress records of exactly-once mode: one per committed transaction, in
//! the compacted topic `kafka.progress_topic`, keyed by the transactional
//! id, listing every row the transaction carries and where it landed. They
//! are written inside the transaction, so one is visible exactly when its
//! rows are; read back with `isolation.level = read_committed` after
//! `init_transactions`, newest first, they tell which committed rows
//! Postgres may not show as published yet.

use std::time::{Duration, Instant};

use bytes::Bytes;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Message, OwnedHeaders};
use rdkafka::{Offset, TopicPartitionList};

use super::{client_config, Failure, Outbound, SinkError};
use crate::config::Config;
use crate::delivery::{ProgressRecord, ProgressSource};
use crate::error_class::Leaf;

/// Records read per partition and window when reading back.
const WINDOW: i64 = 2_000;
/// How long reading one window may take.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

// The sink's side of the neutral record: how it goes to Kafka.
impl ProgressRecord {
    /// The record for the progress topic (JSON, keyed by the transactional id).
    pub fn outbound(&self, topic: &str) -> Result<Outbound, SinkError> {
        let payload = serde_json::to_vec(self)
            .map_err(|e| SinkError::Transaction(Failure::because("cannot serialize the progress record", e)))?;
        Ok(Outbound {
            topic: topic.into(),
            key: Bytes::copy_from_slice(self.transactional_id.as_bytes()),
            payload: Some(Bytes::from(payload)),
            headers: OwnedHeaders::new(),
            partition: None,
        })
    }
}

/// Creates the progress topic when it is missing and topic creation is on:
/// one partition, compacted with hourly segments (only each relay group's
/// last records matter in the long run). A start reads it back from the
/// end until it finds a record of its own group whose rows are recorded;
/// the first start of a group reads it all.
pub async fn ensure_topic(config: &Config) -> Result<(), SinkError> {
    if !config.routing.create_topics {
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> = client_config(&config.kafka).create().map_err(SinkError::Client)?;
    let topic = NewTopic::new(
        &config.kafka.progress_topic,
        1,
        TopicReplication::Fixed(config.routing.topic_replication_factor),
    )
    .set("cleanup.policy", "compact")
    // Small segments, so compaction keeps what a start reads back small
    // (the active segment is never compacted; the default rolls weekly).
    .set("segment.ms", "3600000");
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics([&topic], &options)
        .await
        .map_err(|e| SinkError::Transaction(Failure::because("cannot create the progress topic", Leaf(e))))?;
    for result in results {
        match result {
            Ok(_) => tracing::info!(topic = %config.kafka.progress_topic, "created the progress topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => {
                return Err(SinkError::Transaction(Failure::new(format!(
                    "cannot create the progress topic `{}`: {code}; create it (compacted) or grant CREATE",
                    config.kafka.progress_topic
                ))))
            }
        }
    }
    Ok(())
}

/// Reads the progress topic back, newest window first: the
/// [`ProgressSource`] of the exactly-once recovery.
pub struct ProgressReader {
    consumer: Option<BaseConsumer>,
    topic: String,
    transactional_id: String,
    /// Per partition: the lowest offset and where the next older window ends.
    partitions: Vec<(i32, i64, i64)>,
}

impl ProgressReader {
    /// A reader positioned at the end of every partition of the topic.
    pub async fn open(config: &Config) -> Result<Self, SinkError> {
        let mut client = client_config(&config.kafka);
        client
            .set("group.id", format!("{}-progress", config.transactional_id()))
            .set("isolation.level", "read_committed")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            // Windows end where data is; a fetch that waits for more at
            // the end of the partition only delays the start.
            .set("fetch.wait.max.ms", "10");
        let consumer: BaseConsumer = client.create().map_err(SinkError::Client)?;
        let topic = config.kafka.progress_topic.clone();
        let (consumer, partitions) = blocking(move || {
            let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
            let mut partitions = Vec::new();
            for t in metadata.topics().iter().filter(|t| t.name() == topic) {
                for p in t.partitions() {
                    let (low, high) = consumer.fetch_watermarks(&topic, p.id(), Duration::from_secs(10))?;
                    partitions.push((p.id(), low, high));
                }
            }
            Ok((consumer, partitions))
        })
        .await?;
        Ok(Self {
            consumer: Some(consumer),
            topic: config.kafka.progress_topic.clone(),
            transactional_id: config.transactional_id(),
            partitions,
        })
    }
}

impl ProgressSource for ProgressReader {
    type Error = SinkError;

    /// The next older window of this group's records, newest first; `None`
    /// once the beginning of every partition was read.
    async fn older(&mut self) -> Result<Option<Vec<ProgressRecord>>, SinkError> {
        let windows: Vec<(i32, i64, i64)> = self
            .partitions
            .iter()
            .filter(|(_, low, end)| end > low)
            .map(|&(p, low, end)| (p, (end - WINDOW).max(low), end))
            .collect();
        if windows.is_empty() {
            return Ok(None);
        }
        for (p, _, end) in &mut self.partitions {
            if let Some((_, start, _)) = windows.iter().find(|(wp, _, _)| wp == p) {
                *end = *start;
            }
        }
        let consumer =
            self.consumer.take().ok_or_else(|| SinkError::Transaction(Failure::new("progress reader closed")))?;
        let (topic, id) = (self.topic.clone(), self.transactional_id.clone());
        let (consumer, mut records) = blocking(move || {
            let mut found = Vec::new();
            for (partition, start, end) in windows {
                found.extend(read_window(&consumer, &topic, partition, start, end, &id)?.into_iter().map(|(_, r)| r));
            }
            Ok((consumer, found))
        })
        .await?;
        self.consumer = Some(consumer);
        records.reverse();
        Ok(Some(records))
    }
}

/// This group's records in `[start, end)` of one partition, oldest first.
fn read_window(
    consumer: &BaseConsumer,
    topic: &str,
    partition: i32,
    start: i64,
    end: i64,
    transactional_id: &str,
) -> Result<Vec<(i64, ProgressRecord)>, rdkafka::error::KafkaError> {
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, partition, Offset::Offset(start))?;
    consumer.assign(&assignment)?;
    let deadline = Instant::now() + READ_TIMEOUT;
    let mut found = Vec::new();
    loop {
        let position = consumer.position()?.find_partition(topic, partition).and_then(|e| e.offset().to_raw());
        if position.is_some_and(|p| p >= end) || Instant::now() > deadline {
            break;
        }
        // Short: a window often ends on a transaction marker, which is
        // never returned, so its end shows only in the position; a long
        // poll would wait out its whole timeout there, at every
        // exactly-once start.
        let Some(message) = consumer.poll(Duration::from_millis(10)) else { continue };
        let message = message?;
        if message.offset() >= end {
            break;
        }
        if message.key() != Some(transactional_id.as_bytes()) {
            continue;
        }
        if let Some(record) = message.payload().and_then(|p| serde_json::from_slice::<ProgressRecord>(p).ok()) {
            found.push((message.offset(), record));
        }
    }
    if Instant::now() > deadline {
        return Err(rdkafka::error::KafkaError::MessageConsumption(RDKafkaErrorCode::OperationTimedOut));
    }
    Ok(found)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, rdkafka::error::KafkaError> + Send + 'static,
) -> Result<T, SinkError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => {
            result.map_err(|e| SinkError::Transaction(Failure::because("cannot read the progress topic", Leaf(e))))
        }
        Err(e) => Err(SinkError::Transaction(Failure::because("cannot read the progress topic", e))),
    }
}
