//! The lease table (`<table>_relay_leader`, migration `0006_leader`, one row
//! per relay group: the sidecars sharing the outbox and `source.slot_name`)
//! and the fence every publish-state write of the relay passes. Times come
//! from the Postgres server's clock (`clock_timestamp()`), never from the
//! relays' clocks. The timing (renewing, self-fencing) is in `leader`.

use serde::Serialize;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Statement};

use super::{get, Store, StoreError};

/// The longest channel name Postgres accepts (NAMEDATALEN - 1).
const MAX_CHANNEL: usize = 63;

/// The statements on the lease row of one relay group.
#[derive(Debug, Clone)]
pub struct LeaseStore {
    /// `"schema"."table_relay_leader"`.
    table: String,
    slot_name: String,
    channel: String,
}

/// Who held the lease before this relay acquired it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Previous {
    /// Nobody: the first lease of the group.
    None,
    /// Its holder released it (graceful stop).
    Released,
    /// Its holder did not renew it in time (crash, pause, partition).
    Expired,
    /// This relay itself, in an earlier term it lost.
    Own,
}

impl Previous {
    /// The `reason` label of `outbox_relay_leader_takeovers_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "first",
            Self::Released => "released",
            Self::Expired => "expired",
            Self::Own => "own",
        }
    }
}

/// A lease another relay holds.
#[derive(Debug, Clone, PartialEq)]
pub struct HeldLease {
    pub holder: String,
    pub epoch: i64,
    /// Until it runs out, by the server's clock, unless renewed.
    pub remaining_seconds: f64,
}

/// A lease this relay just acquired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acquired {
    pub epoch: i64,
    pub previous: Previous,
}

/// What the lease row says, for `relay status`.
#[derive(Debug, Clone, Serialize)]
pub struct LeaseState {
    /// The instance id of the holder (`host:pid:random`).
    pub holder: String,
    /// Backend pid of the holder's lease session at its last renewal.
    pub holder_pid: Option<i32>,
    pub epoch: i64,
    /// When this epoch began (RFC 3339).
    pub since: String,
    /// Seconds since this epoch began.
    pub held_for_seconds: f64,
    /// Seconds since the last renewal.
    pub lease_age_seconds: f64,
    /// Seconds until the lease runs out; negative once it has.
    pub lease_remaining_seconds: f64,
    /// Whether the holder released it (graceful stop).
    pub released: bool,
    /// Whether a relay holds it now: neither released nor run out.
    pub active: bool,
}

impl Store {
    /// The lease of this relay group.
    pub fn lease(&self) -> LeaseStore {
        let table = &self.sql.leader_table;
        let mut channel = format!("{}_relay_leader", self.table_name);
        channel.truncate(MAX_CHANNEL);
        LeaseStore { table: table.clone(), slot_name: self.slot_name.clone(), channel }
    }
}

impl LeaseStore {
    /// The channel a release is notified on, so standbys take over at once.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// The lease another relay than `holder` holds now; `None` when it can
    /// be taken (none yet, run out, released, or `holder`'s own). A plain
    /// read: standbys ask this on every round without locking the row that
    /// the active relay's writes lock.
    pub async fn held_by_other(&self, client: &Client, holder: &str) -> Result<Option<HeldLease>, StoreError> {
        let sql = format!(
            "SELECT holder, epoch, extract(epoch FROM lease_until - clock_timestamp())::float8 FROM {} \
             WHERE slot_name = $1 AND lease_until > clock_timestamp() AND holder <> $2",
            self.table
        );
        match client.query_opt(&sql, &[&self.slot_name, &holder]).await? {
            None => Ok(None),
            Some(row) => Ok(Some(HeldLease {
                holder: get(&row, 0, "holder", "text")?,
                epoch: get(&row, 1, "epoch", "bigint")?,
                remaining_seconds: get(&row, 2, "lease_until", "float8")?,
            })),
        }
    }

