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
use crate::source::logical::{self, LogicalError, LogicalSource};
use crate::source::poll::{PollError, PollSource};
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
}

impl PipelineError {
    fn component(&self) -> &'static str {
        match self {
            Self::Database(_) | Self::Postgres(_) | Self::Source(_) | Self::Poll(_) => "postgres",
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
                Ok(()) => return Ok(()),
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
         WHERE published_at IS NULL AND last_error IS NOT NULL GROUP BY 1, 2",
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

/// One run of the pipeline, from the last confirmed position until `stop`
/// or the first failure of any stage.
async fn run_once(config: &Config, codec: &Codec, stop: watch::Receiver<bool>, health: &Health) -> Result<(), PipelineError> {
    let logical_mode = config.source.mode == SourceMode::Logical;
    let client = database::connect(&config.postgres).await?;
    if logical_mode && config.source.create_slot && logical::ensure_publication_and_slot(&client, config).await? {
        tracing::warn!("the replication slot was created now: rows committed before this moment are not streamed");
    }
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
        held,
        confirmed_tx,
    );
    // Everything after the source is one code path for both modes.
    let source = async {
        match config.source.mode {
            SourceMode::Logical => LogicalSource::new(config.clone()).run(source_tx, confirmed_rx, stop).await.map_err(PipelineError::from),
            SourceMode::Poll => PollSource::new(config.clone()).run(source_tx, confirmed_rx, stop).await.map_err(PipelineError::from),
        }
    };
    health.set_ready(true);
    let (source_result, sink_result, checkpoint_result) = tokio::join!(
        source,
        sink.run(source_rx, flight_tx),
        checkpoint.run(flight_rx),
    );
    checkpoint_result?;
    source_result?;
    sink_result?;
    let position = *final_position.borrow();
    if logical_mode {
        logical::persist_confirmed(&control, &config.source.slot_name, position).await;
    }
    tracing::info!(position, "stopped; publish state recorded and position confirmed");
    Ok(())
}
