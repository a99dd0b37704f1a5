//! The logical replication slot and its publication: creating them (always
//! with a catch-up marker), inspecting the slot's health, dropping and
//! recreating it, and moving its confirmed position after a stream ended.

use std::time::Duration;

use pgwire_replication::Lsn as PgLsn;
use tokio_postgres::Client;

use crate::config::Config;
use crate::database;
use crate::error_class::ErrorClass;
use crate::outbox::Lsn;
use crate::store::{CatchUpReason, Store, StoreError};
use crate::telemetry::metrics;

/// Why the slot cannot be used and the relay may not recreate it, or a
/// statement about it failed.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("replication slot `{slot}` is {state} and source.create_slot is false: recreate it (rows committed meanwhile are caught up at the next start) or set create_slot = true")]
    NotAllowed { slot: String, state: &'static str },
    #[error("publication `{publication}` covers [{tables}], not exactly the outbox table {table}: make it cover exactly the outbox table, or set source.publication_name to one that does")]
    PublicationMismatch { publication: String, table: String, tables: String },
    #[error("the outbox table {table} is partitioned, and publication `{publication}` publishes its partitions under their own names: ALTER PUBLICATION \"{publication}\" SET (publish_via_partition_root = true)")]
    PublicationNotViaRoot { publication: String, table: String },
    #[error("postgres")]
    Postgres(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl SlotError {
    /// A slot the relay may not recreate or a publication that covers the
    /// wrong tables needs an operator; statements go by their SQLSTATE.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::NotAllowed { .. } => ErrorClass::operator("recreate the slot, or set source.create_slot = true"),
            Self::PublicationMismatch { .. } | Self::PublicationNotViaRoot { .. } => {
                ErrorClass::operator("correct the publication as said below")
            }
            Self::Postgres(e) => database::class_of(e),
            Self::Store(e) => e.class(),
        }
    }
}

/// What `pg_replication_slots` says about the slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotHealth {
    Missing,
    /// Invalidated (`wal_status = 'lost'`): it can never stream again.
    Lost,
    /// Usable; the WAL it retains, in bytes.
    Present {
        retained: Option<i64>,
    },
}

/// Reads the slot's health.
pub async fn inspect(client: &Client, slot: &str) -> Result<SlotHealth, tokio_postgres::Error> {
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
            let status: Option<String> = row.try_get(0)?;
            if status.as_deref() == Some("lost") {
                SlotHealth::Lost
            } else {
                SlotHealth::Present { retained: row.try_get(1)? }
            }
        }
    })
}

/// The WAL the slot retains, in bytes (`None` when it is gone or lost).
pub async fn retained_wal(client: &Client, slot: &str) -> Result<Option<i64>, tokio_postgres::Error> {
    Ok(match inspect(client, slot).await? {
        SlotHealth::Present { retained } => retained,
        _ => None,
    })
}

/// Creates the publication (inserts only, so the relay's own publish-state
/// updates never come back to it; `publish_via_partition_root`, so a
/// partitioned outbox streams under its own name, not its partitions') and
/// the slot when they are missing; checks an existing publication.
/// Returns whether the slot was created now.
pub async fn ensure_publication_and_slot(client: &Client, config: &Config) -> Result<bool, SlotError> {
    let publication = &config.source.publication_name;
    let exists = client.query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[publication]).await?.is_some();
    if !exists {
        client
            .batch_execute(&format!(
                "CREATE PUBLICATION {} FOR TABLE {} WITH (publish = 'insert', publish_via_partition_root = true)",
                crate::store::ident(publication),
                config.outbox_table_sql()
            ))
            .await?;
        tracing::info!(publication = %publication, "created publication");
    } else {
        check_publication(client, config).await?;
    }
    let slot = &config.source.slot_name;
    let exists = client.query_opt("SELECT 1 FROM pg_replication_slots WHERE slot_name = $1", &[slot]).await?.is_some();
    if !exists {
        create(client, config).await?;
        tracing::info!(slot = %slot, "created replication slot");
    }
    Ok(!exists)
}

