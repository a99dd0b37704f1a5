//! Applies `migrations/` idempotently; a version table records what ran.

use tokio_postgres::Client;

use crate::config::{Config, SourceMode};
use crate::source::{poll, slot};
use crate::store::{Store, StoreError};

/// The migrations, in order, compiled into the binary.
const MIGRATIONS: &[(&str, &str)] = &[
    ("0001_outbox", include_str!("../migrations/0001_outbox.sql")),
    ("0002_notify", include_str!("../migrations/0002_notify.sql")),
    ("0003_held", include_str!("../migrations/0003_held.sql")),
    ("0004_catchup", include_str!("../migrations/0004_catchup.sql")),
    ("0005_waiting", include_str!("../migrations/0005_waiting.sql")),
    ("0006_leader", include_str!("../migrations/0006_leader.sql")),
    ("0007_tombstones", include_str!("../migrations/0007_tombstones.sql")),
    ("0008_side_table", include_str!("../migrations/0008_side_table.sql")),
];

/// Why migrating failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("migration {version} failed")]
    Apply { version: String, source: tokio_postgres::Error },
    #[error("postgres")]
    Postgres(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Slot(#[from] slot::SlotError),
    #[error("moving the publish state into checkpoint.publish_state's layout failed")]
    Layout(#[from] StoreError),
}

/// Applies every migration not yet recorded, each in its own transaction,
/// under an advisory lock so concurrent sidecars do not race. In logical mode
/// it then creates the publication and slot, so rows written from now on are
/// streamed even before the relay first starts; in poll mode the NOTIFY
/// trigger (dropped in logical mode). Returns the versions applied.
pub async fn migrate(client: &mut Client, config: &Config) -> Result<Vec<String>, MigrateError> {
    let schema = &config.outbox.schema;
    let table = &config.outbox.table;
    let version_table = format!("\"{schema}\".\"{table}_relay_migrations\"");
    client
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {version_table} (version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        ))
        .await?;
    let mut applied = Vec::new();
    for (version, sql) in MIGRATIONS {
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock(7263521)", &[]).await?;
        let done =
            tx.query_opt(&format!("SELECT 1 FROM {version_table} WHERE version = $1"), &[version]).await?.is_some();
        if !done {
            let sql = sql.replace("{{schema}}", schema).replace("{{table}}", table);
            tx.batch_execute(&sql)
                .await
                .map_err(|source| MigrateError::Apply { version: version.to_string(), source })?;
            tx.execute(&format!("INSERT INTO {version_table} (version) VALUES ($1)"), &[version]).await?;
            applied.push(version.to_string());
        }
        tx.commit().await?;
    }
    let moved = Store::new(config).move_publish_state(client).await?;
    if moved > 0 {
        tracing::info!(rows = moved, layout = ?config.checkpoint.publish_state, "moved publish state into the configured layout");
    }
    if config.source.mode == SourceMode::Logical {
        slot::ensure_publication_and_slot(client, config).await?;
    }
    poll::set_notify_trigger(client, config, config.source.mode == SourceMode::Poll).await?;
    Ok(applied)
}
