//! Ordered polling source (`source.mode = "poll"`), for databases where the
//! relay may not use logical replication (no `REPLICATION` role, no
//! `wal_level = logical`). Same sink, same checkpoint stage, same publish-state
//! columns as the logical source: only the reading differs.
//!
//! # How rows are read
//!
//! ```sql
//! SELECT <configured columns as text> FROM outbox AS o
//! WHERE o.published_at IS NULL AND o.last_error IS NULL
//! ORDER BY o.id LIMIT $batch_rows
//! ```
//!
//! There is no cursor (`id > last_seen`). A row stays selectable for as long
//! as it is unpublished, so the question "has the poller moved past it?"
//! never arises.
//!
//! # Why no row is ever skipped, even one that commits late
//!
//! Naive polling keeps `last_seen` and asks for `id > last_seen`. Ids are
//! taken at insert time, not at commit time: a transaction that took id 5 and
//! commits after rows 6 and 7 were read becomes visible behind the cursor
//! and is lost. Here, the only condition is the row's own publish state.
//! Row 5 is invisible to the polls that run before its commit, and the first
//! poll after its commit finds it, because it is still unpublished.
//! `published_at` is set only by the checkpoint stage, and only after Kafka
//! acknowledged the row. No other state can hide an unpublished row except
//! `last_error` (a held row, exactly as in logical mode: an operator
//! releases it with `relay held retry ID` or `relay held skip ID`, and the
//! active relay picks the released rows up within seconds).
//!
//! Latency: a statement-level `AFTER INSERT` trigger (function from
//! migration `0002_notify`, trigger created by [`set_notify_trigger`] in
//! poll mode only) sends `NOTIFY <table>_relay`. Postgres delivers it when the
//! inserting transaction commits, so the late row wakes the poller right
//! away. `source.poll_interval_ms` is only the fallback, e.g. when a
//! notification is lost while the LISTEN connection reconnects.
//!
//! # Why nothing is sent twice while in flight
//!
//! Up to two batches are in flight: the next one is read while the
//! previous one is published and recorded. After a batch's rows comes a
//! commit boundary ([`CommitBoundary::Batch`]) with the batch number. The
//! checkpoint stage sends that number back through `confirmed` once every
//! row before the marker has its publish state recorded (`published_at`, or
//! `last_error` for held rows). A poll leaves out the rows of the batches
//! still in flight (their ids, as runs of consecutive ids, [`IdRuns`]);
//! recorded rows no longer match `published_at IS NULL AND last_error IS
//! NULL`. So no poll sees a row again that was read before. A crash between
//! delivery and recording resends the unrecorded batches after the
//! restart, which is the same at-least-once window as the logical mode.
//!
//! # Why per-entity order holds (and what breaks it)
//!
//! The rule, which the application must follow: **in the transaction that
//! inserts an outbox row, lock or update the entity's own row before the
//! insert** (`SELECT ... FOR UPDATE`, or the domain `UPDATE` itself). Then two
//! transactions that write the same entity are serialized. The second one
//! takes its outbox id after the first one committed (it waited for the
//! lock), so:
//!
//! 1. per entity, id order is commit order, and
//! 2. whenever a row of an entity is visible, every earlier row of that
//!    entity is visible too: its transaction committed before the lock was
//!    released.
//!
//! Each poll therefore sees, for every entity, a prefix of that entity's
//! unpublished rows in commit order, and emits it in id order. Why the
//! second batch in flight cannot reorder an entity: the first poll took,
//! in id order, a prefix of the rows visible then, so for entity E it took
//! a prefix P of E's visible rows. Every other row of E that the second
//! poll can see either was visible at the first poll and cut off by its
//! `LIMIT` (a higher id than all of P), or became visible after it, which
//! under the rule means it committed after all of P and has a higher id
//! too. The second poll leaves P out, so it emits only rows of E that come
//! after all of P, and it emits them after P into the same sink, whose one
//! producer keeps that order per partition. By induction over the polls,
//! an entity's row is never sent before an earlier row of the same entity,
//! whatever other transactions do. An unrelated long transaction only hides its own rows.
//! The ids it holds below the others do not stop anything, because nothing
//! here orders by transaction id or waits for the oldest open transaction.
//!
//! What breaks it: writers that do **not** serialize per entity. Two
//! concurrent transactions that insert rows for the same entity without
//! locking it can commit in the opposite order of their ids, and a poll can
//! run between the two commits. Logical mode would then publish in commit
//! order and poll mode in id order (if both are visible), or the later row
//! first (if only it is visible). Without the lock, "order" of such writes
//! is not defined by the application either.
//!
//! Held rows behave as in logical mode, through the same code path. The sink's
//! held-entity map (loaded from `last_error` at start) turns later rows of a
//! held entity into held rows "waiting behind held row N", which gives them a
//! `last_error`, so later polls skip them too.
//!
//! # Cost
//!
//! The query walks the partial index `<table>_unpublished_idx` (`id WHERE
//! published_at IS NULL`). Its size is the unpublished backlog plus held rows,
//! not the table's history, so a poll costs the same on a table with a
//! hundred million published rows as on an empty one. Batches are bounded by
//! `source.batch_rows` and `source.batch_max_bytes` (cut in the query, by
//! stored size, so large rows cost memory by bytes). A poll that found rows
//! is followed by another at once; after an empty one the poller sleeps
//! until a notification or the fallback interval.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_postgres::Client;

