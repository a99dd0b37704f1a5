//! outbox-relay: a transactional outbox relay from PostgreSQL to Apache Kafka.
//!
//! The pipeline: [`source`] (logical replication or ordered polling, in
//! commit order) -> [`codec`] (payload encoding) -> [`sink`] (Kafka) ->
//! [`checkpoint`] (publish state, commit boundary confirmation), wired by
//! [`pipeline`]. Around it: [`config`], [`outbox`] and [`delivery`] (the
//! types the stages pass on), [`error_class`] (what each failure means),
//! [`hold`] (the held-row rule both the sink and
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
//! [`run`] is what the `relay` binary calls, after [`Config::load`] and
//! [`preflight`].

pub mod checkpoint;
pub mod cli;
pub mod codec;
pub mod config;
pub mod database;
pub mod delivery;
pub mod error_class;
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

pub use config::{Config, ConfigError};

/// Why the relay stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("cannot serve telemetry.http_listen {addr}")]
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

/// The start-up checks that read files, the step after [`Config::load`]
/// (whose validation reads none): every CA file the config names can be
/// read, and the registry's holds a PEM certificate, so a wrong path fails
/// before any connection, naming its key. The `relay` binary runs it before
/// every command.
pub fn preflight(config: &Config) -> Result<(), ConfigError> {
    let unreadable = |key: &str, path: &std::path::Path| {
        Err(ConfigError::Invalid { key: key.into(), message: format!("cannot read {}", path.display()) })
    };
    // Postgres and Kafka read theirs at connect time; a missing file is
    // refused here already.
    for (key, file) in
        [("postgres.tls_ca_file", &config.postgres.tls_ca_file), ("kafka.tls_ca_file", &config.kafka.tls_ca_file)]
    {
        if let Some(path) = file {
            if std::fs::metadata(path).is_err() {
                return unreadable(key, path);
            }
        }
    }
    if let Some(path) = &config.registry.tls_ca_file {
        if let Err(err) = tls::ca_certificates(path) {
            return Err(ConfigError::Invalid { key: "registry.tls_ca_file".into(), message: err.to_string() });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MINIMAL;

    /// The config of `toml` as the binary sees it at start-up: parsed,
    /// validated, and its files checked.
    pub(crate) fn start_up(toml: &str) -> Result<Config, ConfigError> {
        let config = Config::from_toml_str(toml)?;
        preflight(&config)?;
        Ok(config)
    }

    #[test]
    fn registry_ca_file_is_read_at_start() {
        let toml = format!("{MINIMAL}\n[registry]\ntls_ca_file = \"/nonexistent/registry-ca.pem\"");
        let err = start_up(&toml).expect_err("must fail").to_string();
        assert!(err.contains("registry.tls_ca_file") && err.contains("/nonexistent/registry-ca.pem"), "{err}");
        let not_pem = tempfile::NamedTempFile::new().expect("temp file");
        let toml = format!("{MINIMAL}\n[registry]\ntls_ca_file = \"{}\"", not_pem.path().display());
        let err = start_up(&toml).expect_err("must fail").to_string();
        assert!(err.contains("registry.tls_ca_file") && err.contains("no PEM certificate"), "{err}");
    }

    #[test]
    fn a_missing_postgres_ca_file_is_named() {
        let toml = MINIMAL.replace("[kafka]", "tls_ca_file = \"/nonexistent/pg-ca.pem\"\n[kafka]");
        Config::from_toml_str(&toml).expect("validation reads no file");
        let err = start_up(&toml).expect_err("must fail").to_string();
        assert!(err.contains("postgres.tls_ca_file") && err.contains("/nonexistent/pg-ca.pem"), "{err}");
    }
}
