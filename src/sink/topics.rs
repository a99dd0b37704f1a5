//! Makes sure a topic exists before the first record goes to it, creating
//! it when `routing.create_topics` allows; remembers the topics it saw.
//!
//! With ACLs: creating needs CREATE on the topic, and a broker refuses it
//! (TOPIC_AUTHORIZATION_FAILED) even for a topic that exists, so a refused
//! creation falls back to metadata (DESCRIBE) before anything is held.
//! Reading `max.message.bytes` needs DESCRIBE_CONFIGS; without it the relay
//! warns once per topic and lets the delivery report decide.

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
    /// Who the ACLs must name (`KafkaConfig::principal`), for messages.
    principal: Arc<str>,
    known: Arc<Mutex<HashMap<String, Option<usize>>>>,
}

/// What the cluster's metadata says about one topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Presence {
    Exists,
    Missing,
    /// The principal may not even describe it (no DESCRIBE ACL).
    NotAuthorized,
}

impl Topics {
    /// `principal` is named in the messages of held rows (the ACL to grant).
    pub fn new(
        admin: AdminClient<DefaultClientContext>,
        producer: FutureProducer,
        routing: RoutingConfig,
        principal: Arc<str>,
    ) -> Self {
        Self { admin: Arc::new(admin), producer, routing, principal, known: Arc::default() }
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
        let principal = &self.principal;
        // Created (or found existing) by the create call: no metadata needed.
        let created = self.routing.create_topics && self.create(topic).await?;
        if !created {
            match self.exists(topic).await? {
                Presence::Exists => {}
                Presence::Missing if self.routing.create_topics => {
                    return Err(PublishError::Permanent(format!(
                        "not authorized to create topic `{topic}`: grant CREATE on TOPIC {topic} to {principal}, or create the topic"
                    )))
                }
                Presence::Missing => {
                    return Err(PublishError::Permanent(format!(
                        "topic `{topic}` does not exist and routing.create_topics is false: create it, or set routing.create_topics = true"
                    )))
                }
                // Without DESCRIBE the broker does not say whether it exists.
                Presence::NotAuthorized => {
                    let create = if self.routing.create_topics { " (and CREATE, if it does not exist)" } else { "" };
                    return Err(PublishError::Permanent(format!(
                        "not authorized to describe topic `{topic}`: grant DESCRIBE and WRITE on TOPIC {topic} to {principal}{create}, then `relay held retry`"
                    )));
                }
            }
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
        let mut limit = None;
        for result in results {
            match result {
                // rdkafka 0.39 drops the per-resource error code: a topic the
                // principal may not DESCRIBE_CONFIGS comes back with no entries
                // (a readable topic always has them, defaults included).
                Ok(resource) if resource.entries.is_empty() => tracing::warn!(
                    topic,
                    "cannot read the topic's configuration (max.message.bytes); records too large for it are held only when the broker refuses them; grant DESCRIBE_CONFIGS on TOPIC {topic} to {} to hold them before they are sent",
                    self.principal
                ),
                Ok(resource) => {
                    limit = limit.or_else(|| {
                        resource.get("max.message.bytes").and_then(|entry| entry.value.as_deref()?.parse().ok())
                    })
                }
                Err(code) => tracing::debug!(topic, error = %code, "cannot read the topic's max.message.bytes"),
            }
        }
        tracing::debug!(topic, ?limit, "topic record size limit");
        limit
    }

    /// Creates `topic`: true when it exists now (created, or it already
    /// existed), false when the broker refused for lack of CREATE (then the
    /// topic may exist all the same: the caller asks the metadata).
    async fn create(&self, topic: &str) -> Result<bool, PublishError> {
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
                Err((_, RDKafkaErrorCode::TopicAuthorizationFailed | RDKafkaErrorCode::ClusterAuthorizationFailed)) => {
                    tracing::debug!(topic, "not authorized to create the topic; looking it up");
                    return Ok(false);
                }
                Err((_, code)) => {
                    let error = format!("cannot create topic `{topic}`: {code}");
                    return Err(match code {
                        RDKafkaErrorCode::InvalidTopic
                        | RDKafkaErrorCode::InvalidPartitions
                        | RDKafkaErrorCode::InvalidReplicationFactor
                        | RDKafkaErrorCode::PolicyViolation => PublishError::Permanent(error),
                        _ => PublishError::Retriable(error),
                    });
                }
            }
        }
        Ok(true)
    }

    async fn exists(&self, topic: &str) -> Result<Presence, PublishError> {
        let producer = self.producer.clone();
        let name = topic.to_string();
        tokio::task::spawn_blocking(move || {
            producer.client().fetch_metadata(Some(&name), Duration::from_secs(10)).map(|md| {
                let mine = md.topics().iter().filter(|t| t.name() == name);
                let mut presence = Presence::Missing;
                for t in mine {
                    presence = match t.error().map(RDKafkaErrorCode::from) {
                        None if !t.partitions().is_empty() => Presence::Exists,
                        Some(RDKafkaErrorCode::TopicAuthorizationFailed) => Presence::NotAuthorized,
                        _ => presence,
                    };
                }
                presence
            })
        })
        .await
        .map_err(|e| PublishError::Retriable(e.to_string()))?
        .map_err(|e| PublishError::Retriable(format!("cannot read metadata of topic `{topic}`: {e}")))
    }
}
