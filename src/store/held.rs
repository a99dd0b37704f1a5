//! Held and waiting rows: loading the held entities, the relay's own release
//! of waiting rows, and the operator's `relay held list|retry|skip`.
//!
//! Only the first held row of an entity can be retried or skipped: releasing
//! a later one would publish it before the earlier one, breaking order.

use serde::Serialize;
use tokio_postgres::{Client, Transaction};

use super::{get, OutboxSql, Store, StoreError};

/// One held or waiting row, as `relay held list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct HeldRow {
    pub id: i64,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    pub attempts: i32,
    pub last_error: String,
    /// The held row this one waits behind; `None` for a held row.
    pub waiting_for: Option<i64>,
    /// RFC 3339.
    pub occurred_at: String,
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

/// The words of the store's vocabulary (see the [module doc](super)) as SQL
/// conditions on the outbox row aliased `alias`: every statement says
/// "pending", "held" or "waiting" through these.
impl OutboxSql {
    /// Pending: not published, no `last_error`: the relay will publish it.
    pub(super) fn pending(&self, alias: &str) -> String {
        format!("{} AND {alias}.last_error IS NULL", self.unpublished(alias))
    }

    /// Held or waiting: not published, `last_error` set, not skipped.
    pub(super) fn not_settled(&self, alias: &str) -> String {
        format!("{} AND {}", self.unpublished(alias), Marked::HeldOrWaiting.on(alias))
    }

    /// Held by its own error: not settled, and not waiting behind another row.
    pub(super) fn held(&self, alias: &str) -> String {
        format!("{} AND {}", self.unpublished(alias), Marked::Held.on(alias))
    }

    /// Waiting behind a held row of its entity (`waiting_for`).
    pub(super) fn waiting(&self, alias: &str) -> String {
        format!("{} AND {}", self.unpublished(alias), Marked::Waiting.on(alias))
    }

    /// A row that held its entity and is held no more: published, released
    /// by an operator (`last_error` cleared) or skipped.
    pub(super) fn no_longer_held(&self, alias: &str) -> String {
        format!("({} OR {alias}.last_error IS NULL OR {alias}.skipped_at IS NOT NULL)", self.published(alias))
    }
}

/// Which state a row that carries `last_error` is in, told by its error
/// columns alone. Publishing clears `last_error` in both layouts, so such a
/// row is never a published one: statements that walk the held-rows index
/// (`last_error IS NOT NULL`) need no publish-state probe. Elsewhere use
/// the [`OutboxSql`] conditions, which add it.
#[derive(Debug, Clone, Copy)]
pub(super) enum Marked {
    /// Held, waiting or skipped: every row of the held-rows index.
    Any,
    HeldOrWaiting,
    Held,
    Waiting,
    /// Settled by an operator without publishing (`relay held skip`).
    Skipped,
}

impl Marked {
    /// The condition on the outbox row aliased `alias`.
    pub(super) fn on(self, alias: &str) -> String {
        let marked = format!("{alias}.last_error IS NOT NULL");
        match self {
            Self::Any => marked,
            Self::HeldOrWaiting => format!("{marked} AND {alias}.skipped_at IS NULL"),
            Self::Held => format!("{marked} AND {alias}.skipped_at IS NULL AND {alias}.waiting_for IS NULL"),
            Self::Waiting => format!("{marked} AND {alias}.skipped_at IS NULL AND {alias}.waiting_for IS NOT NULL"),
            Self::Skipped => format!("{marked} AND {alias}.skipped_at IS NOT NULL"),
        }
    }
}

impl Store {
    /// The entities that have a held row, with the first such row of each,
    /// so their new rows keep waiting behind it.
    pub async fn held_entities(&self, client: &Client) -> Result<Vec<(String, String, i64)>, StoreError> {
        let s = &self.sql;
        let sql = format!(
            "SELECT o.{t}::text, o.{a}::text, min(o.{id})::bigint FROM {table} AS o WHERE {not_settled} GROUP BY 1, 2",
            t = s.aggregate_type,
            a = s.aggregate_id,
            id = s.id,
            table = s.table,
            not_settled = s.not_settled("o"),
        );
        let n = &s.names;
        client
            .query(&sql, &[])
            .await?
            .iter()
            .map(|r| {
                Ok((
                    get(r, 0, &n.aggregate_type, "text")?,
                    get(r, 1, &n.aggregate_id, "text")?,
                    get(r, 2, &n.id, "bigint")?,
                ))
            })
            .collect()
    }