/// Refuses a publication that does not cover exactly the outbox table: rows
/// of other tables would be ignored, and a missing outbox table (or one
/// published as its partitions, whose names the decoder does not know)
/// would let commit boundaries move the slot past rows never seen.
pub async fn check_publication(client: &Client, config: &Config) -> Result<(), SlotError> {
    let row = client
        .query_one(
            "SELECT coalesce((SELECT array_agg(format('%I.%I', schemaname, tablename) ORDER BY 1) \
                 FROM pg_publication_tables WHERE pubname = $1), '{}'), \
             format('%I.%I', $2::text, $3::text), \
             coalesce((SELECT pubviaroot FROM pg_publication WHERE pubname = $1), false), \
             coalesce((SELECT c.relkind = 'p' FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $2 AND c.relname = $3), false)",
            &[&config.source.publication_name, &config.outbox.schema, &config.outbox.table],
        )
        .await?;
    let (tables, table): (Vec<String>, String) = (row.try_get(0)?, row.try_get(1)?);
    let (via_root, partitioned): (bool, bool) = (row.try_get(2)?, row.try_get(3)?);
    let publication = config.source.publication_name.clone();
    if partitioned && !via_root {
        return Err(SlotError::PublicationNotViaRoot { publication, table });
    }
    if tables != [table.clone()] {
        return Err(SlotError::PublicationMismatch { publication, table, tables: tables.join(", ") });
    }
    Ok(())
}

/// Creates the slot with its catch-up marker: marker first (keeping a
/// recovery reason already there), then the slot, then the bound, the
/// highest id visible once the slot exists. Rows committed before the slot
/// are published through the poll path at the relay's next start.
async fn create(client: &Client, config: &Config) -> Result<(), SlotError> {
    let store = Store::new(config);
    store.mark_slot_creation(client).await?;
    client.query_one("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[&config.source.slot_name]).await?;
    store.bound_catch_up(client).await?;
    Ok(())
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
        let (active, pid): (bool, Option<i32>) = (row.try_get(0)?, row.try_get(1)?);
        if !active {
            let sql = "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                       WHERE slot_name = $1 AND NOT active";
            match client.query_opt(sql, &[&slot]).await {
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

/// Ends the session that still streams from the slot for an earlier term
/// (a paused or partitioned relay keeps its walsender, and the slot, for as
/// long as its TCP connection lives), and waits until the slot is free, for
/// up to 5 s (then `START_REPLICATION` reports it). Only the lease holder
/// calls this, and it took the lease only after the previous one ran out or
/// was released, so whoever streams from the slot now is not the leader.
pub async fn take_over(client: &Client, slot: &str) -> Result<(), tokio_postgres::Error> {
    let started = std::time::Instant::now();
    let mut ended = None;
    while started.elapsed() < Duration::from_secs(5) {
        let row =
            client.query_opt("SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1", &[&slot]).await?;
        let Some(pid) = row.map(|r| r.try_get::<_, Option<i32>>(0)).transpose()?.flatten() else { return Ok(()) };
        if ended != Some(pid) {
            tracing::warn!(slot, pid, "a stream of an earlier leader term still holds the slot: ending its session");
            client.execute("SELECT pg_terminate_backend($1)", &[&pid]).await?;
            ended = Some(pid);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Recreates the slot and leaves a catch-up marker with `reason`; counts it.
pub async fn recover(client: &Client, config: &Config, reason: CatchUpReason) -> Result<(), SlotError> {
    let slot = &config.source.slot_name;
    Store::new(config).write_catch_up_marker(client, reason).await?;
    drop_slot(client, slot).await?;
    ensure_publication_and_slot(client, config).await?;
    metrics::slot_recovery(reason.as_str());
    tracing::warn!(slot = %slot, reason = reason.as_str(), "slot recovery: replication slot recreated; catching up every unpublished row through the poll path before streaming");
    Ok(())
}

/// Drops the slot after the stream stopped, leaving a marker with `reason`
/// first, so the next run recreates it and catches up.
pub async fn abandon(client: &Client, config: &Config, reason: CatchUpReason) -> Result<(), SlotError> {
    Store::new(config).write_catch_up_marker(client, reason).await?;
    drop_slot(client, &config.source.slot_name).await?;
    Ok(())
}

/// Moves the slot's confirmed position after the stream is closed, so a
/// graceful stop persists exactly what was recorded even if the last standby
/// status update did not reach Postgres. A no-op when the slot is already there.
pub async fn persist_confirmed(client: &Client, slot: &str, position: Lsn) {
    if position.0 == 0 {
        return;
    }
    let lsn = PgLsn::from_u64(position.0).to_pg_string();
    // The walsender of the closed stream may still hold the slot for a moment.
    for _ in 0..20 {
        let sql = "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn) \
                   FROM pg_replication_slots WHERE slot_name = $1 AND NOT active \
                   AND confirmed_flush_lsn < $2::text::pg_lsn";
        match client.query_opt(sql, &[&slot, &lsn]).await {
            Ok(_) => {
                let active: Option<bool> = client
                    .query_opt("SELECT active FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
                    .await
                    .ok()
                    .flatten()
                    .and_then(|r| r.try_get(0).ok());
                if active != Some(true) {
                    return;
                }
            }
            Err(err) => {
                tracing::debug!(error = %err, "slot advance after stop not possible");
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
