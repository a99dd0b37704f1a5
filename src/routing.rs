//! Topic routing: a template with per-aggregate-type overrides.

use std::collections::BTreeMap;

use crate::config::RoutingConfig;

/// Chooses the topic of each row from its aggregate type.
#[derive(Debug, Clone)]
pub struct TopicRouter {
    template: String,
    overrides: BTreeMap<String, String>,
}

impl TopicRouter {
    pub fn new(config: &RoutingConfig) -> Self {
        Self { template: config.topic_template.clone(), overrides: config.topics.clone() }
    }

    /// The topic for rows of `aggregate_type`.
    pub fn topic_for(&self, aggregate_type: &str) -> String {
        match self.overrides.get(aggregate_type) {
            Some(topic) => topic.clone(),
            None => self.template.replace("{aggregate_type}", aggregate_type),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_and_overrides() {
        let mut config = RoutingConfig::default();
        config.topics.insert("profile".into(), "profiles.state".into());
        let router = TopicRouter::new(&config);
        assert_eq!(router.topic_for("order"), "outbox.order");
        assert_eq!(router.topic_for("profile"), "profiles.state");
    }
}