use crate::config::Config;
use crate::database::{self, DatabaseError};
use crate::error_class::ErrorClass;
use crate::outbox::{CommitBoundary, PollBatch, RowError, RowLayout, SourceEvent};
use crate::store::{ident, rows_within, text_values, RowQuery, Store, StoreError};

/// Why the poll source stopped.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error(transparent)]
    Database(#[from] DatabaseError),
    #[error("postgres")]
    Postgres(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("outbox row cannot be read")]
    Row(#[from] RowError),
    #[error("the LISTEN connection to Postgres closed")]
    ListenerClosed,
}

impl PollError {
    /// Statements by their SQLSTATE, a missing outbox table needs `relay
    /// migrate`; a closed listener or an unreadable row restarts the run.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Database(e @ DatabaseError::Connect(_)) => e.class(),
            // The LISTEN statement, and a URL and CA file `prepare` used
            // before this run's source started: retried.
            Self::Database(DatabaseError::Query(_) | DatabaseError::Url(_) | DatabaseError::Tls { .. }) => {
                ErrorClass::Retry
            }
            Self::Postgres(e) => database::class_of(e),
            Self::Store(e) => e.class(),
            Self::Row(e) => e.class(),
            Self::ListenerClosed => ErrorClass::Retry,
        }
    }
}

/// Creates (poll mode) or drops (logical mode) the statement-level trigger
/// that sends `NOTIFY <table>_relay` on insert. Only poll mode listens, and
/// NOTIFY makes notifying transactions queue on one lock at commit.
pub async fn set_notify_trigger(client: &Client, config: &Config, enabled: bool) -> Result<(), tokio_postgres::Error> {
    let table = &config.outbox.table;
    let schema = &config.outbox.schema;
    let trigger = ident(&format!("{table}_relay_notify"));
    let target = config.outbox_table_sql();
    let drop = format!("DROP TRIGGER IF EXISTS {trigger} ON {target}");
    if !enabled {
        return client.batch_execute(&drop).await;
    }
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE t.tgname = $1 AND c.relname = $2 AND n.nspname = $3",
            &[&format!("{table}_relay_notify"), table, schema],
        )
        .await?
        .is_some();
    if !exists {
        client
            .batch_execute(&format!(
                "CREATE TRIGGER {trigger} AFTER INSERT ON {target} \
                 FOR EACH STATEMENT EXECUTE FUNCTION {}.{trigger}()",
                ident(schema)
            ))
            .await?;
    }
    Ok(())
}

/// The notification channel the notify trigger signals.
pub fn channel_name(config: &Config) -> String {
    format!("{}_relay", config.outbox.table)
}

/// The ids of batches in flight as maximal runs of consecutive ids, which
/// the poll query leaves out: its cost is per run, and the rows of a batch
/// are mostly consecutive. An id inside a run is in the batch, so a row
/// that commits late is never inside one unless it was read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdRuns {
    lo: Vec<i64>,
    hi: Vec<i64>,
}

impl IdRuns {
    /// The runs of `ids`, which are in ascending order (a batch's order).
    pub fn of(ids: &[i64]) -> Self {
        let mut runs = Self::default();
        for &id in ids {
            match runs.hi.last_mut() {
                Some(hi) if id == *hi + 1 => *hi = id,
                _ => {
                    runs.lo.push(id);
                    runs.hi.push(id);
                }
            }
        }
        runs
    }

    /// The highest id of these runs.
    pub fn last(&self) -> Option<i64> {
        self.hi.last().copied()
    }

