//! The publish-state picture from Postgres alone: `relay status` prints it
//! (usable while the relay is down) and the relay samples it into gauges.

use serde::Serialize;
use tokio_postgres::Client;

use super::held::Marked;
use super::{get, LeaseState, Store, StoreError};

/// Pending rows are counted one by one up to this many; above it
/// `pending` is estimated from the range of pending ids, so a sample costs
/// the same on a backlog of a million rows as on one of ten thousand
/// (counting every row would make each sample's cost grow with the backlog).
pub const PENDING_COUNT_LIMIT: i64 = 10_000;

/// The outbox's publish state.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Rows not yet published, not held and not waiting: counted when at
    /// most [`PENDING_COUNT_LIMIT`], estimated above it.
    pub pending: i64,
    /// `pending` is an estimate: over [`PENDING_COUNT_LIMIT`] rows are
    /// pending, and the estimate is the span of their ids (it also counts
    /// ids that never committed and held rows among them).
    pub pending_estimated: bool,
    /// Age of the oldest pending row, seconds; above
    /// [`PENDING_COUNT_LIMIT`] the oldest of that many lowest pending ids.
    pub oldest_pending_age_seconds: Option<f64>,
    /// Rows held by their own error (not published, `last_error` set, not
    /// waiting, not skipped): each waits for an operator.
    pub held: i64,
    /// Rows waiting behind a held row of their entity (`waiting_for`).
    pub waiting: i64,
    /// `held` plus `waiting`: every row `relay held list` shows.
    pub held_or_waiting: i64,
    /// The 0.1.0 name of `held_or_waiting`.
    pub failed: i64,
    /// Held rows an operator skipped (`relay held skip`): settled, never published.
    pub skipped: i64,
    /// When the last row was published (RFC 3339).
    pub last_published_at: Option<String>,
    /// Logical mode: WAL the slot retains, bytes.
    pub slot_retained_wal_bytes: Option<i64>,
    /// Logical mode: whether a relay is streaming from the slot.
    pub slot_active: Option<bool>,
    /// The leader lease: who is active, since when, lease age, epoch.
    /// `None` when no relay has led yet.
    pub leader: Option<LeaseState>,
}

impl Store {
    /// Reads the status; cheap on a large table (partial indexes and
    /// primary-key ranges only). `logical`: also read the slot.
    pub async fn status(&self, client: &mut Client, logical: bool) -> Result<Status, StoreError> {
        let last_published = if self.sql.side_table {
            format!("SELECT max(published_at) FROM {}", self.sql.published_table)
        } else {
            format!("SELECT max(published_at) FROM {} WHERE published_at IS NOT NULL", self.sql.table)
        };
        let tx = client.transaction().await?;
        // Every part is written for an index; right after a bulk insert,
        // before autovacuum's ANALYZE, the planner's stale statistics can
        // make it scan and sort the whole outbox on each sample instead.
        tx.batch_execute("SET LOCAL enable_seqscan = off; SET LOCAL enable_sort = off").await?;
        let row = tx.query_one(&self.counts_statement(), &[]).await?;
        let last: Option<chrono::DateTime<chrono::Utc>> = tx.query_one(&last_published, &[]).await?.try_get(0)?;
        tx.commit().await?;
        let (mut retained, mut active) = (None, None);
        if logical {
            if let Some(slot) = client
                .query_opt(
                    "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint, active \
                     FROM pg_replication_slots WHERE slot_name = $1",
                    &[&self.slot_name],
                )
                .await?
            {
                retained = slot.try_get(0)?;
                active = Some(slot.try_get(1)?);
            }
        }
        let (held, waiting): (i64, i64) =
            (get(&row, 2, "last_error", "bigint")?, get(&row, 3, "waiting_for", "bigint")?);
        let leader = self.lease().read(client).await?;
        let counted: i64 = get(&row, 0, "published_at", "bigint")?;
        let pending_estimated = get::<i64>(&row, 6, &self.sql.names.id, "bigint")? > PENDING_COUNT_LIMIT;
        let pending = if pending_estimated {
            get::<Option<i64>>(&row, 5, &self.sql.names.id, "bigint")?.unwrap_or(0).max(counted)
        } else {
            counted
        };
        Ok(Status {
            pending,
            pending_estimated,
            oldest_pending_age_seconds: get(&row, 1, &self.sql.names.occurred_at, "float8")?,
            held,
            waiting,
            held_or_waiting: held + waiting,
            failed: held + waiting,
            skipped: get(&row, 4, "skipped_at", "bigint")?,
            last_published_at: last.map(|t| t.to_rfc3339()),
            slot_retained_wal_bytes: retained,
            slot_active: active,
            leader,
        })
    }
}

