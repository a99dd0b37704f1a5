//! Retention: deletes published rows older than `retention.max_age_secs`
//! in small batches, on the active relay only. Held rows have no
//! `published_at` and are never deleted. Each statement finds its rows
//! through the partial index on `published_at` and skips locked rows, so
//! its cost stays flat as the table grows and it never waits on writers.

use std::time::Duration;

use tokio::sync::watch;

use crate::config::Config;
use crate::store::Store;
use crate::telemetry::{metrics, ErrorChain, Health};

/// Deletes old published rows until `stop`.
pub async fn run(config: Config, health: Health, mut stop: watch::Receiver<bool>) {
    if !config.retention.enabled {
        return;
    }
    let store = Store::new(&config);
    let max_age = config.retention.max_age_secs as f64;
    let interval = Duration::from_secs(config.retention.interval_secs.max(1));
    loop {
        if health.active() {
            if let Ok(client) = crate::database::connect(&config.postgres).await {
                loop {
                    match store.delete_published_before(&client, max_age, config.retention.batch_rows).await {
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
                            tracing::warn!(error = %ErrorChain(&err), "retention failed; trying again later");
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
