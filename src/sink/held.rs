//! The one owner of the held-row rule.
//!
//! A row that can never be published as it is (payload does not match its
//! schema, too large, not authorized, topic missing) is **held**; every
//! later row of its entity **waits** behind it, so per-entity order
//! survives until an operator retries or skips the held row. A row is held
//! either when the sink tries to produce it or when its delivery report
//! brings a permanent error; both go through [`Holder::hold`], so the log
//! line, the metric and the dead-letter copy are the same either way.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::reports::KafkaProducer;

use super::record;
use super::topics::Topics;
use crate::delivery::RoutedRow;
use crate::routing::TopicKind;
use crate::telemetry::metrics;

/// More entities are held than `routing.max_held_entities` allows.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{held} entities are held, more than routing.max_held_entities ({max}); the last one for: {last_error}. A failure of a whole topic (ACL, deleted topic, size limit) holds every entity: fix it, then `relay held list` and `relay held retry`")]
pub struct TooManyHeld {
    pub held: usize,
    pub max: usize,
    pub last_error: String,
}

/// Entities whose earlier row is held, with that row's id; at most `max`.
#[derive(Debug, Clone)]
pub struct HeldEntities {
    map: Arc<Mutex<HashMap<(String, String), i64>>>,
    max: usize,
}

impl Default for HeldEntities {
    fn default() -> Self {
        Self::new(usize::MAX)
    }
}

impl HeldEntities {
    /// An empty set that holds at most `max` entities.
    pub fn new(max: usize) -> Self {
        Self { map: Arc::default(), max }
    }

    /// The entities from the store: `(aggregate_type, aggregate_id, first held id)`.
    pub fn from_rows(rows: Vec<(String, String, i64)>, max: usize) -> Result<Self, TooManyHeld> {
        let held = Self::new(max);
        for (aggregate_type, aggregate_id, id) in rows {
            held.hold(&aggregate_type, &aggregate_id, id, "held rows in the outbox table")?;
        }
        Ok(held)
    }

    /// Marks the entity as blocked by row `id` (the first held row wins).
    fn hold(&self, aggregate_type: &str, aggregate_id: &str, id: i64, error: &str) -> Result<(), TooManyHeld> {
        if let Ok(mut map) = self.map.lock() {
            map.entry((aggregate_type.to_string(), aggregate_id.to_string())).or_insert(id);
            metrics::held_entities(map.len());
            if map.len() > self.max {
                return Err(TooManyHeld { held: map.len(), max: self.max, last_error: error.to_string() });
            }
        }
        Ok(())
    }

    /// Forgets the entity's hold if row `id` is what blocks it.
    fn release(&self, key: &(String, String), id: i64) {
        if let Ok(mut map) = self.map.lock() {
            if map.get(key) == Some(&id) {
                map.remove(key);
                metrics::held_entities(map.len());
            }
        }
    }

    /// The held rows that block entities now, for the pipeline's check
    /// whether an operator released one of them.
    pub fn blockers(&self) -> Vec<i64> {
        self.map.lock().map(|map| map.values().copied().collect()).unwrap_or_default()
    }

    /// The held row blocking this entity, if any.
    pub fn blocker(&self, aggregate_type: &str, aggregate_id: &str) -> Option<i64> {
        let map = self.map.lock().ok()?;
        if map.is_empty() {
            return None;
        }
        map.get(&(aggregate_type.to_string(), aggregate_id.to_string())).copied()
    }
}

/// Where a row was found to be unpublishable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeldAt {
    /// Before or while handing it to the producer.
    Produce,
    /// In its delivery report.
    Delivery,
}

struct DeadLetter {
    topic: String,
    producer: KafkaProducer,
    topics: Topics,
}

/// Holds rows: the in-memory held entities plus the optional dead-letter
/// topic. Cheap to clone; the sink and the checkpoint stage share one.
#[derive(Clone, Default)]
pub struct Holder {
    entities: HeldEntities,
    dead_letter: Option<Arc<DeadLetter>>,
}

