//! Recording publish state: the checkpoint stage's writes, behind a trait so
//! the in-order settling logic is tested without Postgres.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;

use tokio_postgres::{Client, Statement};

use super::held::Marked;
use super::{get, Fence, OutboxSql, PreparedFence, Store, StoreError};

/// A row Kafka acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub id: i64,
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    /// The writing transaction, where known (see [`PublishStateStore::in_progress`]).
    pub xid: Option<u32>,
}

/// A row that is not published: held by its own error, or waiting behind
/// held row `waiting_for` of the same entity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldState {
    pub id: i64,
    /// Why, for operators (`relay held list`, `last_error`).
    pub error: String,
    /// Whether a publish was attempted (counts in `attempts`).
    pub attempted: bool,
    /// The held row this one waits behind; `None` for a held row.
    pub waiting_for: Option<i64>,
    /// The writing transaction, where known.
    pub xid: Option<u32>,
}

/// Where the checkpoint stage records publish state. Each call returns the
/// ids it matched: an id not matched is not visible yet (its commit is
/// decoded before it is visible to other sessions) and is tried again.
pub trait PublishStateStore {
    /// Marks rows published with their partition and offset.
    fn record_published(&self, rows: &[&Published]) -> impl Future<Output = Result<Vec<i64>, StoreError>> + Send;
    /// Records why rows are held or waiting. Rows already published are
    /// matched and left as they are.
    fn record_held(&self, rows: &[&HeldState]) -> impl Future<Output = Result<Vec<i64>, StoreError>> + Send;
    /// Which of `xids` are still in progress for a snapshot taken now: their
    /// rows are decoded (the commit is in the WAL) but not visible yet, e.g.
    /// while a synchronous standby has not confirmed the commit.
    fn in_progress(&self, xids: &[u32]) -> impl Future<Output = Result<HashSet<u32>, StoreError>> + Send;
}

impl super::Store {
    /// Which of `ids` exist and are not recorded as published.
    pub async fn unpublished_among(&self, client: &Client, ids: &[i64]) -> Result<HashSet<i64>, StoreError> {
        let sql = format!(
            "SELECT o.{id}::bigint FROM {table} AS o WHERE o.{id} = ANY($1) AND {unpublished}",
            id = self.sql.id,
            table = self.sql.table,
            unpublished = self.sql.unpublished("o"),
        );
        client.query(&sql, &[&ids]).await?.iter().map(|r| get(r, 0, &self.sql.names.id, "bigint")).collect()
    }

    /// Which of `ids` are recorded as published. In the side-table layout
    /// through the side table alone (primary-key probes of a narrow table):
    /// after a restart the slot streams the whole backlog through this.
    pub async fn published_among(&self, client: &Client, ids: &[i64]) -> Result<HashSet<i64>, StoreError> {
        if self.sql.side_table {
            let sql = format!("SELECT id FROM {} WHERE id = ANY($1)", self.sql.published_table);
            return client.query(&sql, &[&ids]).await?.iter().map(|r| get(r, 0, "id", "bigint")).collect();
        }
        let sql = format!(
            "SELECT o.{id}::bigint FROM {table} AS o WHERE o.{id} = ANY($1) AND {published}",
            id = self.sql.id,
            table = self.sql.table,
            published = self.sql.published("o"),
        );
        client.query(&sql, &[&ids]).await?.iter().map(|r| get(r, 0, &self.sql.names.id, "bigint")).collect()
    }
}

/// [`PublishStateStore`] on Postgres: one statement per batch (`UPDATE ...
/// FROM unnest(...) RETURNING id` of the outbox rows, or in the side-table
/// layout an `INSERT ... SELECT` of side rows), prepared once. Every write runs in a
/// transaction behind the fence of the lease term that makes it
/// ([`PreparedFence::begin`]): once another relay took over, nothing is
/// written and the write fails with [`StoreError::Fenced`].
pub struct PgPublishState {
    client: Client,
    publish: Statement,
    hold: Statement,
    id_column: String,
    /// `checkpoint.publish_state = "side_table"`.
    side_table: bool,
    fence: PreparedFence,
}

