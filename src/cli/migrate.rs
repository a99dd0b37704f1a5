//! `relay migrate`: applies `migrations/` and creates the publication and
//! slot, as the outbox table's owner; with `--print-grants ROLE` prints the
//! GRANTs the running relay's role needs instead, running nothing.

use std::process::ExitCode;

use crate::config::{Config, Delivery};
use crate::database::{self, DatabaseError};
use crate::migrate::MigrateError;
use crate::sink::SinkError;

/// Why `relay migrate` failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateCommandError {
    #[error(transparent)]
    Database(#[from] DatabaseError),
    #[error(transparent)]
    Migrate(#[from] MigrateError),
    /// The exactly-once progress topic could not be created.
    #[error(transparent)]
    ProgressTopic(#[from] SinkError),
}

/// Runs `relay migrate`, printing what it applied (or the GRANTs for
/// `print_grants`).
pub async fn run(config: &Config, print_grants: Option<&str>) -> Result<ExitCode, MigrateCommandError> {
    if let Some(role) = print_grants {
        print!("{}", crate::store::grants::grants_sql(config, role));
        return Ok(ExitCode::SUCCESS);
    }
    let mut client = database::connect(&config.postgres).await?;
    let applied = crate::migrate::migrate(&mut client, config).await?;
    if applied.is_empty() {
        println!("migrations: up to date");
    } else {
        println!("migrations: applied {}", applied.join(", "));
    }
    if config.kafka.delivery == Delivery::ExactlyOnce && config.routing.create_topics {
        // The administrator's run, so the relay's own principal needs no
        // CREATE on the cluster for it.
        crate::sink::progress::ensure_topic(config).await?;
        println!("progress topic: {} (compacted)", config.kafka.progress_topic);
    }
    Ok(ExitCode::SUCCESS)
}
