//! One run of the pipeline: prepare (slot, catch-up plan, publication,
//! orphaned waiters, held entities), the exactly-once bootstrap, the three
//! stages joined by bounded channels, the run's watch, and how it ends.

use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::PipelineError;
use crate::checkpoint::{self, Checkpoint, CheckpointError};
use crate::codec::Codec;
use crate::config::{Config, Delivery, SourceMode};
use crate::database;
use crate::hold::HeldEntities;
use crate::outbox::{CommitBoundary, SourceEvent};
use crate::sink::{self, KafkaSink, SinkError};
use crate::source::catchup;
use crate::source::logical::{LogicalError, LogicalSource};
use crate::source::poll::PollSource;
use crate::source::slot::{self, SlotError, SlotHealth};
use crate::store::{CatchUpReason, Fence, PgPublishState, Store};
use crate::telemetry::{ErrorChain, Health};

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

/// Prepares the codec once (kept across runs), then runs the pipeline.
pub(super) async fn run_with_codec(
    config: &Config,
    codec: &mut Option<Codec>,
    fence: Fence,
    stop: watch::Receiver<bool>,
    health: &Health,
) -> Result<RunEnd, PipelineError> {
    let codec = match codec {
        Some(codec) => codec,
        None => codec.insert(Codec::prepare(config).await?),
    };
    run_once(config, codec, fence, stop, health).await
}

/// How a run that did not fail ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RunEnd {
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

/// Exactly-once mode, before the stages start: fences earlier producers
/// first, so no transaction of theirs can commit after the sink's progress
/// topic is read back; then records what committed transactions carried
/// and Postgres does not show as published yet (see
/// [`crate::checkpoint::progress`]).
async fn start_exactly_once(
    config: &Config,
    sink: &KafkaSink,
    store: &PgPublishState,
    control: &tokio_postgres::Client,
) -> Result<(), PipelineError> {
    let started = std::time::Instant::now();
    sink::progress::ensure_topic(config).await?;
    let topic_ms = started.elapsed().as_millis() as u64;
    sink.init_transactions().await?;
    let init_ms = started.elapsed().as_millis() as u64 - topic_ms;
    let mut progress = sink::progress::ProgressReader::open(config).await.map_err(CheckpointError::progress)?;
    checkpoint::progress::recover(config, store, control, &mut progress).await?;
    tracing::info!(
        topic_ms,
        init_ms,
        recovery_ms = started.elapsed().as_millis() as u64 - topic_ms - init_ms,
        "exactly-once: earlier producers fenced, progress read back"
    );
    Ok(())
}

/// What the source stage works with: where it sends, what it hears back.
struct SourceStage<'a> {
    config: &'a Config,
    control: &'a tokio_postgres::Client,
    plan: Option<catchup::Plan>,
    out: mpsc::Sender<SourceEvent>,
    confirmed: watch::Receiver<Option<CommitBoundary>>,
    stop: watch::Receiver<bool>,
    /// Turns true once the catch-up phase is over.
    caught_up: watch::Sender<bool>,
}

impl SourceStage<'_> {
    /// Runs the catch-up phase first when one is planned (logical mode),
    /// then the replication stream or the poll loop. Everything after the
    /// source is one code path for both modes.
    async fn run(self) -> Result<(), PipelineError> {
        let Self { config, control, plan, out, mut confirmed, mut stop, caught_up } = self;
        if let Some(plan) = plan {
            let outcome = catchup::catch_up(config, control, plan, &out, &mut confirmed, &mut stop).await?;
            if !outcome.finished {
                return Ok(());
            }
            let _ = caught_up.send(true);
        }
        match config.source.mode {
            SourceMode::Logical => LogicalSource::new(config.clone()).run(control, out, confirmed, stop).await?,
            SourceMode::Poll => PollSource::new(config.clone()).run(out, confirmed, stop).await?,
        }
        Ok(())
    }
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
        start_exactly_once(config, &sink, &store, &control).await?;
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
    let source = SourceStage {
        config,
        control: &control,
        plan,
        out: source_tx,
        confirmed: confirmed_rx,
        stop: run_stop,
        caught_up: caught_up_tx,
    };
    health.set_ready(true);
    let stages = async { tokio::join!(source.run(), sink.run(source_rx, flight_tx), checkpoint.run(flight_rx)) };
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
