//! The checkpoint stage: records publish state and confirms commit boundaries.
//!
//! # Contract
//! - A row is marked published (`published_at`, `kafka_topic`,
//!   `kafka_partition`, `kafka_offset`) only after Kafka acknowledged it.
//! - Items arrive in source (commit) order and are settled in that order:
//!   a delivery report that comes early waits for those before it. So the
//!   commit boundary handed back to the source always closes a contiguous
//!   prefix of rows that are each acknowledged-and-recorded, or
//!   held-or-waiting-and-recorded (property test
//!   `tests::confirms_only_a_recorded_prefix`).
//! - A crash can therefore repeat only rows after the last confirmed
//!   boundary (the in-flight window, at most `checkpoint.max_in_flight` rows
//!   plus the transaction they belong to); it can never lose a row, because
//!   nothing past an unrecorded row is ever confirmed.
//! - Held and waiting rows are recorded (`last_error`, `waiting_for`,
//!   `attempts`) before the boundary moves past them, so their release can
//!   be driven from the table while the slot moves on. A permanent error in
//!   a delivery report holds the row through the same [`Holder`] as the
//!   sink, with the same log line, metric and dead-letter copy.
//! - Recording is batched: one round trip per batch of published rows, one
//!   per batch of held and waiting rows ([`PublishStateStore`]).

pub mod retention;

use std::collections::HashSet;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::Instrument;

use crate::delivery::{waiting_reason, Ack, InFlight, PendingDelivery, PublishError, RoutedRow};
use crate::outbox::CommitBoundary;
use crate::sink::{HeldAt, Holder};
use crate::store::{HeldState, PublishStateStore, Published, StoreError};
use crate::telemetry::metrics;

/// Why the checkpoint stage stopped.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot record publish state")]
    Record(#[from] StoreError),
    #[error("delivery failed, restarting from the last confirmed commit boundary: {0}")]
    Delivery(String),
}

#[derive(Default)]
struct Batch {
    published: Vec<Published>,
    held: Vec<HeldState>,
    boundary: Option<CommitBoundary>,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.published.is_empty() && self.held.is_empty() && self.boundary.is_none()
    }
    fn rows(&self) -> usize {
        self.published.len() + self.held.len()
    }
}

/// Records publish state through a [`PublishStateStore`] and reports
/// confirmed commit boundaries.
pub struct Checkpoint<S> {
    store: S,
    batch_rows: usize,
    flush_interval: Duration,
    holder: Holder,
    confirmed: watch::Sender<Option<CommitBoundary>>,
}

impl<S: PublishStateStore> Checkpoint<S> {
    pub fn new(
        store: S,
        batch_rows: usize,
        flush_interval: Duration,
        holder: Holder,
        confirmed: watch::Sender<Option<CommitBoundary>>,
    ) -> Self {
        Self { store, batch_rows, flush_interval, holder, confirmed }
    }

    /// Settles items in order until the sink is done, then records the rest.
    pub async fn run(self, mut input: mpsc::Receiver<InFlight>) -> Result<(), CheckpointError> {
        let mut batch = Batch::default();
        let mut deadline = Instant::now() + self.flush_interval;
        loop {
            let item = if batch.is_empty() {
                input.recv().await
            } else {
                tokio::select! {
                    item = input.recv() => item,
                    _ = tokio::time::sleep_until(deadline) => {
                        self.flush(&mut batch).await?;
                        continue;
                    }
                }
            };
            let Some(item) = item else { break };
            metrics::in_flight_dec();
            if batch.is_empty() {
                deadline = Instant::now() + self.flush_interval;
            }
            match item {
                InFlight::Boundary(boundary) => batch.boundary = Some(boundary),
                InFlight::Held { row, error } => batch.held.push(held_state(&row, error, None)),
                InFlight::Waiting { row, behind } => {
                    batch.held.push(held_state(&row, waiting_reason(behind), Some(behind)));
                }
                InFlight::Sent { row, delivery } => {
                    let outcome = self.await_delivery(delivery, &mut batch, &mut deadline).await?;
                    self.settle_delivery(row, outcome, &mut batch).await?;
                }
            }
            if batch.rows() >= self.batch_rows || Instant::now() >= deadline {
                self.flush(&mut batch).await?;
            }
        }
        self.flush(&mut batch).await
    }

