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
use std::pin::Pin;
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, Sleep};
use tracing::Instrument;

use crate::delivery::{Ack, InFlight, PendingDelivery, PublishError, RoutedRow};
use crate::error_class::ErrorClass;
use crate::hold::{waiting_reason, HeldAt, Holder, TooManyHeld};
use crate::outbox::CommitBoundary;
use crate::store::{HeldState, PublishStateStore, Published, StoreError};
use crate::telemetry::metrics;

pub mod progress;

/// Why the checkpoint stage stopped.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot record publish state")]
    Record(#[from] StoreError),
    #[error("delivery failed, restarting from the last confirmed commit boundary")]
    Delivery(#[source] PublishError),
    #[error(transparent)]
    TooManyHeld(#[from] TooManyHeld),
    /// Exactly-once: the progress records could not be read back.
    #[error("cannot recover exactly-once progress")]
    Progress(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl CheckpointError {
    /// A write by its store error (a refused fence ends the term), a
    /// delivery by its own class; reading progress back is retried.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Record(e) => e.class(),
            Self::Delivery(e) => e.class(),
            Self::TooManyHeld(e) => e.class(),
            Self::Progress(_) => ErrorClass::Retry,
        }
    }

    /// [`Self::Progress`] for the error of a [`crate::delivery::ProgressSource`].
    pub fn progress(err: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Progress(Box::new(err))
    }
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
        // One timer per run, reset when a batch starts: a fresh sleep per
        // item costs a driver wake-up (an eventfd write) per row.
        let flush_timer = tokio::time::sleep_until(Instant::now() + self.flush_interval);
        tokio::pin!(flush_timer);
        loop {
            let item = if batch.is_empty() {
                input.recv().await
            } else {
                tokio::select! {
                    item = input.recv() => item,
                    () = &mut flush_timer => {
                        self.flush(&mut batch).await?;
                        continue;
                    }
                }
            };
            let Some(item) = item else { break };
            metrics::in_flight_dec();
            if batch.is_empty() {
                flush_timer.as_mut().reset(Instant::now() + self.flush_interval);
            }
            match item {
                InFlight::Boundary(boundary) => batch.boundary = Some(boundary),
                InFlight::Held { row, error } => batch.held.push(held_state(&row, error, None)),
                InFlight::Waiting { row, behind } => {
                    batch.held.push(held_state(&row, waiting_reason(behind), Some(behind)));
                }
                InFlight::Sent { row, delivery } => {
                    let outcome = self.await_delivery(delivery, &mut batch, flush_timer.as_mut()).await?;
                    self.settle_delivery(row, outcome, &mut batch).await?;
                }
            }
            if batch.rows() >= self.batch_rows || Instant::now() >= flush_timer.deadline() {
                self.flush(&mut batch).await?;
            }
        }
        self.flush(&mut batch).await
    }

    /// Waits for one delivery, recording what is already settled whenever
    /// the flush timer fires meanwhile.
    async fn await_delivery(
        &self,
        mut delivery: PendingDelivery,
        batch: &mut Batch,
        mut flush_timer: Pin<&mut Sleep>,
    ) -> Result<Result<Ack, PublishError>, CheckpointError> {
        loop {
            if batch.is_empty() {
                return Ok((&mut delivery).await);
            }
            // Already acknowledged (the usual case while a backlog drains):
            // no timer to poll for it.
            if let Some(outcome) = (&mut delivery).now_or_never() {
                return Ok(outcome);
            }
            tokio::select! {
                outcome = &mut delivery => return Ok(outcome),
                () = flush_timer.as_mut() => {
                    self.flush(batch).await?;
                    flush_timer.as_mut().reset(Instant::now() + self.flush_interval);
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
        if !matches!(outcome, Err(PublishError::Retriable { .. })) {
            if let Some(behind) = self.holder.behind_a_delivery_hold(&row) {
                batch.held.push(held_state(&row, waiting_reason(behind), Some(behind)));
                return Ok(());
            }
        }
        match outcome {
            Ok(ack) => {
                metrics::published(&row.topic, row.since());
                batch.published.push(Published {
                    id: row.row.id,
                    topic: row.topic,
                    partition: ack.partition,
                    offset: ack.offset,
                    xid: row.row.xid,
                });
                Ok(())
            }
            Err(permanent @ PublishError::Permanent { .. }) => {
                metrics::publish_error(true);
                let error = permanent.reason();
                self.holder.hold(&row, &error, HeldAt::Delivery).await?;
                batch.held.push(held_state(&row, error, None));
                Ok(())
            }
            Err(retriable @ PublishError::Retriable { .. }) => {
                metrics::publish_error(false);
                // Everything before this row is settled: keep it.
                self.flush(batch).await?;
                Err(CheckpointError::Delivery(retriable))
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
    /// Logical decoding may stream a transaction before its commit is
    /// visible to other sessions (the commit record is flushed before the
    /// committing backend leaves the proc array; with synchronous
    /// replication it stays there until a standby confirms), so an UPDATE
    /// racing it can miss a just-committed row. See [`Self::until_visible`].
    async fn record(&self, batch: &Batch) -> Result<(), CheckpointError> {
        let started = std::time::Instant::now();
        if !batch.published.is_empty() {
            let key = |r: &Published| (r.id, r.xid);
            self.until_visible(&batch.published, key, async |rows| self.store.record_published(rows).await).await?;
            metrics::checkpoint_batch(batch.published.len(), started.elapsed());
        }
        if !batch.held.is_empty() {
            let key = |r: &HeldState| (r.id, r.xid);
            self.until_visible(&batch.held, key, async |rows| self.store.record_held(rows).await).await?;
        }
        Ok(())
    }

    /// Runs `update` for `items` (keyed by row id and writing transaction),
    /// again for those it did not match, until each is matched or known to
    /// be gone.
    ///
    /// Safety: the commit boundary after these rows is confirmed only once
    /// this returns, so it never returns while one of them can still become
    /// visible. A row not found whose transaction is still in progress for a
    /// fresh snapshot is waited for, however long, with a log line and the
    /// `outbox_relay_unrecorded_rows` gauge (a stop then ends the run without
    /// confirming). Only a row whose transaction is over, and that an UPDATE
    /// after that still does not find, is given up: it was deleted after its
    /// insert (some outbox writers do that). Test: `tests/it/exclusive/chaos.rs`,
    /// `a_commit_not_visible_yet_is_waited_for_never_confirmed_past`.
    async fn until_visible<T>(
        &self,
        items: &[T],
        key: impl Fn(&T) -> (i64, Option<u32>),
        mut update: impl AsyncFnMut(&[&T]) -> Result<Vec<i64>, StoreError>,
    ) -> Result<(), StoreError> {
        /// Quick retries first: the usual race lasts microseconds.
        const QUICK_ATTEMPTS: u32 = 3;
        let mut pending: Vec<&T> = items.iter().collect();
        for attempt in 1.. {
            let matched: HashSet<i64> = update(&pending).await?.into_iter().collect();
            pending.retain(|item| !matched.contains(&key(item).0));
            if pending.is_empty() {
                break;
            }
            if attempt <= QUICK_ATTEMPTS {
                tokio::time::sleep(Duration::from_millis(2u64 << attempt)).await;
                continue;
            }
            let xids: Vec<u32> = pending.iter().filter_map(|item| key(item).1).collect();
            let running = if xids.is_empty() { HashSet::new() } else { self.store.in_progress(&xids).await? };
            let (waiting, over): (Vec<&T>, Vec<&T>) =
                pending.into_iter().partition(|item| key(item).1.is_some_and(|xid| running.contains(&xid)));
            if !over.is_empty() {
                // Their transactions are over: visible to this UPDATE, or deleted.
                let matched: HashSet<i64> = update(&over).await?.into_iter().collect();
                let gone = over.iter().filter(|item| !matched.contains(&key(item).0)).count();
                if gone > 0 {
                    tracing::warn!(gone, "published rows are gone (deleted after insert?): nothing to record for them");
                }
            }
            pending = waiting;
            metrics::unrecorded_rows(pending.len());
            if pending.is_empty() {
                break;
            }
            if attempt % 10 == QUICK_ATTEMPTS + 1 {
                tracing::warn!(
                    rows = pending.len(),
                    "published rows are not visible yet: their transactions are still in progress (a synchronous standby that does not confirm?); waiting for them, and not confirming past them"
                );
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        Ok(())
    }
}

fn held_state(row: &RoutedRow, error: String, waiting_for: Option<i64>) -> HeldState {
    HeldState { id: row.row.id, error, attempted: waiting_for.is_none(), waiting_for, xid: row.row.xid }
}

#[cfg(test)]
mod tests;
