//! Topic routing: event and state messages each have a template with
//! per-aggregate-type overrides (`routing.*` in the config).

use crate::config::{RoutingConfig, TopicKind};
use crate::outbox::OutboxRow;

/// Chooses the topic of each row from its aggregate type and kind.
#[derive(Debug, Clone)]
pub struct TopicRouter {
    routing: RoutingConfig,
}

impl TopicRouter {
    pub fn new(config: &RoutingConfig) -> Self {
        Self { routing: config.clone() }
    }

    /// The topic for rows of `aggregate_type` and `kind`.
    pub fn topic_for(&self, aggregate_type: &str, kind: TopicKind) -> String {
        self.routing.topic_for(aggregate_type, kind)
    }

    /// The topic of `row`.
    pub fn topic_of(&self, row: &OutboxRow) -> String {
        self.routing.topic_for(&row.aggregate_type, TopicKind::of_row(&row.kind))
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
        assert_eq!(router.topic_of(&row), "outbox.order");
        row.kind = "command".into();
        assert_eq!(router.topic_of(&row), "outbox.order");
        row.kind = "state".into();
        assert_eq!(router.topic_of(&row), "outbox.order.state");
    }
}
