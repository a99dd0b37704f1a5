//! Makes sure a topic exists before the first record goes to it, creating
//! it when `routing.create_topics` allows; remembers the topics it saw.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::{FutureProducer, Producer};

use crate::config::RoutingConfig;
use crate::delivery::PublishError;

/// The topics known to exist, with the broker-side record size limit of
/// each (`max.message.bytes`, when it could be read). Cheap to clone;
/// clones share what they know. A new pipeline run starts afresh, so a
/// limit an operator raised is seen after `relay held retry`.
#[derive(Clone)]
pub struct Topics {
    admin: Arc<AdminClient<DefaultClientContext>>,
    producer: FutureProducer,
    routing: RoutingConfig,
    known: Arc<Mutex<HashMap<String, Option<usize>>>>,
}

impl Topics {
    pub fn new(admin: AdminClient<DefaultClientContext>, producer: FutureProducer, routing: RoutingConfig) -> Self {
        Self { admin: Arc::new(admin), producer, routing, known: Arc::default() }
    }

    fn known(&self, topic: &str) -> Option<Option<usize>> {
        self.known.lock().ok()?.get(topic).copied()
    }

    /// Makes sure `topic` exists, creating it when allowed, and returns its
    /// record size limit if known. A definite "no" (not authorized, invalid,
    /// missing with creation off) is permanent; an unreachable broker is
    /// retriable and never holds a row.
    pub async fn ensure(&self, topic: &str) -> Result<Option<usize>, PublishError> {
        if let Some(limit) = self.known(topic) {
            return Ok(limit);
        }
        if self.routing.create_topics {
            self.create(topic).await?;
        } else if !self.exists(topic).await? {
            return Err(PublishError::Permanent(format!(
                "topic `{topic}` does not exist and routing.create_topics is false: create it, or set routing.create_topics = true"
            )));
        }
        let limit = self.max_message_bytes(topic).await;
        if let Ok(mut known) = self.known.lock() {
            known.insert(topic.to_string(), limit);
        }
        Ok(limit)
    }

    /// The topic's `max.message.bytes`: the broker refuses larger record
    /// batches, but says so only in the delivery report, after later rows of
    /// the same entity may already be on their way. Knowing it, the sink
    /// holds such a record before it is sent. `None` when it cannot be read
    /// (then the delivery report decides, as before).
    async fn max_message_bytes(&self, topic: &str) -> Option<usize> {
        let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
        let results = match self.admin.describe_configs([&ResourceSpecifier::Topic(topic)], &options).await {
            Ok(results) => results,
            Err(err) => {
                tracing::debug!(topic, error = %err, "cannot read the topic's max.message.bytes");
                return None;
            }
        };
        let limit = results.into_iter().flatten().find_map(|resource| {
            resource.get("max.message.bytes").and_then(|entry| entry.value.as_deref()?.parse::<usize>().ok())
        });
        tracing::debug!(topic, ?limit, "topic record size limit");
        limit
    }

    async fn create(&self, topic: &str) -> Result<(), PublishError> {
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
        Ok(())
    }

    async fn exists(&self, topic: &str) -> Result<bool, PublishError> {
        let producer = self.producer.clone();
        let name = topic.to_string();
        tokio::task::spawn_blocking(move || {
            producer.client().fetch_metadata(Some(&name), Duration::from_secs(10)).map(|md| {
                md.topics().iter().any(|t| t.name() == name && t.error().is_none() && !t.partitions().is_empty())
            })
        })
        .await
        .map_err(|e| PublishError::Retriable(e.to_string()))?
        .map_err(|e| PublishError::Retriable(format!("cannot read metadata of topic `{topic}`: {e}")))
    }
}
