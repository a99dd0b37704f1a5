//! Wires source -> sink -> checkpoint, elects the active relay, and restarts
//! the pipeline from its last confirmed position after any failure.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::sync::{mpsc, watch};

use crate::checkpoint::{Checkpoint, CheckpointError};
use crate::codec::{Codec, SchemaError};
use crate::config::{Config, SourceMode};
use crate::database::{self, DatabaseError};
use crate::sink::{HeldEntities, KafkaSink, SinkError};
use crate::source::catchup::{self, SlotError};
use crate::source::logical::{self, LogicalError, LogicalSource};
use crate::source::poll::{PollError, PollSource};
use crate::source::Position;
use crate::telemetry::{metrics, Health};

/// Why one run of the pipeline ended. Every variant is retried with backoff;
/// the log says what failed and the restart metric counts it by component.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Database(#[from] DatabaseError),
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
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
}

impl PipelineError {
    fn component(&self) -> &'static str {
        match self {
            Self::Database(_) | Self::Postgres(_) | Self::Source(_) | Self::Poll(_) | Self::Slot(_) => "postgres",
            Self::Sink(_) => "kafka",
            Self::Schema(_) => "registry",
            Self::Checkpoint(CheckpointError::Delivery(_)) => "kafka",
            Self::Checkpoint(_) => "postgres",
        }
    }
}

fn backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times()
        .build()
}

/// Waits `delay`, or less if `stop` turns true. Returns whether to stop.
async fn pause(delay: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    let stopped = tokio::select! {
        _ = tokio::time::sleep(delay) => false,
        _ = stop.wait_for(|s| *s) => true,
    };
    stopped || *stop.borrow()
}

/// Runs the relay until `stop` turns true: waits to become the active
/// relay (a Postgres advisory lock; the other sidecars stay standby), then
/// streams, restarting with backoff after failures.
pub async fn run(config: Config, mut stop: watch::Receiver<bool>, health: Health) -> Result<(), PipelineError> {
    let lock_key = database::leader_lock_key(&config);
    let mut delays = backoff();
    // Resolved once, then kept across restarts: a registry outage after
    // start-up cannot stop publishing.
    let mut codec: Option<Codec> = None;
    'elect: loop {
        if *stop.borrow() {
            return Ok(());
        }
        let lock_client = match database::connect(&config.postgres).await {
            Ok(client) => client,
            Err(err) => {
                tracing::warn!(error = %err, "postgres unreachable; retrying");
                health.set_ready(false);
                metrics::restart("postgres");
                if pause(delays.next().unwrap_or(Duration::from_secs(10)), &mut stop).await {
                    return Ok(());
                }
                continue;
            }
        };
        match database::try_lead(&lock_client, lock_key).await {
            Ok(true) => {}
            Ok(false) => {
                if health.active() || !health.ready() {
                    tracing::info!("another relay is active for this outbox; standing by");
                }
                health.set_active(false);
                health.set_ready(true);
                if pause(Duration::from_secs(2), &mut stop).await {
                    return Ok(());
                }
                continue;
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot take the leader lock; retrying");
                if pause(delays.next().unwrap_or(Duration::from_secs(10)), &mut stop).await {
                    return Ok(());
                }
                continue;
            }
        }
        tracing::info!("this relay is active");
        health.set_active(true);
        loop {
            let started = std::time::Instant::now();
            let result = match codec.as_ref() {
                Some(prepared) => run_once(&config, prepared, stop.clone(), &health).await,
                None => match Codec::prepare(&config).await {
                    Ok(prepared) => {
                        codec = Some(prepared);
                        continue;
                    }
                    Err(err) if err.is_fatal() => return Err(err.into()),
                    Err(err) => Err(err.into()),
                },
            };
            match result {
                Ok(RunEnd::Stopped) => return Ok(()),
                // Not a failure: the run ended to recover the slot or to
                // publish released held rows; the next one starts at once.
                Ok(RunEnd::Restart) => {
                    if *stop.borrow() {
                        return Ok(());
                    }
                }
                Err(err) => {
                    // A run that went well for a while starts the backoff afresh.
                    if started.elapsed() > Duration::from_secs(60) {
                        delays = backoff();
                    }
                    health.set_ready(false);
                    metrics::restart(err.component());
                    metrics::in_flight_reset();
                    let delay = delays.next().unwrap_or(Duration::from_secs(10));
                    tracing::error!(error = %err, component = err.component(), retry_in_ms = delay.as_millis() as u64, "pipeline stopped; restarting from the last confirmed position");
                    if pause(delay, &mut stop).await {
                        return Ok(());
                    }
                    if lock_client.is_closed() {
                        health.set_active(false);
                        continue 'elect;
                    }
                }
            }
        }
    }
}

