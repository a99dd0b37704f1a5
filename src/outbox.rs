//! What the source passes on: outbox rows and commit boundaries (delivery
//! outcomes, from the sink to the checkpoint, are in [`crate::delivery`]).
//! This module imports no stage; every stage imports it.
//!
//! The pipeline and its imports (kept true by the unit test in
//! `src/layering_tests.rs`):
//!
//! ```text
//! source -> codec -> sink -> checkpoint    no stage imports a later one
//! config, telemetry                        import no stage
//! outbox, delivery, hold, routing, store,  import no stage (and no Kafka
//! database, tls, leader                    client): what stages share
//! pipeline, cli, migrate, main             wire them: import anything
//! ```

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::config::ColumnNames;
use crate::error_class::ErrorClass;

/// A WAL position (LSN) as Postgres reports it: what a logical slot confirms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl std::fmt::Display for Lsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// The number of a batch read by the poll path (poll mode, or the catch-up
/// phase of logical mode): 1, 2, ... within one pipeline run. Never a WAL
/// position, so it is never confirmed to a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PollBatch(pub u64);

/// A commit boundary: every row emitted before it belongs to a transaction
/// (or poll batch) that ends at the boundary. Once all of them are
/// acknowledged and recorded, the source may move past it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitBoundary {
    /// The end of a committed transaction, or an idle position, in the WAL.
    Wal(Lsn),
    /// The end of a batch read by the poll path.
    Batch(PollBatch),
}

/// One outbox row as the relay publishes it.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRow {
    /// Primary key of the row; the publish state is recorded against it.
    pub id: i64,
    /// Unique message id consumers dedupe on.
    pub event_id: Uuid,
    /// Entity type; routes to a topic. Shared: few distinct values.
    pub aggregate_type: Arc<str>,
    /// Entity id; the Kafka key.
    pub aggregate_id: String,
    pub event_type: Arc<str>,
    /// `event`, `state` or `command`.
    pub kind: Arc<str>,
    pub entity_version: Option<i64>,
    /// The payload as JSON text, exactly as Postgres printed it; `None` (SQL
    /// NULL) for a tombstone: a state row saying the entity is gone.
    pub payload: Option<Bytes>,
    /// Optional JSON object of extra headers (e.g. `traceparent`).
    pub headers: Option<Bytes>,
    pub occurred_at: DateTime<Utc>,
    /// When the writing transaction committed, where the source knows it.
    pub committed_at: Option<DateTime<Utc>>,
    /// The writing transaction's id, where the source knows it (logical
    /// mode): tells "not visible yet" from "deleted" when recording.
    pub xid: Option<u32>,
}

/// What a source emits, in commit order.
#[derive(Debug, Clone, PartialEq)]
// Rows are nearly every item: boxing them would cost an allocation per row
// to save a few bytes on the rare boundaries.
#[allow(clippy::large_enum_variant)]
pub enum SourceEvent {
    /// A row to publish.
    Row(OutboxRow),
    /// Every row emitted before it is covered by this commit boundary; see
    /// [`CommitBoundary`].
    Boundary(CommitBoundary),
}

/// Why a row could not be read from its columns.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RowError {
    #[error("outbox table has no column `{0}` (see outbox.columns in the config)")]
    MissingColumn(String),
    #[error("column `{column}` is NULL, but the relay needs a value")]
    Null { column: String },
    /// The value itself is left out: it is row data.
    #[error("column `{column}` does not hold a valid {expected}")]
    Malformed { column: String, expected: &'static str },
}

impl RowError {
    /// A row the source cannot read: the run restarts and reads it again.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::MissingColumn(_) | Self::Null { .. } | Self::Malformed { .. } => ErrorClass::Retry,
        }
    }
}

/// Where each field of [`OutboxRow`] sits among a relation's columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowLayout {
    id: usize,
    event_id: usize,
    aggregate_type: usize,
    aggregate_id: usize,
    event_type: usize,
    kind: usize,
    entity_version: Option<usize>,
    payload: usize,
    headers: Option<usize>,
    occurred_at: usize,
    names: ColumnNames,
    shared: SharedText,
}

/// The text values of the columns with few distinct values (aggregate
/// type, event type, kind), one allocation each, shared by every row that
/// has them instead of copied into each.
#[derive(Default)]
struct SharedText(Mutex<HashSet<Arc<str>>>);

/// Beyond this many distinct values, new ones are not kept (memory stays
/// bounded whatever the table holds).
const SHARED_TEXT_MAX: usize = 4096;