    /// Takes the lease for `lease_ms` with the next epoch, if there is none,
    /// it ran out or was released, or `holder` holds it already (a term it
    /// lost locally: the new epoch fences the old term's writes). `None`
    /// when another relay holds it.
    ///
    /// Safety: the UPDATE of the conflicting row needs a lock that conflicts
    /// with the `FOR SHARE` lock every publish-state transaction of the
    /// current holder takes first (see [`Fence::begin`]), so it waits until
    /// those transactions are over; its condition is evaluated again on the
    /// row as they left it. After it commits, the old epoch matches nothing.
    pub async fn try_acquire(
        &self,
        client: &Client,
        holder: &str,
        lease_ms: i64,
    ) -> Result<Option<Acquired>, StoreError> {
        let sql = format!(
            "WITH prior AS (SELECT holder, released_at IS NOT NULL AS released FROM {table} WHERE slot_name = $1) \
             INSERT INTO {table} AS l (slot_name, holder, holder_pid, epoch, acquired_at, renewed_at, lease_until) \
             VALUES ($1, $2, pg_backend_pid(), 1, clock_timestamp(), clock_timestamp(), \
                     clock_timestamp() + $3::bigint * interval '1 millisecond') \
             ON CONFLICT (slot_name) DO UPDATE SET holder = EXCLUDED.holder, holder_pid = EXCLUDED.holder_pid, \
                 epoch = l.epoch + 1, acquired_at = clock_timestamp(), renewed_at = clock_timestamp(), \
                 lease_until = clock_timestamp() + $3::bigint * interval '1 millisecond', released_at = NULL \
             WHERE l.lease_until <= clock_timestamp() OR l.holder = EXCLUDED.holder \
             RETURNING l.epoch, (SELECT holder FROM prior), (SELECT released FROM prior)",
            table = self.table
        );
        let Some(row) = client.query_opt(&sql, &[&self.slot_name, &holder, &lease_ms]).await? else {
            return Ok(None);
        };
        let epoch = get(&row, 0, "epoch", "bigint")?;
        let prior: Option<String> = get(&row, 1, "holder", "text")?;
        let released: Option<bool> = get(&row, 2, "released_at", "boolean")?;
        let previous = match (prior, released) {
            (None, _) => Previous::None,
            (Some(prior), _) if prior == holder => Previous::Own,
            (Some(_), Some(true)) => Previous::Released,
            (Some(_), _) => Previous::Expired,
        };
        Ok(Some(Acquired { epoch, previous }))
    }

    /// Extends the lease of `holder`'s term `epoch` to `lease_ms` from now.
    /// `false` when that term is over (another relay took over).
    pub async fn renew(&self, client: &Client, holder: &str, epoch: i64, lease_ms: i64) -> Result<bool, StoreError> {
        let sql = format!(
            "UPDATE {} SET renewed_at = clock_timestamp(), holder_pid = pg_backend_pid(), \
             lease_until = clock_timestamp() + $4::bigint * interval '1 millisecond' \
             WHERE slot_name = $1 AND holder = $2 AND epoch = $3 AND released_at IS NULL",
            self.table
        );
        Ok(client.execute(&sql, &[&self.slot_name, &holder, &epoch, &lease_ms]).await? == 1)
    }

    /// Ends `holder`'s term `epoch` now and notifies the standbys (delivered
    /// at commit). `false` when that term was over already.
    pub async fn release(&self, client: &Client, holder: &str, epoch: i64) -> Result<bool, StoreError> {
        let sql = format!(
            "WITH released AS (UPDATE {} SET lease_until = clock_timestamp(), released_at = clock_timestamp(), \
             holder_pid = NULL WHERE slot_name = $1 AND holder = $2 AND epoch = $3 RETURNING 1) \
             SELECT pg_notify($4, '') FROM released",
            self.table
        );
        Ok(!client.query(&sql, &[&self.slot_name, &holder, &epoch, &self.channel]).await?.is_empty())
    }

    /// The lease row; `None` when no relay has led yet, or the table is
    /// missing (`relay migrate` not run since 0006).
    pub async fn read(&self, client: &Client) -> Result<Option<LeaseState>, StoreError> {
        let sql = format!(
            "SELECT holder, holder_pid, epoch, acquired_at, released_at IS NOT NULL, \
             extract(epoch FROM clock_timestamp() - renewed_at)::float8, \
             extract(epoch FROM lease_until - clock_timestamp())::float8, \
             extract(epoch FROM clock_timestamp() - acquired_at)::float8 \
             FROM {} WHERE slot_name = $1",
            self.table
        );
        let row = match client.query_opt(&sql, &[&self.slot_name]).await {
            Ok(row) => row,
            Err(err) if err.code() == Some(&SqlState::UNDEFINED_TABLE) => return Ok(None),
            Err(err) => return Err(err.into()),
        };
        let Some(row) = row else { return Ok(None) };
        let since: chrono::DateTime<chrono::Utc> = get(&row, 3, "acquired_at", "timestamptz")?;
        let released: bool = get(&row, 4, "released_at", "boolean")?;
        let remaining: f64 = get(&row, 6, "lease_until", "float8")?;
        Ok(Some(LeaseState {
            holder: get(&row, 0, "holder", "text")?,
            holder_pid: get(&row, 1, "holder_pid", "integer")?,
            epoch: get(&row, 2, "epoch", "bigint")?,
            since: since.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            held_for_seconds: get(&row, 7, "acquired_at", "float8")?,
            lease_age_seconds: get(&row, 5, "renewed_at", "float8")?,
            lease_remaining_seconds: remaining,
            released,
            active: !released && remaining > 0.0,
        }))
    }

