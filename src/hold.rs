//! The one owner of the held-row rule, below both the sink and the
//! checkpoint stage, which share one [`Holder`].
//!
//! A row that can never be published as it is (payload does not match its
//! schema, too large, not authorized, topic missing) is **held**; every
//! later row of its entity **waits** behind it, so per-entity order
//! survives until an operator retries or skips the held row. A row is held
//! either when the sink tries to produce it or when its delivery report
//! brings a permanent error; both go through [`Holder::hold`], so the log
//! line, the metric and the dead-letter copy are the same either way.
//! Whether a row waits is decided here too: [`Holder::waits_behind`] before
//! a row is sent, [`Holder::behind_a_delivery_hold`] once its delivery
//! report is in. The dead-letter copy is the sink's business: it hands the
//! holder a [`DeadLetter`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use futures::future::BoxFuture;

use crate::delivery::RoutedRow;
use crate::error_class::ErrorClass;
use crate::telemetry::metrics;

/// More entities are held than `routing.max_held_entities` allows.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{held} entities are held, more than routing.max_held_entities ({max}); the last one for: {last_error}. A failure of a whole topic (ACL, deleted topic, size limit) holds every entity: fix it, then `relay held list` and `relay held retry`")]
pub struct TooManyHeld {
    pub held: usize,
    pub max: usize,
    pub last_error: String,
}

impl TooManyHeld {
    /// Holding more would let the held rows grow without bound: an operator
    /// fixes the cause and settles them.
    pub fn class(&self) -> ErrorClass {
        ErrorClass::operator("release or skip held rows once the cause is fixed")
    }
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

    /// The map, also after a panic elsewhere while it was locked: a
    /// poisoned map read as empty would let later rows of a held entity be
    /// sent before the held row, breaking the entity's order.
    fn map(&self) -> MutexGuard<'_, HashMap<(String, String), i64>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks the entity as blocked by row `id` (the first held row wins).
    fn hold(&self, aggregate_type: &str, aggregate_id: &str, id: i64, error: &str) -> Result<(), TooManyHeld> {
        let mut map = self.map();
        map.entry((aggregate_type.to_string(), aggregate_id.to_string())).or_insert(id);
        metrics::held_entities(map.len());
        if map.len() > self.max {
            return Err(TooManyHeld { held: map.len(), max: self.max, last_error: error.to_string() });
        }
        Ok(())
    }

    /// Forgets the entity's hold if row `id` is what blocks it.
    fn release(&self, aggregate_type: &str, aggregate_id: &str, id: i64) {
        let mut map = self.map();
        let key = (aggregate_type.to_string(), aggregate_id.to_string());
        if map.get(&key) == Some(&id) {
            map.remove(&key);
            metrics::held_entities(map.len());
        }
    }

    /// The held rows that block entities now, for the pipeline's check
    /// whether an operator released one of them.
    pub fn blockers(&self) -> Vec<i64> {
        self.map().values().copied().collect()
    }

    /// The held row blocking this entity, if any.
    pub fn blocker(&self, aggregate_type: &str, aggregate_id: &str) -> Option<i64> {
        let map = self.map();
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

/// Where a copy of every held row goes, with the reason (the sink's
/// dead-letter topic). Best effort: the row stays held and recorded
/// whatever happens to the copy, so failures are logged, never returned.
pub trait DeadLetter: Send + Sync {
    /// Sends the copy of `row`, held for `reason`.
    fn send<'a>(&'a self, row: &'a RoutedRow, reason: &'a str) -> BoxFuture<'a, ()>;
}

/// Holds rows: the in-memory held entities plus the optional dead-letter
/// copy. Cheap to clone; the sink and the checkpoint stage share one.
#[derive(Clone, Default)]
pub struct Holder {
    entities: HeldEntities,
    dead_letter: Option<Arc<dyn DeadLetter>>,
}

impl Holder {
    pub fn new(entities: HeldEntities) -> Self {
        Self { entities, dead_letter: None }
    }

