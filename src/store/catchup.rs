//! The catch-up marker table (`<table>_relay_catchup`, one row per slot):
//! written before a slot is created, deleted once every row committed
//! before the slot existed was published through the poll path. See
//! `source::catchup` for why.

use tokio_postgres::Client;

use super::{get, Store, StoreError};

/// Why the relay recreated the slot. The text is what the marker table and
/// the `reason` label of `outbox_relay_slot_recoveries_total` hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatchUpReason {
    /// The slot did not exist (dropped, or never created).
    Missing,
    /// Postgres invalidated it (`wal_status = 'lost'`).
    Invalidated,
    /// It retained more than `source.max_slot_wal_bytes`.
    WalBudget,
}

impl CatchUpReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Invalidated => "invalidated",
            Self::WalBudget => "wal_budget",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
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
pub struct CatchUpMarker {
    /// `created` or a [`CatchUpReason`].
    pub reason: String,
    /// Rows above this id are streamed; `None`: no bound known.
    pub max_id: Option<i64>,
}

impl Store {
    /// The pending catch-up of the configured slot, if any.
    pub async fn catch_up_marker(&self, client: &Client) -> Result<Option<CatchUpMarker>, StoreError> {
        let row = client
            .query_opt(
                &format!("SELECT reason, max_id FROM {} WHERE slot_name = $1", self.sql.catchup_table),
                &[&self.slot_name],
            )
            .await?;
        row.map(|r| {
            Ok(CatchUpMarker { reason: get(&r, 0, "reason", "text")?, max_id: get(&r, 1, "max_id", "bigint")? })
        })
        .transpose()
    }

    /// Records that a catch-up is due because of `reason`, before the slot
    /// is touched: whatever happens next, the next run catches up.
    pub async fn write_catch_up_marker(&self, client: &Client, reason: CatchUpReason) -> Result<(), StoreError> {
        client
            .execute(
                &format!(
                    "INSERT INTO {} (slot_name, reason) VALUES ($1, $2) ON CONFLICT (slot_name) \
                     DO UPDATE SET reason = EXCLUDED.reason, max_id = NULL, requested_at = now()",
                    self.sql.catchup_table
                ),
                &[&self.slot_name, &reason.as_str()],
            )
            .await?;
        Ok(())
    }

    /// Marks a slot about to be created (keeping a recovery reason already
    /// there): no bound yet.
    pub async fn mark_slot_creation(&self, client: &Client) -> Result<(), StoreError> {
        client
            .execute(
                &format!(
                    "INSERT INTO {} (slot_name, reason) VALUES ($1, 'created') \
                     ON CONFLICT (slot_name) DO UPDATE SET max_id = NULL",
                    self.sql.catchup_table
                ),
                &[&self.slot_name],
            )
            .await?;
        Ok(())
    }

    /// Sets the catch-up bound once the slot exists: the highest id visible
    /// now. Every row committed before the slot is visible, so it is at or
    /// below the bound.
    pub async fn bound_catch_up(&self, client: &Client) -> Result<(), StoreError> {
        client
            .execute(
                &format!(
                    "UPDATE {markers} SET max_id = (SELECT coalesce(max({id}), 0) FROM {table}) WHERE slot_name = $1",
                    markers = self.sql.catchup_table,
                    id = self.sql.id,
                    table = self.sql.table
                ),
                &[&self.slot_name],
            )
            .await?;
        Ok(())
    }

    /// Deletes the marker: the catch-up phase is complete.
    pub async fn clear_catch_up_marker(&self, client: &Client) -> Result<(), StoreError> {
        client
            .execute(&format!("DELETE FROM {} WHERE slot_name = $1", self.sql.catchup_table), &[&self.slot_name])
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_round_trip_and_created_is_not_a_recovery() {
        for reason in [CatchUpReason::Missing, CatchUpReason::Invalidated, CatchUpReason::WalBudget] {
            assert_eq!(CatchUpReason::parse(reason.as_str()), Some(reason));
        }
        assert_eq!(CatchUpReason::parse("created"), None);
    }
}