    /// These runs and `other`'s.
    pub fn union<'a>(all: impl IntoIterator<Item = &'a IdRuns>) -> Self {
        let mut runs = Self::default();
        for other in all {
            runs.lo.extend_from_slice(&other.lo);
            runs.hi.extend_from_slice(&other.hi);
        }
        runs
    }
}

/// What one [`BatchRound`] did.
pub enum Round {
    /// The query found nothing.
    Empty,
    /// A batch of `rows` was emitted (and, for [`BatchRound::send`],
    /// recorded); more may be waiting (the query may have cut the batch by
    /// size), so the poller asks again at once until a poll comes back empty.
    Sent { rows: usize, runs: IdRuns },
    /// `stop` turned true, or the downstream stages are gone.
    Stopped,
}

/// One round of polling, shared by poll mode and the catch-up phase: select
/// the next unpublished rows (id order) but those in flight, cut them at
/// `max_bytes`, emit them and the batch marker.
pub struct BatchRound<'a> {
    pub client: &'a Client,
    /// Selects unpublished rows in id order, `LIMIT $1`, bytes `$2`, but
    /// the id runs `$3`..`$4`.
    pub statement: &'a tokio_postgres::Statement,
    pub limit: i64,
    pub max_bytes: usize,
    pub layout: &'a RowLayout,
}

impl BatchRound<'_> {
    /// Emits batch number `batch`, leaving out the rows of `in_flight`.
    pub async fn emit(
        &self,
        batch: PollBatch,
        in_flight: &IdRuns,
        out: &mpsc::Sender<SourceEvent>,
    ) -> Result<Round, PollError> {
        let max_bytes = i64::try_from(self.max_bytes).unwrap_or(i64::MAX);
        let rows = self.client.query(self.statement, &[&self.limit, &max_bytes, &in_flight.lo, &in_flight.hi]).await?;
        if rows.is_empty() {
            return Ok(Round::Empty);
        }
        let mut values = Vec::with_capacity(rows.len());
        let mut sizes = Vec::with_capacity(rows.len());
        for row in &rows {
            let (columns, size) = text_values(row)?;
            values.push(columns);
            sizes.push(size);
        }
        let take = rows_within(&sizes, self.max_bytes);
        let mut ids = Vec::with_capacity(take);
        for columns in values.iter().take(take) {
            let row = self.layout.row(columns, None)?;
            tracing::trace!(row_id = row.id, "row read");
            ids.push(row.id);
            if out.send(SourceEvent::Row(row)).await.is_err() {
                return Ok(Round::Stopped);
            }
        }
        tracing::debug!(batch = batch.0, rows = take, bytes = sizes.iter().take(take).sum::<usize>(), "batch read");
        if out.send(SourceEvent::Boundary(CommitBoundary::Batch(batch))).await.is_err() {
            return Ok(Round::Stopped);
        }
        Ok(Round::Sent { rows: take, runs: IdRuns::of(&ids) })
    }

    /// [`BatchRound::emit`] with nothing else in flight, then waits until
    /// the checkpoint stage has recorded the batch (one batch in flight:
    /// the catch-up phase).
    pub async fn send(
        &self,
        batch: PollBatch,
        out: &mpsc::Sender<SourceEvent>,
        confirmed: &mut watch::Receiver<Option<CommitBoundary>>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<Round, PollError> {
        let round = self.emit(batch, &IdRuns::default(), out).await?;
        if !matches!(round, Round::Sent { .. }) {
            return Ok(round);
        }
        Ok(if recorded(batch, confirmed, stop).await { round } else { Round::Stopped })
    }
}

/// Waits until the checkpoint stage reports `batch` recorded; false when
/// `stop` turned true or the checkpoint stage is gone (the pipeline
/// reports why).
async fn recorded(
    batch: PollBatch,
    confirmed: &mut watch::Receiver<Option<CommitBoundary>>,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    tokio::select! {
        biased;
        _ = stop.wait_for(|s| *s) => false,
        done = confirmed.wait_for(|b| matches!(b, Some(CommitBoundary::Batch(done)) if *done >= batch)) => done.is_ok(),
    }
}

/// Batches a poll-mode relay keeps in flight: the next one is read while
/// the previous one is published and recorded.
const POLL_DEPTH: usize = 2;

/// Reads unpublished outbox rows in id order, up to [`POLL_DEPTH`] batches in flight.
pub struct PollSource {
    config: Config,
}

impl PollSource {
    pub fn new(config: Config) -> Self {
        Self { config }
    }