impl SharedText {
    fn get(&self, text: &str) -> Arc<str> {
        let mut known = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(shared) = known.get(text) {
            return Arc::clone(shared);
        }
        let shared: Arc<str> = text.into();
        if known.len() < SHARED_TEXT_MAX {
            known.insert(Arc::clone(&shared));
        }
        shared
    }
}

impl Clone for SharedText {
    fn clone(&self) -> Self {
        Self::default()
    }
}

/// A cache: layouts are equal whatever it holds.
impl PartialEq for SharedText {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for SharedText {}

impl std::fmt::Debug for SharedText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedText")
    }
}

impl RowLayout {
    /// Maps the configured column names onto a relation's column order.
    pub fn new(columns: &[String], names: &ColumnNames) -> Result<Self, RowError> {
        let find = |name: &str| columns.iter().position(|c| c == name);
        let need = |name: &str| find(name).ok_or_else(|| RowError::MissingColumn(name.to_string()));
        Ok(Self {
            id: need(&names.id)?,
            event_id: need(&names.event_id)?,
            aggregate_type: need(&names.aggregate_type)?,
            aggregate_id: need(&names.aggregate_id)?,
            event_type: need(&names.event_type)?,
            kind: need(&names.kind)?,
            entity_version: find(&names.entity_version),
            payload: need(&names.payload)?,
            headers: find(&names.headers),
            occurred_at: need(&names.occurred_at)?,
            names: names.clone(),
            shared: SharedText::default(),
        })
    }

    /// Builds a row from text-format column values (`None` is NULL).
    pub fn row(&self, values: &[Option<Bytes>], committed_at: Option<DateTime<Utc>>) -> Result<OutboxRow, RowError> {
        let n = &self.names;
        let text = |idx: usize, column: &str| -> Result<Option<&str>, RowError> {
            match values.get(idx).and_then(|v| v.as_ref()) {
                None => Ok(None),
                Some(b) => std::str::from_utf8(b)
                    .map(Some)
                    .map_err(|_| RowError::Malformed { column: column.to_string(), expected: "UTF-8 text" }),
            }
        };
        let required = |idx: usize, column: &str| -> Result<&str, RowError> {
            text(idx, column)?.ok_or_else(|| RowError::Null { column: column.to_string() })
        };
        let malformed = |column: &str, expected| RowError::Malformed { column: column.to_string(), expected };
        let id = required(self.id, &n.id)?.parse().map_err(|_| malformed(&n.id, "bigint"))?;
        let event_id_text = required(self.event_id, &n.event_id)?;
        let event_id = Uuid::parse_str(event_id_text).map_err(|_| malformed(&n.event_id, "uuid"))?;
        let entity_version = match self.entity_version.map(|i| text(i, &n.entity_version)).transpose()?.flatten() {
            None => None,
            Some(v) => Some(v.parse().map_err(|_| malformed(&n.entity_version, "bigint"))?),
        };
        let occurred_text = required(self.occurred_at, &n.occurred_at)?;
        let occurred_at = parse_timestamptz(occurred_text).ok_or_else(|| malformed(&n.occurred_at, "timestamptz"))?;
        let payload = values.get(self.payload).and_then(|v| v.clone());
        let headers = self.headers.and_then(|i| values.get(i).and_then(|v| v.clone()));
        Ok(OutboxRow {
            id,
            event_id,
            aggregate_type: self.shared.get(required(self.aggregate_type, &n.aggregate_type)?),
            aggregate_id: required(self.aggregate_id, &n.aggregate_id)?.to_string(),
            event_type: self.shared.get(required(self.event_type, &n.event_type)?),
            kind: self.shared.get(required(self.kind, &n.kind)?),
            entity_version,
            payload,
            headers,
            occurred_at,
            committed_at,
            xid: None,
        })
    }
}

#[cfg(test)]
impl OutboxRow {
    /// A row for unit tests: an `event` of `aggregate_type` "order" and
    /// entity `aggregate_id`, payload `{}`.
    pub(crate) fn for_test(id: i64, aggregate_id: &str) -> Self {
        Self {
            id,
            event_id: Uuid::new_v4(),
            aggregate_type: "order".into(),
            aggregate_id: aggregate_id.into(),
            event_type: "Changed".into(),
            kind: "event".into(),
            entity_version: None,
            payload: Some(Bytes::from_static(b"{}")),
            headers: None,
            occurred_at: Utc::now(),
            committed_at: None,
            xid: None,
        }
    }
}

