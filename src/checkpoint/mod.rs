//! The checkpoint stage: records publish state and confirms source positions.
//!
//! # Contract
//! - A row is marked published (`published_at`, `kafka_topic`,
//!   `kafka_partition`, `kafka_offset`) only after Kafka acknowledged it.
//! - Items arrive in source (commit) order and are settled in that order:
//!   a delivery report that comes early waits for those before it. So the
//!   position handed back to the source always closes a contiguous prefix of
//!   rows that are each either acknowledged-and-recorded or held-and-recorded.
//! - A crash can therefore repeat only rows after the last confirmed position
//!   (the in-flight window, at most `checkpoint.max_in_flight` rows plus the
//!   transaction they belong to); it can never lose a row, because nothing
//!   past an unrecorded row is ever confirmed.
//! - Held rows (permanent errors) are recorded with `attempts` and
//!   `last_error` before the position moves past them, so their release can
//!   be driven from the table while the slot moves on.
//! - Recording is batched: one `UPDATE ... FROM unnest(...)` round trip per
//!   batch of published rows, one per batch of held rows.

pub mod retention;

use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_postgres::Client;
use tracing::Instrument;

use crate::sink::{HeldEntities, PendingDelivery, PublishError};
use crate::source::{OutboxRow, Position};
use crate::telemetry::metrics;

/// What the checkpoint stage needs to know of a row.
#[derive(Debug, Clone)]
pub struct RowMeta {
    pub id: i64,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub topic: String,
    /// Commit time where known, else `occurred_at`: the start of the latency.
    pub since: chrono::DateTime<chrono::Utc>,
    /// The row's W3C trace context, carried into the relay's log lines.
    pub traceparent: Option<String>,
}

impl RowMeta {
    pub fn new(row: &OutboxRow, topic: &str) -> Self {
        Self {
            id: row.id,
            aggregate_type: row.aggregate_type.clone(),
            aggregate_id: row.aggregate_id.clone(),
            topic: topic.to_string(),
            since: row.committed_at.unwrap_or(row.occurred_at),
            traceparent: row.headers.as_ref().and_then(|h| {
                let value: serde_json::Value = serde_json::from_slice(h).ok()?;
                value.get("traceparent")?.as_str().map(str::to_string)
            }),
        }
    }
}

/// One item between the sink and the checkpoint stage, in source order.
pub enum InFlight {
    /// A record handed to the producer.
    Sent { meta: RowMeta, delivery: PendingDelivery },
    /// A row that is not sent: its own error, or an earlier held row of the
    /// same entity (`attempted` false).
    Held { meta: RowMeta, error: String, attempted: bool },
    /// A source position; see [`crate::source::SourceEvent::Checkpoint`].
    Checkpoint(Position),
}

/// Why the checkpoint stage stopped.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot record publish state: {0}")]
    Record(#[from] tokio_postgres::Error),
    #[error("delivery failed, restarting from the last confirmed position: {0}")]
    Delivery(String),
}

#[derive(Default)]
struct Batch {
    ids: Vec<i64>,
    topics: Vec<String>,
    partitions: Vec<i32>,
    offsets: Vec<i64>,
    held_ids: Vec<i64>,
    held_errors: Vec<String>,
    held_attempts: Vec<i32>,
    position: Option<Position>,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.ids.is_empty() && self.held_ids.is_empty() && self.position.is_none()
    }
    fn rows(&self) -> usize {
        self.ids.len() + self.held_ids.len()
    }
}

/// Records publish state in Postgres and reports confirmed positions.
pub struct Checkpoint {
    client: Client,
    publish_sql: String,
    hold_sql: String,
    batch_rows: usize,
    flush_interval: Duration,
    held: HeldEntities,
    confirmed: watch::Sender<Position>,
}

