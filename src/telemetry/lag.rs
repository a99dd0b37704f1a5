//! The lag picture from Postgres alone: `relay status` prints it (usable
//! while the relay is down) and the relay samples it into gauges.

use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use tokio_postgres::Client;

use super::{metrics, Health};
use crate::config::{Config, SourceMode};

/// The outbox's publish state.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Rows not yet published and not held.
    pub pending: i64,
    /// Age of the oldest pending row, seconds.
    pub oldest_pending_age_seconds: Option<f64>,
    /// Rows held with an error (`last_error` set, not published), except
    /// those an operator skipped.
    pub failed: i64,
    /// Held rows an operator skipped (`relay held skip`): settled, never published.
    pub skipped: i64,
    /// When the last row was published (RFC 3339).
    pub last_published_at: Option<String>,
    /// Logical mode: WAL the slot retains, bytes.
    pub slot_retained_wal_bytes: Option<i64>,
    /// Logical mode: whether a relay is streaming from the slot.
    pub slot_active: Option<bool>,
}

/// Reads the status; cheap on a large table (partial indexes only).
pub async fn status(client: &Client, config: &Config) -> Result<Status, tokio_postgres::Error> {
    let table = config.outbox_table_sql();
    let occurred = &config.outbox.columns.occurred_at;
    let row = client
        .query_one(
            &format!(
                "SELECT count(*) FILTER (WHERE last_error IS NULL), \
                 extract(epoch FROM now() - min(\"{occurred}\") FILTER (WHERE last_error IS NULL))::float8, \
                 count(*) FILTER (WHERE last_error IS NOT NULL AND skipped_at IS NULL), \
                 count(*) FILTER (WHERE skipped_at IS NOT NULL) \
                 FROM {table} WHERE published_at IS NULL"
            ),
            &[],
        )
        .await?;
    let last: Option<chrono::DateTime<chrono::Utc>> = client
        .query_one(&format!("SELECT max(published_at) FROM {table} WHERE published_at IS NOT NULL"), &[])
        .await?
        .get(0);
    let (mut retained, mut active) = (None, None);
    if config.source.mode == SourceMode::Logical {
        if let Some(slot) = client
            .query_opt(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint, active \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&config.source.slot_name],
            )
            .await?
        {
            retained = slot.get(0);
            active = Some(slot.get(1));
        }
    }
    Ok(Status {
        pending: row.get(0),
        oldest_pending_age_seconds: row.get(1),
        failed: row.get(2),
        skipped: row.get(3),
        last_published_at: last.map(|t| t.to_rfc3339()),
        slot_retained_wal_bytes: retained,
        slot_active: active,
    })
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "pending rows:            {}", self.pending)?;
        match self.oldest_pending_age_seconds {
            Some(age) => writeln!(f, "oldest pending row age:  {age:.1} s")?,
            None => writeln!(f, "oldest pending row age:  -")?,
        }
        writeln!(f, "failed (held) rows:      {}", self.failed)?;
        if self.skipped > 0 {
            writeln!(f, "skipped held rows:       {}", self.skipped)?;
        }
        writeln!(f, "last published at:       {}", self.last_published_at.as_deref().unwrap_or("never"))?;
        if let Some(bytes) = self.slot_retained_wal_bytes {
            writeln!(f, "slot retained WAL:       {bytes} bytes")?;
        }
        if let Some(active) = self.slot_active {
            writeln!(f, "slot active:             {active}")?;
        }
        Ok(())
    }
}

/// Samples the lag picture from Postgres every
/// `telemetry.lag_sample_interval_ms` into gauges, and judges progress for
/// `/health/progress`. Runs on standbys too (the lag is the outbox's, not
/// the instance's), until `stop`.
pub async fn sample(config: Config, health: Health, mut stop: watch::Receiver<bool>) {
    let interval = Duration::from_millis(config.telemetry.lag_sample_interval_ms);
    let timeout = config.telemetry.progress_timeout_secs as f64;
    let mut client: Option<Client> = None;
    loop {
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = crate::database::connect(&config.postgres).await.ok();
        }
        if let Some(c) = &client {
            match status(c, &config).await {
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
                Err(err) => tracing::debug!(error = %err, "lag sample failed"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}
