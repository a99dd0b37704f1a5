//! Topic routing: event and state messages each have a template with
//! per-aggregate-type overrides (`routing.*` in the config).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::config::{RoutingConfig, TopicKind};
use crate::outbox::OutboxRow;

/// How many topic names [`TopicRouter::topic_of`] remembers per kind; past
/// it the memory starts over (a bound against unbounded aggregate types).
const REMEMBERED_TOPICS: usize = 4096;

/// Topic names by aggregate type, one map per kind (event, state).
type RememberedTopics = [HashMap<Arc<str>, Arc<str>>; 2];

/// Chooses the topic of each row from its aggregate type and kind.
#[derive(Debug, Clone)]
pub struct TopicRouter {
    routing: RoutingConfig,
    /// Topic names already made, per kind (event, state) and aggregate
    /// type: every row carries its topic along the pipeline, and a shared
    /// name saves formatting and copying it for each row.
    remembered: Arc<Mutex<RememberedTopics>>,
}

impl TopicRouter {
    pub fn new(config: &RoutingConfig) -> Self {
        Self { routing: config.clone(), remembered: Arc::default() }
    }

    /// The topic for rows of `aggregate_type` and `kind`.
    pub fn topic_for(&self, aggregate_type: &str, kind: TopicKind) -> String {
        self.routing.topic_for(aggregate_type, kind)
    }

    /// The topic of `row`.
    pub fn topic_of(&self, row: &OutboxRow) -> Arc<str> {
        let kind = TopicKind::of_row(&row.kind);
        let make = || Arc::from(self.routing.topic_for(&row.aggregate_type, kind));
        // A poisoned lock only means another thread panicked mid-insert;
        // the names are still right, or missing.
        let Ok(mut remembered) = self.remembered.lock() else { return make() };
        let names = &mut remembered[usize::from(kind == TopicKind::State)];
        if let Some(topic) = names.get(&*row.aggregate_type) {
            return Arc::clone(topic);
        }
        if names.len() >= REMEMBERED_TOPICS {
            names.clear();
        }
        let topic: Arc<str> = make();
        names.insert(row.aggregate_type.clone(), Arc::clone(&topic));
        topic
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_and_overrides_per_kind() {
        let mut config = RoutingConfig::default();
        config.topics.insert("profile".into(), "profiles.events".into());
        config.state_topics.insert("profile".into(), "profiles.state".into());
        let router = TopicRouter::new(&config);
        assert_eq!(router.topic_for("order", TopicKind::Event), "outbox.order");
        assert_eq!(router.topic_for("order", TopicKind::State), "outbox.order.state");
        assert_eq!(router.topic_for("profile", TopicKind::Event), "profiles.events");
        assert_eq!(router.topic_for("profile", TopicKind::State), "profiles.state");
        let mut row = OutboxRow::for_test(1, "o-1");
        assert_eq!(&*router.topic_of(&row), "outbox.order");
        row.kind = "command".into();
        assert_eq!(&*router.topic_of(&row), "outbox.order");
        row.kind = "state".into();
        assert_eq!(&*router.topic_of(&row), "outbox.order.state");
        // Remembered: the same name, not a new copy; the other kind apart.
        assert!(Arc::ptr_eq(&router.topic_of(&row), &router.topic_of(&row)));
        row.kind = "event".into();
        assert_eq!(&*router.topic_of(&row), "outbox.order");
    }
}