/// Parses Postgres' ISO text output of a `timestamptz`
/// (`2026-11-23 16:40:00.123456+00`, `...+05:30`).
pub fn parse_timestamptz(text: &str) -> Option<DateTime<Utc>> {
    // The format parsed once: it is read for every row, and parsing the
    // format string each time shows in the relay's CPU profile.
    static FORMAT: std::sync::LazyLock<Vec<chrono::format::Item<'static>>> = std::sync::LazyLock::new(|| {
        chrono::format::StrftimeItems::new("%Y-%m-%d %H:%M:%S%.f%#z").parse_to_owned().unwrap_or_default()
    });
    let mut parsed = chrono::format::Parsed::new();
    chrono::format::parse(&mut parsed, text, FORMAT.iter()).ok()?;
    parsed.to_datetime().ok().map(|t| t.with_timezone(&Utc))
}

/// Converts pgoutput's timestamps (microseconds since 2000-01-01 UTC).
pub fn pg_epoch_micros_to_utc(micros: i64) -> Option<DateTime<Utc>> {
    const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;
    DateTime::from_timestamp_micros(micros.checked_add(PG_EPOCH_UNIX_MICROS)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_postgres_timestamps() {
        let t = parse_timestamptz("2026-11-23 16:40:00.123456+00").expect("utc");
        assert_eq!(t.to_rfc3339(), "2026-11-23T16:40:00.123456+00:00");
        let t = parse_timestamptz("2026-11-23 22:10:00+05:30").expect("offset");
        assert_eq!(t.to_rfc3339(), "2026-11-23T16:40:00+00:00");
        assert!(parse_timestamptz("yesterday").is_none());
        assert!(parse_timestamptz("2026-11-23 16:40:00").is_none(), "no offset");
        let t = parse_timestamptz("2026-11-23 16:40:00.5-03").expect("negative offset");
        assert_eq!(t.to_rfc3339(), "2026-11-23T19:40:00.500+00:00");
    }

    #[test]
    fn pg_epoch_conversion() {
        let t = pg_epoch_micros_to_utc(0).expect("epoch");
        assert_eq!(t.to_rfc3339(), "2000-01-01T00:00:00+00:00");
    }

    fn columns() -> Vec<String> {
        [
            "id",
            "event_id",
            "aggregate_type",
            "aggregate_id",
            "event_type",
            "kind",
            "entity_version",
            "payload",
            "headers",
            "occurred_at",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    #[test]
    fn builds_a_row_from_text_columns() {
        let layout = RowLayout::new(&columns(), &ColumnNames::default()).expect("layout");
        let v = |s: &'static str| Some(Bytes::from_static(s.as_bytes()));
        let values = vec![
            v("7"),
            v("6f1c1a52-36cb-4d6a-9a0b-2b8e1b9e4f11"),
            v("order"),
            v("o-1"),
            v("OrderPlaced"),
            v("event"),
            None,
            v("{\"total\": 3}"),
            None,
            v("2026-11-23 16:40:00+00"),
        ];
        let row = layout.row(&values, None).expect("row");
        assert_eq!(row.id, 7);
        assert_eq!(row.aggregate_id, "o-1");
        assert_eq!(row.entity_version, None);
        let mut bad = values.clone();
        bad[0] = v("seven");
        assert!(matches!(layout.row(&bad, None), Err(RowError::Malformed { .. })));
        // Rows share the text of the few-valued columns; the entity id is their own.
        let again = layout.row(&values, None).expect("row");
        assert!(Arc::ptr_eq(&row.aggregate_type, &again.aggregate_type));
        assert!(Arc::ptr_eq(&row.event_type, &again.event_type));
        assert!(Arc::ptr_eq(&row.kind, &again.kind));
        assert_eq!(&*again.kind, "event");
    }

    #[test]
    fn shared_text_stays_bounded() {
        let shared = SharedText::default();
        for i in 0..SHARED_TEXT_MAX + 10 {
            assert_eq!(&*shared.get(&format!("type-{i}")), format!("type-{i}"));
        }
        let kept = shared.0.lock().expect("lock").len();
        assert_eq!(kept, SHARED_TEXT_MAX);
        let late = format!("type-{}", SHARED_TEXT_MAX + 5);
        assert!(!Arc::ptr_eq(&shared.get(&late), &shared.get(&late)), "values past the bound are not kept");
    }

    #[test]
    fn debezium_column_names_can_be_mapped() {
        let names = ColumnNames {
            aggregate_type: "aggregatetype".into(),
            aggregate_id: "aggregateid".into(),
            event_type: "type".into(),
            ..ColumnNames::default()
        };
        let mut cols = columns();
        cols[2] = "aggregatetype".into();
        cols[3] = "aggregateid".into();
        cols[4] = "type".into();
        assert!(RowLayout::new(&cols, &names).is_ok());
        assert_eq!(RowLayout::new(&columns(), &names), Err(RowError::MissingColumn("aggregatetype".into())));
    }
}