    /// Releases waiting rows whose held row is held no more (published,
    /// released or skipped): clears `last_error` and `waiting_for` and sets
    /// `retry_requested_at`, so the catch-up phase (logical mode) or the
    /// next poll publishes them, in id order. Needed because rows of a
    /// released entity that arrive before the relay notices the release are
    /// recorded as waiting again. Returns how many rows it released.
    pub async fn release_orphaned_waiters(&self, client: &Client) -> Result<u64, StoreError> {
        let s = &self.sql;
        let sql = format!(
            "UPDATE {table} AS w SET last_error = NULL, waiting_for = NULL, retry_requested_at = now() \
             WHERE {waiting} \
             AND NOT EXISTS (SELECT 1 FROM {table} AS h \
                 WHERE h.{t} = w.{t} AND h.{a} = w.{a} AND h.{id} < w.{id} AND {held})",
            table = s.table,
            t = s.aggregate_type,
            a = s.aggregate_id,
            id = s.id,
            waiting = s.waiting("w"),
            held = s.held("h"),
        );
        Ok(client.execute(&sql, &[]).await?)
    }

    /// Whether one of `blockers` (rows that hold entities in this run) is
    /// no longer held: an operator retried or skipped it.
    pub async fn blocker_released(&self, client: &Client, blockers: &[i64]) -> Result<bool, StoreError> {
        if blockers.is_empty() {
            return Ok(false);
        }
        let sql = format!(
            "SELECT 1 FROM {} AS o WHERE o.{} = ANY($1) AND {} LIMIT 1",
            self.sql.table,
            self.sql.id,
            self.sql.no_longer_held("o"),
        );
        Ok(client.query_opt(&sql, &[&blockers]).await?.is_some())
    }

    /// Held and waiting rows, oldest first.
    pub async fn held_rows(&self, client: &Client) -> Result<Vec<HeldRow>, StoreError> {
        let s = &self.sql;
        let sql = format!(
            "SELECT o.{id}::bigint, o.{t}::text, o.{a}::text, o.{e}::text, o.attempts, o.last_error, o.waiting_for, \
             o.{occurred}::timestamptz FROM {table} AS o WHERE {not_settled} ORDER BY o.{id}",
            id = s.id,
            t = s.aggregate_type,
            a = s.aggregate_id,
            e = s.event_type,
            occurred = s.occurred_at,
            table = s.table,
            not_settled = s.not_settled("o"),
        );
        let n = &s.names;
        client
            .query(&sql, &[])
            .await?
            .iter()
            .map(|r| {
                Ok(HeldRow {
                    id: get(r, 0, &n.id, "bigint")?,
                    aggregate_type: get(r, 1, &n.aggregate_type, "text")?,
                    aggregate_id: get(r, 2, &n.aggregate_id, "text")?,
                    event_type: get(r, 3, &n.event_type, "text")?,
                    attempts: get(r, 4, "attempts", "int")?,
                    last_error: get(r, 5, "last_error", "text")?,
                    waiting_for: get(r, 6, "waiting_for", "bigint")?,
                    occurred_at: get::<chrono::DateTime<chrono::Utc>>(r, 7, &n.occurred_at, "timestamptz")?
                        .to_rfc3339(),
                })
            })
            .collect()
    }

    /// `relay held retry ID`: releases held row `id` and the rows of its
    /// entity behind it, for the relay to publish them in id order.
    pub async fn retry_held(&self, client: &mut Client, id: i64) -> Result<Released, StoreError> {
        let tx = client.transaction().await?;
        let entity = self.first_held(&tx, id).await?;
        let released = self.release_from(&tx, &entity, id).await?;
        tx.commit().await?;
        Ok(Released { aggregate_type: entity.0, aggregate_id: entity.1, released, skipped: None })
    }

    /// `relay held skip ID`: settles held row `id` without publishing it
    /// (`last_error` stays as the record of why) and releases the rows of
    /// its entity behind it.
    pub async fn skip_held(&self, client: &mut Client, id: i64, reason: &str) -> Result<Released, StoreError> {
        let tx = client.transaction().await?;
        let entity = self.first_held(&tx, id).await?;
        tx.execute(
            &format!("UPDATE {} SET skipped_at = now(), skip_reason = $2 WHERE {} = $1", self.sql.table, self.sql.id),
            &[&id, &reason],
        )
        .await?;
        let released = self.release_from(&tx, &entity, id + 1).await?;
        tx.commit().await?;
        Ok(Released { aggregate_type: entity.0, aggregate_id: entity.1, released, skipped: Some(id) })
    }