impl PgPublishState {
    pub async fn new(client: Client, sql: &OutboxSql, fence: Fence) -> Result<Self, StoreError> {
        let (table, id) = (&sql.table, &sql.id);
        let publish = client.prepare(&publish_statement(sql)).await?;
        // Matches published rows too (leaving them as they are), so that
        // "not matched" only ever means "not visible yet".
        let unpublished = sql.unpublished("o");
        let hold = client
            .prepare(&format!(
                "UPDATE {table} AS o SET \
                 attempts = CASE WHEN {unpublished} THEN o.attempts + u.tried ELSE o.attempts END, \
                 last_error = CASE WHEN {unpublished} THEN u.err ELSE o.last_error END, \
                 waiting_for = CASE WHEN {unpublished} THEN u.behind ELSE o.waiting_for END \
                 FROM unnest($1::bigint[], $2::text[], $3::int[], $4::bigint[]) AS u(id, err, tried, behind) \
                 WHERE o.{id} = u.id RETURNING o.{id}"
            ))
            .await?;
        let fence = fence.prepare(&client).await?;
        Ok(Self { client, publish, hold, id_column: sql.names.id.clone(), side_table: sql.side_table, fence })
    }

    /// Runs `write` (statements on this connection) in a transaction behind
    /// the fence: it commits only if the term is still the current one.
    async fn fenced<T>(&self, write: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
        self.fence.begin(&self.client).await?;
        match write.await {
            Ok(value) => {
                self.fence.commit(&self.client).await?;
                Ok(value)
            }
            Err(err) => {
                self.fence.rollback(&self.client).await;
                Err(err)
            }
        }
    }

    /// Releases rows that wait behind a row no longer held (see
    /// [`Store::release_orphaned_waiters`]), behind the fence.
    pub async fn release_orphaned_waiters(&self, store: &Store) -> Result<u64, StoreError> {
        self.fenced(store.release_orphaned_waiters(&self.client)).await
    }

    /// The lease epoch whose writes this store makes.
    pub fn epoch(&self) -> i64 {
        self.fence.epoch()
    }

    fn ids(&self, rows: Vec<tokio_postgres::Row>) -> Result<Vec<i64>, StoreError> {
        rows.iter().map(|r| get(r, 0, &self.id_column, "bigint")).collect()
    }
}

/// The statement that records a batch of published rows: `$1` ids, `$2`
/// topics, `$3` partitions, `$4` offsets. In the outbox-row layout it
/// returns the ids it matched: the rows visible to it. In the side table it
/// records every row and returns nothing. A row published again
/// (the catch-up and the stream both sent it) gets the latest delivery in
/// the outbox-row layout and keeps its first in the side table.
fn publish_statement(sql: &OutboxSql) -> String {
    let (table, id) = (&sql.table, &sql.id);
    const ROWS: &str = "unnest($1::bigint[], $2::text[], $3::int[], $4::bigint[]) AS u(id, topic, part, off)";
    if sql.side_table {
        let published = &sql.published_table;
        // One index probe per row, no write to the outbox row: the outbox
        // row is updated only when it carries an error from an earlier
        // attempt (a released held or waiting row, found through the small
        // held-rows index); publishing clears it, as in the outbox-row
        // layout. A row recorded already keeps its first record (a plain
        // INSERT behind NOT EXISTS: no speculative insertion, about half
        // the WAL of ON CONFLICT). Every row is recorded, visible yet or
        // not: its commit was decoded, so it is committed, and the side row
        // needs nothing of it. An id twice in one batch is inserted once.
        format!(
            "WITH u AS (SELECT * FROM {ROWS}), \
             cleared AS (UPDATE {table} AS o SET last_error = NULL, waiting_for = NULL \
               WHERE o.{id} = ANY($1) AND {marked}) \
             INSERT INTO {published} (id, published_at, kafka_topic, kafka_partition, kafka_offset) \
             SELECT DISTINCT ON (u.id) u.id, now(), u.topic, u.part, u.off FROM u \
             WHERE NOT EXISTS (SELECT 1 FROM {published} AS p WHERE p.id = u.id) ORDER BY u.id",
            marked = Marked::Any.on("o"),
        )
    } else {
        format!(
            "UPDATE {table} AS o SET published_at = now(), kafka_topic = u.topic, \
             kafka_partition = u.part, kafka_offset = u.off, attempts = o.attempts + 1, \
             last_error = NULL, waiting_for = NULL \
             FROM {ROWS} WHERE o.{id} = u.id RETURNING o.{id}"
        )
    }
}

