//! Wires source -> sink -> checkpoint, runs it while this relay holds the
//! leader lease ([`crate::leader`]), and restarts the pipeline from its last
//! confirmed commit boundary after any failure that a retry can cure. A
//! failure that only an operator can cure (role lacks a privilege, table
//! missing, authentication or TLS misconfigured, publication covers the
//! wrong table) stops the relay with a one-line message naming the fix, so
//! a sidecar shows the reason in CrashLoopBackOff instead of retrying in
//! silence.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::sync::{mpsc, watch};
use tokio_postgres::error::SqlState;

use crate::checkpoint::{Checkpoint, CheckpointError};
use crate::codec::{Codec, SchemaError};
use crate::config::{Config, Delivery, SourceMode};
use crate::database::{self, DatabaseError};
use crate::hold::{HeldEntities, TooManyHeld};
use crate::leader::{Candidate, LeaderError, Lost, Term};
use crate::outbox::CommitBoundary;
use crate::sink::{self, KafkaSink, SinkError};
use crate::source::catchup;
use crate::source::logical::{LogicalError, LogicalSource};
use crate::source::poll::{PollError, PollSource};
use crate::source::slot::{self, SlotError, SlotHealth};
use crate::store::{CatchUpReason, Fence, PgPublishState, Store, StoreError};
use crate::telemetry::{metrics, ErrorChain, Health};

