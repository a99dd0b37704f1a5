//! The sink stage: produces each row to Kafka and hands the pending delivery
//! to the checkpoint stage, in source order.
//!
//! Contract: the producer is idempotent with `acks=all`, so librdkafka's own
//! retries neither duplicate nor reorder records within a partition. The key
//! is the entity id and the partitioner is `murmur2_random`, the Java client's
//! default for keyed records, so every message of one entity lands in one
//! partition, the same one a Java producer would choose. A row counts as
//! published only when the checkpoint stage has its delivery report; nothing
//! here marks anything.
//!
//! Backpressure: when librdkafka's queue is full, the sink waits and stops
//! taking rows from the source, which stops reading Postgres.

mod routing;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::ClientConfig;
use tokio::sync::mpsc;

pub use routing::TopicRouter;

use crate::checkpoint::{InFlight, RowMeta};
use crate::codec::Codec;
use crate::config::{Config, KafkaConfig, RoutingConfig};
use crate::source::{OutboxRow, SourceEvent};
use crate::telemetry::metrics;

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
    /// pipeline restarts from its last confirmed position.
    #[error("{0}")]
    Retriable(String),
}

/// A delivery in progress, resolving to the record's partition and offset.
pub type PendingDelivery = Pin<Box<dyn Future<Output = Result<Ack, PublishError>> + Send>>;

/// Why the sink stage stopped.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("cannot create the Kafka client: {0}")]
    Client(#[source] KafkaError),
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
        "enable.idempotence"
        | "acks"
        | "request.required.acks"
        | "max.in.flight"
        | "max.in.flight.requests.per.connection" => "the no-loss, in-order guarantee",
        "partitioner" => "per-key order compatible with the Java client",
        _ => return None,
    })
}