    /// The fence of `holder`'s term `epoch`, for its publish-state writes.
    pub fn fence(&self, holder: &str, epoch: i64, lease_ms: i64) -> Fence {
        Fence {
            check: format!(
                "SELECT 1 FROM {} WHERE slot_name = $1 AND holder = $2 AND epoch = $3 FOR SHARE",
                self.table
            ),
            slot_name: self.slot_name.clone(),
            holder: holder.to_string(),
            epoch,
            lease_ms,
        }
    }
}

/// What a publish-state write of one term checks first: that the term is
/// still the current one.
#[derive(Debug, Clone)]
pub struct Fence {
    check: String,
    slot_name: String,
    holder: String,
    pub epoch: i64,
    lease_ms: i64,
}

/// A [`Fence`] prepared on the connection that makes the writes.
pub struct PreparedFence {
    fence: Fence,
    check: Statement,
}

impl Fence {
    /// Prepares the check on `client`, the connection of this term's
    /// writes, and makes the server end that session when it stays idle in
    /// a transaction for a lease (see [`PreparedFence::begin`]).
    pub async fn prepare(self, client: &Client) -> Result<PreparedFence, StoreError> {
        client.batch_execute(&format!("SET idle_in_transaction_session_timeout = {}", self.lease_ms)).await?;
        let check = client.prepare(&self.check).await?;
        Ok(PreparedFence { fence: self, check })
    }
}

impl PreparedFence {
    pub fn epoch(&self) -> i64 {
        self.fence.epoch
    }

    /// Begins a transaction for one publish-state write of this term and
    /// locks the lease row `FOR SHARE` where it still names this term's
    /// holder and epoch; when it does not, rolls back and returns
    /// [`StoreError::Fenced`]. The caller writes, then calls [`Self::commit`].
    ///
    /// Safety (why two relays never both record publish state, and a relay
    /// that lost its lease records nothing, even one that wakes up from a
    /// pause in the middle of a batch): a takeover is an UPDATE of the lease
    /// row ([`LeaseStore::try_acquire`]), which needs a row lock that
    /// conflicts with `FOR SHARE`.
    /// - A write transaction that locked the row first holds the takeover
    ///   back until it commits: every write of the old term commits before
    ///   the new term exists, and the new leader reads the publish state
    ///   only after that.
    /// - A write transaction that comes after the takeover (or waits on its
    ///   lock) finds the row with another epoch (Postgres evaluates the
    ///   condition again on the updated row) and writes nothing; the caller
    ///   gets [`StoreError::Fenced`], ends the run and steps down, never
    ///   retrying into a duplicate.
    /// - A relay paused while a transaction is open cannot hold a takeover
    ///   back for long: its session has `idle_in_transaction_session_timeout`
    ///   set to the lease, so the server ends it and rolls the write back.
    ///
    /// Tests: `tests/it/slow/leadership.rs`,
    /// `a_paused_active_relay_records_nothing_after_a_standby_took_over`
    /// (no publish-state write by the paused relay after the takeover) and
    /// `ending_the_lease_session_never_makes_two_actives`.
    pub async fn begin(&self, client: &Client) -> Result<(), StoreError> {
        let f = &self.fence;
        // Pipelined: one round trip for both.
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [&f.slot_name, &f.holder, &f.epoch];
        let (begun, held) = tokio::join!(client.batch_execute("BEGIN"), client.query_opt(&self.check, &params));
        let outcome = match (begun, held) {
            (Ok(()), Ok(Some(_))) => return Ok(()),
            (Ok(()), Ok(None)) => Err(StoreError::Fenced { epoch: f.epoch }),
            (Err(err), _) | (_, Err(err)) => Err(err.into()),
        };
        let _ = client.batch_execute("ROLLBACK").await;
        outcome
    }

    pub async fn commit(&self, client: &Client) -> Result<(), StoreError> {
        Ok(client.batch_execute("COMMIT").await?)
    }

    pub async fn rollback(&self, client: &Client) {
        let _ = client.batch_execute("ROLLBACK").await;
    }
}
