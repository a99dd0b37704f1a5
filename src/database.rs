//! Connections to Postgres and the single-active-relay lock.

use std::time::Duration;

use secrecy::ExposeSecret;
use tokio_postgres::{Client, NoTls};

use crate::config::{Config, PostgresConfig};

/// Why Postgres could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DatabaseError {
    /// The message includes the cause (refused, authentication, timeout).
    #[error("cannot connect to Postgres: {0}")]
    Connect(String),
    #[error("Postgres query failed: {0}")]
    Query(#[from] tokio_postgres::Error),
    #[error("invalid postgres.url: {0}")]
    Url(String),
}

/// Opens a regular (non-replication) connection and drives it in a task.
pub async fn connect(config: &PostgresConfig) -> Result<Client, DatabaseError> {
    let mut pg: tokio_postgres::Config =
        config.url.expose_secret().parse().map_err(|e: tokio_postgres::Error| DatabaseError::Url(e.to_string()))?;
    pg.connect_timeout(Duration::from_millis(config.connect_timeout_ms));
    if pg.get_application_name().is_none() {
        pg.application_name("outbox-relay");
    }
    let (client, connection) = pg.connect(NoTls).await.map_err(|err| {
        let cause = std::error::Error::source(&err).map(|s| format!(" ({s})")).unwrap_or_default();
        DatabaseError::Connect(format!("{err}{cause}"))
    })?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(error = %err, "postgres connection closed");
        }
    });
    Ok(client)
}

/// Key of the advisory lock that elects the active relay among sidecars
/// sharing one outbox: derived from the table and slot, so relays of
/// different outboxes in one database do not exclude each other.
pub fn leader_lock_key(config: &Config) -> i64 {
    // FNV-1a: stable across versions and platforms, unlike std's hasher.
    let text = format!("outbox-relay:{}:{}", config.outbox_table_sql(), config.source.slot_name);
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash as i64
}

/// Tries to become the active relay. The lock lives as long as `client`'s
/// session: a crashed relay's lock is released when Postgres notices the
/// connection is gone, and a standby takes over.
pub async fn try_lead(client: &Client, key: i64) -> Result<bool, DatabaseError> {
    let row = client.query_one("SELECT pg_try_advisory_lock($1)", &[&key]).await?;
    Ok(row.get(0))
}