/// Loads the entities that have a held row, so their new rows keep waiting.
async fn load_held(client: &tokio_postgres::Client, config: &Config) -> Result<HeldEntities, tokio_postgres::Error> {
    let c = &config.outbox.columns;
    let sql = format!(
        "SELECT \"{t}\", \"{a}\", min(\"{id}\") FROM {table} \
         WHERE published_at IS NULL AND last_error IS NOT NULL AND skipped_at IS NULL GROUP BY 1, 2",
        t = c.aggregate_type,
        a = c.aggregate_id,
        id = c.id,
        table = config.outbox_table_sql()
    );
    let held = HeldEntities::default();
    for row in client.query(&sql, &[]).await? {
        held.hold(row.get(0), row.get(1), row.get(2));
    }
    Ok(held)
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

/// Checks, every [`WATCH_INTERVAL`] once the catch-up phase is over, whether
/// a row that holds an entity in this run was released by an operator, and
/// (logical mode, with a budget) whether the slot retains too much WAL.
/// Returns only when the run must end for one of those.
async fn watch_run(
    config: &Config,
    client: &tokio_postgres::Client,
    held: &HeldEntities,
    mut caught_up: watch::Receiver<bool>,
) -> WatchEnd {
    let _ = caught_up.wait_for(|done| *done).await;
    let budget = config.source.max_slot_wal_bytes;
    let logical_mode = config.source.mode == SourceMode::Logical;
    loop {
        tokio::time::sleep(WATCH_INTERVAL).await;
        match catchup::blocker_released(client, config, &held.blockers()).await {
            Ok(true) => {
                tracing::info!("held rows were released by an operator: restarting the pipeline run to publish them");
                return WatchEnd::Released;
            }
            Ok(false) => {}
            Err(err) => tracing::debug!(error = %err, "released-rows check failed"),
        }
        if logical_mode && budget > 0 {
            match catchup::retained_wal(client, &config.source.slot_name).await {
                Ok(Some(retained)) if retained > 0 && retained as u64 > budget => {
                    tracing::error!(slot = %config.source.slot_name, retained, budget, "replication slot retains more WAL than source.max_slot_wal_bytes: stopping the stream and dropping the slot to protect the database; the next run catches up through the poll path");
                    return WatchEnd::WalBudget;
                }
                Ok(_) => {}
                Err(err) => tracing::debug!(error = %err, "slot WAL check failed"),
            }
        }
    }
}

/// Whether the replication stream failed because Postgres invalidated the
/// slot (WAL removed): then no retry can succeed, and the slot is dropped so
/// the next run recreates it and catches up.
fn slot_invalidated(err: &PipelineError) -> bool {
    matches!(err, PipelineError::Source(LogicalError::Replication(e)) if {
        let text = e.to_string();
        text.contains("invalidated") || text.contains("can no longer get changes")
    })
}

/// One run of the pipeline, from the last confirmed position until `stop`
/// or the first failure of any stage. Logical mode first recovers a lost
/// slot and runs the catch-up phase (see [`catchup`]).
async fn run_once(
    config: &Config,
    codec: &Codec,
    mut stop: watch::Receiver<bool>,
    health: &Health,
) -> Result<RunEnd, PipelineError> {
    let logical_mode = config.source.mode == SourceMode::Logical;
    let client = database::connect(&config.postgres).await?;
    let plan = if logical_mode {
        // Recovers a missing, invalidated or over-budget slot first, so a
        // slot is never created without its catch-up marker.
        let plan = catchup::prepare(&client, config).await?;
        if config.source.create_slot {
            logical::ensure_publication_and_slot(&client, config).await?;
        }
        Some(plan)
    } else {
        None
    };
    catchup::release_orphaned_waiters(&client, config).await?;
    let held = load_held(&client, config).await?;
    let sink = KafkaSink::new(config, held.clone(), codec.clone())?;
    let control = database::connect(&config.postgres).await?;

    let (source_tx, source_rx) = mpsc::channel(config.source.batch_rows);
    let (flight_tx, flight_rx) = mpsc::channel(config.checkpoint.max_in_flight);
    let (confirmed_tx, confirmed_rx) = watch::channel(0);
    let final_position = confirmed_rx.clone();
    let checkpoint = Checkpoint::new(
        client,
        &config.outbox_table_sql(),
        &config.outbox.columns.id,
        config.checkpoint.batch_rows,
        Duration::from_millis(config.checkpoint.flush_interval_ms),
        held.clone(),
        confirmed_tx,
    );
    let (run_stop_tx, run_stop) = watch::channel(false);
    let (caught_up_tx, caught_up) = watch::channel(plan.is_none());
    // Everything after the source is one code path for both modes. Returns
    // the catch-up's last batch number: no WAL position is below it.
    let source = async {
        let (mut confirmed_rx, mut source_stop) = (confirmed_rx, run_stop.clone());
        let mut floor = 0;
        if let Some(plan) = plan {
            let outcome =
                catchup::catch_up(config, &control, plan, &source_tx, &mut confirmed_rx, &mut source_stop).await?;
            floor = outcome.batches;
            if !outcome.finished {
                return Ok(floor);
            }
            let _ = caught_up_tx.send(true);
        }
        match config.source.mode {
            SourceMode::Logical => LogicalSource::new(config.clone()).run(source_tx, confirmed_rx, source_stop).await?,
            SourceMode::Poll => PollSource::new(config.clone()).run(source_tx, confirmed_rx, source_stop).await?,
        }
        Ok::<Position, PipelineError>(floor)
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
    let floor = match source_result {
        Ok(floor) => floor,
        Err(err) if logical_mode && config.source.create_slot && slot_invalidated(&err) => {
            tracing::error!(error = %err, "the replication slot was invalidated: dropping it; the next run recreates it and catches up");
            catchup::abandon_slot(&control, config, catchup::Reason::Invalidated).await?;
            return Ok(RunEnd::Restart);
        }
        Err(err) => return Err(err),
    };
    sink_result?;
    let position = *final_position.borrow();
    if logical_mode && position > floor {
        logical::persist_confirmed(&control, &config.source.slot_name, position).await;
    }
    match ended_by {
        Some(WatchEnd::WalBudget) => {
            catchup::abandon_slot(&control, config, catchup::Reason::WalBudget).await?;
            tracing::warn!(slot = %config.source.slot_name, "replication slot dropped over its WAL budget; recovering");
            Ok(RunEnd::Restart)
        }
        Some(WatchEnd::Released) => Ok(RunEnd::Restart),
        None if *stop.borrow() => {
            tracing::info!(position, "stopped; publish state recorded and position confirmed");
            Ok(RunEnd::Stopped)
        }
        // The source ended by itself (catch-up interrupted without a stop).
        None => Ok(RunEnd::Restart),
    }
}
