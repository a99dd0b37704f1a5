//! The catch-up phase: publishes, through the poll path, the unpublished rows
//! a logical slot will never stream, before the stream starts.
//!
//! # Why it exists
//!
//! A logical slot streams only transactions that commit after it was
//! created. A slot can be missing (dropped by an operator), invalidated
//! (Postgres removed WAL it needed, `max_slot_wal_keep_size`), or dropped by
//! the relay itself (`source.max_slot_wal_bytes`). The WAL it would have
//! decoded is gone, but every outbox row carries its own publish state, so
//! what the slot missed is exactly `published_at IS NULL AND last_error IS
//! NULL`, which the poll path can always read.
//!
//! # Order of the steps, and why
//!
//! 1. Detect, at the start of every pipeline run ([`prepare`]): the slot is
//!    missing, or `wal_status = 'lost'`, or it retains more WAL than the
//!    budget. (A START_REPLICATION refused because the slot was invalidated
//!    drops it; the next run finds it missing.)
//! 2. Write the pending catch-up marker (table `<table>_relay_catchup`, in
//!    [`crate::store`]), then
//!    drop and create the slot. The new slot captures every commit from now
//!    on, so from this moment on nothing can fall between the two paths.
//!    The marker stays until the catch-up is complete: the slot alone cannot
//!    tell that it is new, so a crash during the catch-up would otherwise
//!    lose the rest of it. `relay migrate` creates slots the same way.
//! 3. Catch up ([`catch_up`]): every unpublished, not held row with an id up
//!    to the highest id visible right after the slot was created (rows
//!    committed before the slot are all below it), in id order, batch by
//!    batch, through the same sink and checkpoint stages, waiting for each
//!    batch's publish state like poll mode does, until a poll returns
//!    nothing. Then the marker is deleted.
//! 4. Stream from the new slot.
//!
//! Rows committed after the slot was created may be published twice (by the
//! catch-up and again by the stream): duplicates are allowed, loss and
//! reordering of first occurrences are not. Per entity the catch-up goes in
//! id order, which is commit order under the entity-lock rule (see the poll
//! source), and everything it publishes of an entity committed before the
//! entity's first streamed row, or is streamed again after it.
//!
//! The same phase publishes held rows an operator released (`relay held
//! retry|skip`): the stream went past them long ago, so in logical mode they
//! are caught up too (`retry_requested_at IS NOT NULL`). The pipeline's
//! watch (`Store::blocker_released`) restarts the run when a row that holds an
//! entity in this run is released; the new run reads the held entities
//! afresh (`Store::held_entities`), without that one, and the catch-up
//! publishes the rows.

use tokio::sync::{mpsc, watch};
use tokio_postgres::Client;

use super::poll::{BatchRound, PollError, Round};
use super::slot::{self, SlotError, SlotHealth};
use crate::config::Config;
use crate::outbox::{CommitBoundary, PollBatch, SourceEvent};
use crate::store::{CatchUpMarker, CatchUpReason, RowQuery, Store};

/// What the catch-up phase of a run publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Condition on the outbox table aliased `o`, besides "pending".
    pub condition: String,
    /// A marker is pending: delete it once the phase finished.
    pub marker: bool,
}