impl Store {
    /// Pending count (up to `PENDING_COUNT_LIMIT + 1`), oldest pending age
    /// (seconds), held, waiting, skipped, and the span of pending ids (the
    /// estimate when the count reached its limit). Every part reads a
    /// bounded number of rows, through partial indexes and primary-key
    /// ranges.
    ///
    /// In the side-table layout nothing on the outbox row marks it
    /// published, so pending rows are found by id: those above the highest
    /// published id, plus released held rows below it (through the
    /// released-rows index). A row of a transaction that commits after
    /// rows with higher ids were published is not counted until it is
    /// published, a moment later: the slot streams it.
    fn counts_statement(&self) -> String {
        let (table, id, occurred) = (&self.sql.table, &self.sql.id, &self.sql.occurred_at);
        let limit = PENDING_COUNT_LIMIT + 1;
        // Through the held-rows index: rows with `last_error` are never
        // published, so the states need no publish-state probe.
        let held = format!(
            "held AS (SELECT \
               count(*) FILTER (WHERE {held}) AS held, \
               count(*) FILTER (WHERE {waiting}) AS waiting, \
               count(*) FILTER (WHERE {skipped}) AS skipped \
               FROM {table} AS o WHERE {marked})",
            held = Marked::Held.on("o"),
            waiting = Marked::Waiting.on("o"),
            skipped = Marked::Skipped.on("o"),
            marked = Marked::Any.on("o"),
        );
        // `lowest`: the lowest unpublished ids, held ones too (a filter
        // inside the limit would let many held rows make it walk the
        // table); when it fills, the count is over its limit.
        const COUNTS: &str = "SELECT (SELECT count(*) FROM pending), \
             (SELECT extract(epoch FROM now() - min(at))::float8 FROM pending), \
             held.held, held.waiting, held.skipped";
        if !self.sql.side_table {
            // The lowest unpublished ids through the unpublished-rows index.
            return format!(
                "WITH lowest AS (SELECT {occurred}::timestamptz AS at, last_error FROM {table} \
                   WHERE published_at IS NULL ORDER BY {id} LIMIT {limit}), \
                 pending AS (SELECT at FROM lowest WHERE last_error IS NULL), \
                 {held} \
                 {COUNTS}, \
                 (SELECT (max({id}) - min({id}) + 1)::bigint FROM {table} WHERE published_at IS NULL), \
                 (SELECT count(*) FROM lowest) \
                 FROM held"
            );
        }
        let published = &self.sql.published_table;
        format!(
            "WITH m AS (SELECT coalesce(max(id), 0) AS top FROM {published}), \
             lowest AS (SELECT o.{occurred}::timestamptz AS at, o.last_error FROM {table} AS o \
               WHERE o.{id} > (SELECT top FROM m) ORDER BY o.{id} LIMIT {limit}), \
             released AS (SELECT o.{occurred}::timestamptz AS at FROM {table} AS o \
               WHERE o.retry_requested_at IS NOT NULL AND o.published_at IS NULL AND o.{id} <= (SELECT top FROM m) \
                 AND {pending} LIMIT {limit}), \
             pending AS (SELECT at FROM lowest WHERE last_error IS NULL UNION ALL SELECT at FROM released), \
             {held} \
             {COUNTS}, \
             (SELECT (coalesce(max(o.{id}), 0) - (SELECT top FROM m))::bigint FROM {table} AS o), \
             greatest((SELECT count(*) FROM lowest), (SELECT count(*) FROM released)) \
             FROM held",
            pending = self.sql.pending("o"),
        )
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.pending_estimated {
            writeln!(
                f,
                "pending rows:            about {} (over {PENDING_COUNT_LIMIT}: estimated from their ids)",
                self.pending
            )?;
        } else {
            writeln!(f, "pending rows:            {}", self.pending)?;
        }
        match self.oldest_pending_age_seconds {
            Some(age) => writeln!(f, "oldest pending row age:  {age:.1} s")?,
            None => writeln!(f, "oldest pending row age:  -")?,
        }
        writeln!(f, "held rows:               {}", self.held)?;
        writeln!(f, "waiting rows:            {} (behind held rows of their entity)", self.waiting)?;
        if self.skipped > 0 {
            writeln!(f, "skipped held rows:       {}", self.skipped)?;
        }
        writeln!(f, "last published at:       {}", self.last_published_at.as_deref().unwrap_or("never"))?;
        if let Some(bytes) = self.slot_retained_wal_bytes {
            writeln!(f, "slot retained WAL:       {bytes} bytes")?;
        }
        if let Some(active) = self.slot_active {
            writeln!(f, "slot active:             {active}")?;
        }
        match &self.leader {
            None => writeln!(f, "active relay:            none yet (no relay has held the lease)")?,
            Some(lease) if lease.active => {
                writeln!(
                    f,
                    "active relay:            {} (epoch {}), since {} ({:.1} s)",
                    lease.holder, lease.epoch, lease.since, lease.held_for_seconds
                )?;
                writeln!(
                    f,
                    "lease:                   renewed {:.1} s ago, runs out in {:.1} s",
                    lease.lease_age_seconds, lease.lease_remaining_seconds
                )?;
            }
            Some(lease) => {
                let (holder, ago) = (&lease.holder, -lease.lease_remaining_seconds);
                if lease.released {
                    writeln!(
                        f,
                        "active relay:            none: {holder} released the lease {ago:.1} s ago (epoch {})",
                        lease.epoch
                    )?;
                } else {
                    writeln!(
                        f,
                        "active relay:            none: the lease of {holder} ran out {ago:.1} s ago (epoch {})",
                        lease.epoch
                    )?;
                }
            }
        }
        Ok(())
    }
}
