//! `relay held list|retry|skip`: the operator's side of held rows.
//!
//! A held row (`last_error` set, `published_at` NULL) cannot be published
//! until someone acts; the rows of its entity that came after it wait behind
//! it (`waiting_for`), so per-entity order survives the incident. The two
//! decisions (the statements are in [`crate::store`]):
//!
//! - `retry ID` after fixing the cause (payload, schema, topic, ACL): clears
//!   `last_error` on the row and on every later held row of its entity and
//!   records `retry_requested_at`. The active relay notices within seconds
//!   and publishes them, in id order, before anything newer of the entity.
//! - `skip ID --reason TEXT`: the row will never be published. It is settled
//!   (`skipped_at`, `skip_reason`; `last_error` stays as the record of why),
//!   no longer counts as held, and the rows behind it are released as with
//!   `retry`.
//!
//! Only the first held row of an entity can be retried or skipped: releasing
//! a later one would publish it before the earlier one, breaking order.
//! Both commands only write the table, so they work while the relay is down
//! too (it then publishes at start).

use std::process::ExitCode;

use crate::config::Config;
use crate::database::{self, DatabaseError};
use crate::store::{HeldRow, Released, Store, StoreError};

/// What to do with held rows.
#[derive(Debug, clap::Subcommand)]
pub enum HeldAction {
    /// List held rows and the rows waiting behind them (not published, with
    /// an error, not skipped), by id.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Release held row ID and the rows of its entity waiting behind it, for
    /// the relay to publish them again (after fixing the cause).
    Retry {
        /// The held row's id.
        id: i64,
    },
    /// Settle held row ID without publishing it, recording why, and release
    /// the rows of its entity waiting behind it.
    Skip {
        /// The held row's id.
        id: i64,
        /// Why the row is skipped (kept in skip_reason).
        #[arg(long, value_name = "TEXT")]
        reason: String,
    },
}

/// Why a held-row command failed.
#[derive(Debug, thiserror::Error)]
pub enum HeldError {
    #[error(transparent)]
    Database(#[from] DatabaseError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("--reason must not be empty")]
    EmptyReason,
}

/// The held rows as a table for a terminal.
pub fn render(rows: &[HeldRow]) -> String {
    if rows.is_empty() {
        return "no held rows\n".to_string();
    }
    let mut out = format!(
        "{:>10}  {:<16} {:<24} {:<20} {:>8}  {:<25}  {}\n",
        "id", "aggregate_type", "aggregate_id", "event_type", "attempts", "occurred_at", "last_error"
    );
    for r in rows {
        out.push_str(&format!(
            "{:>10}  {:<16} {:<24} {:<20} {:>8}  {:<25}  {}\n",
            r.id, r.aggregate_type, r.aggregate_id, r.event_type, r.attempts, r.occurred_at, r.last_error
        ));
    }
    out
}

impl std::fmt::Display for Released {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(id) = self.skipped {
            writeln!(f, "skipped row {id} ({}/{})", self.aggregate_type, self.aggregate_id)?;
        }
        if self.released.is_empty() {
            writeln!(f, "no rows released")
        } else {
            let ids: Vec<String> = self.released.iter().map(i64::to_string).collect();
            writeln!(
                f,
                "released rows {} ({}/{}); the active relay publishes them in this order within seconds",
                ids.join(", "),
                self.aggregate_type,
                self.aggregate_id
            )
        }
    }
}

/// Runs `relay held ACTION` and prints what it did.
pub async fn run(config: &Config, action: HeldAction) -> Result<ExitCode, HeldError> {
    print!("{}", act(config, action).await?);
    Ok(ExitCode::SUCCESS)
}

/// Carries out a `relay held` action; returns what to print.
pub async fn act(config: &Config, action: HeldAction) -> Result<String, HeldError> {
    let store = Store::new(config);
    let mut client = database::connect(&config.postgres).await?;
    Ok(match action {
        HeldAction::List { json } => {
            let rows = store.held_rows(&client).await?;
            if json {
                serde_json::to_string_pretty(&rows).unwrap_or_default() + "\n"
            } else {
                render(&rows)
            }
        }
        HeldAction::Retry { id } => store.retry_held(&mut client, id).await?.to_string(),
        HeldAction::Skip { id, reason } => {
            if reason.trim().is_empty() {
                return Err(HeldError::EmptyReason);
            }
            store.skip_held(&mut client, id, &reason).await?.to_string()
        }
    })
}