/// Why one run of the pipeline ended.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Database(#[from] DatabaseError),
    #[error("postgres")]
    Postgres(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Source(#[from] LogicalError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Poll(#[from] PollError),
    #[error(transparent)]
    Slot(#[from] SlotError),
    #[error(transparent)]
    TooManyHeld(#[from] TooManyHeld),
    #[error(transparent)]
    Leader(#[from] LeaderError),
    /// Retrying cannot help: the relay stops and says what to fix.
    #[error("stopped until an operator acts: {fix}")]
    NeedsOperator {
        fix: String,
        #[source]
        cause: Box<PipelineError>,
    },
}

/// What to do about a failed run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorPolicy {
    /// Restart the run with backoff (connection lost, broker down).
    Retry,
    /// Stop the relay and tell the operator this fix.
    Operator(String),
}

impl PipelineError {
    /// A publish-state write was refused because another relay took the
    /// lease over: the run ends and the relay steps down, it does not retry.
    pub fn is_fenced(&self) -> bool {
        matches!(
            self,
            Self::Store(StoreError::Fenced { .. })
                | Self::Checkpoint(CheckpointError::Record(StoreError::Fenced { .. }))
                | Self::Sink(SinkError::Fenced(_))
        )
    }

    fn component(&self) -> &'static str {
        match self {
            Self::Database(_)
            | Self::Postgres(_)
            | Self::Store(_)
            | Self::Source(_)
            | Self::Poll(_)
            | Self::Slot(_)
            | Self::Leader(_) => "postgres",
            Self::Sink(_) | Self::TooManyHeld(_) | Self::Checkpoint(CheckpointError::TooManyHeld(_)) => "kafka",
            Self::Schema(_) => "registry",
            Self::Checkpoint(CheckpointError::Delivery(_)) => "kafka",
            Self::Checkpoint(_) => "postgres",
            Self::NeedsOperator { cause, .. } => cause.component(),
        }
    }

    /// Whether a retry can cure this failure. Decided by SQLSTATE codes,
    /// typed replication errors and slot state. The one reading of message
    /// text: pgwire-replication reports a server error as text only, so its
    /// SQLSTATE is taken from the `(SQLSTATE xxxxx)` the text ends with
    /// (`server_sql_state`).
    pub fn policy(&self) -> ErrorPolicy {
        let postgres = match self {
            Self::Database(DatabaseError::Url(_) | DatabaseError::Tls(_))
            | Self::Leader(LeaderError::Database(DatabaseError::Url(_) | DatabaseError::Tls(_))) => {
                return ErrorPolicy::Operator("correct postgres.url / postgres.tls_ca_file".into())
            }
            Self::Database(DatabaseError::Connect(e) | DatabaseError::Query(e))
            | Self::Leader(LeaderError::Database(DatabaseError::Connect(e) | DatabaseError::Query(e)))
            | Self::Postgres(e) => e.code(),
            Self::Leader(LeaderError::Store(e)) => e.sql_state(),
            Self::Store(StoreError::NoTable(table)) => {
                return ErrorPolicy::Operator(format!("outbox table {table} does not exist: run `relay migrate`"))
            }
            Self::Store(StoreError::Layout { .. }) => {
                return ErrorPolicy::Operator("run `relay migrate` with this config".into())
            }
            Self::Store(e) => e.sql_state(),
            Self::Poll(PollError::Store(StoreError::NoTable(table))) => {
                return ErrorPolicy::Operator(format!("outbox table {table} does not exist: run `relay migrate`"))
            }
            Self::Poll(PollError::Store(e)) => e.sql_state(),
            Self::Poll(PollError::Postgres(e) | PollError::Database(DatabaseError::Connect(e))) => e.code(),
            Self::Checkpoint(CheckpointError::Record(e)) => e.sql_state(),
            Self::Slot(SlotError::NotAllowed { .. }) => {
                return ErrorPolicy::Operator("recreate the slot, or set source.create_slot = true".into())
            }
            Self::Slot(SlotError::PublicationMismatch { .. } | SlotError::PublicationNotViaRoot { .. }) => {
                return ErrorPolicy::Operator("correct the publication as said below".into())
            }
            Self::Slot(SlotError::Postgres(e)) => e.code(),
            Self::Slot(SlotError::Store(e)) => e.sql_state(),
            Self::Source(LogicalError::Replication(e)) => return replication_policy(e),
            Self::Schema(e) if e.is_fatal() => return ErrorPolicy::Operator(e.operator_fix().into()),
            Self::NeedsOperator { fix, .. } => return ErrorPolicy::Operator(fix.clone()),
            Self::Sink(SinkError::Refused(e)) => return ErrorPolicy::Operator(e.fix().into()),
            Self::Sink(SinkError::TransactionalIdRefused(_)) => {
                return ErrorPolicy::Operator(
                    "grant WRITE and DESCRIBE on TRANSACTIONAL_ID (kafka.transactional_id, prefixed) to the relay's principal, or use kafka.delivery = \"at_least_once\"".into(),
                )
            }
            Self::TooManyHeld(_)
            | Self::Sink(SinkError::TooManyHeld(_))
            | Self::Checkpoint(CheckpointError::TooManyHeld(_)) => {
                return ErrorPolicy::Operator("release or skip held rows once the cause is fixed".into())
            }
            _ => None,
        };
        match postgres {
            Some(code) => sql_state_policy(code),
            None => ErrorPolicy::Retry,
        }
    }
}

/// The policy of a Postgres error code.
fn sql_state_policy(code: &SqlState) -> ErrorPolicy {
    let fix = if *code == SqlState::INVALID_PASSWORD || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION {
        "check the user and password in postgres.url, and pg_hba.conf"
    } else if *code == SqlState::INSUFFICIENT_PRIVILEGE {
        "grant the relay's role what it needs: `relay check` names each missing privilege, `relay migrate --print-grants ROLE` prints the GRANTs (README, Security)"
    } else if *code == SqlState::UNDEFINED_TABLE {
        "a table the relay needs does not exist: run `relay migrate` as the outbox table's owner"
    } else if *code == SqlState::UNDEFINED_COLUMN {
        "a configured column does not exist: run `relay migrate` or correct outbox.columns"
    } else if *code == SqlState::INVALID_CATALOG_NAME {
        "the database in postgres.url does not exist"
    } else {
        return ErrorPolicy::Retry;
    };
    ErrorPolicy::Operator(fix.to_string())
}

/// The policy of a replication connection error: typed variants, and the
/// SQLSTATE the server sent.
fn replication_policy(err: &pgwire_replication::PgWireError) -> ErrorPolicy {
    use pgwire_replication::PgWireError as E;
    match err {
        E::Auth(_) => sql_state_policy(&SqlState::INVALID_PASSWORD),
        E::Tls(_) => ErrorPolicy::Operator("check postgres.url's sslmode and postgres.tls_ca_file".into()),
        E::Server(message) => match server_sql_state(message) {
            Some(code) => sql_state_policy(&code),
            None => ErrorPolicy::Retry,
        },
        _ => ErrorPolicy::Retry,
    }
}

/// The SQLSTATE code pgwire-replication appends to a server error
/// (`... (SQLSTATE 42501)`).
fn server_sql_state(message: &str) -> Option<SqlState> {
    let start = message.rfind("(SQLSTATE ")? + "(SQLSTATE ".len();
    let code = message.get(start..start + 5)?;
    Some(SqlState::from_code(code))
}

/// Before a run produces anything: brokers that refuse the relay's SASL
/// credentials or whose certificate it cannot verify stop the relay with
/// the keys to fix. librdkafka itself would retry them forever, with rows
/// piling up in its queue and nothing but its log lines to show why. An
/// unreachable broker is left to the run, which waits for it as always.
async fn check_kafka_credentials(config: &Config) -> Result<(), PipelineError> {
    match sink::probe(&config.kafka, Duration::from_secs(5)).await {
        Err(err) if err.needs_operator() => Err(SinkError::Refused(err).into()),
        Err(err) => {
            tracing::debug!(error = %ErrorChain(&err), "Kafka not reached before the run; the run waits for it");
            Ok(())
        }
        Ok(_) => Ok(()),
    }
}

type Backoff = Box<dyn Iterator<Item = Duration> + Send>;

fn backoff() -> Backoff {
    Box::new(
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(10))
            .with_jitter()
            .without_max_times()
            .build(),
    )
}

/// Waits `delay`, or less if `stop` turns true. Returns whether to stop.
async fn pause(delay: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    let stopped = tokio::select! {
        _ = tokio::time::sleep(delay) => false,
        _ = stop.wait_for(|s| *s) => true,
    };
    stopped || *stop.borrow()
}

/// Turns a failure into a stop when only an operator can cure it.
fn stop_for_operator(err: PipelineError) -> Result<PipelineError, PipelineError> {
    match err.policy() {
        ErrorPolicy::Retry => Ok(err),
        ErrorPolicy::Operator(_) if matches!(err, PipelineError::NeedsOperator { .. }) => Err(err),
        ErrorPolicy::Operator(fix) => Err(PipelineError::NeedsOperator { fix, cause: Box::new(err) }),
    }
}

/// Runs the relay until `stop` turns true: stands by until this relay holds
/// the leader lease, then runs the pipeline while it does, restarting with
/// backoff after failures a retry can cure. Returns an error only for a
/// failure an operator must fix.
pub async fn run(config: Config, mut stop: watch::Receiver<bool>, health: Health) -> Result<(), PipelineError> {
    let mut delays = backoff();
    // Resolved once, then kept across restarts: a registry outage after
    // start-up cannot stop publishing.
    let mut codec: Option<Codec> = None;
    let candidate = Candidate::new(&config);
    health.set_instance(candidate.id());
    tracing::info!(instance = candidate.id(), "relay instance");
    while !*stop.borrow() {
        let term = match candidate.campaign(&mut stop, &health).await {
            Ok(Some(term)) => term,
            Ok(None) => return Ok(()),
            Err(err) => {
                let err = stop_for_operator(err.into())?;
                tracing::warn!(error = %ErrorChain(&err), "cannot read or take the leader lease; retrying");
                health.set_ready(false);
                metrics::restart("postgres");
                if pause(delays.next().unwrap_or(Duration::from_secs(10)), &mut stop).await {
                    return Ok(());
                }
                continue;
            }
        };
        health.set_active(true);
        let end = lead(&config, &term, &mut codec, &mut delays, &mut stop, &health).await;
        health.set_active(false);
        health.set_epoch(None);
        let epoch = term.epoch();
        match end {
            Ok(LeadEnd::Stopped) => {
                let released = term.release().await;
                tracing::info!(epoch, released, "stopped; leader lease released for a standby to take over");
                return Ok(());
            }
            Ok(LeadEnd::Lost(lost)) => {
                metrics::leader_lost(lost.as_str());
                tracing::warn!(epoch, reason = lost.as_str(), "lost the leader lease: stopped producing and dropped the producer; nothing more is recorded in this term; standing by");
                term.release().await;
            }
            Err(err) => {
                term.release().await;
                return Err(err);
            }
        }
    }
    Ok(())
}

/// How leading ended.
enum LeadEnd {
    /// `stop` turned true; everything is recorded and confirmed.
    Stopped,
    /// The term is over; the run was dropped.
    Lost(Lost),
}

/// Runs the pipeline while `term` lasts.
///
/// Safety: `term.lost()` is polled first (`biased`) on every poll, and
/// resolving it drops the run: the source stops reading, the sink's
/// producer is dropped (librdkafka purges its queue) and the checkpoint
/// stage records nothing more. See [`Term::lost`] for why the
/// relay stops producing before a standby can take over, and
/// [`crate::store::PreparedFence::begin`] for why nothing of an ended term
/// is recorded even when it is not noticed here (a pause): a refused write
/// ([`PipelineError::is_fenced`]) ends leading the same way, never a retry.
async fn lead(
    config: &Config,
    term: &Term,
    codec: &mut Option<Codec>,
    delays: &mut Backoff,
    stop: &mut watch::Receiver<bool>,
    health: &Health,
) -> Result<LeadEnd, PipelineError> {
    loop {
        let started = std::time::Instant::now();
        let result = tokio::select! {
            biased;
            lost = term.lost() => return Ok(LeadEnd::Lost(lost)),
            result = run_with_codec(config, codec, term.fence(), stop.clone(), health) => result,
        };
        match result {
            Ok(RunEnd::Stopped) => return Ok(LeadEnd::Stopped),
            // Not a failure: the run ended to recover the slot or to
            // publish released held rows; the next one starts at once.
            Ok(RunEnd::Restart) if *stop.borrow() => return Ok(LeadEnd::Stopped),
            Ok(RunEnd::Restart) => {}
            Err(err) if err.is_fenced() => {
                tracing::warn!(error = %ErrorChain(&err), "a publish-state write was refused");
                return Ok(LeadEnd::Lost(Lost::TakenOver));
            }
            Err(err) => {
                health.set_ready(false);
                let err = stop_for_operator(err)?;
                // A run that went well for a while starts the backoff afresh.
                if started.elapsed() > Duration::from_secs(60) {
                    *delays = backoff();
                }
                metrics::restart(err.component());
                metrics::in_flight_reset();
                let delay = delays.next().unwrap_or(Duration::from_secs(10));
                tracing::error!(error = %ErrorChain(&err), component = err.component(), retry_in_ms = delay.as_millis() as u64, "pipeline stopped; restarting from the last confirmed commit boundary");
                tokio::select! {
                    biased;
                    lost = term.lost() => return Ok(LeadEnd::Lost(lost)),
                    stopped = pause(delay, stop) => {
                        if stopped {
                            return Ok(LeadEnd::Stopped);
                        }
                    }
                }
            }
        }
    }
}

/// Prepares the codec once (kept across runs), then runs the pipeline.
async fn run_with_codec(
    config: &Config,
    codec: &mut Option<Codec>,
    fence: Fence,
    stop: watch::Receiver<bool>,
    health: &Health,
) -> Result<RunEnd, PipelineError> {
    let prepared = match codec.take() {
        Some(prepared) => prepared,
        None => Codec::prepare(config).await?,
    };
    let prepared = codec.insert(prepared);
    run_once(config, prepared, fence, stop, health).await
}

/// How a run that did not fail ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunEnd {
    /// `stop` turned true.
    Stopped,
    /// Start the next run at once (slot dropped over its WAL budget or
    /// invalidated; held rows released by an operator).
    Restart,
}

