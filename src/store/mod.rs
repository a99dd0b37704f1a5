//! The one owner of the SQL against the outbox table and the relay's own
//! tables: publish state (published, held, waiting), the reads of the poll
//! path and of `relay replay`, held-row decisions, status and lag,
//! retention, the catch-up marker, and the leader lease with the fence of
//! publish-state writes.
//!
//! The words, used the same way in code, metrics, CLI output and docs:
//! - **pending**: not published, no `last_error`: the relay will publish it.
//! - **held**: not published, `last_error` set by its own error, not
//!   skipped: it waits for an operator (`relay held retry|skip`).
//! - **waiting**: not published, `waiting_for` names the held row of the
//!   same entity it waits behind; released by the relay itself once that
//!   row is published, released or skipped.
//! - **skipped**: a held row an operator settled without publishing.
//!
//! Every column is read with `try_get`, so a configured column of the wrong
//! type is a [`StoreError`], never a panic.

mod catchup;
pub mod grants;
mod held;
mod layout;
mod leader;
mod publish;
mod rows;
mod status;

pub use catchup::{CatchUpMarker, CatchUpReason};
pub use held::{HeldRow, Released};
pub use leader::{Acquired, Fence, HeldLease, LeaseState, LeaseStore, PreparedFence, Previous};
pub use publish::{HeldState, PgPublishState, PublishStateStore, Published};
pub use rows::{rows_within, select_list, text_values, RowQuery, TableLayout};
pub use status::Status;

use tokio_postgres::types::FromSql;
use tokio_postgres::{Client, Row};

use crate::config::Config;
use crate::database;
use crate::error_class::ErrorClass;
use crate::outbox::RowError;

/// Why a statement of the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
    #[error("cannot read column `{column}` as {expected}")]
    Column {
        column: String,
        expected: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("outbox table {0} not found; run `relay migrate`")]
    NoTable(String),
    /// The publish state in Postgres is kept in the other layout than
    /// `checkpoint.publish_state` names.
    #[error("checkpoint.publish_state = \"{configured}\", but {found}: run `relay migrate` with this config (it moves the publish state into the configured layout), then start the relay again")]
    Layout { configured: &'static str, found: String },
    #[error(transparent)]
    Row(#[from] RowError),
    #[error("row {0} does not exist")]
    NotFound(i64),
    #[error("row {id} is not held: it is {state}")]
    NotHeld { id: i64, state: &'static str },
    #[error("row {id} waits behind held row {blocker} of the same entity: retry or skip row {blocker} first")]
    Behind { id: i64, blocker: i64 },
    /// The lease term that made this write is over: another relay took
    /// over. Nothing was written; the run must end and the relay step down.
    #[error("the lease of this relay (epoch {epoch}) is over: another relay took over; nothing was written")]
    Fenced { epoch: i64 },
}

impl StoreError {
    /// The SQLSTATE of the underlying Postgres error, if any.
    pub fn sql_state(&self) -> Option<&tokio_postgres::error::SqlState> {
        match self {
            Self::Postgres(err) | Self::Column { source: err, .. } => err.code(),
            _ => None,
        }
    }

    /// A statement is judged by its SQLSTATE ([`database::sql_state_class`]);
    /// a missing table or the other publish-state layout needs `relay
    /// migrate`; a refused fence ends the term.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Postgres(_) | Self::Column { .. } => database::sql_state_class(self.sql_state()),
            Self::NoTable(table) => {
                ErrorClass::Operator(format!("outbox table {table} does not exist: run `relay migrate`").into())
            }
            Self::Layout { .. } => ErrorClass::operator("run `relay migrate` with this config"),
            Self::Row(e) => e.class(),
            // A row a command names that is not in the state it asked for:
            // the command says so; no statement failed.
            Self::NotFound(_) | Self::NotHeld { .. } | Self::Behind { .. } => ErrorClass::Retry,
            Self::Fenced { .. } => ErrorClass::StepDown,
        }
    }
}