/// Step 1 and 2 for logical mode, at the start of a pipeline run: detects a
/// missing, invalidated or over-budget slot, recreates it, and returns what
/// the catch-up phase must publish.
pub async fn prepare(client: &Client, config: &Config) -> Result<Plan, SlotError> {
    let store = Store::new(config);
    let slot = &config.source.slot_name;
    let budget = config.source.max_slot_wal_bytes;
    let marker = store.catch_up_marker(client).await?;
    let reason = match slot::inspect(client, slot).await? {
        SlotHealth::Lost => Some(CatchUpReason::Invalidated),
        // A marker's reason says why an earlier run dropped it (the WAL budget).
        SlotHealth::Missing => {
            Some(marker.as_ref().and_then(|m| CatchUpReason::parse(&m.reason)).unwrap_or(CatchUpReason::Missing))
        }
        SlotHealth::Present { retained: Some(retained) } if budget > 0 && retained > 0 && retained as u64 > budget => {
            tracing::error!(slot = %slot, retained, budget, "replication slot retains more WAL than source.max_slot_wal_bytes: dropping it to protect the database; the catch-up phase publishes what it held");
            Some(CatchUpReason::WalBudget)
        }
        SlotHealth::Present { .. } => None,
    };
    if let Some(reason) = reason {
        if !config.source.create_slot {
            let state = match reason {
                CatchUpReason::Invalidated => "invalidated",
                CatchUpReason::Missing => "missing",
                CatchUpReason::WalBudget => "over its WAL budget",
            };
            return Err(SlotError::NotAllowed { slot: slot.clone(), state });
        }
        slot::recover(client, config, reason).await?;
    }
    let id = crate::store::ident(&config.outbox.columns.id);
    Ok(match store.catch_up_marker(client).await? {
        Some(CatchUpMarker { max_id: Some(max), reason }) => {
            tracing::info!(slot = %slot, reason = %reason, max_id = max, "catch-up phase due: rows committed before the slot was created are published through the poll path");
            Plan { condition: format!("o.{id} <= {max} OR o.retry_requested_at IS NOT NULL"), marker: true }
        }
        Some(CatchUpMarker { max_id: None, reason }) => {
            tracing::info!(slot = %slot, reason = %reason, "catch-up phase due, without a bound: every unpublished row is published through the poll path");
            Plan { condition: "true".to_string(), marker: true }
        }
        // Only rows an operator released: the stream went past them.
        None => Plan { condition: "o.retry_requested_at IS NOT NULL".to_string(), marker: false },
    })
}

/// How a catch-up phase ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CatchUpOutcome {
    /// Rows handed to the sink.
    pub rows: u64,
    /// Batches sent.
    pub batches: u64,
    /// Every matching row was published or held; false when stopped.
    pub finished: bool,
}

/// Step 3: reads the rows matching `plan`'s condition in id order, one
/// batch in flight at a time, exactly like the poll source, until a poll is
/// empty; then deletes the marker.
pub async fn catch_up(
    config: &Config,
    client: &Client,
    plan: Plan,
    out: &mpsc::Sender<SourceEvent>,
    confirmed: &mut watch::Receiver<Option<CommitBoundary>>,
    stop: &mut watch::Receiver<bool>,
) -> Result<CatchUpOutcome, PollError> {
    let store = Store::new(config);
    let table = store.table_layout(client).await?;
    let id = crate::store::ident(&config.outbox.columns.id);
    // In the side-table layout nothing narrows "unpublished" on the outbox,
    // so each batch starts after the last one instead of at the table's
    // first row (which would make the phase quadratic in the table). Safe
    // here, unlike in poll mode: every row the phase is for committed
    // before the slot was created (a later commit is streamed), and a row
    // released meanwhile restarts the run (`Store::blocker_released`).
    let side_table = store.sql().side_table;
    let mut after = i64::MIN;
    let mut outcome = CatchUpOutcome { rows: 0, batches: 0, finished: false };
    let mut prepared: Option<(i64, tokio_postgres::Statement)> = None;
    while !*stop.borrow() {
        let cursor = if side_table { after } else { i64::MIN };
        let statement = match prepared.take() {
            Some((at, statement)) if at == cursor => statement,
            _ => {
                let condition = if side_table {
                    format!("({}) AND o.{id} > {cursor}", plan.condition)
                } else {
                    plan.condition.clone()
                };
                let sql = RowQuery::catch_up(store.sql(), &table.columns, &condition);
                tracing::debug!(sql = %sql, "catch-up query");
                client.prepare(&sql).await?
            }
        };
        let round = BatchRound {
            client,
            statement: &statement,
            limit: i64::try_from(config.source.batch_rows).unwrap_or(i64::MAX),
            max_bytes: config.source.batch_max_bytes,
            layout: &table.layout,
        };
        match round.send(PollBatch(outcome.batches + 1), out, confirmed, stop).await? {
            Round::Empty => {
                outcome.finished = true;
                break;
            }
            Round::Stopped => break,
            Round::Sent { rows, runs } => {
                outcome.batches += 1;
                outcome.rows += rows as u64;
                after = runs.last().unwrap_or(after).max(after);
            }
        }
        prepared = Some((cursor, statement));
    }
    if outcome.finished {
        if plan.marker {
            store.clear_catch_up_marker(client).await?;
            tracing::info!(rows = outcome.rows, "catch-up phase done; streaming from the slot");
        } else if outcome.rows > 0 {
            tracing::info!(rows = outcome.rows, "released held rows caught up; streaming from the slot");
        }
    }
    Ok(outcome)
}