/// `RELAY_BENCH_SKIP_PUBLISH_STATE` is set (benchmark builds only): the
/// harness measures a drain without publish-state writes, so their cost to
/// Postgres is known. Rows count as recorded without a write.
#[cfg(feature = "bench-switches")]
fn bench_skips_publish_state() -> bool {
    static SKIP: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SKIP.get_or_init(|| std::env::var_os("RELAY_BENCH_SKIP_PUBLISH_STATE").is_some())
}

impl PublishStateStore for PgPublishState {
    async fn record_published(&self, rows: &[&Published]) -> Result<Vec<i64>, StoreError> {
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        #[cfg(feature = "bench-switches")]
        if bench_skips_publish_state() {
            return Ok(ids);
        }
        let topics: Vec<&str> = rows.iter().map(|r| &*r.topic).collect();
        let partitions: Vec<i32> = rows.iter().map(|r| r.partition).collect();
        let offsets: Vec<i64> = rows.iter().map(|r| r.offset).collect();
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] = [&ids, &topics, &partitions, &offsets];
        if self.side_table {
            // Every row is recorded by it (inserted, or there already).
            self.fenced(async { Ok(self.client.execute(&self.publish, &params).await?) }).await?;
            return Ok(ids);
        }
        let matched = self.fenced(async { Ok(self.client.query(&self.publish, &params).await?) }).await?;
        self.ids(matched)
    }

    async fn record_held(&self, rows: &[&HeldState]) -> Result<Vec<i64>, StoreError> {
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        let errors: Vec<&str> = rows.iter().map(|r| r.error.as_str()).collect();
        let tried: Vec<i32> = rows.iter().map(|r| i32::from(r.attempted)).collect();
        let behind: Vec<Option<i64>> = rows.iter().map(|r| r.waiting_for).collect();
        let update = async { Ok(self.client.query(&self.hold, &[&ids, &errors, &tried, &behind]).await?) };
        let matched = self.fenced(update).await?;
        self.ids(matched)
    }

    async fn in_progress(&self, xids: &[u32]) -> Result<HashSet<u32>, StoreError> {
        // A transaction waiting for a synchronous standby is committed in
        // the commit log but not yet completed for snapshots: it is in the
        // snapshot's xip list or at/above its xmax. pg_visible_in_snapshot
        // answers both; the 32-bit xid pgoutput sends gets the epoch of the
        // snapshot's xmax (the previous one if it lies far above xmax).
        let xids: Vec<i64> = xids.iter().map(|&x| i64::from(x)).collect();
        let rows = self
            .client
            .query(
                "WITH s AS (SELECT snap, pg_snapshot_xmax(snap)::text::bigint AS xmax \
                    FROM (SELECT pg_current_snapshot() AS snap) AS c) \
                 SELECT x FROM unnest($1::bigint[]) AS x, s \
                 WHERE NOT pg_visible_in_snapshot(((((s.xmax >> 32) \
                     - CASE WHEN x > (s.xmax & 4294967295) + 2147483648 THEN 1 ELSE 0 END) << 32) | x)::text::xid8, s.snap)",
                &[&xids],
            )
            .await?;
        rows.iter().map(|r| Ok(u32::try_from(get::<i64>(r, 0, "xid", "bigint")?).unwrap_or(0))).collect()
    }
}
