//! `[routing]`: where each row goes. The rules that read these keys are in
//! [`crate::routing`]; this section provides them through [`RouteTable`].

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

use super::{at_least_one, defaults, invalid, CodecConfig, ConfigError};
use crate::routing::{RouteTable, TopicKind};

/// Where each row goes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    /// Topic name template; `{aggregate_type}` is replaced by the row's entity type.
    #[serde(default = "defaults::topic_template")]
    pub topic_template: String,
    /// Per-aggregate-type topic, overriding the template.
    #[serde(default)]
    pub topics: BTreeMap<String, String>,
    /// Topic name template of state messages (rows of `kind = 'state'`):
    /// created compacted, so it must never be an event topic too.
    #[serde(default = "defaults::state_topic_template")]
    pub state_topic_template: String,
    /// Per-aggregate-type state topic, overriding `state_topic_template`.
    #[serde(default)]
    pub state_topics: BTreeMap<String, String>,
    /// Extra settings of the topics the relay creates, per aggregate type
    /// (both its event and state topic), e.g. `min.compaction.lag.ms`.
    /// `cleanup.policy` is the relay's: `compact` for state, `delete` else.
    #[serde(default)]
    pub topic_settings: BTreeMap<String, BTreeMap<String, String>>,
    /// Create a missing topic on first use. When false, a missing topic holds its
    /// rows with an error naming the topic.
    #[serde(default = "defaults::create_topics")]
    pub create_topics: bool,
    /// Partitions of created topics; -1 takes the broker's `num.partitions`.
    #[serde(default = "defaults::topic_partitions")]
    pub topic_partitions: i32,
    /// Replication factor of created topics; -1 takes the broker's default.
    #[serde(default = "defaults::topic_replication_factor")]
    pub topic_replication_factor: i32,
    /// Optional topic that receives a JSON copy (with the reason) of every
    /// row held for its own error. The row stays held either way.
    #[serde(default)]
    pub dead_letter_topic: Option<String>,
    /// How many entities may be held at once. A topic-wide failure (an ACL,
    /// a deleted topic) holds every entity that writes to it; past this
    /// bound the relay stops and asks for an operator instead of keeping
    /// an ever larger set in memory.
    #[serde(default = "defaults::max_held_entities")]
    pub max_held_entities: usize,
}

impl RouteTable for RoutingConfig {
    fn template(&self, kind: TopicKind) -> &str {
        match kind {
            TopicKind::Event => &self.topic_template,
            TopicKind::State => &self.state_topic_template,
        }
    }

    fn overrides(&self, kind: TopicKind) -> &BTreeMap<String, String> {
        match kind {
            TopicKind::Event => &self.topics,
            TopicKind::State => &self.state_topics,
        }
    }
}

impl RoutingConfig {
    /// routing.*; `codec` names aggregate types too (its schema keys), whose
    /// topics must not mix kinds either.
    pub fn validate(&self, codec: &CodecConfig) -> Result<(), ConfigError> {
        for (key, template) in [
            ("routing.topic_template", &self.topic_template),
            ("routing.state_topic_template", &self.state_topic_template),
        ] {
            if template.replace("{aggregate_type}", "").contains('{') {
                return invalid(key, "the only placeholder allowed is {aggregate_type}");
            }
        }
        self.validate_topic_kinds(codec)?;
        if self.dead_letter_topic.as_deref().is_some_and(|t| t.trim().is_empty()) {
            return invalid("routing.dead_letter_topic", "must be a topic name, or left out");
        }
        if self.topic_partitions == 0 || self.topic_partitions < -1 {
            return invalid("routing.topic_partitions", "must be -1 (broker default) or at least 1");
        }
        if self.topic_replication_factor == 0 || self.topic_replication_factor < -1 {
            return invalid("routing.topic_replication_factor", "must be -1 (broker default) or at least 1");
        }
        at_least_one(&[("routing.max_held_entities", self.max_held_entities)])
    }