/// Why the run's watch ended the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WatchEnd {
    Released,
    WalBudget,
}

/// How often an active run checks for released held rows and the slot's WAL.
const WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// Checks, every [`WATCH_INTERVAL`], whether a row that holds an entity in
/// this run was released by an operator (once the catch-up phase is over:
/// it publishes released rows itself), and (logical mode, with a budget)
/// whether the slot retains too much WAL, also during the catch-up phase,
/// when the slot does not move at all. Returns only when the run must end
/// for one of those.
async fn watch_run(
    config: &Config,
    client: &tokio_postgres::Client,
    held: &HeldEntities,
    caught_up: watch::Receiver<bool>,
) -> WatchEnd {
    let store = Store::new(config);
    let budget = config.source.max_slot_wal_bytes;
    let logical_mode = config.source.mode == SourceMode::Logical;
    loop {
        tokio::time::sleep(WATCH_INTERVAL).await;
        if *caught_up.borrow() {
            match store.blocker_released(client, &held.blockers()).await {
                Ok(true) => {
                    tracing::info!(
                        "held rows were released by an operator: restarting the pipeline run to publish them"
                    );
                    return WatchEnd::Released;
                }
                Ok(false) => {}
                Err(err) => tracing::debug!(error = %ErrorChain(&err), "released-rows check failed"),
            }
        }
        if logical_mode && budget > 0 {
            match slot::retained_wal(client, &config.source.slot_name).await {
                Ok(Some(retained)) if retained > 0 && retained as u64 > budget => {
                    tracing::error!(slot = %config.source.slot_name, retained, budget, "replication slot retains more WAL than source.max_slot_wal_bytes: stopping the stream and dropping the slot to protect the database; the next run catches up through the poll path");
                    return WatchEnd::WalBudget;
                }
                Ok(_) => {}
                Err(err) => tracing::debug!(error = %ErrorChain(&err), "slot WAL check failed"),
            }
        }
    }
}

