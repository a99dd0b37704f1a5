//! outbox-relay: a transactional outbox relay from PostgreSQL to Apache Kafka.
//!
//! The pipeline: [`source`] (logical replication or ordered polling, in
//! commit order) -> [`codec`] (payload encoding) -> [`sink`] (Kafka) ->
//! [`checkpoint`] (publish state, commit boundary confirmation), wired by
//! [`pipeline`]. Around it: [`config`], [`outbox`] and [`delivery`] (the
//! types the stages pass on), [`hold`] (the held-row rule both the sink and
//! the checkpoint apply), [`routing`], [`database`], [`store`] (every
//! statement on the outbox and the relay's tables), [`telemetry`] and
//! [`leader`] (the lease that makes one relay of a group active); [`tls`]
//! reads CA files.
//!
//! Imports flow one way: no stage imports a later one, config and
//! telemetry import no stage, and neither do the shared modules around the
//! stages; only the wiring ([`pipeline`], [`cli`], [`migrate`], the
//! binary) imports everything. A unit test (`layering_tests.rs`) checks
//! every `crate::` path under `src/` against that table.
//! [`run`] is what the `relay` binary calls.

pub mod checkpoint;
pub mod cli;
pub mod codec;
pub mod config;
pub mod database;
pub mod delivery;
pub mod hold;
pub mod leader;
pub mod migrate;
pub mod outbox;
pub mod pipeline;
pub mod routing;
pub mod sink;
pub mod source;
pub mod store;
pub mod telemetry;
pub mod tls;

#[cfg(test)]
mod layering_tests;

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;

pub use config::Config;

/// Why the relay stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("cannot serve telemetry.http_listen {addr}: {source}")]
    Http { addr: String, source: std::io::Error },
    #[error(transparent)]
    Pipeline(#[from] pipeline::PipelineError),
    #[error("shutdown took longer than shutdown_timeout_ms ({0} ms); unrecorded deliveries will be resent on restart")]
    ShutdownDeadline(u64),
}

/// Runs the relay until `shutdown` resolves, then stops reading, drains
/// in-flight deliveries, records their state and confirms the position,
/// within `shutdown_timeout_ms`.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), RelayError> {
    let metrics = telemetry::install_metrics();
    let health = telemetry::Health::new(config.telemetry.readiness);
    let (stop_tx, stop_rx) = watch::channel(false);
    let addr = config.telemetry.http_listen.clone();
    let socket: std::net::SocketAddr = addr
        .parse()
        .map_err(|_| RelayError::Http { addr: addr.clone(), source: std::io::ErrorKind::InvalidInput.into() })?;
    let listener = tokio::net::TcpListener::bind(socket)
        .await
        .map_err(|source| RelayError::Http { addr: addr.clone(), source })?;
    let http = tokio::spawn(telemetry::http::serve(listener, metrics, health.clone(), stop_rx.clone()));

    let sampler = tokio::spawn(telemetry::lag::sample(config.clone(), health.clone(), stop_rx.clone()));
    let retention = tokio::spawn(checkpoint::retention::run(config.clone(), health.clone(), stop_rx.clone()));

    let deadline = Duration::from_millis(config.shutdown_timeout_ms);
    let pipeline = pipeline::run(config, stop_rx, health);
    tokio::pin!(pipeline);
    let result = tokio::select! {
        result = &mut pipeline => result.map_err(RelayError::from),
        _ = shutdown => {
            tracing::info!("stopping: draining in-flight deliveries");
            let _ = stop_tx.send(true);
            match tokio::time::timeout(deadline, &mut pipeline).await {
                Ok(result) => result.map_err(RelayError::from),
                Err(_) => Err(RelayError::ShutdownDeadline(deadline.as_millis() as u64)),
            }
        }
    };
    let _ = stop_tx.send(true);
    let _ = tokio::join!(http, sampler, retention);
    result
}