impl Checkpoint {
    pub fn new(
        client: Client,
        table_sql: &str,
        id_column: &str,
        batch_rows: usize,
        flush_interval: Duration,
        held: HeldEntities,
        confirmed: watch::Sender<Position>,
    ) -> Self {
        let publish_sql = format!(
            "UPDATE {table_sql} AS o SET published_at = now(), kafka_topic = u.topic, \
             kafka_partition = u.part, kafka_offset = u.off, attempts = o.attempts + 1, last_error = NULL \
             FROM unnest($1::bigint[], $2::text[], $3::int[], $4::bigint[]) AS u(id, topic, part, off) \
             WHERE o.\"{id_column}\" = u.id RETURNING o.\"{id_column}\""
        );
        // Matches published rows too (leaving them as they are), so that
        // "not matched" only ever means "not visible yet".
        let hold_sql = format!(
            "UPDATE {table_sql} AS o SET \
             attempts = CASE WHEN o.published_at IS NULL THEN o.attempts + u.tried ELSE o.attempts END, \
             last_error = CASE WHEN o.published_at IS NULL THEN u.err ELSE o.last_error END \
             FROM unnest($1::bigint[], $2::text[], $3::int[]) AS u(id, err, tried) \
             WHERE o.\"{id_column}\" = u.id RETURNING o.\"{id_column}\""
        );
        Self { client, publish_sql, hold_sql, batch_rows, flush_interval, held, confirmed }
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
                InFlight::Checkpoint(position) => batch.position = Some(position),
                InFlight::Held { meta, error, attempted } => {
                    if attempted {
                        metrics::held_row();
                    }
                    batch.held_ids.push(meta.id);
                    batch.held_errors.push(error);
                    batch.held_attempts.push(i32::from(attempted));
                }
                InFlight::Sent { meta, mut delivery } => {
                    // Wait for this delivery, recording what is already settled
                    // whenever the flush interval passes meanwhile.
                    let outcome = loop {
                        if batch.is_empty() {
                            break (&mut delivery).await;
                        }
                        match tokio::time::timeout_at(deadline, &mut delivery).await {
                            Ok(outcome) => break outcome,
                            Err(_) => {
                                self.flush(&mut batch).await?;
                                deadline = Instant::now() + self.flush_interval;
                            }
                        }
                    };
                    match outcome {
                        Ok(ack) => {
                            metrics::published(&meta.topic, meta.since);
                            batch.ids.push(meta.id);
                            batch.topics.push(meta.topic);
                            batch.partitions.push(ack.partition);
                            batch.offsets.push(ack.offset);
                        }
                        Err(PublishError::Permanent(error)) => {
                            metrics::publish_error(true);
                            metrics::held_row();
                            tracing::error!(row_id = meta.id, topic = %meta.topic, traceparent = meta.traceparent.as_deref().unwrap_or(""), error = %error, "delivery failed permanently; row held");
                            self.held.hold(&meta.aggregate_type, &meta.aggregate_id, meta.id);
                            batch.held_ids.push(meta.id);
                            batch.held_errors.push(error);
                            batch.held_attempts.push(1);
                        }
                        Err(PublishError::Retriable(error)) => {
                            metrics::publish_error(false);
                            // Everything before this row is settled: keep it.
                            self.flush(&mut batch).await?;
                            return Err(CheckpointError::Delivery(error));
                        }
                    }
                }
            }
            if batch.rows() >= self.batch_rows || Instant::now() >= deadline {
                self.flush(&mut batch).await?;
            }
        }
        self.flush(&mut batch).await
    }

    async fn flush(&self, batch: &mut Batch) -> Result<(), CheckpointError> {
        let span = tracing::debug_span!("checkpoint_batch", published = batch.ids.len(), held = batch.held_ids.len());
        self.record(batch).instrument(span).await?;
        if let Some(position) = batch.position {
            tracing::trace!(position, first = ?batch.ids.first(), last = ?batch.ids.last(), "recorded; confirming");
            // Only now is every row up to `position` recorded.
            self.confirmed.send_replace(position);
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
    /// visible; the position is confirmed only after that.
    async fn record(&self, batch: &Batch) -> Result<(), CheckpointError> {
        let started = std::time::Instant::now();
        if !batch.ids.is_empty() {
            self.until_visible(&batch.ids, async |pending: &[usize]| {
                let ids: Vec<i64> = pending.iter().map(|&i| batch.ids[i]).collect();
                let topics: Vec<&str> = pending.iter().map(|&i| batch.topics[i].as_str()).collect();
                let partitions: Vec<i32> = pending.iter().map(|&i| batch.partitions[i]).collect();
                let offsets: Vec<i64> = pending.iter().map(|&i| batch.offsets[i]).collect();
                self.client.query(&self.publish_sql, &[&ids, &topics, &partitions, &offsets]).await
            })
            .await?;
            metrics::checkpoint_batch(batch.ids.len(), started.elapsed());
        }
        if !batch.held_ids.is_empty() {
            self.until_visible(&batch.held_ids, async |pending: &[usize]| {
                let ids: Vec<i64> = pending.iter().map(|&i| batch.held_ids[i]).collect();
                let errors: Vec<&str> = pending.iter().map(|&i| batch.held_errors[i].as_str()).collect();
                let attempts: Vec<i32> = pending.iter().map(|&i| batch.held_attempts[i]).collect();
                self.client.query(&self.hold_sql, &[&ids, &errors, &attempts]).await
            })
            .await?;
        }
        Ok(())
    }

    /// Runs `update` (an UPDATE ... RETURNING id) for the rows at the
    /// `pending` indices of `ids`, again for those it did not match, until
    /// all are matched or [`Self::wait_for_visibility`] gives up.
    async fn until_visible(
        &self,
        ids: &[i64],
        mut update: impl AsyncFnMut(&[usize]) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>,
    ) -> Result<(), CheckpointError> {
        let mut pending: Vec<usize> = (0..ids.len()).collect();
        for attempt in 0.. {
            let rows = update(&pending).await?;
            let matched: std::collections::HashSet<i64> = rows.iter().map(|r| r.get(0)).collect();
            pending.retain(|&i| !matched.contains(&ids[i]));
            if pending.is_empty() || !self.wait_for_visibility(attempt, pending.len()).await {
                break;
            }
        }
        Ok(())
    }

    /// Backs off before retrying rows whose commit is not visible yet.
    /// Gives up after about five seconds: a row deleted right after its
    /// insert (some outbox writers do that) never becomes visible.
    async fn wait_for_visibility(&self, attempt: u32, missing: usize) -> bool {
        const MAX_ATTEMPTS: u32 = 12;
        if attempt >= MAX_ATTEMPTS {
            tracing::warn!(
                missing,
                "rows were published but not found when recording their state (deleted after insert?)"
            );
            return false;
        }
        tokio::time::sleep(Duration::from_millis(2u64 << attempt.min(11)).min(Duration::from_secs(1))).await;
        true
    }
}