/// What a run prepared before its stages start.
struct Prepared {
    /// Logical mode: what the catch-up phase publishes first.
    plan: Option<catchup::Plan>,
    held: HeldEntities,
    store: PgPublishState,
    /// A connection for the catch-up phase and the run's watch.
    control: tokio_postgres::Client,
}

/// Frees the slot from a stream of an earlier term, recovers a lost slot
/// (logical mode), releases orphaned waiting rows and loads the held
/// entities. Publish-state writes go through `fence`.
async fn prepare(config: &Config, fence: Fence) -> Result<Prepared, PipelineError> {
    let client = database::connect(&config.postgres).await?;
    let store = Store::new(config);
    // Before anything reads "unpublished": in the other layout every
    // published row would look unpublished.
    store.check_publish_state_layout(&client).await?;
    let plan = if config.source.mode == SourceMode::Logical {
        slot::take_over(&client, &config.source.slot_name).await.map_err(SlotError::from)?;
        // Recovers a missing, invalidated or over-budget slot first, so a
        // slot is never created without its catch-up marker.
        let plan = catchup::prepare(&client, config).await?;
        if config.source.create_slot {
            slot::ensure_publication_and_slot(&client, config).await?;
        } else {
            slot::check_publication(&client, config).await?;
        }
        Some(plan)
    } else {
        None
    };
    let control = database::connect(&config.postgres).await?;
    let publish_state = PgPublishState::new(client, store.sql(), fence).await?;
    let released = publish_state.release_orphaned_waiters(&store).await?;
    if released > 0 {
        tracing::info!(rows = released, "released rows that waited behind a row no longer held");
    }
    let held = HeldEntities::from_rows(store.held_entities(&control).await?, config.routing.max_held_entities)?;
    Ok(Prepared { plan, held, store: publish_state, control })
}

