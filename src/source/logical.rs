//! Logical replication source: `pgoutput` over the streaming replication
//! protocol.
//!
//! Why `pgwire-replication`: it speaks the real streaming protocol
//! (`START_REPLICATION ... LOGICAL`), answers keepalives by itself, bounds its
//! event buffer, and reports exactly the flushed position the caller sets with
//! `update_applied_lsn`, never more. The alternative with plain tokio-postgres,
//! `pg_logical_slot_peek_binary_changes` in a loop, re-decodes the WAL from the
//! confirmed position on every call (quadratic on a large transaction) and adds
//! a polling delay; `pg_walstream` is younger and less used.
//!
//! Order: Postgres decodes whole transactions in commit order, so rows arrive
//! in commit order whatever their ids. The position confirmed to Postgres is
//! the end LSN of a commit whose rows, and all before them, are recorded by
//! the checkpoint stage: a crash resends at most the unconfirmed transactions.

use std::time::Duration;

use chrono::{DateTime, Utc};
use pgwire_replication::{Lsn as PgLsn, ReplicationClient, ReplicationConfig, ReplicationEvent, TlsConfig};
use secrecy::ExposeSecret;
use tokio::sync::{mpsc, watch};
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use super::pgoutput::{self, Message};
use crate::config::{Config, OutboxConfig};
use crate::database;
use crate::error_class::ErrorClass;
use crate::outbox::{pg_epoch_micros_to_utc, CommitBoundary, Lsn, RowError, RowLayout, SourceEvent};
use crate::store::{Store, StoreError};
use crate::telemetry::metrics;

