//! `relay held list|retry|skip`: the operator's side of held rows.
//!
//! A held row (`last_error` set, `published_at` NULL) cannot be published
//! until someone acts; the rows of its entity that came after it wait behind
//! it, so per-entity order survives the incident. The two decisions:
//!
//! - `retry ID` after fixing the cause (payload, schema, topic, ACL): clears
//!   `last_error` on the row and on every later held row of its entity and
//!   records `retry_requested_at`. The active relay notices within seconds
//!   and publishes them, in id order, before anything newer of the entity.
//! - `skip ID --reason TEXT`: the row will never be published. It is settled
//!   (`skipped_at`, `skip_reason`; `last_error` stays as the record of why),
//!   no longer counts as failed, and the rows behind it are released as with
//!   `retry`.
//!
//! Only the first held row of an entity can be retried or skipped: releasing
//! a later one would publish it before the earlier one, breaking order.
//! Both commands only write the table, so they work while the relay is down
//! too (it then publishes at start).

use serde::Serialize;
use tokio_postgres::Client;

use crate::config::Config;
use crate::database::{self, DatabaseError};

/// What to do with held rows.
#[derive(Debug, clap::Subcommand)]
pub enum HeldAction {
    /// List held rows (not published, with an error, not skipped), by id.
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
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("row {0} does not exist")]
    NotFound(i64),
    #[error("row {id} is not held: it is {state}")]
    NotHeld { id: i64, state: &'static str },
    #[error("row {id} waits behind held row {blocker} of the same entity: retry or skip row {blocker} first")]
    Behind { id: i64, blocker: i64 },
    #[error("--reason must not be empty")]
    EmptyReason,
}

/// One held row, as `relay held list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct HeldRow {
    pub id: i64,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    pub attempts: i32,
    pub last_error: String,
    /// RFC 3339.
    pub occurred_at: String,
}

