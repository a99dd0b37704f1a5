//! Makes sure a topic exists before the first record goes to it, creating
//! it when `routing.create_topics` allows; remembers the topics it saw.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::{FutureProducer, Producer};

use crate::config::RoutingConfig;
use crate::delivery::PublishError;

/// The topics known to exist. Cheap to clone; clones share what they know.
#[derive(Clone)]
pub struct Topics {
    admin: Arc<AdminClient<DefaultClientContext>>,
    producer: FutureProducer,
    routing: RoutingConfig,
    known: Arc<Mutex<HashSet<String>>>,
}

impl Topics {
    pub fn new(admin: AdminClient<DefaultClientContext>, producer: FutureProducer, routing: RoutingConfig) -> Self {
        Self { admin: Arc::new(admin), producer, routing, known: Arc::default() }
    }

    fn is_known(&self, topic: &str) -> bool {
        self.known.lock().map(|known| known.contains(topic)).unwrap_or(false)
    }

    /// Makes sure `topic` exists, creating it when allowed. A definite "no"
    /// (not authorized, invalid, missing with creation off) is permanent; an
    /// unreachable broker is retriable and never holds a row.
    pub async fn ensure(&self, topic: &str) -> Result<(), PublishError> {
        if self.is_known(topic) {
            return Ok(());
        }
        if self.routing.create_topics {
            self.create(topic).await?;
        } else if !self.exists(topic).await? {
            return Err(PublishError::Permanent(format!(
                "topic `{topic}` does not exist and routing.create_topics is false: create it, or set routing.create_topics = true"
            )));
        }
        if let Ok(mut known) = self.known.lock() {
            known.insert(topic.to_string());
        }
        Ok(())
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
