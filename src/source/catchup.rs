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
//! 2. Write the pending catch-up marker (table `<table>_relay_catchup`), then
//!    drop and create the slot. The new slot captures every commit from now
//!    on, so from this moment on nothing can fall between the two paths.
//!    The marker stays until the catch-up is complete: the slot alone cannot
//!    tell that it is new, so a crash during the catch-up would otherwise
//!    lose the rest of it. `relay migrate` creates slots the same way.
//! 3. Catch up ([`CatchUp`]): every unpublished, not held row with an id up
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
//! watch ([`blocker_released`]) restarts the run when a row that holds an
//! entity in this run is released, so `load_held` forgets the entity and
//! the catch-up publishes the rows.

use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_postgres::Client;

use super::logical;
use super::poll::{select_list, table_layout, BatchRound, PollError, Round};
use super::{Position, SourceEvent};
use crate::config::Config;
use crate::sink::WAITING_BEHIND;
use crate::telemetry::metrics;

/// Why the relay recreated the slot. The text is what the marker table and
/// the `reason` label of `outbox_relay_slot_recoveries_total` hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The slot did not exist (dropped, or never created).
    Missing,
    /// Postgres invalidated it (`wal_status = 'lost'`).
    Invalidated,
    /// It retained more than `source.max_slot_wal_bytes`.
    WalBudget,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Invalidated => "invalidated",
            Self::WalBudget => "wal_budget",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text {
            "missing" => Some(Self::Missing),
            "invalidated" => Some(Self::Invalidated),
            "wal_budget" => Some(Self::WalBudget),
            _ => None,
        }
    }
}

/// A pending catch-up, as recorded in the marker table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marker {
    /// `created` or a [`Reason`].
    pub reason: String,
    /// Rows above this id are streamed; `None`: no bound known.
    pub max_id: Option<i64>,
}

fn marker_table(config: &Config) -> String {
    format!("\"{}\".\"{}_relay_catchup\"", config.outbox.schema, config.outbox.table)
}

/// The pending catch-up of the configured slot, if any.
pub async fn read_marker(client: &Client, config: &Config) -> Result<Option<Marker>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            &format!("SELECT reason, max_id FROM {} WHERE slot_name = $1", marker_table(config)),
            &[&config.source.slot_name],
        )
        .await?;
    Ok(row.map(|r| Marker { reason: r.get(0), max_id: r.get(1) }))
}

/// Records that a catch-up is due because of `reason`, before the slot is
/// touched: whatever happens next, the next run catches up.
async fn write_marker(client: &Client, config: &Config, reason: Reason) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            &format!(
                "INSERT INTO {} (slot_name, reason) VALUES ($1, $2) \
                 ON CONFLICT (slot_name) DO UPDATE SET reason = EXCLUDED.reason, max_id = NULL, requested_at = now()",
                marker_table(config)
            ),
            &[&config.source.slot_name, &reason.as_str()],
        )
        .await?;
    Ok(())
}

async fn clear_marker(client: &Client, config: &Config) -> Result<(), tokio_postgres::Error> {
    client
        .execute(&format!("DELETE FROM {} WHERE slot_name = $1", marker_table(config)), &[&config.source.slot_name])
        .await?;
    Ok(())
}

/// Creates the slot with its catch-up marker: marker first (keeping a
/// recovery reason already there), then the slot, then the bound, the
/// highest id visible once the slot exists. Every row committed before the
/// slot is visible then, so it is at or below the bound.
pub async fn create_slot(client: &Client, config: &Config) -> Result<(), tokio_postgres::Error> {
    let slot = &config.source.slot_name;
    let markers = marker_table(config);
    client
        .execute(
            &format!("INSERT INTO {markers} (slot_name, reason) VALUES ($1, 'created') ON CONFLICT (slot_name) DO UPDATE SET max_id = NULL"),
            &[slot],
        )
        .await?;
    client.query_one("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[slot]).await?;
    client
        .execute(
            &format!(
                "UPDATE {markers} SET max_id = (SELECT coalesce(max(\"{id}\"), 0) FROM {table}) WHERE slot_name = $1",
                id = config.outbox.columns.id,
                table = config.outbox_table_sql()
            ),
            &[slot],
        )
        .await?;
    Ok(())
}

/// What `pg_replication_slots` says about the slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotHealth {
    Missing,
    /// Invalidated: it can never stream again.
    Lost,
    /// Usable; the WAL it retains, in bytes.
    Present {
        retained: Option<i64>,
    },
}

