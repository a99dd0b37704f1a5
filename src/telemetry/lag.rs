//! Samples the lag picture (`store::Status`, from Postgres alone) into
//! gauges and judges progress for `/health/progress`.

use std::time::Duration;

use tokio::sync::watch;
use tokio_postgres::Client;

use super::{metrics, ErrorChain, Health};
use crate::config::{Config, SourceMode};
use crate::store::Store;

/// Samples the lag picture from Postgres every
/// `telemetry.lag_sample_interval_ms` into gauges, and judges progress for
/// `/health/progress`. Runs on standbys too (the lag is the outbox's, not
/// the instance's), until `stop`.
pub async fn sample(config: Config, health: Health, mut stop: watch::Receiver<bool>) {
    let interval = Duration::from_millis(config.telemetry.lag_sample_interval_ms);
    let timeout = config.telemetry.progress_timeout_secs as f64;
    let store = Store::new(&config);
    let logical = config.source.mode == SourceMode::Logical;
    let mut client: Option<Client> = None;
    loop {
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = crate::database::connect(&config.postgres).await.ok();
        }
        if let Some(c) = client.as_mut() {
            match store.status(c, logical).await {
                Ok(s) => {
                    metrics::lag(&s);
                    let since_publish =
                        s.last_published_at.as_deref().and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok()).map(
                            |t| (chrono::Utc::now() - t.with_timezone(&chrono::Utc)).num_milliseconds() as f64 / 1000.0,
                        );
                    let stalled = s.oldest_pending_age_seconds.is_some_and(|age| age > timeout)
                        && since_publish.is_none_or(|since| since > timeout);
                    health.set_progressing(!stalled);
                }
                Err(err) => tracing::debug!(error = %ErrorChain(&err), "lag sample failed"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}