/// Why the logical source stopped.
#[derive(Debug, thiserror::Error)]
pub enum LogicalError {
    #[error("replication connection failed")]
    Replication(#[from] pgwire_replication::PgWireError),
    #[error("cannot decode the replication stream")]
    Decode(#[from] pgoutput::DecodeError),
    #[error("outbox row cannot be read")]
    Row(#[from] RowError),
    #[error("postgres")]
    Postgres(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("invalid postgres.url for replication")]
    Url(#[source] tokio_postgres::Error),
    #[error("the replication stream ended")]
    StreamEnded,
}

impl LogicalError {
    /// A replication connection error by its type and the SQLSTATE the
    /// server sent (`replication_class`); everything else restarts the run.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Replication(e) => replication_class(e),
            Self::Decode(e) => e.class(),
            Self::Row(e) => e.class(),
            // The stream's own reads (the resend check, which rows are
            // recorded) are retried whatever their SQLSTATE.
            Self::Postgres(_) | Self::Store(_) => ErrorClass::Retry,
            // `prepare` connected with the same URL before the stream starts.
            Self::Url(_) => ErrorClass::Retry,
            Self::StreamEnded => ErrorClass::Retry,
        }
    }
}

/// The class of a replication connection error: typed variants, and the
/// SQLSTATE the server sent. The one reading of message text:
/// pgwire-replication reports a server error as text only, so its SQLSTATE
/// is taken from the `(SQLSTATE xxxxx)` the text ends with
/// ([`server_sql_state`]).
fn replication_class(err: &pgwire_replication::PgWireError) -> ErrorClass {
    use pgwire_replication::PgWireError as E;
    match err {
        E::Auth(_) => database::sql_state_class(Some(&SqlState::INVALID_PASSWORD)),
        E::Tls(_) => ErrorClass::operator("check postgres.url's sslmode and postgres.tls_ca_file"),
        E::Server(message) => database::sql_state_class(server_sql_state(message).as_ref()),
        // I/O, protocol and the rest; the enum is `#[non_exhaustive]`.
        _ => ErrorClass::Retry,
    }
}

/// The SQLSTATE code pgwire-replication appends to a server error
/// (`... (SQLSTATE 42501)`).
fn server_sql_state(message: &str) -> Option<SqlState> {
    let start = message.rfind("(SQLSTATE ")? + "(SQLSTATE ".len();
    let code = message.get(start..start + 5)?;
    Some(SqlState::from_code(code))
}

/// Streams outbox inserts from the slot in commit order.
pub struct LogicalSource {
    config: Config,
}

impl LogicalSource {
    pub fn new(config: Config) -> Self {
        Self { config }
    }

    fn replication_config(&self) -> Result<ReplicationConfig, LogicalError> {
        let pg: tokio_postgres::Config = self.config.postgres.url.expose_secret().parse().map_err(LogicalError::Url)?;
        let host = match pg.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => "localhost".to_string(),
        };
        // As the regular connections: `prefer` (the default) encrypts when
        // the server offers TLS, `require` insists, and with
        // postgres.tls_ca_file the server is verified (the chain, and the
        // host name unless the host is an IP address, which this client
        // cannot match against a certificate).
        use tokio_postgres::config::SslMode as Mode;
        let tls = match (pg.get_ssl_mode(), self.config.postgres.tls_ca_file.clone()) {
            (Mode::Disable, _) => TlsConfig::disabled(),
            (_, Some(ca)) if host.parse::<std::net::IpAddr>().is_ok() => TlsConfig::verify_ca(Some(ca)),
            (_, Some(ca)) => TlsConfig::verify_full(Some(ca)),
            (Mode::Require, None) => TlsConfig::require(),
            (_, None) => {
                let mut tls = TlsConfig::require();
                tls.mode = pgwire_replication::SslMode::Prefer;
                tls
            }
        };
        let source = &self.config.source;
        let mut replication = ReplicationConfig::default();
        replication.host = host;
        replication.port = pg.get_ports().first().copied().unwrap_or(5432);
        replication.user = pg.get_user().unwrap_or("postgres").to_string();
        replication.password = pg.get_password().map(|p| String::from_utf8_lossy(p).into_owned()).unwrap_or_default();
        replication.database = pg.get_dbname().unwrap_or("postgres").to_string();
        replication.tls = tls;
        replication.slot = source.slot_name.clone();
        replication.publication = source.publication_name.as_str().into();
        // Zero: resume from the slot's confirmed_flush_lsn.
        replication.start_lsn = PgLsn::from_u64(0);
        replication.status_interval = Duration::from_millis(source.status_interval_ms);
        replication.idle_wakeup_interval = Duration::from_millis(source.status_interval_ms.max(1_000));
        // Bounded: the worker stops reading the socket when this is full.
        replication.buffer_events = source.batch_rows.max(64);
        Ok(replication)
    }

    /// Runs until `stop` turns true or the stream fails. Rows go to `out`
    /// (bounded: a full channel pauses reading); the checkpoint stage reports
    /// recorded commit boundaries through `confirmed`, and this source
    /// forwards the WAL ones to Postgres (a catch-up phase before the stream
    /// confirms poll batches, which are never WAL positions). On a graceful
    /// stop it waits for the checkpoint stage to finish and confirms its
    /// final position.
    ///
    /// `control` is a regular connection: it reads where the WAL ends when
    /// the stream starts, and the publish state of rows streamed again
    /// below that point (see [`Resent`]).
    pub async fn run(
        &self,
        control: &Client,
        out: mpsc::Sender<SourceEvent>,
        mut confirmed: watch::Receiver<Option<CommitBoundary>>,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), LogicalError> {
        confirmed.mark_unchanged();
        let resent = Resent::start(control, &self.config).await?;
        let mut client = ReplicationClient::connect(self.replication_config()?).await?;
        tracing::info!(slot = %self.config.source.slot_name, resend_window_end = %resent.until, "replication stream started");
        let result = self.stream(&mut client, resent, &out, &mut confirmed, &mut stop).await;
        drop(out);
        if result.is_ok() {
            // Graceful: forward confirmations until the checkpoint stage is done.
            while confirmed.changed().await.is_ok() {
                confirm(&client, *confirmed.borrow_and_update());
            }
            confirm(&client, *confirmed.borrow());
            if let Err(err) = client.shutdown().await {
                tracing::debug!(error = %err, "replication stream shutdown");
            }
        } else {
            client.abort();
        }
        result
    }

    async fn stream(
        &self,
        client: &mut ReplicationClient,
        mut resent: Resent<'_>,
        out: &mpsc::Sender<SourceEvent>,
        confirmed: &mut watch::Receiver<Option<CommitBoundary>>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), LogicalError> {
        let mut decoder = Decoder::default();
        loop {
            if *stop.borrow() {
                return Ok(());
            }
            tokio::select! {
                biased;
                _ = stop.changed() => return Ok(()),
                changed = confirmed.changed() => {
                    if changed.is_err() {
                        // The checkpoint stage is gone; the pipeline reports why.
                        return Ok(());
                    }
                    confirm(client, *confirmed.borrow_and_update());
                }
                event = client.recv() => {
                    let event = event?.ok_or(LogicalError::StreamEnded)?;
                    let Some(event) = decoder.decode(event, &self.config.outbox)? else { continue };
                    let position = match &event {
                        SourceEvent::Row(_) => decoder.final_lsn,
                        SourceEvent::Boundary(CommitBoundary::Wal(lsn)) => *lsn,
                        SourceEvent::Boundary(CommitBoundary::Batch(_)) => Lsn(u64::MAX),
                    };
                    if position <= resent.until {
                        resent.queue(event);
                        if resent.is_full() && !resent.flush(out).await? {
                            return Ok(());
                        }
                        continue;
                    }
                    // Past the window: what was queued goes first, checked.
                    if !resent.flush(out).await? || out.send(event).await.is_err() {
                        return Ok(());
                    }
                }
                // The stream paused inside the window: do not hold rows back.
                // An async block: select! builds every branch's future even
                // when disabled, and a bare sleep reads the clock to do so,
                // for each of the three events of a one-row transaction.
                _ = async { tokio::time::sleep(RESENT_IDLE).await }, if resent.is_pending() => {
                    if !resent.flush(out).await? {
                        return Ok(());
                    }
                }
            }
        }
    }
}

/// Turns replication events into source events: outbox rows with their
/// commit time, and a commit boundary at each commit (and at idle
/// keepalives between transactions).
#[derive(Default)]
struct Decoder {
    /// The outbox relation's id and column layout, once announced.
    layout: Option<(u32, RowLayout)>,
    committed_at: Option<DateTime<Utc>>,
    /// The commit position of the transaction being decoded.
    final_lsn: Lsn,
    xid: u32,
    in_transaction: bool,
    /// The transaction being decoded has outbox rows.
    has_rows: bool,
    last_boundary: Lsn,
}

impl Decoder {
    fn decode(&mut self, event: ReplicationEvent, outbox: &OutboxConfig) -> Result<Option<SourceEvent>, LogicalError> {
        Ok(match event {
            ReplicationEvent::Begin { commit_time_micros, final_lsn, xid } => {
                self.in_transaction = true;
                self.has_rows = false;
                self.xid = xid;
                self.final_lsn = Lsn(final_lsn.as_u64());
                self.committed_at = pg_epoch_micros_to_utc(commit_time_micros);
                None
            }
            ReplicationEvent::XLogData { data, .. } => match pgoutput::decode(data)? {
                Message::Relation { id, namespace, name, columns } => {
                    if namespace == outbox.schema && name == outbox.table {
                        let names: Vec<String> = columns.into_iter().map(|c| c.name).collect();
                        self.layout = Some((id, RowLayout::new(&names, &outbox.columns)?));
                    }
                    None
                }
                Message::Insert { relation_id, values } => match &self.layout {
                    Some((id, layout)) if *id == relation_id => {
                        let mut row = layout.row(&values, self.committed_at)?;
                        row.xid = Some(self.xid);
                        self.has_rows = true;
                        tracing::trace!(row_id = row.id, "row read");
                        Some(SourceEvent::Row(row))
                    }
                    _ => None,
                },
                Message::Other(_) => None,
            },
            ReplicationEvent::Commit { end_lsn, .. } => {
                tracing::trace!(end_lsn = %end_lsn, "commit");
                self.in_transaction = false;
                if let Some(committed_at) = self.committed_at.filter(|_| self.has_rows) {
                    metrics::source_delay(committed_at);
                }
                self.boundary(Lsn(end_lsn.as_u64()))
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                // Between transactions everything before wal_end has been
                // sent: confirming it lets an idle slot release WAL.
                let position = Lsn(wal_end.as_u64());
                if !self.in_transaction && position > self.last_boundary {
                    tracing::trace!(wal_end = %wal_end, "idle position");
                    self.boundary(position)
                } else {
                    None
                }
            }
            ReplicationEvent::Message { .. } | ReplicationEvent::StoppedAt { .. } => None,
        })
    }