/// One run of the pipeline, from the last confirmed commit boundary until
/// `stop` or the first failure of any stage. Logical mode first recovers a
/// lost slot and runs the catch-up phase (see [`catchup`]).
async fn run_once(
    config: &Config,
    codec: &Codec,
    fence: Fence,
    mut stop: watch::Receiver<bool>,
    health: &Health,
) -> Result<RunEnd, PipelineError> {
    let Prepared { plan, held, store, control } = prepare(config, fence).await?;
    check_kafka_credentials(config).await?;
    let sink = KafkaSink::new(config, held.clone(), codec.clone())?;
    if config.kafka.delivery == Delivery::ExactlyOnce {
        // Fence earlier producers first: then no transaction of theirs can
        // commit after the sink's progress topic is read back for recovery.
        let started = std::time::Instant::now();
        crate::sink::progress::ensure_topic(config).await?;
        let topic_ms = started.elapsed().as_millis() as u64;
        sink.init_transactions().await?;
        let init_ms = started.elapsed().as_millis() as u64 - topic_ms;
        let mut progress = sink::progress::ProgressReader::open(config).await.map_err(CheckpointError::progress)?;
        crate::checkpoint::progress::recover(config, &store, &control, &mut progress).await?;
        tracing::info!(
            topic_ms,
            init_ms,
            recovery_ms = started.elapsed().as_millis() as u64 - topic_ms - init_ms,
            "exactly-once: earlier producers fenced, progress read back"
        );
    }
    let (source_tx, source_rx) = mpsc::channel(config.source.batch_rows);
    let (flight_tx, flight_rx) = mpsc::channel(config.checkpoint.max_in_flight);
    let (confirmed_tx, confirmed_rx) = watch::channel(None);
    let final_boundary = confirmed_rx.clone();
    let checkpoint = Checkpoint::new(
        store,
        config.checkpoint.batch_rows,
        Duration::from_millis(config.checkpoint.flush_interval_ms),
        sink.holder(),
        confirmed_tx,
    );
    let (run_stop_tx, run_stop) = watch::channel(false);
    let (caught_up_tx, caught_up) = watch::channel(plan.is_none());
    // Everything after the source is one code path for both modes.
    let source = async {
        let (mut confirmed_rx, mut source_stop) = (confirmed_rx, run_stop.clone());
        if let Some(plan) = plan {
            let outcome =
                catchup::catch_up(config, &control, plan, &source_tx, &mut confirmed_rx, &mut source_stop).await?;
            if !outcome.finished {
                return Ok(());
            }
            let _ = caught_up_tx.send(true);
        }
        match config.source.mode {
            SourceMode::Logical => {
                LogicalSource::new(config.clone()).run(&control, source_tx, confirmed_rx, source_stop).await?
            }
            SourceMode::Poll => PollSource::new(config.clone()).run(source_tx, confirmed_rx, source_stop).await?,
        }
        Ok::<(), PipelineError>(())
    };
    health.set_ready(true);
    let stages = async { tokio::join!(source, sink.run(source_rx, flight_tx), checkpoint.run(flight_rx)) };
    tokio::pin!(stages);
    let mut ended_by = None;
    let (source_result, sink_result, checkpoint_result) = tokio::select! {
        results = &mut stages => results,
        _ = stop.wait_for(|s| *s) => {
            let _ = run_stop_tx.send(true);
            (&mut stages).await
        }
        end = watch_run(config, &control, &held, caught_up) => {
            ended_by = Some(end);
            let _ = run_stop_tx.send(true);
            (&mut stages).await
        }
    };
    checkpoint_result?;
    if let Err(err) = source_result {
        return recover_invalidated_slot(config, &control, err).await;
    }
    sink_result?;
    let boundary = *final_boundary.borrow();
    if let Some(CommitBoundary::Wal(lsn)) = boundary {
        slot::persist_confirmed(&control, &config.source.slot_name, lsn).await;
    }
    let stopped = *stop.borrow();
    run_end(config, &control, ended_by, stopped, boundary).await
}

