//! What passes from the sink to the checkpoint stage: each row with its
//! pending delivery, or the reason it was not sent, in source order; and,
//! in exactly-once mode, the progress records the checkpoint's recovery
//! reads back ([`ProgressSource`]). Imports no stage and no Kafka client:
//! how Kafka errors become a [`PublishError`] is the sink's
//! (`sink::classify`), and so is reading the progress topic.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error_class::{Cause, ErrorClass};
use crate::outbox::{CommitBoundary, OutboxRow};
use crate::telemetry::ErrorChain;

/// The acknowledgement of one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub partition: i32,
    pub offset: i64,
}

/// Why a record was not delivered: what failed, with the fix where one is
/// known, and the client's error as the source.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PublishError {
    /// Retrying the same record can never succeed (too large, not authorized,
    /// missing topic): the row is held with [`PublishError::reason`].
    #[error("{what}")]
    Permanent {
        what: String,
        #[source]
        cause: Option<Cause>,
    },
    /// The broker or network failed in a way librdkafka gave up on: the
    /// pipeline restarts from its last confirmed commit boundary.
    #[error("{what}")]
    Retriable {
        what: String,
        #[source]
        cause: Option<Cause>,
    },
}

impl PublishError {
    /// A [`PublishError::Permanent`] without a cause.
    pub fn permanent(what: impl Into<String>) -> Self {
        Self::Permanent { what: what.into(), cause: None }
    }

    /// A [`PublishError::Retriable`] without a cause.
    pub fn retriable(what: impl Into<String>) -> Self {
        Self::Retriable { what: what.into(), cause: None }
    }

    /// The same error, caused by `cause`.
    pub fn because(self, cause: impl std::error::Error + Send + Sync + 'static) -> Self {
        let cause = Some(Arc::new(cause) as Cause);
        match self {
            Self::Permanent { what, .. } => Self::Permanent { what, cause },
            Self::Retriable { what, .. } => Self::Retriable { what, cause },
        }
    }

    /// The text a held row keeps (its `last_error`, the log line, the
    /// dead-letter reason): the error and its causes.
    pub fn reason(&self) -> String {
        ErrorChain(self).to_string()
    }

    /// A permanent refusal holds the row; anything else restarts the run.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Permanent { .. } => ErrorClass::Hold,
            Self::Retriable { .. } => ErrorClass::Retry,
        }
    }
}

/// A delivery in progress, resolving to the record's partition and offset.
pub type PendingDelivery = Pin<Box<dyn Future<Output = Result<Ack, PublishError>> + Send>>;

/// A row on its way through the sink: where it goes and with which key.
/// The row itself travels along so that a row held only when its delivery
/// report comes back gets the same dead-letter copy as one held at once.
#[derive(Debug, Clone)]
pub struct RoutedRow {
    pub row: OutboxRow,
    pub topic: Arc<str>,
    /// The record key, once encoded (the dead-letter copy reuses it).
    pub key: Option<Bytes>,
}

impl RoutedRow {
    pub fn new(row: OutboxRow, topic: Arc<str>) -> Self {
        Self { row, topic, key: None }
    }

    /// Commit time where known, else `occurred_at`: the start of the latency.
    pub fn since(&self) -> chrono::DateTime<chrono::Utc> {
        self.row.committed_at.unwrap_or(self.row.occurred_at)
    }

    /// The row's W3C trace context, carried into the relay's log lines.
    pub fn traceparent(&self) -> Option<String> {
        let headers = self.row.headers.as_ref()?;
        let value: serde_json::Value = serde_json::from_slice(headers).ok()?;
        value.get("traceparent")?.as_str().map(str::to_string)
    }
}

/// One item between the sink and the checkpoint stage, in source order.
pub enum InFlight {
    /// A record handed to the producer.
    Sent { row: RoutedRow, delivery: PendingDelivery },
    /// A row held for its own error (already counted and logged by the
    /// [`Holder`](crate::hold::Holder)).
    Held { row: RoutedRow, error: String },
    /// A row that waits behind held row `behind` of the same entity.
    Waiting { row: RoutedRow, behind: i64 },
    /// A commit boundary; see [`CommitBoundary`].
    Boundary(CommitBoundary),
}

/// What one committed exactly-once transaction carried: written inside the
/// transaction to the progress topic, so it is visible exactly when its
/// rows are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressRecord {
    pub transactional_id: String,
    pub rows: Vec<ProgressRow>,
}

/// One row of a transaction: its id and where it landed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressRow {
    pub id: i64,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

impl ProgressRow {
    pub fn new(row: &RoutedRow, ack: Ack) -> Self {
        Self { id: row.row.id, topic: row.topic.to_string(), partition: ack.partition, offset: ack.offset }
    }
}

/// This relay group's progress records, read back newest first: what the
/// exactly-once recovery (`checkpoint::progress::recover`) walks. The sink
/// implements it over its progress topic, read only after
/// `init_transactions`, so no transaction of an earlier producer can still
/// commit behind it.
pub trait ProgressSource {
    /// Why a window could not be read.
    type Error: std::error::Error + Send + Sync + 'static;
    /// The next older window of records, newest first; `None` once the
    /// beginning was read.
    fn older(&mut self) -> impl Future<Output = Result<Option<Vec<ProgressRecord>>, Self::Error>> + Send;
}