    fn boundary(&mut self, position: Lsn) -> Option<SourceEvent> {
        self.last_boundary = position;
        metrics::source_position(position.0);
        Some(SourceEvent::Boundary(CommitBoundary::Wal(position)))
    }
}

/// Rows streamed again after a restart: the slot resumes at its confirmed
/// position, which lags behind what is recorded (it is reported every
/// `source.status_interval_ms`, and a large transaction has no boundary
/// before its commit). The publish state is the truth; the slot position is
/// only a lower bound. So every row of a transaction that committed before
/// this stream started (commit position at or below `until`, the WAL end
/// then) may have been published by an earlier run, and is checked against
/// its publish state, in chunks, before it goes on: rows already recorded as
/// published are not sent again. A crash then repeats only rows Kafka
/// acknowledged that were not recorded yet (the in-flight window). Rows
/// committed after the start cannot have been published before, and cost
/// nothing.
struct Resent<'a> {
    client: &'a Client,
    store: Store,
    until: Lsn,
    chunk: usize,
    /// Rows and commit boundaries of the window, in stream order, not sent
    /// yet: one lookup covers many single-row transactions.
    queued: Vec<SourceEvent>,
    rows: usize,
}

/// How long queued events of the window wait when the stream pauses.
const RESENT_IDLE: Duration = Duration::from_millis(20);

