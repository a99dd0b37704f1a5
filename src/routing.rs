//! Topic routing: event and state messages each have a template with
//! per-aggregate-type overrides (`routing.*` in the config).
//!
//! The rules are written once here, for the config's validation and for the
//! stages alike. So that both can use them, this module imports no other
//! module of the crate: the config implements [`RouteTable`] for its
//! `routing` section.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex};

/// What a topic carries: one kind only, because compaction keeps the latest
/// record per key and would destroy an event stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TopicKind {
    /// Event and command messages (`kind` 'event' or 'command'): every one
    /// matters; `cleanup.policy=delete`.
    Event,
    /// State messages (`kind = 'state'`): only the latest per key matters;
    /// `cleanup.policy=compact`, and a NULL payload is a tombstone.
    State,
}

impl TopicKind {
    /// The kind of topic a row of outbox `kind` goes to.
    pub fn of_row(kind: &str) -> Self {
        if kind == "state" {
            Self::State
        } else {
            Self::Event
        }
    }

    /// The `cleanup.policy` the relay gives topics of this kind.
    pub fn cleanup_policy(self) -> &'static str {
        match self {
            Self::Event => "delete",
            Self::State => "compact",
        }
    }

    /// How messages call it: "event" or "state".
    pub fn name(self) -> &'static str {
        match self {
            Self::Event => "event",
            Self::State => "state",
        }
    }
}

/// The routing keys of a configuration: per kind, a topic template with the
/// placeholder `{aggregate_type}` and per-aggregate-type overrides.
///
/// Implementors provide the two accessors only; the provided methods are the
/// routing rules and are not meant to be overridden.
pub trait RouteTable: fmt::Debug + Send + Sync {
    /// The topic template of `kind` (`routing.topic_template` or
    /// `routing.state_topic_template`).
    fn template(&self, kind: TopicKind) -> &str;

    /// The topic of `kind` per aggregate type, overriding the template
    /// (`routing.topics` or `routing.state_topics`).
    fn overrides(&self, kind: TopicKind) -> &BTreeMap<String, String>;

    /// The topic of rows of `aggregate_type` and `kind`: the override,
    /// else the template.
    fn topic_for(&self, aggregate_type: &str, kind: TopicKind) -> String {
        match self.overrides(kind).get(aggregate_type) {
            Some(topic) => topic.clone(),
            None => self.template(kind).replace("{aggregate_type}", aggregate_type),
        }
    }

    /// The kind and aggregate type of the rows routed to an existing
    /// `topic`, if any: an override names it, or it fits a template (the
    /// state template first: it is usually the longer).
    fn kind_of_topic(&self, topic: &str) -> Option<(TopicKind, String)> {
        for kind in [TopicKind::State, TopicKind::Event] {
            if let Some((aggregate_type, _)) = self.overrides(kind).iter().find(|(_, t)| *t == topic) {
                return Some((kind, aggregate_type.clone()));
            }
        }
        [TopicKind::State, TopicKind::Event]
            .into_iter()
            .find_map(|kind| self.fits_template(topic, kind).map(|aggregate_type| (kind, aggregate_type)))
    }

    /// The aggregate type for which the template of `kind` makes `topic`.
    fn fits_template(&self, topic: &str, kind: TopicKind) -> Option<String> {
        let template = self.template(kind);
        match template.split_once("{aggregate_type}") {
            None => (template == topic).then(String::new),
            Some((prefix, suffix)) => {
                let middle = topic.strip_prefix(prefix).and_then(|rest| rest.strip_suffix(suffix));
                middle.filter(|m| !m.is_empty()).map(str::to_string)
            }
        }
    }
}

/// How many topic names [`TopicRouter::topic_of`] remembers per kind; past
/// it the memory starts over (a bound against unbounded aggregate types).
const REMEMBERED_TOPICS: usize = 4096;

/// Topic names by aggregate type, one map per kind (event, state).
type RememberedTopics = [HashMap<Arc<str>, Arc<str>>; 2];

/// Chooses the topic of each row from its aggregate type and kind.
#[derive(Debug, Clone)]
pub struct TopicRouter {
    routing: Arc<dyn RouteTable>,
    /// Topic names already made, per kind (event, state) and aggregate
    /// type: every row carries its topic along the pipeline, and a shared
    /// name saves formatting and copying it for each row.
    remembered: Arc<Mutex<RememberedTopics>>,
}

impl TopicRouter {
    /// A router by the rules of `routing` (the config's `routing` section).
    pub fn new(routing: &(impl RouteTable + Clone + 'static)) -> Self {
        Self { routing: Arc::new(routing.clone()), remembered: Arc::default() }
    }

    /// The topic for rows of `aggregate_type` and `kind`.
    pub fn topic_for(&self, aggregate_type: &str, kind: TopicKind) -> String {
        self.routing.topic_for(aggregate_type, kind)
    }

    /// The topic of a row of `aggregate_type` and outbox `row_kind`.
    pub fn topic_of(&self, aggregate_type: &Arc<str>, row_kind: &str) -> Arc<str> {
        let kind = TopicKind::of_row(row_kind);
        let make = || Arc::from(self.routing.topic_for(aggregate_type, kind));
        // A poisoned lock only means another thread panicked mid-insert;
        // the names are still right, or missing.
        let Ok(mut remembered) = self.remembered.lock() else { return make() };
        let names = &mut remembered[usize::from(kind == TopicKind::State)];
        if let Some(topic) = names.get(&**aggregate_type) {
            return Arc::clone(topic);
        }
        if names.len() >= REMEMBERED_TOPICS {
            names.clear();
        }
        let topic: Arc<str> = make();
        names.insert(Arc::clone(aggregate_type), Arc::clone(&topic));
        topic
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RoutingConfig;
    use crate::outbox::OutboxRow;

    #[test]
    fn template_and_overrides_per_kind() {
        let mut config = RoutingConfig::default();
        config.topics.insert("profile".into(), "profiles.events".into());
        config.state_topics.insert("profile".into(), "profiles.state".into());
        let router = TopicRouter::new(&config);
        let topic_of = |row: &OutboxRow| router.topic_of(&row.aggregate_type, &row.kind);
        assert_eq!(router.topic_for("order", TopicKind::Event), "outbox.order");
        assert_eq!(router.topic_for("order", TopicKind::State), "outbox.order.state");
        assert_eq!(router.topic_for("profile", TopicKind::Event), "profiles.events");
        assert_eq!(router.topic_for("profile", TopicKind::State), "profiles.state");
        let mut row = OutboxRow::for_test(1, "o-1");
        assert_eq!(&*topic_of(&row), "outbox.order");
        row.kind = "command".into();
        assert_eq!(&*topic_of(&row), "outbox.order");
        row.kind = "state".into();
        assert_eq!(&*topic_of(&row), "outbox.order.state");
        // Remembered: the same name, not a new copy; the other kind apart.
        assert!(Arc::ptr_eq(&topic_of(&row), &topic_of(&row)));
        row.kind = "event".into();
        assert_eq!(&*topic_of(&row), "outbox.order");
    }
}
