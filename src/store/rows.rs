//! Reading outbox rows: the poll path's and the catch-up phase's selects,
//! `relay replay`'s keyset query, and how their text columns become rows.

use bytes::Bytes;
use tokio_postgres::Client;

use super::{get, ident, OutboxSql, Store, StoreError};
use crate::config::ColumnNames;
use crate::outbox::RowLayout;

/// The configured read-side columns the outbox table has, in
/// [`ColumnNames`] order, and the layout that builds rows from them.
#[derive(Debug, Clone)]
pub struct TableLayout {
    pub columns: Vec<String>,
    pub layout: RowLayout,
}

/// The configured read-side columns, in [`ColumnNames`] order, that the table has.
pub fn selected_columns(names: &ColumnNames, existing: &[String]) -> Vec<String> {
    [
        &names.id,
        &names.event_id,
        &names.aggregate_type,
        &names.aggregate_id,
        &names.event_type,
        &names.kind,
        &names.entity_version,
        &names.payload,
        &names.headers,
        &names.occurred_at,
    ]
    .into_iter()
    .filter(|name| existing.iter().any(|e| e == *name))
    .cloned()
    .collect()
}

/// The select list of `columns` of the table aliased `o`, each as text
/// (`occurred_at` in UTC ISO format, `2026-11-23 16:40:00.123456+00`,
/// whatever the session's TimeZone), so [`RowLayout::row`] builds rows from
/// a select exactly as from the logical stream.
pub fn select_list(names: &ColumnNames, columns: &[String]) -> String {
    let list: Vec<String> = columns
        .iter()
        .map(|c| {
            let column = ident(c);
            if *c == names.occurred_at {
                format!("to_char(o.{column}::timestamptz AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00'")
            } else {
                format!("o.{column}::text")
            }
        })
        .collect();
    list.join(", ")
}

/// A result row of a [`select_list`] query as text values (`None` is NULL),
/// with their total size in bytes.
pub fn text_values(row: &tokio_postgres::Row) -> Result<(Vec<Option<Bytes>>, usize), StoreError> {
    let mut columns = Vec::with_capacity(row.len());
    let mut size = 0;
    for i in 0..row.len() {
        let value: Option<&str> = get(row, i, row.columns()[i].name(), "text")?;
        size += value.map_or(0, str::len);
        columns.push(value.map(|v| Bytes::copy_from_slice(v.as_bytes())));
    }
    Ok((columns, size))
}

/// How many of the leading rows (sizes in bytes) fit in `max_bytes`: at
/// least one, so a single row larger than the limit still goes (alone).
pub fn rows_within(sizes: &[usize], max_bytes: usize) -> usize {
    let mut total = 0usize;
    for (i, size) in sizes.iter().enumerate() {
        total = total.saturating_add(*size);
        if total > max_bytes && i > 0 {
            return i;
        }
    }
    sizes.len()
}

/// The statements that read rows to publish or replay.
pub struct RowQuery;

impl RowQuery {
    /// The poll query: pending rows (not published, not held, not waiting)
    /// in id order, `LIMIT $1`. No cursor: see `source::poll`.
    pub fn poll(sql: &OutboxSql, columns: &[String]) -> String {
        Self::pending(sql, columns, "true")
    }

    /// The catch-up phase's query: pending rows that also match `condition`
    /// (on the table aliased `o`), in id order, `LIMIT $1`.
    pub fn catch_up(sql: &OutboxSql, columns: &[String], condition: &str) -> String {
        Self::pending(sql, columns, condition)
    }

