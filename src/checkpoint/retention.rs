//! Retention: deletes published rows older than `retention.max_age_secs`
//! in small batches, on the active relay only. Held rows have no
//! `published_at` and are never deleted. Each statement finds its rows
//! through the partial index on `published_at` and skips locked rows, so
//! its cost stays flat as the table grows and it never waits on writers.

use std::time::Duration;

use tokio::sync::watch;

use crate::config::Config;
use crate::telemetry::{metrics, Health};

/// Deletes old published rows until `stop`.
pub async fn run(config: Config, health: Health, mut stop: watch::Receiver<bool>) {
    if !config.retention.enabled {
        return;
    }
    let table = config.outbox_table_sql();
    let id = &config.outbox.columns.id;
    let sql = format!(
        "DELETE FROM {table} WHERE \"{id}\" IN (SELECT \"{id}\" FROM {table} \
         WHERE published_at IS NOT NULL AND published_at < now() - make_interval(secs => $1) \
         ORDER BY published_at LIMIT $2 FOR UPDATE SKIP LOCKED)"
    );
    let max_age = config.retention.max_age_secs as f64;
    let interval = Duration::from_secs(config.retention.interval_secs.max(1));
    loop {
        if health.active() {
            if let Ok(client) = crate::database::connect(&config.postgres).await {
                loop {
                    match client.execute(&sql, &[&max_age, &config.retention.batch_rows]).await {
                        Ok(deleted) => {
                            metrics::retention_deleted(deleted);
                            if deleted > 0 {
                                tracing::debug!(deleted, "retention deleted published rows");
                            }
                            if (deleted as i64) < config.retention.batch_rows || *stop.borrow() {
                                break;
                            }
                        }
                        Err(err) => {
                            tracing::warn!(error = %err, "retention failed; trying again later");
                            break;
                        }
                    }
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}