/// How a run whose stages all finished ends.
async fn run_end(
    config: &Config,
    control: &tokio_postgres::Client,
    ended_by: Option<WatchEnd>,
    stopped: bool,
    boundary: Option<CommitBoundary>,
) -> Result<RunEnd, PipelineError> {
    match ended_by {
        Some(WatchEnd::WalBudget) => {
            slot::abandon(control, config, CatchUpReason::WalBudget).await?;
            tracing::warn!(slot = %config.source.slot_name, "replication slot dropped over its WAL budget; recovering");
            Ok(RunEnd::Restart)
        }
        Some(WatchEnd::Released) => Ok(RunEnd::Restart),
        None if stopped => {
            tracing::info!(?boundary, "stopped; publish state recorded and commit boundary confirmed");
            Ok(RunEnd::Stopped)
        }
        // The source ended by itself (catch-up interrupted without a stop).
        None => Ok(RunEnd::Restart),
    }
}

/// After the replication stream failed: if Postgres invalidated the slot
/// (`wal_status = 'lost'`), no retry can succeed, so the slot is dropped and
/// the next run recreates it and catches up. Otherwise the error stands.
async fn recover_invalidated_slot(
    config: &Config,
    control: &tokio_postgres::Client,
    err: PipelineError,
) -> Result<RunEnd, PipelineError> {
    let logical = config.source.mode == SourceMode::Logical && config.source.create_slot;
    if logical
        && matches!(err, PipelineError::Source(LogicalError::Replication(_)))
        && slot::inspect(control, &config.source.slot_name).await? == SlotHealth::Lost
    {
        tracing::error!(error = %ErrorChain(&err), "the replication slot was invalidated: dropping it; the next run recreates it and catches up");
        slot::abandon(control, config, CatchUpReason::Invalidated).await?;
        return Ok(RunEnd::Restart);
    }
    Err(err)
}
