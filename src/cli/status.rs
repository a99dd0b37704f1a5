//! `relay status`: the outbox lag picture straight from Postgres, as text
//! or JSON; exit 2 when the oldest pending row is older than a limit.

use std::process::ExitCode;

use crate::config::{Config, SourceMode};
use crate::database::{self, DatabaseError};
use crate::store::{Store, StoreError};

/// Why `relay status` failed.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Database(#[from] DatabaseError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

/// Prints the status (JSON when `json`); exit code 2 when the oldest
/// pending row is older than `max_lag_seconds`, so a cron job or a probe can
/// alert on it.
pub async fn run(config: &Config, json: bool, max_lag_seconds: Option<f64>) -> Result<ExitCode, StatusError> {
    let mut client = database::connect(&config.postgres).await?;
    let logical = config.source.mode == SourceMode::Logical;
    let status = Store::new(config).status(&mut client, logical).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{status}");
    }
    let lagging = matches!((max_lag_seconds, status.oldest_pending_age_seconds), (Some(max), Some(age)) if age > max);
    Ok(if lagging { ExitCode::from(2) } else { ExitCode::SUCCESS })
}
