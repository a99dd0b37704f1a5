//! Makes sure a topic exists before the first record goes to it, creating
//! it when `routing.create_topics` allows; remembers the topics it saw.
//!
//! With ACLs: creating needs CREATE on the topic, and a broker refuses it
//! (TOPIC_AUTHORIZATION_FAILED) even for a topic that exists, so a refused
//! creation falls back to metadata (DESCRIBE) before anything is held.
//! Reading `max.message.bytes` and `cleanup.policy` needs DESCRIBE_CONFIGS;
//! without it the relay warns once per topic and lets the delivery report
//! decide (and cannot tell a compacted topic from another).
//!
//! Created topics get the cleanup policy of their kind (`compact` for state
//! topics, `delete` for event topics, written explicitly rather than the
//! broker's default) and `routing.topic_settings` of their aggregate type.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::Producer;

use super::reports::KafkaProducer;

use crate::config::RoutingConfig;
use crate::delivery::PublishError;
use crate::error_class::Leaf;
use crate::routing::TopicKind;

/// What the relay learnt about a topic once, when it first sent to it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TopicFacts {
    /// The broker-side record size limit (`max.message.bytes`).
    pub max_message_bytes: Option<usize>,
    /// Whether `cleanup.policy` includes `compact`.
    pub compacted: Option<bool>,
    /// The partition count the metadata gave when the run first sent to
    /// the topic (partitions added later count from the next run on).
    pub partitions: Option<i32>,
}

impl TopicFacts {
    /// Refuses a row of `kind` on a topic of the other kind: compaction would
    /// destroy events, and a state topic without it grows without bound.
    /// `Err` is the held row's error, with the fix.
    pub fn accepts(&self, kind: TopicKind, topic: &str, aggregate_type: &str) -> Result<(), String> {
        match (kind, self.compacted) {
            (TopicKind::Event, Some(true)) => Err(format!(
                "topic `{topic}` is compacted (cleanup.policy includes compact), which would delete event messages of aggregate type `{aggregate_type}`: route them elsewhere (routing.topics.{aggregate_type}) or set the topic's cleanup.policy=delete, then `relay held retry`"
            )),
            (TopicKind::State, Some(false)) => Err(format!(
                "topic `{topic}` is not compacted, so the state messages of aggregate type `{aggregate_type}` would pile up there for ever (or expire): route them to a compacted topic (routing.state_topics.{aggregate_type}) or set the topic's cleanup.policy=compact, then `relay held retry`"
            )),
            _ => Ok(()),
        }
    }
}