pub async fn inspect_slot(client: &Client, slot: &str) -> Result<SlotHealth, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT wal_status, pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(match row {
        None => SlotHealth::Missing,
        Some(row) => {
            let status: Option<String> = row.get(0);
            if status.as_deref() == Some("lost") {
                SlotHealth::Lost
            } else {
                SlotHealth::Present { retained: row.get(1) }
            }
        }
    })
}

/// Drops the slot from a normal connection. The walsender of a stream that
/// just ended may hold it for a moment; one that still holds it after a
/// few seconds is a stale session of this relay (only the active relay gets
/// here), and is terminated.
pub async fn drop_slot(client: &Client, slot: &str) -> Result<(), tokio_postgres::Error> {
    let started = std::time::Instant::now();
    loop {
        let row = client
            .query_opt("SELECT active, active_pid FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
            .await?;
        let Some(row) = row else { return Ok(()) };
        let (active, pid): (bool, Option<i32>) = (row.get(0), row.get(1));
        if !active {
            match client
                .query_opt("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1 AND NOT active", &[&slot])
                .await
            {
                Ok(_) => continue,
                // Taken again in between: look again.
                Err(err) if started.elapsed() < Duration::from_secs(30) => {
                    tracing::debug!(error = %err, "slot drop raced; retrying");
                }
                Err(err) => return Err(err),
            }
        } else if started.elapsed() > Duration::from_secs(5) {
            if let Some(pid) = pid {
                tracing::warn!(slot, pid, "terminating the session that still holds the slot, so it can be dropped");
                client.execute("SELECT pg_terminate_backend($1)", &[&pid]).await?;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Recreates the slot and leaves a catch-up marker with `reason`; counts it.
async fn recover_slot(client: &Client, config: &Config, reason: Reason) -> Result<(), tokio_postgres::Error> {
    let slot = &config.source.slot_name;
    write_marker(client, config, reason).await?;
    drop_slot(client, slot).await?;
    logical::ensure_publication_and_slot(client, config).await?;
    metrics::slot_recovery(reason.as_str());
    tracing::warn!(slot = %slot, reason = reason.as_str(), "slot recovery: replication slot recreated; catching up every unpublished row through the poll path before streaming");
    Ok(())
}

/// Why the slot cannot be used and the relay may not recreate it.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("replication slot `{slot}` is {state} and source.create_slot is false: recreate it (rows committed meanwhile are caught up at the next start) or set create_slot = true")]
    NotAllowed { slot: String, state: &'static str },
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
}

/// What the catch-up phase of a run publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Condition on the outbox table aliased `o`, besides "unpublished and
    /// not held".
    pub condition: String,
    /// A marker is pending: delete it once the phase finished.
    pub marker: bool,
}

/// Step 1 and 2 for logical mode, at the start of a pipeline run: detects a
/// missing, invalidated or over-budget slot, recreates it, and returns what
/// the catch-up phase must publish.
pub async fn prepare(client: &Client, config: &Config) -> Result<Plan, SlotError> {
    let slot = &config.source.slot_name;
    let budget = config.source.max_slot_wal_bytes;
    let marker = read_marker(client, config).await?;
    let reason = match inspect_slot(client, slot).await? {
        SlotHealth::Lost => Some(Reason::Invalidated),
        // A marker's reason says why an earlier run dropped it (the WAL budget).
        SlotHealth::Missing => Some(marker.as_ref().and_then(|m| Reason::parse(&m.reason)).unwrap_or(Reason::Missing)),
        SlotHealth::Present { retained: Some(retained) } if budget > 0 && retained > 0 && retained as u64 > budget => {
            tracing::error!(slot = %slot, retained, budget, "replication slot retains more WAL than source.max_slot_wal_bytes: dropping it to protect the database; the catch-up phase publishes what it held");
            Some(Reason::WalBudget)
        }
        SlotHealth::Present { .. } => None,
    };
    if let Some(reason) = reason {
        if !config.source.create_slot {
            let state = if reason == Reason::Invalidated {
                "invalidated"
            } else if reason == Reason::Missing {
                "missing"
            } else {
                "over its WAL budget"
            };
            return Err(SlotError::NotAllowed { slot: slot.clone(), state });
        }
        recover_slot(client, config, reason).await?;
    }
    let id = &config.outbox.columns.id;
    Ok(match read_marker(client, config).await? {
        Some(Marker { max_id: Some(max), reason }) => {
            tracing::info!(slot = %slot, reason = %reason, max_id = max, "catch-up phase due: rows committed before the slot was created are published through the poll path");
            Plan { condition: format!("o.\"{id}\" <= {max} OR o.retry_requested_at IS NOT NULL"), marker: true }
        }
        Some(Marker { max_id: None, reason }) => {
            tracing::info!(slot = %slot, reason = %reason, "catch-up phase due, without a bound: every unpublished row is published through the poll path");
            Plan { condition: "true".to_string(), marker: true }
        }
        // Only rows an operator released: the stream went past them.
        None => Plan { condition: "o.retry_requested_at IS NOT NULL".to_string(), marker: false },
    })
}

/// Drops the slot after the stream stopped, leaving a marker with `reason`
/// first, so the next run recreates it and catches up.
pub async fn abandon_slot(client: &Client, config: &Config, reason: Reason) -> Result<(), tokio_postgres::Error> {
    write_marker(client, config, reason).await?;
    drop_slot(client, &config.source.slot_name).await
}

/// Releases rows that wait behind a held row that is held no more
/// (published, released or skipped): clears their `last_error` and sets
/// `retry_requested_at`, so the catch-up phase (logical mode) or the next
/// poll publishes them after it, in id order. Runs at the start of every
/// pipeline run, before the held entities are loaded. Needed because rows of
/// a released entity that arrive before the relay notices the release are
/// recorded as waiting again. Returns how many rows it released.
pub async fn release_orphaned_waiters(client: &Client, config: &Config) -> Result<u64, tokio_postgres::Error> {
    let c = &config.outbox.columns;
    let table = config.outbox_table_sql();
    let sql = format!(
        "UPDATE {table} AS w SET last_error = NULL, retry_requested_at = now() \
         WHERE w.published_at IS NULL AND w.skipped_at IS NULL AND w.last_error LIKE $1 \
         AND NOT EXISTS (SELECT 1 FROM {table} AS h \
             WHERE h.\"{t}\" = w.\"{t}\" AND h.\"{a}\" = w.\"{a}\" AND h.\"{id}\" < w.\"{id}\" \
             AND h.published_at IS NULL AND h.skipped_at IS NULL \
             AND h.last_error IS NOT NULL AND h.last_error NOT LIKE $1)",
        t = c.aggregate_type,
        a = c.aggregate_id,
        id = c.id,
    );
    let released = client.execute(&sql, &[&format!("{WAITING_BEHIND}%")]).await?;
    if released > 0 {
        tracing::info!(rows = released, "released rows that waited behind a row no longer held");
    }
    Ok(released)
}

/// Whether one of `blockers` (the rows that hold entities in this run) is
/// no longer held: an operator retried or skipped it. The run must restart
/// so the held entities are reloaded and the released rows published.
pub async fn blocker_released(
    client: &Client,
    config: &Config,
    blockers: &[i64],
) -> Result<bool, tokio_postgres::Error> {
    if blockers.is_empty() {
        return Ok(false);
    }
    let sql = format!(
        "SELECT 1 FROM {} WHERE \"{}\" = ANY($1) \
         AND (published_at IS NOT NULL OR last_error IS NULL OR skipped_at IS NOT NULL) LIMIT 1",
        config.outbox_table_sql(),
        config.outbox.columns.id
    );
    Ok(client.query_opt(&sql, &[&blockers]).await?.is_some())
}

/// The WAL the slot retains, in bytes (`None` when it is gone or lost).
pub async fn retained_wal(client: &Client, slot: &str) -> Result<Option<i64>, tokio_postgres::Error> {
    Ok(match inspect_slot(client, slot).await? {
        SlotHealth::Present { retained } => retained,
        _ => None,
    })
}

/// How a catch-up phase ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CatchUpOutcome {
    /// Rows handed to the sink.
    pub rows: u64,
    /// The last batch marker sent (positions `1..=batches`): the stream that
    /// follows must not confirm these numbers to Postgres as WAL positions.
    pub batches: Position,
    /// Every matching row was published or held; false when stopped.
    pub finished: bool,
}

/// Step 3: reads the rows matching `condition` in id order, one batch in
/// flight at a time, exactly like the poll source, until a poll is empty.
pub struct CatchUp<'a> {
    pub config: &'a Config,
    /// Extra condition on the outbox table aliased `o` (see [`prepare`]).
    pub condition: String,
}

impl CatchUp<'_> {
    pub async fn run(
        &self,
        client: &Client,
        out: &mpsc::Sender<SourceEvent>,
        confirmed: &mut watch::Receiver<Position>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<CatchUpOutcome, PollError> {
        let config = self.config;
        let (columns, layout) = table_layout(client, config).await?;
        let names = &config.outbox.columns;
        let sql = format!(
            "SELECT {} FROM {} AS o WHERE o.published_at IS NULL AND o.last_error IS NULL AND ({}) ORDER BY o.\"{}\" LIMIT $1",
            select_list(names, &columns),
            config.outbox_table_sql(),
            self.condition,
            names.id
        );
        tracing::debug!(sql = %sql, "catch-up query");
        let statement = client.prepare(&sql).await?;
        let limit = i64::try_from(config.source.batch_rows).unwrap_or(i64::MAX);
        let mut outcome = CatchUpOutcome { rows: 0, batches: 0, finished: false };
        let round = BatchRound {
            client,
            statement: &statement,
            limit,
            max_bytes: config.source.batch_max_bytes,
            layout: &layout,
        };
        loop {
            if *stop.borrow() {
                return Ok(outcome);
            }
            match round.send(outcome.batches + 1, out, confirmed, stop).await? {
                Round::Empty => {
                    outcome.finished = true;
                    return Ok(outcome);
                }
                Round::Stopped => return Ok(outcome),
                Round::Sent { rows, .. } => {
                    outcome.batches += 1;
                    outcome.rows += rows as u64;
                }
            }
        }
    }
}

/// Runs the catch-up phase of a logical-mode run and deletes the marker
/// once it finished. Logs what it did.
pub async fn catch_up(
    config: &Config,
    client: &Client,
    plan: Plan,
    out: &mpsc::Sender<SourceEvent>,
    confirmed: &mut watch::Receiver<Position>,
    stop: &mut watch::Receiver<bool>,
) -> Result<CatchUpOutcome, PollError> {
    let outcome = CatchUp { config, condition: plan.condition }.run(client, out, confirmed, stop).await?;
    if outcome.finished {
        if plan.marker {
            clear_marker(client, config).await?;
            tracing::info!(rows = outcome.rows, "catch-up phase done; streaming from the slot");
        } else if outcome.rows > 0 {
            tracing::info!(rows = outcome.rows, "released held rows caught up; streaming from the slot");
        }
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_round_trip_and_created_is_not_a_recovery() {
        for reason in [Reason::Missing, Reason::Invalidated, Reason::WalBudget] {
            assert_eq!(Reason::parse(reason.as_str()), Some(reason));
        }
        assert_eq!(Reason::parse("created"), None);
    }
}