impl Holder {
    pub fn new(entities: HeldEntities) -> Self {
        Self { entities, dead_letter: None }
    }

    /// Sends a JSON copy of every held row, with the reason, to `topic`.
    pub fn with_dead_letter(mut self, topic: String, producer: KafkaProducer, topics: Topics) -> Self {
        self.dead_letter = Some(Arc::new(DeadLetter { topic, producer, topics }));
        self
    }

    pub fn entities(&self) -> &HeldEntities {
        &self.entities
    }

    /// Whether held rows need their payload after they were produced (for
    /// the dead-letter copy of a row held from its delivery report).
    pub fn keeps_payloads(&self) -> bool {
        self.dead_letter.is_some()
    }

    /// The held row `row` must wait behind, if any. A held row that comes
    /// again (resent after a restart, or released by an operator) is tried
    /// again itself, and the rows behind it follow it in order; if it fails
    /// again, it holds the entity again.
    pub fn waits_behind(&self, row: &RoutedRow) -> Option<i64> {
        let r = &row.row;
        match self.entities.blocker(&r.aggregate_type, &r.aggregate_id)? {
            blocker if blocker == r.id => {
                self.entities.release(&(r.aggregate_type.to_string(), r.aggregate_id.clone()), r.id);
                None
            }
            blocker => Some(blocker),
        }
    }

    /// Holds `row` for `error`: later rows of its entity wait behind it; the
    /// metric, the log line and the dead-letter copy (best effort: the row
    /// stays held and recorded whatever happens to the copy). Fails when
    /// more entities are held than allowed: the run must end.
    pub async fn hold(&self, row: &RoutedRow, error: &str, at: HeldAt) -> Result<(), TooManyHeld> {
        let r = &row.row;
        self.entities.hold(&r.aggregate_type, &r.aggregate_id, r.id, error)?;
        metrics::held_row();
        let traceparent = row.traceparent();
        tracing::error!(row_id = r.id, topic = %row.topic, traceparent = traceparent.as_deref().unwrap_or(""), error = %error, held_at = ?at, "row held: it cannot be published until an operator acts");
        if let Some(dead_letter) = &self.dead_letter {
            dead_letter.send(row, error).await;
        }
        Ok(())
    }
}

impl DeadLetter {
    async fn send(&self, row: &RoutedRow, reason: &str) {
        let (row_id, topic) = (row.row.id, self.topic.clone());
        if let Err(err) = self.topics.ensure(&topic, TopicKind::Event, None).await {
            tracing::warn!(row_id, topic = %topic, error = %err, "cannot reach the dead-letter topic");
            return;
        }
        match record::produce(&self.producer, record::dead_letter(&topic, row, reason)).await {
            Ok(delivery) => {
                tokio::spawn(async move {
                    if let Err(err) = delivery.await {
                        tracing::warn!(row_id, topic = %topic, error = %err, "dead-letter copy not delivered");
                    }
                });
            }
            Err(err) => tracing::warn!(row_id, topic = %topic, error = %err, "dead-letter copy not sent"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_held_set_is_bounded_and_says_why_when_full() {
        let rows = (0..3).map(|i| ("order".to_string(), format!("o-{i}"), i)).collect::<Vec<_>>();
        assert!(HeldEntities::from_rows(rows.clone(), 3).is_ok());
        let err = HeldEntities::from_rows(rows, 2).expect_err("over the bound");
        assert_eq!((err.held, err.max), (3, 2));
        assert!(err.to_string().contains("routing.max_held_entities"), "{err}");

        let held = HeldEntities::new(1);
        assert!(held.hold("order", "o-1", 1, "too large").is_ok());
        assert!(held.hold("order", "o-1", 2, "too large").is_ok(), "the same entity again");
        let err = held.hold("order", "o-2", 3, "not authorized").expect_err("a second entity");
        assert_eq!(err.last_error, "not authorized");
    }
}
