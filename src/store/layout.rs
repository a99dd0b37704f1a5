//! Where publish state lives (`checkpoint.publish_state`): the predicates
//! the other statements use for "published", and the move between the two
//! layouts that `relay migrate` makes.
//!
//! - **outbox_row** (the default): `published_at`, `kafka_*` and `attempts`
//!   of the outbox row itself. Poll mode needs it: its query walks the
//!   partial index of rows with `published_at IS NULL`.
//! - **side_table** (logical mode): one row per published outbox row in
//!   `<table>_relay_published`. Recording it is an `INSERT` of a narrow row
//!   instead of a new version of the whole outbox row with its index
//!   entries, about a third of the Postgres work (`scripts/bench
//!   publish-state`). The outbox row is written only for held and waiting
//!   rows, which the partial index `<table>_held_idx` finds.
//!
//! In both layouts publishing a row clears its `last_error`, so a row with
//! `last_error` is never a published one. The view `<table>_publish_state`
//! shows either layout the same way.

use tokio_postgres::Client;

use super::{OutboxSql, Store, StoreError};

impl OutboxSql {
    /// SQL that is true when the outbox row aliased `alias` is published.
    /// In the side-table layout only the side row counts: the move to it
    /// gave every row published before it its side row, and a relay does
    /// not start before that (see [`Store::check_publish_state_layout`]).
    /// One primary-key probe, never an `OR` that would keep the planner
    /// from probing by id.
    pub fn published(&self, alias: &str) -> String {
        if self.side_table {
            self.side_row(alias)
        } else {
            format!("{alias}.published_at IS NOT NULL")
        }
    }

    /// SQL that is true when the outbox row aliased `alias` is not
    /// published. It names `published_at IS NULL` in both layouts, so the
    /// partial indexes with that predicate (released rows) still serve.
    pub fn unpublished(&self, alias: &str) -> String {
        if self.side_table {
            format!("({alias}.published_at IS NULL AND NOT {})", self.side_row(alias))
        } else {
            format!("{alias}.published_at IS NULL")
        }
    }

    fn side_row(&self, alias: &str) -> String {
        format!("EXISTS (SELECT 1 FROM {} AS p WHERE p.id = {alias}.{})", self.published_table, self.id)
    }
}

impl Store {
    /// `relay migrate`: moves the publish state of published rows into the
    /// layout the config names, so that no published row looks unpublished
    /// to the relay that starts next (which would send it again). Into the
    /// side table: every row with `published_at` gets its side row
    /// (idempotent). Back into the outbox row: every side row's state is
    /// written into its outbox row, and the side table emptied. Returns the
    /// rows moved. Run with the relays stopped.
    pub async fn move_publish_state(&self, client: &mut Client) -> Result<u64, StoreError> {
        let (table, id, published) = (&self.sql.table, &self.sql.id, &self.sql.published_table);
        let tx = client.transaction().await?;
        let moved = if self.sql.side_table {
            tx.execute(
                &format!(
                    "INSERT INTO {published} (id, published_at, kafka_topic, kafka_partition, kafka_offset) \
                     SELECT {id}, published_at, kafka_topic, kafka_partition, kafka_offset \
                     FROM {table} WHERE published_at IS NOT NULL ON CONFLICT (id) DO NOTHING"
                ),
                &[],
            )
            .await?
        } else {
            let moved = tx
                .execute(
                    &format!(
                        "UPDATE {table} AS o SET published_at = p.published_at, kafka_topic = p.kafka_topic, \
                         kafka_partition = p.kafka_partition, kafka_offset = p.kafka_offset, attempts = o.attempts + 1 \
                         FROM {published} AS p WHERE o.{id} = p.id AND o.published_at IS NULL"
                    ),
                    &[],
                )
                .await?;
            tx.execute(&format!("DELETE FROM {published}"), &[]).await?;
            moved
        };
        tx.commit().await?;
        Ok(moved)
    }

    /// At start: fails with [`StoreError::Layout`] when the publish state is
    /// kept in the other layout, so a relay never takes published rows for
    /// unpublished ones. Cheap: one probe of each table.
    pub async fn check_publish_state_layout(&self, client: &Client) -> Result<(), StoreError> {
        let (table, id, published) = (&self.sql.table, &self.sql.id, &self.sql.published_table);
        let found = client
            .query_one("SELECT to_regclass($1)::text, has_table_privilege(to_regclass($1), 'SELECT')", &[published])
            .await?;
        let (exists, readable): (Option<String>, Option<bool>) = (found.try_get(0)?, found.try_get(1)?);
        if self.sql.side_table {
            if exists.is_none() {
                return Err(StoreError::Layout {
                    configured: "side_table",
                    found: format!("{published} does not exist"),
                });
            }
            // The row published last in the outbox-row layout must have its
            // side row: then the move ran after the last such publish.
            let unmoved: Option<i64> = client
                .query_opt(
                    &format!(
                        "SELECT o.{id}::bigint FROM (SELECT {id} FROM {table} WHERE published_at IS NOT NULL \
                         ORDER BY published_at DESC LIMIT 1) AS o \
                         WHERE NOT EXISTS (SELECT 1 FROM {published} AS p WHERE p.id = o.{id})"
                    ),
                    &[],
                )
                .await?
                .map(|r| r.try_get(0))
                .transpose()?;
            if let Some(row) = unmoved {
                return Err(StoreError::Layout {
                    configured: "side_table",
                    found: format!("row {row} was published in the outbox-row layout and has no row in {published}"),
                });
            }
        } else if readable == Some(true) {
            // A role without SELECT on it (the default layout's grants) has
            // never written it either.
            let held = client.query_opt(&format!("SELECT id FROM {published} LIMIT 1"), &[]).await?;
            if held.is_some() {
                return Err(StoreError::Layout {
                    configured: "outbox_row",
                    found: format!("{published} holds the publish state of published rows (side-table layout)"),
                });
            }
        }
        Ok(())
    }
}
