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
//! Only one batch is in flight at a time. After a batch's rows comes a
//! commit boundary ([`CommitBoundary::Batch`]) with the batch number. The checkpoint
//! stage sends that number back through `confirmed` once every row before the
//! marker has its publish state recorded (`published_at`, or `last_error` for
//! held rows). The next SELECT runs only after that, so it cannot see those
//! rows again. A crash between delivery and recording resends the
//! unrecorded batch after the restart, which is the same at-least-once window
//! as the logical mode.
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
//! unpublished rows in commit order, and emits it in id order. Rows of earlier
//! polls are recorded before this poll runs. An entity's row is therefore
//! never sent before an earlier row of the same entity, whatever other
//! transactions do. An unrelated long transaction only hides its own rows.
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

use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_postgres::Client;

use crate::config::Config;
use crate::database::{self, DatabaseError};
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

/// What one [`BatchRound`] did.
pub enum Round {
    /// The query found nothing.
    Empty,
    /// A batch of `rows` was emitted and recorded; more may be waiting (the
    /// query may have cut the batch by size), so the poller asks again at
    /// once until a poll comes back empty.
    Sent { rows: usize },
    /// `stop` turned true, or the downstream stages are gone.
    Stopped,
}

/// One round of the one-batch-in-flight loop that poll mode and the
/// catch-up phase share: select the next unpublished rows (id order), cut
/// them at `max_bytes`, emit them and the batch marker, then wait until the
/// checkpoint stage has recorded the batch, so that the next SELECT cannot
/// see these rows again.
pub struct BatchRound<'a> {
    pub client: &'a Client,
    /// Selects unpublished rows in id order, `LIMIT $1`.
    pub statement: &'a tokio_postgres::Statement,
    pub limit: i64,
    pub max_bytes: usize,
    pub layout: &'a RowLayout,
}

impl BatchRound<'_> {
    /// Emits batch number `batch`; see [`Round`].
    pub async fn send(
        &self,
        batch: PollBatch,
        out: &mpsc::Sender<SourceEvent>,
        confirmed: &mut watch::Receiver<Option<CommitBoundary>>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<Round, PollError> {
        let max_bytes = i64::try_from(self.max_bytes).unwrap_or(i64::MAX);
        let rows = self.client.query(self.statement, &[&self.limit, &max_bytes]).await?;
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
        for columns in values.iter().take(take) {
            let row = self.layout.row(columns, None)?;
            tracing::trace!(row_id = row.id, "row read");
            if out.send(SourceEvent::Row(row)).await.is_err() {
                return Ok(Round::Stopped);
            }
        }
        tracing::debug!(batch = batch.0, rows = take, bytes = sizes.iter().take(take).sum::<usize>(), "batch read");
        if out.send(SourceEvent::Boundary(CommitBoundary::Batch(batch))).await.is_err() {
            return Ok(Round::Stopped);
        }
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => Ok(Round::Stopped),
            // An error: the checkpoint stage is gone; the pipeline reports why.
            recorded = confirmed.wait_for(|b| matches!(b, Some(CommitBoundary::Batch(done)) if *done >= batch)) => Ok(if recorded.is_ok() { Round::Sent { rows: take } } else { Round::Stopped }),
        }
    }
}

/// Reads unpublished outbox rows in id order, one batch in flight at a time.
pub struct PollSource {
    config: Config,
}

impl PollSource {
    pub fn new(config: Config) -> Self {
        Self { config }
    }

    /// Runs until `stop` turns true or Postgres fails. Rows and a commit
    /// boundary (`Batch(n)`, n = 1, 2, ...) go to `out`; the next poll waits
    /// until the checkpoint stage reports `n` through `confirmed`.
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
        let mut batch = 0;
        loop {
            if *stop.borrow() {
                return Ok(());
            }
            let round = BatchRound {
                client: &client,
                statement: &statement,
                limit,
                max_bytes: source.batch_max_bytes,
                layout: &layout,
            };
            match round.send(PollBatch(batch + 1), &out, &mut confirmed, &mut stop).await? {
                Round::Stopped => return Ok(()),
                Round::Sent { .. } => {
                    batch += 1;
                    continue;
                }
                Round::Empty => {}
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