    /// Pending rows in id order: at most `$1` rows, cut where the payloads'
    /// stored size passes `$2` bytes (at least one row), leaving out the
    /// id runs `$3[i]..=$4[i]` (the batches still in flight; empty arrays
    /// for none): one comparison pair per run, not per in-flight row. The cut is made in
    /// Postgres on `pg_column_size` (no detoasting), and only the rows that
    /// pass are turned into text and sent, so a batch of very large rows
    /// costs memory by bytes, not by `batch_rows` x row size. Stored size
    /// is the compressed size for a compressed payload: the text can be a
    /// few times larger, a constant factor, not a multiple of the batch. A
    /// tombstone (NULL payload) counts 0, not NULL: a NULL running sum would
    /// leave it out of every batch but the one it starts.
    fn pending(sql: &OutboxSql, columns: &[String], condition: &str) -> String {
        format!(
            "SELECT {list} FROM (\
               SELECT l.*, row_number() OVER (ORDER BY l.{id}) AS relay_n, \
                 sum(coalesce(pg_column_size(l.{payload}), 0)) OVER (ORDER BY l.{id}) AS relay_upto \
               FROM (SELECT * FROM {table} AS o \
                 WHERE {pending} AND ({condition}) \
                 AND NOT EXISTS (SELECT 1 FROM unnest($3::bigint[], $4::bigint[]) AS r(lo, hi) \
                   WHERE o.{id} BETWEEN r.lo AND r.hi) \
                 ORDER BY o.{id} LIMIT $1) AS l\
             ) AS o WHERE o.relay_n = 1 OR o.relay_upto <= $2 ORDER BY o.{id}",
            list = select_list(&sql.names, columns),
            table = sql.table,
            id = sql.id,
            payload = ident(&sql.names.payload),
            pending = sql.pending("o"),
        )
    }

    /// `relay replay`'s keyset query: published rows after `$1` up to `$2`,
    /// filtered by `$3` (since, or NULL) and `$4` (aggregate type, or NULL),
    /// in id order, `$5` at a time.
    pub fn replay(sql: &OutboxSql, columns: &[String]) -> String {
        format!(
            "SELECT {list} {from_where} ORDER BY o.{id} LIMIT $5",
            list = select_list(&sql.names, columns),
            from_where = Self::replay_from_where(sql),
            id = sql.id,
        )
    }

    /// How many rows a replay with parameters `$1` to `$4` covers.
    pub fn replay_count(sql: &OutboxSql) -> String {
        format!("SELECT count(*) {}", Self::replay_from_where(sql))
    }

    fn replay_from_where(sql: &OutboxSql) -> String {
        format!(
            "FROM {table} AS o \
             WHERE {published} AND o.{id} > $1 AND o.{id} <= $2 \
             AND ($3::timestamptz IS NULL OR o.{occurred}::timestamptz >= $3) \
             AND ($4::text IS NULL OR o.{aggregate_type}::text = $4)",
            table = sql.table,
            id = sql.id,
            occurred = sql.occurred_at,
            aggregate_type = sql.aggregate_type,
            published = sql.published("o"),
        )
    }
}

impl Store {
    /// Reads which configured columns the outbox table has.
    pub async fn table_layout(&self, client: &Client) -> Result<TableLayout, StoreError> {
        let table = &self.sql.table;
        let exists: Option<String> = client.query_one("SELECT to_regclass($1)::text", &[table]).await?.try_get(0)?;
        if exists.is_none() {
            return Err(StoreError::NoTable(table.clone()));
        }
        let existing = client
            .query(
                "SELECT attname::text FROM pg_attribute \
                 WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped",
                &[table],
            )
            .await?
            .iter()
            .map(|r| get(r, 0, "attname", "text"))
            .collect::<Result<Vec<String>, _>>()?;
        let columns = selected_columns(&self.sql.names, &existing);
        let layout = RowLayout::new(&columns, &self.sql.names)?;
        Ok(TableLayout { columns, layout })
    }

    /// The `CACHE` of the sequence behind the id column, if it has one. With
    /// a cache above 1 each session takes ids in blocks, so ids stop
    /// following the entity lock's order, which poll mode relies on.
    pub async fn id_sequence_cache(&self, client: &Client) -> Result<Option<i64>, StoreError> {
        let row = client
            .query_one(
                "SELECT (SELECT s.seqcache FROM pg_sequence s \
                 WHERE s.seqrelid = pg_get_serial_sequence($1, $2)::regclass)",
                &[&self.sql.table, &self.sql.names.id],
            )
            .await?;
        Ok(row.try_get(0)?)
    }