/// The topics known to exist, with the broker-side record size limit of
/// each (`max.message.bytes`, when it could be read). Cheap to clone;
/// clones share what they know. A new pipeline run starts afresh, so a
/// limit an operator raised is seen after `relay held retry`.
#[derive(Clone)]
pub struct Topics {
    admin: Arc<AdminClient<DefaultClientContext>>,
    producer: KafkaProducer,
    routing: RoutingConfig,
    /// Who the ACLs must name (`KafkaConfig::principal`), for messages.
    principal: Arc<str>,
    known: Arc<Mutex<HashMap<String, TopicFacts>>>,
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
        producer: KafkaProducer,
        routing: RoutingConfig,
        principal: Arc<str>,
    ) -> Self {
        Self { admin: Arc::new(admin), producer, routing, principal, known: Arc::default() }
    }

    fn known(&self, topic: &str) -> Option<TopicFacts> {
        self.known.lock().ok()?.get(topic).copied()
    }

    /// Makes sure `topic` exists, creating it when allowed as a topic of
    /// `kind` (with the settings of `aggregate_type`), and returns what it
    /// knows of it. A definite "no" (not authorized, invalid, missing with
    /// creation off) is permanent; an unreachable broker is retriable and
    /// never holds a row.
    pub async fn ensure(
        &self,
        topic: &str,
        kind: TopicKind,
        aggregate_type: Option<&str>,
    ) -> Result<TopicFacts, PublishError> {
        if let Some(facts) = self.known(topic) {
            return Ok(facts);
        }
        let principal = &self.principal;
        // Created (or found existing) by the create call: no metadata needed.
        let created = self.routing.create_topics && self.create(topic, kind, aggregate_type).await?;
        if !created {
            match self.exists(topic).await? {
                Presence::Exists => {}
                Presence::Missing if self.routing.create_topics => {
                    return Err(PublishError::permanent(format!(
                        "not authorized to create topic `{topic}`: grant CREATE on TOPIC {topic} to {principal}, or create the topic"
                    )))
                }
                Presence::Missing => {
                    return Err(PublishError::permanent(format!(
                        "topic `{topic}` does not exist and routing.create_topics is false: create it, or set routing.create_topics = true"
                    )))
                }
                // Without DESCRIBE the broker does not say whether it exists.
                Presence::NotAuthorized => {
                    let create = if self.routing.create_topics { " (and CREATE, if it does not exist)" } else { "" };
                    return Err(PublishError::permanent(format!(
                        "not authorized to describe topic `{topic}`: grant DESCRIBE and WRITE on TOPIC {topic} to {principal}{create}, then `relay held retry`"
                    )));
                }
            }
        }
        let mut facts = self.describe(topic).await;
        facts.partitions = self.partition_count(topic).await;
        if let Ok(mut known) = self.known.lock() {
            known.insert(topic.to_string(), facts);
        }
        Ok(facts)
    }

    /// The topic's `max.message.bytes` and `cleanup.policy`. The broker
    /// refuses larger record batches, but says so only in the delivery
    /// report, after later rows of the same entity may already be on their
    /// way; knowing the limit, the sink holds such a record before it is
    /// sent. `None`s when it cannot be read (then the delivery report
    /// decides, as before, and the policy goes unchecked).
    async fn describe(&self, topic: &str) -> TopicFacts {
        let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
        let results = match self.admin.describe_configs([&ResourceSpecifier::Topic(topic)], &options).await {
            Ok(results) => results,
            Err(err) => {
                tracing::debug!(topic, error = %err, "cannot read the topic's configuration");
                return TopicFacts::default();
            }
        };
        let mut facts = TopicFacts::default();
        for result in results {
            match result {
                // rdkafka 0.39 drops the per-resource error code: a topic the
                // principal may not DESCRIBE_CONFIGS comes back with no entries
                // (a readable topic always has them, defaults included).
                Ok(resource) if resource.entries.is_empty() => tracing::warn!(
                    topic,
                    "cannot read the topic's configuration (max.message.bytes, cleanup.policy); records too large for it are held only when the broker refuses them, and its cleanup policy goes unchecked; grant DESCRIBE_CONFIGS on TOPIC {topic} to {} to hold them before they are sent",
                    self.principal
                ),
                Ok(resource) => {
                    let value = |name: &str| resource.get(name).and_then(|entry| entry.value.clone());
                    facts.max_message_bytes =
                        facts.max_message_bytes.or_else(|| value("max.message.bytes")?.parse().ok());
                    facts.compacted =
                        facts.compacted.or_else(|| Some(value("cleanup.policy")?.split(',').any(|p| p.trim() == "compact")));
                }
                Err(code) => tracing::debug!(topic, error = %code, "cannot read the topic's configuration"),
            }
        }
        tracing::debug!(topic, ?facts, "topic configuration");
        facts
    }

    /// Creates `topic`: true when it exists now (created, or it already
    /// existed), false when the broker refused for lack of CREATE (then the
    /// topic may exist all the same: the caller asks the metadata).
    async fn create(&self, topic: &str, kind: TopicKind, aggregate_type: Option<&str>) -> Result<bool, PublishError> {
        let mut new_topic = NewTopic::new(
            topic,
            self.routing.topic_partitions,
            TopicReplication::Fixed(self.routing.topic_replication_factor),
        )
        .set("cleanup.policy", kind.cleanup_policy());
        if let Some(settings) = aggregate_type.and_then(|t| self.routing.topic_settings.get(t)) {
            for (name, value) in settings {
                new_topic = new_topic.set(name, value);
            }
        }
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let results = self
            .admin
            .create_topics([&new_topic], &options)
            .await
            .map_err(|e| PublishError::retriable(format!("cannot create topic `{topic}`")).because(Leaf(e)))?;
        for result in results {
            match result {
                Ok(_) => {
                    tracing::info!(topic, cleanup_policy = kind.cleanup_policy(), "created topic");
                    self.wait_for_leaders(topic).await;
                }
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, RDKafkaErrorCode::TopicAuthorizationFailed | RDKafkaErrorCode::ClusterAuthorizationFailed)) => {
                    tracing::debug!(topic, "not authorized to create the topic; looking it up");
                    return Ok(false);
                }
                Err((_, code)) => {
                    // Kafka refuses a name that equals an existing topic's
                    // once '.' and '_' are taken as one (metric names).
                    let hint = match code {
                        RDKafkaErrorCode::InvalidTopic => {
                            " (an existing topic whose name differs only by '.' against '_' collides with it: route elsewhere or delete that topic, then `relay held retry`)"
                        }
                        _ => "",
                    };
                    let error = format!("cannot create topic `{topic}`: {code}{hint}");
                    return Err(match code {
                        RDKafkaErrorCode::InvalidTopic
                        | RDKafkaErrorCode::InvalidPartitions
                        | RDKafkaErrorCode::InvalidReplicationFactor
                        | RDKafkaErrorCode::PolicyViolation => PublishError::permanent(error),
                        _ => PublishError::retriable(error),
                    });
                }
            }
        }
        Ok(true)
    }

    /// Waits (up to 10 s) until the metadata names a leader for every
    /// partition of a topic just created. Records produced in the window
    /// before that were seen acknowledged without an offset (librdkafka's
    /// -1001, after a retry answered DUPLICATE_SEQUENCE_NUMBER) and then
    /// missing from the log, while the entity's next record landed: a gap
    /// the sink can only turn into a resend after it. So the first record
    /// goes out once the partitions are served.
    async fn wait_for_leaders(&self, topic: &str) {
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            let producer = self.producer.clone();
            let name = topic.to_string();
            let ready = tokio::task::spawn_blocking(move || {
                let metadata = producer.client().fetch_metadata(Some(&name), Duration::from_secs(5)).ok()?;
                let entry = metadata.topics().iter().find(|t| t.name() == name)?;
                let served = entry.error().is_none()
                    && !entry.partitions().is_empty()
                    && entry.partitions().iter().all(|p| p.error().is_none() && p.leader() >= 0);
                served.then_some(())
            })
            .await;
            if matches!(ready, Ok(Some(()))) {
                tracing::debug!(
                    topic,
                    waited_ms = started.elapsed().as_millis() as u64,
                    "partitions of the new topic have leaders"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tracing::warn!(topic, "the new topic's partitions have no leader after 10 s; sending anyway");
    }

    /// The topic's partition count from the metadata; `None` when it cannot
    /// be read (then librdkafka's own partitioner picks the partition).
    async fn partition_count(&self, topic: &str) -> Option<i32> {
        let producer = self.producer.clone();
        let name = topic.to_string();
        let count = tokio::task::spawn_blocking(move || {
            let metadata = producer.client().fetch_metadata(Some(&name), Duration::from_secs(10)).ok()?;
            let entry = metadata.topics().iter().find(|t| t.name() == name)?;
            let count = entry.partitions().len();
            (entry.error().is_none() && count > 0).then_some(count as i32)
        })
        .await
        .ok()
        .flatten();
        if count.is_none() {
            tracing::warn!(
                topic,
                "cannot read the topic's partition count; librdkafka's partitioner places its records"
            );
        }
        count
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
        .map_err(|e| PublishError::retriable(format!("cannot read metadata of topic `{topic}`")).because(e))?
        .map_err(|e| PublishError::retriable(format!("cannot read metadata of topic `{topic}`")).because(Leaf(e)))
    }
}

/// Whether each of `topics` is compacted (`cleanup.policy` includes
/// `compact`), for `relay check`; a topic whose configuration the principal
/// may not read is left out.
pub async fn compacted(
    config: &crate::config::KafkaConfig,
    topics: &[String],
) -> Result<std::collections::BTreeMap<String, bool>, rdkafka::error::KafkaError> {
    let mut compacted = std::collections::BTreeMap::new();
    if topics.is_empty() {
        return Ok(compacted);
    }
    let admin: AdminClient<DefaultClientContext> = super::client_config(config).create()?;
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let resources: Vec<ResourceSpecifier> = topics.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
    let described = admin.describe_configs(&resources, &options).await;
    // Destroying a librdkafka client waits for its threads: not on the
    // runtime's one thread, where the other checks run meanwhile.
    tokio::task::spawn_blocking(move || drop(admin));
    for resource in described?.into_iter().flatten() {
        let policy = resource.get("cleanup.policy").and_then(|entry| entry.value.clone());
        if let (rdkafka::admin::OwnedResourceSpecifier::Topic(topic), Some(policy)) = (&resource.specifier, policy) {
            compacted.insert(topic.clone(), policy.split(',').any(|p| p.trim() == "compact"));
        }
    }
    Ok(compacted)
}