/// Quotes an SQL identifier (a configured table or column name).
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Reads column `idx` of `row` with its type checked.
fn get<'a, T: FromSql<'a>>(row: &'a Row, idx: usize, column: &str, expected: &'static str) -> Result<T, StoreError> {
    row.try_get(idx).map_err(|source| StoreError::Column { column: column.to_string(), expected, source })
}

/// The outbox table's names, quoted once, for building statements.
#[derive(Debug, Clone)]
pub struct OutboxSql {
    /// `"schema"."table"`.
    pub table: String,
    /// `"schema"."table_relay_catchup"`.
    pub catchup_table: String,
    /// `"schema"."table_relay_leader"`.
    pub leader_table: String,
    /// `"schema"."table_relay_published"`: publish state in the side-table layout.
    pub published_table: String,
    /// `checkpoint.publish_state = "side_table"`.
    pub side_table: bool,
    pub id: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    pub occurred_at: String,
    /// The configured (unquoted) names, for messages.
    names: crate::config::ColumnNames,
}

impl OutboxSql {
    pub fn new(config: &Config) -> Self {
        let c = &config.outbox.columns;
        let schema = &config.outbox.schema;
        let table = &config.outbox.table;
        Self {
            table: format!("{}.{}", ident(schema), ident(table)),
            catchup_table: format!("{}.{}", ident(schema), ident(&format!("{table}_relay_catchup"))),
            leader_table: format!("{}.{}", ident(schema), ident(&format!("{table}_relay_leader"))),
            published_table: format!("{}.{}", ident(schema), ident(&format!("{table}_relay_published"))),
            side_table: config.checkpoint.publish_state == crate::config::PublishStateLayout::SideTable,
            id: ident(&c.id),
            aggregate_type: ident(&c.aggregate_type),
            aggregate_id: ident(&c.aggregate_id),
            event_type: ident(&c.event_type),
            occurred_at: ident(&c.occurred_at),
            names: c.clone(),
        }
    }
}

/// The store of one outbox: its statements over a client the caller owns.
#[derive(Debug, Clone)]
pub struct Store {
    sql: OutboxSql,
    slot_name: String,
    /// The unquoted table name, for notification channels.
    table_name: String,
}

impl Store {
    pub fn new(config: &Config) -> Self {
        Self {
            sql: OutboxSql::new(config),
            slot_name: config.source.slot_name.clone(),
            table_name: config.outbox.table.clone(),
        }
    }

    /// The quoted names of the outbox table.
    pub fn sql(&self) -> &OutboxSql {
        &self.sql
    }

    /// Deletes up to `batch_rows` published rows older than `max_age_secs`
    /// through the index on `published_at` (the outbox's partial one, or
    /// the side table's), skipping locked rows, so the cost stays flat as
    /// the table grows and it never waits on writers. Held rows have no
    /// `published_at` and are never deleted. In the side-table layout the
    /// outbox rows and their side rows go in one statement.
    pub async fn delete_published_before(
        &self,
        client: &Client,
        max_age_secs: f64,
        batch_rows: i64,
    ) -> Result<u64, StoreError> {
        let (table, id) = (&self.sql.table, &self.sql.id);
        let sql = if self.sql.side_table {
            let published = &self.sql.published_table;
            format!(
                "WITH gone AS (DELETE FROM {published} WHERE id IN (SELECT id FROM {published} \
                   WHERE published_at < now() - make_interval(secs => $1) \
                   ORDER BY published_at LIMIT $2 FOR UPDATE SKIP LOCKED) RETURNING id) \
                 DELETE FROM {table} WHERE {id} IN (SELECT id FROM gone)"
            )
        } else {
            format!(
                "DELETE FROM {table} WHERE {id} IN (SELECT {id} FROM {table} \
                 WHERE published_at IS NOT NULL AND published_at < now() - make_interval(secs => $1) \
                 ORDER BY published_at LIMIT $2 FOR UPDATE SKIP LOCKED)"
            )
        };
        Ok(client.execute(&sql, &[&max_age_secs, &batch_rows]).await?)
    }
}