    /// The highest published id (0 when none): where a replay ends by default.
    pub async fn max_published_id(&self, client: &Client) -> Result<i64, StoreError> {
        let sql = if self.sql.side_table {
            format!("SELECT max(id)::bigint FROM {}", self.sql.published_table)
        } else {
            format!(
                "SELECT max(o.{id})::bigint FROM {table} AS o WHERE o.published_at IS NOT NULL",
                id = self.sql.id,
                table = self.sql.table
            )
        };
        Ok(client.query_one(&sql, &[]).await?.try_get::<_, Option<i64>>(0)?.unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn config() -> Config {
        Config::from_toml_str(
            "postgres.url = \"postgres://relay@localhost/outbox\"\nkafka.bootstrap_servers = \"127.0.0.1:9092\"",
        )
        .expect("config")
    }

    #[test]
    fn byte_bound_cuts_batches_but_always_takes_one_row() {
        assert_eq!(rows_within(&[], 100), 0);
        assert_eq!(rows_within(&[10, 20, 30], 100), 3);
        assert_eq!(rows_within(&[40, 40, 40], 100), 2);
        assert_eq!(rows_within(&[50, 50], 100), 2, "exactly at the bound");
        assert_eq!(rows_within(&[50, 50, 1], 100), 2);
        assert_eq!(rows_within(&[500, 1], 100), 1, "an oversized first row goes alone");
        assert_eq!(rows_within(&[1, 500], 100), 1);
    }

    #[test]
    fn poll_query_selects_by_publish_state_without_cursor_and_maps_columns() {
        let names = ColumnNames::default();
        let existing: Vec<String> = [
            "id",
            "event_id",
            "aggregate_type",
            "aggregate_id",
            "event_type",
            "kind",
            "payload",
            "occurred_at",
            "published_at",
            "last_error",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let columns = selected_columns(&names, &existing);
        assert!(!columns.contains(&"entity_version".to_string()) && !columns.contains(&"headers".to_string()));
        assert!(RowLayout::new(&columns, &names).is_ok());
        let sql = RowQuery::poll(&OutboxSql::new(&config()), &columns);
        assert!(
            sql.contains("WHERE o.published_at IS NULL AND o.last_error IS NULL AND (true) AND NOT EXISTS"),
            "{sql}"
        );
        assert!(sql.contains("BETWEEN r.lo AND r.hi) ORDER BY o.\"id\" LIMIT $1"), "the batches in flight: {sql}");
        assert!(sql.contains("pg_column_size(l.\"payload\")") && sql.contains("o.relay_upto <= $2"), "{sql}");
        assert!(!sql.contains('>'), "no cursor: {sql}");
        assert!(sql.contains("AT TIME ZONE 'UTC'"), "{sql}");
    }

    #[test]
    fn replay_query_selects_published_rows_by_keyset() {
        let columns: Vec<String> =
            ["id", "event_id", "aggregate_type", "aggregate_id", "event_type", "kind", "payload", "occurred_at"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        let sql = RowQuery::replay(&OutboxSql::new(&config()), &columns);
        assert!(sql.contains("WHERE o.published_at IS NOT NULL AND o.\"id\" > $1 AND o.\"id\" <= $2"), "{sql}");
        assert!(sql.contains("ORDER BY o.\"id\" LIMIT $5"), "{sql}");
        assert!(sql.contains("o.\"aggregate_type\"::text = $4"), "{sql}");
        assert!(sql.contains("AT TIME ZONE 'UTC'"), "same select list as poll mode: {sql}");
        assert!(!sql.contains("last_error"), "{sql}");
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(ident("odd\"name"), "\"odd\"\"name\"");
    }
}