    /// No topic carries both event and state messages, for every aggregate
    /// type the config names (a type it does not name can still collide: the
    /// sink holds such rows when it sees the topic's `cleanup.policy`).
    fn validate_topic_kinds(&self, codec: &CodecConfig) -> Result<(), ConfigError> {
        if self.topic_template == self.state_topic_template {
            return invalid(
                "routing.state_topic_template",
                format!(
                    "`{}` is also routing.topic_template: state topics are compacted, which would destroy the events on them; give state messages their own topics, e.g. \"outbox.{{aggregate_type}}.state\"",
                    self.state_topic_template
                ),
            );
        }
        let of_key = |key: &String| key.split('/').next().unwrap_or(key).to_string();
        let named: BTreeSet<String> = self
            .topics
            .keys()
            .chain(self.state_topics.keys())
            .chain(self.topic_settings.keys())
            .chain(codec.schemas.keys())
            .chain(codec.state_schemas.keys())
            .map(of_key)
            .collect();
        for aggregate_type in &named {
            for (kind, other) in [(TopicKind::State, TopicKind::Event), (TopicKind::Event, TopicKind::State)] {
                let topic = self.topic_for(aggregate_type, kind);
                let Some(other_type) = self.sender_of(&named, &topic, other) else { continue };
                let (event_type, state_type) = match kind {
                    TopicKind::State => (other_type, aggregate_type.clone()),
                    TopicKind::Event => (aggregate_type.clone(), other_type),
                };
                return invalid(
                    format!("routing.state_topics.{state_type}"),
                    format!(
                        "topic `{topic}` would carry both the event messages of aggregate type `{event_type}` and the state messages of `{state_type}`; state topics are compacted, which would destroy the events: route one of them elsewhere (routing.state_topics.{state_type} or routing.topics.{event_type})"
                    ),
                );
            }
        }
        for (aggregate_type, settings) in &self.topic_settings {
            if settings.contains_key("cleanup.policy") {
                return invalid(
                    format!("routing.topic_settings.{aggregate_type}"),
                    "cleanup.policy is the relay's: compact for state topics, delete for event and command topics; remove it",
                );
            }
        }
        Ok(())
    }

    /// Who else would send rows of `kind` to `topic`: a type of `named` (the
    /// types the config names), or a plain name the template fits
    /// ("outbox.order" fits "outbox.{aggregate_type}" as `order`; the
    /// default state topic "outbox.order.state" fits it only as
    /// `order.state`, not a likely type).
    fn sender_of(&self, named: &BTreeSet<String>, topic: &str, kind: TopicKind) -> Option<String> {
        if let Some(t) = named.iter().find(|t| self.topic_for(t, kind) == topic) {
            return Some(t.clone());
        }
        if self.overrides(kind).values().any(|t| t == topic) {
            return None;
        }
        let plain = |t: &str| t.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        self.fits_template(topic, kind).filter(|t| plain(t))
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, MINIMAL};
    use crate::routing::{RouteTable, TopicKind};

    #[test]
    fn a_topic_carrying_both_event_and_state_messages_is_refused() {
        let mixed = format!("{MINIMAL}\n[routing.state_topics]\ncustomer = \"outbox.order\"");
        let err = Config::from_toml_str(&mixed).expect_err("must fail").to_string();
        assert!(err.contains("routing.state_topics.customer"), "{err}");
        assert!(err.contains("`outbox.order`") && err.contains("`order`") && err.contains("`customer`"), "{err}");
        let same = format!("{MINIMAL}\n[routing]\nstate_topic_template = \"outbox.{{aggregate_type}}\"");
        let err = Config::from_toml_str(&same).expect_err("must fail").to_string();
        assert!(err.contains("routing.state_topic_template") && err.contains("compacted"), "{err}");
        let policy = format!("{MINIMAL}\n[routing.topic_settings.order]\n\"cleanup.policy\" = \"compact\"");
        let err = Config::from_toml_str(&policy).expect_err("must fail").to_string();
        assert!(err.contains("routing.topic_settings.order") && err.contains("cleanup.policy"), "{err}");
        let apart = format!(
            "{MINIMAL}\n[routing.state_topics]\ncustomer = \"customers.state\"\n[routing.topic_settings.customer]\n\"min.compaction.lag.ms\" = \"60000\""
        );
        let config = Config::from_toml_str(&apart).expect("separate topics are fine");
        assert_eq!(config.routing.kind_of_topic("customers.state"), Some((TopicKind::State, "customer".into())));
        assert_eq!(config.routing.kind_of_topic("outbox.order.state"), Some((TopicKind::State, "order".into())));
        assert_eq!(config.routing.kind_of_topic("outbox.order"), Some((TopicKind::Event, "order".into())));
        assert_eq!(config.routing.kind_of_topic("payments"), None);
    }
}