/// Held rows, oldest first.
pub async fn list(config: &Config) -> Result<Vec<HeldRow>, HeldError> {
    let client = database::connect(&config.postgres).await?;
    let c = &config.outbox.columns;
    let sql = format!(
        "SELECT \"{id}\", \"{t}\", \"{a}\", \"{e}\", attempts, last_error, \"{o}\"::timestamptz FROM {table} \
         WHERE published_at IS NULL AND last_error IS NOT NULL AND skipped_at IS NULL ORDER BY \"{id}\"",
        id = c.id,
        t = c.aggregate_type,
        a = c.aggregate_id,
        e = c.event_type,
        o = c.occurred_at,
        table = config.outbox_table_sql()
    );
    let rows = client.query(&sql, &[]).await?;
    Ok(rows
        .iter()
        .map(|r| HeldRow {
            id: r.get(0),
            aggregate_type: r.get(1),
            aggregate_id: r.get(2),
            event_type: r.get(3),
            attempts: r.get(4),
            last_error: r.get(5),
            occurred_at: r.get::<_, chrono::DateTime<chrono::Utc>>(6).to_rfc3339(),
        })
        .collect())
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

/// Checks that `id` is the first held row of its entity; returns the entity.
async fn first_held(
    tx: &tokio_postgres::Transaction<'_>,
    config: &Config,
    id: i64,
) -> Result<(String, String), HeldError> {
    let c = &config.outbox.columns;
    let table = config.outbox_table_sql();
    let row = tx
        .query_opt(
            &format!(
                "SELECT \"{t}\", \"{a}\", published_at IS NOT NULL, last_error IS NOT NULL, skipped_at IS NOT NULL \
                 FROM {table} WHERE \"{id}\" = $1 FOR UPDATE",
                t = c.aggregate_type,
                a = c.aggregate_id,
                id = c.id
            ),
            &[&id],
        )
        .await?
        .ok_or(HeldError::NotFound(id))?;
    let (aggregate_type, aggregate_id): (String, String) = (row.get(0), row.get(1));
    let (published, failed, skipped): (bool, bool, bool) = (row.get(2), row.get(3), row.get(4));
    if published {
        return Err(HeldError::NotHeld { id, state: "published" });
    }
    if skipped {
        return Err(HeldError::NotHeld { id, state: "skipped already" });
    }
    if !failed {
        return Err(HeldError::NotHeld { id, state: "pending (the relay publishes it)" });
    }
    let blocker: Option<i64> = tx
        .query_one(
            &format!(
                "SELECT min(\"{id}\") FROM {table} WHERE \"{t}\" = $1 AND \"{a}\" = $2 AND \"{id}\" < $3 \
                 AND published_at IS NULL AND last_error IS NOT NULL AND skipped_at IS NULL",
                t = c.aggregate_type,
                a = c.aggregate_id,
                id = c.id
            ),
            &[&aggregate_type, &aggregate_id, &id],
        )
        .await?
        .get(0);
    if let Some(blocker) = blocker {
        return Err(HeldError::Behind { id, blocker });
    }
    Ok((aggregate_type, aggregate_id))
}

/// Releases the held rows of the entity from `from_id` on; returns their ids.
async fn release_from(
    tx: &tokio_postgres::Transaction<'_>,
    config: &Config,
    entity: &(String, String),
    from_id: i64,
) -> Result<Vec<i64>, HeldError> {
    let c = &config.outbox.columns;
    let rows = tx
        .query(
            &format!(
                "UPDATE {table} SET last_error = NULL, retry_requested_at = now() \
                 WHERE \"{t}\" = $1 AND \"{a}\" = $2 AND \"{id}\" >= $3 \
                 AND published_at IS NULL AND last_error IS NOT NULL AND skipped_at IS NULL RETURNING \"{id}\"",
                table = config.outbox_table_sql(),
                t = c.aggregate_type,
                a = c.aggregate_id,
                id = c.id
            ),
            &[&entity.0, &entity.1, &from_id],
        )
        .await?;
    let mut ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    ids.sort_unstable();
    Ok(ids)
}

/// What a retry or skip changed.
#[derive(Debug, Clone, Serialize)]
pub struct Released {
    pub aggregate_type: String,
    pub aggregate_id: String,
    /// Rows released for publishing, in the order they will be published.
    pub released: Vec<i64>,
    /// The row skipped, for `skip`.
    pub skipped: Option<i64>,
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

async fn connect(config: &Config) -> Result<Client, HeldError> {
    Ok(database::connect(&config.postgres).await?)
}

/// `relay held retry ID`.
pub async fn retry(config: &Config, id: i64) -> Result<Released, HeldError> {
    let mut client = connect(config).await?;
    let tx = client.transaction().await?;
    let entity = first_held(&tx, config, id).await?;
    let released = release_from(&tx, config, &entity, id).await?;
    tx.commit().await?;
    Ok(Released { aggregate_type: entity.0, aggregate_id: entity.1, released, skipped: None })
}

/// `relay held skip ID --reason TEXT`.
pub async fn skip(config: &Config, id: i64, reason: &str) -> Result<Released, HeldError> {
    if reason.trim().is_empty() {
        return Err(HeldError::EmptyReason);
    }
    let mut client = connect(config).await?;
    let tx = client.transaction().await?;
    let entity = first_held(&tx, config, id).await?;
    tx.execute(
        &format!(
            "UPDATE {} SET skipped_at = now(), skip_reason = $2 WHERE \"{}\" = $1",
            config.outbox_table_sql(),
            config.outbox.columns.id
        ),
        &[&id, &reason],
    )
    .await?;
    let released = release_from(&tx, config, &entity, id + 1).await?;
    tx.commit().await?;
    Ok(Released { aggregate_type: entity.0, aggregate_id: entity.1, released, skipped: Some(id) })
}

/// Runs a `relay held` action; returns what to print.
pub async fn run(config: &Config, action: HeldAction) -> Result<String, HeldError> {
    Ok(match action {
        HeldAction::List { json } => {
            let rows = list(config).await?;
            if json {
                serde_json::to_string_pretty(&rows).unwrap_or_default() + "\n"
            } else {
                render(&rows)
            }
        }
        HeldAction::Retry { id } => retry(config, id).await?.to_string(),
        HeldAction::Skip { id, reason } => skip(config, id, &reason).await?.to_string(),
    })
}