    /// Checks that `id` is the first held row of its entity; returns the entity.
    async fn first_held(&self, tx: &Transaction<'_>, id: i64) -> Result<(String, String), StoreError> {
        let s = &self.sql;
        let row = tx
            .query_opt(
                &format!(
                    "SELECT o.{t}::text, o.{a}::text, {published}, o.last_error IS NOT NULL, \
                     o.skipped_at IS NOT NULL FROM {table} AS o WHERE o.{id} = $1 FOR UPDATE",
                    t = s.aggregate_type,
                    a = s.aggregate_id,
                    id = s.id,
                    table = s.table,
                    published = s.published("o"),
                ),
                &[&id],
            )
            .await?
            .ok_or(StoreError::NotFound(id))?;
        let n = &s.names;
        let aggregate_type: String = get(&row, 0, &n.aggregate_type, "text")?;
        let aggregate_id: String = get(&row, 1, &n.aggregate_id, "text")?;
        let (published, held, skipped): (bool, bool, bool) = (row.try_get(2)?, row.try_get(3)?, row.try_get(4)?);
        if published {
            return Err(StoreError::NotHeld { id, state: "published" });
        }
        if skipped {
            return Err(StoreError::NotHeld { id, state: "skipped already" });
        }
        if !held {
            return Err(StoreError::NotHeld { id, state: "pending (the relay publishes it)" });
        }
        let blocker: Option<i64> = tx
            .query_one(
                &format!(
                    "SELECT min(o.{id})::bigint FROM {table} AS o WHERE o.{t}::text = $1 AND o.{a}::text = $2 \
                     AND o.{id} < $3 AND {not_settled}",
                    t = s.aggregate_type,
                    a = s.aggregate_id,
                    id = s.id,
                    table = s.table,
                    not_settled = s.not_settled("o"),
                ),
                &[&aggregate_type, &aggregate_id, &id],
            )
            .await?
            .try_get(0)?;
        if let Some(blocker) = blocker {
            return Err(StoreError::Behind { id, blocker });
        }
        Ok((aggregate_type, aggregate_id))
    }

    /// Releases the held and waiting rows of the entity from `from_id` on;
    /// returns their ids in id order.
    async fn release_from(
        &self,
        tx: &Transaction<'_>,
        entity: &(String, String),
        from_id: i64,
    ) -> Result<Vec<i64>, StoreError> {
        let s = &self.sql;
        let rows = tx
            .query(
                &format!(
                    "UPDATE {table} AS o SET last_error = NULL, waiting_for = NULL, retry_requested_at = now() \
                     WHERE o.{t}::text = $1 AND o.{a}::text = $2 AND o.{id} >= $3 AND {not_settled} \
                     RETURNING o.{id}::bigint",
                    table = s.table,
                    t = s.aggregate_type,
                    a = s.aggregate_id,
                    id = s.id,
                    not_settled = s.not_settled("o"),
                ),
                &[&entity.0, &entity.1, &from_id],
            )
            .await?;
        let mut ids = rows.iter().map(|r| get(r, 0, &s.names.id, "bigint")).collect::<Result<Vec<i64>, _>>()?;
        ids.sort_unstable();
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn sql(layout: &str) -> OutboxSql {
        let toml = format!(
            "postgres.url = \"postgres://relay@localhost/outbox\"\nkafka.bootstrap_servers = \"127.0.0.1:9092\"\n{layout}"
        );
        OutboxSql::new(&Config::from_toml_str(&toml).expect("config"))
    }

    #[test]
    fn the_vocabulary_as_sql() {
        let sql = sql("");
        assert_eq!(sql.pending("o"), "o.published_at IS NULL AND o.last_error IS NULL");
        assert_eq!(
            sql.not_settled("o"),
            "o.published_at IS NULL AND o.last_error IS NOT NULL AND o.skipped_at IS NULL"
        );
        assert_eq!(
            sql.held("h"),
            "h.published_at IS NULL AND h.last_error IS NOT NULL AND h.skipped_at IS NULL AND h.waiting_for IS NULL"
        );
        assert_eq!(
            sql.waiting("w"),
            "w.published_at IS NULL AND w.last_error IS NOT NULL AND w.skipped_at IS NULL AND w.waiting_for IS NOT NULL"
        );
        assert_eq!(
            sql.no_longer_held("o"),
            "(o.published_at IS NOT NULL OR o.last_error IS NULL OR o.skipped_at IS NOT NULL)"
        );
        assert_eq!(Marked::Skipped.on("o"), "o.last_error IS NOT NULL AND o.skipped_at IS NOT NULL");
    }

    #[test]
    fn in_the_side_table_layout_unpublished_probes_the_side_row() {
        let sql = sql("checkpoint.publish_state = \"side_table\"");
        let held = sql.held("h");
        assert!(held.starts_with("(h.published_at IS NULL AND NOT EXISTS (SELECT 1 FROM"), "{held}");
        assert!(
            held.ends_with(
                "p.id = h.\"id\")) AND h.last_error IS NOT NULL AND h.skipped_at IS NULL AND h.waiting_for IS NULL"
            ),
            "{held}"
        );
    }
}