    /// Runs until `stop` turns true or Postgres fails. Rows and a commit
    /// boundary (`Batch(n)`, n = 1, 2, ...) go to `out`; with
    /// [`POLL_DEPTH`] batches unrecorded, the next poll waits until the
    /// checkpoint stage reports the oldest through `confirmed`.
    pub async fn run(
        &self,
        out: mpsc::Sender<SourceEvent>,
        mut confirmed: watch::Receiver<Option<CommitBoundary>>,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), PollError> {
        // LISTEN before the first poll, so no commit falls between the two.
        let (_listener, mut wake) = self.listen().await?;
        let client = database::connect(&self.config.postgres).await?;
        if let Err(err) = set_notify_trigger(&client, &self.config, true).await {
            // Polling works without it, only later (every poll_interval_ms);
            // a role with just the runtime grants cannot create a trigger.
            if err.code() != Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) {
                return Err(err.into());
            }
            tracing::warn!(error = %crate::telemetry::ErrorChain(&err), "the NOTIFY trigger is missing and this role may not create it: rows are found every source.poll_interval_ms instead of at once; run `relay migrate` in poll mode as the table's owner");
        }
        let (statement, layout) = self.prepare(&client).await?;
        let source = &self.config.source;
        let limit = i64::try_from(source.batch_rows).unwrap_or(i64::MAX);
        let interval = Duration::from_millis(source.poll_interval_ms);
        tracing::info!(channel = %channel_name(&self.config), "polling source started");
        let round = BatchRound {
            client: &client,
            statement: &statement,
            limit,
            max_bytes: source.batch_max_bytes,
            layout: &layout,
        };
        // Batches emitted and not yet recorded, oldest first.
        let mut in_flight: VecDeque<(PollBatch, IdRuns)> = VecDeque::new();
        let mut next = 1;
        loop {
            if *stop.borrow() {
                return Ok(());
            }
            let done = match *confirmed.borrow() {
                Some(CommitBoundary::Batch(done)) => done,
                _ => PollBatch(0),
            };
            while in_flight.front().is_some_and(|(batch, _)| *batch <= done) {
                in_flight.pop_front();
            }
            if in_flight.len() < POLL_DEPTH {
                let exclude = IdRuns::union(in_flight.iter().map(|(_, runs)| runs));
                match round.emit(PollBatch(next), &exclude, &out).await? {
                    Round::Stopped => return Ok(()),
                    Round::Sent { runs, .. } => {
                        in_flight.push_back((PollBatch(next), runs));
                        next += 1;
                        continue;
                    }
                    Round::Empty => {}
                }
            }
            if let Some((oldest, _)) = in_flight.front() {
                // Full, or nothing new: the next poll after the oldest batch
                // is recorded (it may free rows a late commit made visible).
                if !recorded(*oldest, &mut confirmed, &mut stop).await {
                    return Ok(());
                }
                continue;
            }
            tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => return Ok(()),
                woken = wake.recv() => {
                    if woken.is_none() {
                        return Err(PollError::ListenerClosed);
                    }
                }
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }

    /// Reads the table's columns and prepares the poll query.
    async fn prepare(&self, client: &Client) -> Result<(tokio_postgres::Statement, RowLayout), PollError> {
        let store = Store::new(&self.config);
        let table = store.table_layout(client).await?;
        let sql = RowQuery::poll(store.sql(), &table.columns);
        tracing::debug!(sql = %sql, "poll query");
        Ok((client.prepare(&sql).await?, table.layout))
    }

    /// Opens the LISTEN connection (`database::listen`, shared with the
    /// lease's release notifications).
    async fn listen(&self) -> Result<(Client, mpsc::Receiver<()>), PollError> {
        Ok(database::listen(&self.config.postgres, Some("listen"), &channel_name(&self.config)).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::IdRuns;

    #[test]
    fn id_runs_cover_exactly_the_ids_of_a_batch() {
        let runs = IdRuns::of(&[3, 4, 5, 9, 11, 12]);
        assert_eq!((runs.lo.clone(), runs.hi.clone()), (vec![3, 9, 11], vec![5, 9, 12]));
        // Ids between runs (a row that commits late) are not covered.
        let covered = |id: i64| runs.lo.iter().zip(&runs.hi).any(|(lo, hi)| (*lo..=*hi).contains(&id));
        assert!([3, 4, 5, 9, 11, 12].into_iter().all(covered));
        assert!(![6, 7, 8, 10, 13].into_iter().any(covered));
        let both = IdRuns::union([&runs, &IdRuns::of(&[20])]);
        assert_eq!(both.lo, vec![3, 9, 11, 20]);
        assert_eq!(IdRuns::of(&[]), IdRuns::default());
    }
}