/// The producer properties for `config`.
pub fn producer_config(config: &KafkaConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    for (key, value) in &config.librdkafka {
        client.set(key, value);
    }
    client
        .set("bootstrap.servers", &config.bootstrap_servers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .set("compression.type", &config.compression)
        .set("linger.ms", config.linger_ms.to_string())
        .set("batch.size", config.batch_size_bytes.to_string())
        .set("message.timeout.ms", config.message_timeout_ms.to_string())
        .set("queue.buffering.max.messages", config.queue_max_messages.to_string());
    client
}

/// How `last_error` of a row that waits behind a held row starts; the relay
/// releases such rows by itself once nothing earlier of their entity is held.
pub const WAITING_BEHIND: &str = "waiting behind held row ";

/// Entities whose earlier row is held: their later rows wait behind it.
/// Shared by the sink (errors at produce time) and the checkpoint stage
/// (errors in delivery reports).
#[derive(Debug, Clone, Default)]
pub struct HeldEntities(Arc<Mutex<HashMap<(String, String), i64>>>);

impl HeldEntities {
    /// Marks the entity as blocked by row `id` (the first held row wins).
    pub fn hold(&self, aggregate_type: &str, aggregate_id: &str, id: i64) {
        if let Ok(mut map) = self.0.lock() {
            map.entry((aggregate_type.to_string(), aggregate_id.to_string())).or_insert(id);
            metrics::held_entities(map.len());
        }
    }

    /// Forgets the entity's hold if row `id` is what blocks it: that row is
    /// being retried (released by an operator, or resent after a restart),
    /// so the rows behind it may follow it in order. If it fails again, it
    /// holds the entity again.
    pub fn release(&self, aggregate_type: &str, aggregate_id: &str, id: i64) {
        if let Ok(mut map) = self.0.lock() {
            let key = (aggregate_type.to_string(), aggregate_id.to_string());
            if map.get(&key) == Some(&id) {
                map.remove(&key);
                metrics::held_entities(map.len());
            }
        }
    }

    /// The held rows that block entities now, for the pipeline's check
    /// whether an operator released one of them.
    pub fn blockers(&self) -> Vec<i64> {
        self.0.lock().map(|map| map.values().copied().collect()).unwrap_or_default()
    }

    /// The held row blocking this entity, if any.
    pub fn blocker(&self, aggregate_type: &str, aggregate_id: &str) -> Option<i64> {
        let map = self.0.lock().ok()?;
        if map.is_empty() {
            return None;
        }
        map.get(&(aggregate_type.to_string(), aggregate_id.to_string())).copied()
    }
}

/// Tells permanent Kafka errors (the same record can never succeed) from
/// transient ones.
pub fn classify(err: &KafkaError) -> PublishError {
    use RDKafkaErrorCode as C;
    let code = err.rdkafka_error_code();
    let permanent = matches!(
        code,
        Some(
            C::MessageSizeTooLarge
                | C::InvalidMessageSize
                | C::InvalidMessage
                | C::InvalidRecord
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

/// Produces rows to Kafka.
pub struct KafkaSink {
    producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
    router: TopicRouter,
    routing: RoutingConfig,
    codec: Codec,
    held: HeldEntities,
    known_topics: HashSet<String>,
}

impl KafkaSink {
    pub fn new(config: &Config, held: HeldEntities, codec: Codec) -> Result<Self, SinkError> {
        let client_config = producer_config(&config.kafka);
        let producer: FutureProducer = client_config.create().map_err(SinkError::Client)?;
        let mut admin_config = ClientConfig::new();
        for (key, value) in &config.kafka.librdkafka {
            admin_config.set(key, value);
        }
        admin_config.set("bootstrap.servers", &config.kafka.bootstrap_servers);
        let admin = admin_config.create().map_err(SinkError::Client)?;
        Ok(Self {
            producer,
            admin,
            router: TopicRouter::new(&config.routing),
            routing: config.routing.clone(),
            codec,
            held,
            known_topics: HashSet::new(),
        })
    }

    /// Forwards every source event, in order, to the checkpoint stage.
    /// Returns when the source is exhausted or the checkpoint stage is gone.
    pub async fn run(
        mut self,
        mut input: mpsc::Receiver<SourceEvent>,
        output: mpsc::Sender<InFlight>,
    ) -> Result<(), SinkError> {
        while let Some(event) = input.recv().await {
            let item = match event {
                SourceEvent::Checkpoint(position) => InFlight::Checkpoint(position),
                SourceEvent::Row(row) => self.publish(row).await,
            };
            metrics::in_flight_inc();
            if output.send(item).await.is_err() {
                break;
            }
        }
        Ok(())
    }

    /// Starts the delivery of one row, or holds it with the reason.
    async fn publish(&mut self, row: OutboxRow) -> InFlight {
        let topic = self.router.topic_for(&row.aggregate_type);
        let meta = RowMeta::new(&row, &topic);
        // A held row that comes again (resent after a restart, or released
        // by an operator) is retried itself, and the rows behind it follow.
        match self.held.blocker(&row.aggregate_type, &row.aggregate_id) {
            Some(blocker) if blocker == row.id => self.held.release(&row.aggregate_type, &row.aggregate_id, row.id),
            Some(blocker) => {
                return InFlight::Held {
                    meta,
                    error: format!("{WAITING_BEHIND}{blocker} of the same entity"),
                    attempted: false,
                };
            }
            None => {}
        }
        match self.ensure_topic(&topic).await {
            Ok(()) => {}
            Err(PublishError::Permanent(error)) => return self.hold(&row, meta, error).await,
            Err(retriable) => {
                return InFlight::Sent { meta, delivery: Box::pin(futures::future::ready(Err(retriable))) }
            }
        }
        let payload = match self.codec.encode(&row, &topic) {
            Ok(payload) => payload,
            Err(err) => return self.hold(&row, meta, err.to_string()).await,
        };
        let key = match self.codec.encode_key(&row, &topic) {
            Ok(key) => key,
            Err(err) => return self.hold(&row, meta, err.to_string()).await,
        };
        let headers = record_headers(&row);
        let mut record = FutureRecord::to(&topic).key(key.as_ref()).payload(payload.as_ref()).headers(headers);
        loop {
            match self.producer.send_result(record) {
                Ok(delivery) => {
                    metrics::bytes_produced(payload.len());
                    metrics::producer_queue(self.producer.in_flight_count());
                    let pending: PendingDelivery = Box::pin(delivery.map(|outcome| match outcome {
                        Ok(Ok(delivery)) => Ok(Ack { partition: delivery.partition, offset: delivery.offset }),
                        Ok(Err((err, _))) => Err(classify(&err)),
                        Err(_canceled) => Err(PublishError::Retriable("producer closed before delivery".into())),
                    }));
                    return InFlight::Sent { meta, delivery: pending };
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    // Backpressure: wait for deliveries to drain the queue.
                    metrics::queue_full();
                    record = returned;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((err, _)) => match classify(&err) {
                    PublishError::Permanent(error) => return self.hold(&row, meta, error).await,
                    PublishError::Retriable(error) => {
                        return InFlight::Sent {
                            meta,
                            delivery: Box::pin(futures::future::ready(Err(PublishError::Retriable(error)))),
                        }
                    }
                },
            }
        }
    }

    /// Holds a row that cannot be published: later rows of its entity wait
    /// behind it, and a copy goes to the dead-letter topic if one is set.
    async fn hold(&mut self, row: &OutboxRow, meta: RowMeta, error: String) -> InFlight {
        self.held.hold(&meta.aggregate_type, &meta.aggregate_id, meta.id);
        tracing::error!(row_id = meta.id, topic = %meta.topic, traceparent = meta.traceparent.as_deref().unwrap_or(""), error = %error, "row held: it cannot be published until an operator acts");
        if let Some(topic) = self.routing.dead_letter_topic.clone() {
            self.dead_letter(&topic, row, &error).await;
        }
        InFlight::Held { meta, error, attempted: true }
    }

    /// Sends a held row to the dead-letter topic as JSON with the reason.
    /// Best effort: the row stays held and recorded whatever happens here.
    async fn dead_letter(&mut self, topic: &str, row: &OutboxRow, reason: &str) {
        if let Err(err) = self.ensure_topic(topic).await {
            tracing::warn!(row_id = row.id, topic, error = %err, "cannot reach the dead-letter topic");
            return;
        }
        let payload = serde_json::from_slice::<serde_json::Value>(&row.payload)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&row.payload).into_owned()));
        let body = serde_json::json!({
            "row_id": row.id,
            "event_id": row.event_id,
            "aggregate_type": row.aggregate_type,
            "aggregate_id": row.aggregate_id,
            "event_type": row.event_type,
            "kind": row.kind,
            "entity_version": row.entity_version,
            "occurred_at": row.occurred_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "reason": reason,
            "payload": payload,
        });
        let bytes = body.to_string();
        let headers = record_headers(row).insert(Header { key: "held_reason", value: Some(reason.as_bytes()) });
        let record =
            FutureRecord::to(topic).key(row.aggregate_id.as_bytes()).payload(bytes.as_bytes()).headers(headers);
        match self.producer.send_result(record) {
            Ok(delivery) => {
                let (row_id, topic) = (row.id, topic.to_string());
                tokio::spawn(async move {
                    if let Ok(Err((err, _))) = delivery.await {
                        tracing::warn!(row_id, topic = %topic, error = %err, "dead-letter copy not delivered");
                    }
                });
            }
            Err((err, _)) => tracing::warn!(row_id = row.id, topic, error = %err, "dead-letter copy not sent"),
        }
    }

    /// Makes sure `topic` exists, creating it when allowed. A definite "no"
    /// (not authorized, invalid, missing with creation off) is permanent; an
    /// unreachable broker is retriable and never holds a row.
    async fn ensure_topic(&mut self, topic: &str) -> Result<(), PublishError> {
        if self.known_topics.contains(topic) {
            return Ok(());
        }
        if self.routing.create_topics {
            let new_topic = NewTopic::new(
                topic,
                self.routing.topic_partitions,
                TopicReplication::Fixed(self.routing.topic_replication_factor),
            );
            let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
            let results = self
                .admin
                .create_topics([&new_topic], &options)
                .await
                .map_err(|e| PublishError::Retriable(format!("cannot create topic `{topic}`: {e}")))?;
            for result in results {
                match result {
                    Ok(_) => tracing::info!(topic, "created topic"),
                    Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    Err((_, code)) => {
                        let error = format!("cannot create topic `{topic}`: {code}");
                        return Err(match code {
                            RDKafkaErrorCode::TopicAuthorizationFailed
                            | RDKafkaErrorCode::ClusterAuthorizationFailed
                            | RDKafkaErrorCode::InvalidTopic
                            | RDKafkaErrorCode::InvalidPartitions
                            | RDKafkaErrorCode::InvalidReplicationFactor
                            | RDKafkaErrorCode::PolicyViolation => PublishError::Permanent(error),
                            _ => PublishError::Retriable(error),
                        });
                    }
                }
            }
        } else {
            let producer = self.producer.clone();
            let name = topic.to_string();
            let found = tokio::task::spawn_blocking(move || {
                producer.client().fetch_metadata(Some(&name), Duration::from_secs(10)).map(|md| {
                    md.topics().iter().any(|t| t.name() == name && t.error().is_none() && !t.partitions().is_empty())
                })
            })
            .await
            .map_err(|e| PublishError::Retriable(e.to_string()))?
            .map_err(|e| PublishError::Retriable(format!("cannot read metadata of topic `{topic}`: {e}")))?;
            if !found {
                return Err(PublishError::Permanent(format!(
                    "topic `{topic}` does not exist and routing.create_topics is false: create it, or set routing.create_topics = true"
                )));
            }
        }
        self.known_topics.insert(topic.to_string());
        Ok(())
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