    /// Sends a copy of every held row, with the reason, to `dead_letter`.
    pub fn with_dead_letter(mut self, dead_letter: Arc<dyn DeadLetter>) -> Self {
        self.dead_letter = Some(dead_letter);
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

    /// Before a row is sent: the held row `row` must wait behind, if any. A
    /// held row that comes again (resent after a restart, or released by an
    /// operator) is tried again itself, and the rows behind it follow it in
    /// order; if it fails again, it holds the entity again.
    pub fn waits_behind(&self, row: &RoutedRow) -> Option<i64> {
        let r = &row.row;
        match self.entities.blocker(&r.aggregate_type, &r.aggregate_id)? {
            blocker if blocker == r.id => {
                self.entities.release(&r.aggregate_type, &r.aggregate_id, r.id);
                None
            }
            blocker => Some(blocker),
        }
    }

    /// Once a sent row's delivery report is in: the held row of its entity
    /// that came before it, if any. Only a row held from its delivery
    /// report can be behind a row that was sent ([`Self::waits_behind`] lets
    /// later rows of a held entity wait instead of being sent). Whether
    /// Kafka has the row or refused it too, it then waits: sent again after
    /// the held row once that is released, so the entity's order holds and
    /// one `held retry` releases them all.
    pub fn behind_a_delivery_hold(&self, row: &RoutedRow) -> Option<i64> {
        let r = &row.row;
        self.entities.blocker(&r.aggregate_type, &r.aggregate_id).filter(|&blocker| blocker < r.id)
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

/// The `last_error` text of a row waiting behind held row `behind`; the
/// typed fact is the `waiting_for` column.
pub fn waiting_reason(behind: i64) -> String {
    format!("waiting behind held row {behind} of the same entity")
}

/// Why a row without a payload of `kind` (not `state`) is held: only a
/// state row may be a tombstone.
pub fn tombstone_reason(kind: &str) -> String {
    format!(
        "payload is NULL but kind is '{kind}': only a state row may be a tombstone; give the row a payload, then `relay held retry` (or `relay held skip`)"
    )
}

/// Why a record of `size` bytes is held on `topic`, whose
/// `max.message.bytes` is `limit`.
pub fn too_large_reason(size: usize, topic: &str, limit: usize) -> String {
    format!(
        "record of {size} bytes is too large for topic `{topic}` (max.message.bytes = {limit}): shrink the payload or raise the topic's limit, then `relay held retry`"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::OutboxRow;

    fn row(id: i64, entity: &str) -> RoutedRow {
        RoutedRow::new(OutboxRow::for_test(id, entity), "t".into())
    }

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

    #[test]
    fn a_poisoned_held_set_still_holds_its_entities() {
        let held = HeldEntities::default();
        held.hold("order", "o-1", 5, "too large").expect("hold");
        let poisoner = held.clone();
        let _ = std::thread::spawn(move || {
            let _guard = poisoner.map.lock();
            panic!("poison the held entities");
        })
        .join();
        assert!(held.map.is_poisoned());
        assert_eq!(held.blocker("order", "o-1"), Some(5), "a poisoned map must not read as empty");
        assert_eq!(held.blockers(), vec![5]);
    }

    #[tokio::test]
    async fn later_rows_wait_and_the_held_row_itself_is_tried_again() {
        let holder = Holder::default();
        holder.hold(&row(7, "o-1"), "too large", HeldAt::Produce).await.expect("hold");
        assert_eq!(holder.waits_behind(&row(9, "o-1")), Some(7), "a later row waits");
        assert_eq!(holder.waits_behind(&row(9, "o-2")), None, "another entity flows");
        assert_eq!(holder.behind_a_delivery_hold(&row(9, "o-1")), Some(7));
        assert_eq!(holder.behind_a_delivery_hold(&row(6, "o-1")), None, "an earlier row is not behind it");
        assert_eq!(holder.waits_behind(&row(7, "o-1")), None, "the held row comes again: tried again");
        assert_eq!(holder.waits_behind(&row(9, "o-1")), None, "and released its entity");
    }
}