impl<'a> Resent<'a> {
    async fn start(client: &'a Client, config: &Config) -> Result<Self, LogicalError> {
        let until: i64 =
            client.query_one("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint", &[]).await?.try_get(0)?;
        Ok(Self {
            client,
            store: Store::new(config),
            until: Lsn(u64::try_from(until).unwrap_or(0)),
            chunk: config.source.batch_rows.max(1),
            queued: Vec::new(),
            rows: 0,
        })
    }

    fn queue(&mut self, event: SourceEvent) {
        self.rows += usize::from(matches!(event, SourceEvent::Row(_)));
        self.queued.push(event);
    }

    /// A chunk is due: as many rows, or events, as `source.batch_rows`.
    fn is_full(&self) -> bool {
        self.rows >= self.chunk || self.queued.len() >= 2 * self.chunk
    }

    fn is_pending(&self) -> bool {
        !self.queued.is_empty()
    }

    /// Sends the queued events in order, leaving out rows already recorded
    /// as published. Returns false when the downstream stages are gone.
    async fn flush(&mut self, out: &mpsc::Sender<SourceEvent>) -> Result<bool, LogicalError> {
        let ids: Vec<i64> = self
            .queued
            .iter()
            .filter_map(|e| match e {
                SourceEvent::Row(row) => Some(row.id),
                SourceEvent::Boundary(_) => None,
            })
            .collect();
        let published =
            if ids.is_empty() { Default::default() } else { self.store.published_among(self.client, &ids).await? };
        if !published.is_empty() {
            metrics::resend_skipped(published.len());
            tracing::debug!(skipped = published.len(), of = ids.len(), "rows streamed again are published already");
        }
        self.rows = 0;
        for event in self.queued.drain(..) {
            let skip = matches!(&event, SourceEvent::Row(row) if published.contains(&row.id));
            if !skip && out.send(event).await.is_err() {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// Confirms a recorded WAL commit boundary to Postgres; poll batches (from
/// a catch-up phase before the stream) are not WAL positions and are never
/// forwarded (Postgres 15 moves confirmed_flush_lsn backwards if told so).
fn confirm(client: &ReplicationClient, boundary: Option<CommitBoundary>) {
    if let Some(CommitBoundary::Wal(lsn)) = boundary {
        client.update_applied_lsn(PgLsn::from_u64(lsn.0));
        metrics::confirmed_position(lsn.0);
    }
}