    /// Waits for one delivery, recording what is already settled whenever
    /// the flush interval passes meanwhile.
    async fn await_delivery(
        &self,
        mut delivery: PendingDelivery,
        batch: &mut Batch,
        deadline: &mut Instant,
    ) -> Result<Result<Ack, PublishError>, CheckpointError> {
        loop {
            if batch.is_empty() {
                return Ok((&mut delivery).await);
            }
            match tokio::time::timeout_at(*deadline, &mut delivery).await {
                Ok(outcome) => return Ok(outcome),
                Err(_) => {
                    self.flush(batch).await?;
                    *deadline = Instant::now() + self.flush_interval;
                }
            }
        }
    }

    async fn settle_delivery(
        &self,
        row: RoutedRow,
        outcome: Result<Ack, PublishError>,
        batch: &mut Batch,
    ) -> Result<(), CheckpointError> {
        match outcome {
            Ok(ack) => {
                metrics::published(&row.topic, row.since());
                batch.published.push(Published {
                    id: row.row.id,
                    topic: row.topic,
                    partition: ack.partition,
                    offset: ack.offset,
                });
                Ok(())
            }
            Err(PublishError::Permanent(error)) => {
                metrics::publish_error(true);
                self.holder.hold(&row, &error, HeldAt::Delivery).await;
                batch.held.push(held_state(&row, error, None));
                Ok(())
            }
            Err(PublishError::Retriable(error)) => {
                metrics::publish_error(false);
                // Everything before this row is settled: keep it.
                self.flush(batch).await?;
                Err(CheckpointError::Delivery(error))
            }
        }
    }

    async fn flush(&self, batch: &mut Batch) -> Result<(), CheckpointError> {
        let span = tracing::debug_span!("checkpoint_batch", published = batch.published.len(), held = batch.held.len());
        self.record(batch).instrument(span).await?;
        if let Some(boundary) = batch.boundary {
            tracing::trace!(?boundary, "recorded; confirming");
            // Only now is every row up to `boundary` recorded.
            self.confirmed.send_replace(Some(boundary));
        }
        *batch = Batch::default();
        Ok(())
    }

    /// Writes the batch's publish state, making sure every row was matched.
    ///
    /// Logical decoding may stream a transaction a moment before its commit
    /// is visible to other sessions (the commit record is flushed before the
    /// committing backend leaves the proc array), so an UPDATE racing it can
    /// miss a just-committed row. The missing ids are retried until they are
    /// visible; the boundary is confirmed only after that.
    async fn record(&self, batch: &Batch) -> Result<(), CheckpointError> {
        let started = std::time::Instant::now();
        if !batch.published.is_empty() {
            until_visible(&batch.published, |r| r.id, async |rows| self.store.record_published(rows).await).await?;
            metrics::checkpoint_batch(batch.published.len(), started.elapsed());
        }
        if !batch.held.is_empty() {
            until_visible(&batch.held, |r| r.id, async |rows| self.store.record_held(rows).await).await?;
        }
        Ok(())
    }
}

fn held_state(row: &RoutedRow, error: String, waiting_for: Option<i64>) -> HeldState {
    HeldState { id: row.row.id, error, attempted: waiting_for.is_none(), waiting_for }
}

/// Runs `update` for `items`, again for those it did not match, until all
/// are matched or [`wait_for_visibility`] gives up.
async fn until_visible<T>(
    items: &[T],
    id: impl Fn(&T) -> i64,
    mut update: impl AsyncFnMut(&[&T]) -> Result<Vec<i64>, StoreError>,
) -> Result<(), StoreError> {
    let mut pending: Vec<&T> = items.iter().collect();
    for attempt in 0.. {
        let matched: HashSet<i64> = update(&pending).await?.into_iter().collect();
        pending.retain(|item| !matched.contains(&id(item)));
        if pending.is_empty() || !wait_for_visibility(attempt, pending.len()).await {
            break;
        }
    }
    Ok(())
}

/// Backs off before retrying rows whose commit is not visible yet.
/// Gives up after about five seconds: a row deleted right after its
/// insert (some outbox writers do that) never becomes visible.
async fn wait_for_visibility(attempt: u32, missing: usize) -> bool {
    const MAX_ATTEMPTS: u32 = 12;
    if attempt >= MAX_ATTEMPTS {
        tracing::warn!(missing, "rows were published but not found when recording their state (deleted after insert?)");
        return false;
    }
    tokio::time::sleep(Duration::from_millis(2u64 << attempt.min(11)).min(Duration::from_secs(1))).await;
    true
}

#[cfg(test)]
mod tests;
