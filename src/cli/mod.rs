//! The command line: `relay --config FILE` runs the relay; subcommands do
//! one-off operations against the same configuration.

pub mod check;
pub mod held;
pub mod schemas;


use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Transactional outbox relay: publishes outbox rows from PostgreSQL to
/// Apache Kafka in commit order, keyed per entity, recording publish state.
#[derive(Debug, Parser)]
#[command(name = "relay", version, about, long_about = None)]
pub struct Cli {
    /// Configuration file (TOML). Every key can be overridden by an
    /// environment variable such as RELAY__POSTGRES__URL.
    #[arg(long, short = 'c', global = true, value_name = "FILE", env = "RELAY_CONFIG")]
    pub config: Option<PathBuf>,

    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    pub log_json: bool,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the relay (the default when no subcommand is given).
    Run,
    /// Apply migrations/ (idempotent) and create the publication and slot.
    Migrate,
    /// Validate the config and reach Postgres, Kafka and the schema registry.
    Check,
    /// Print the outbox lag picture straight from Postgres.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Exit with status 2 when the oldest pending row is older than this.
        #[arg(long, value_name = "SECONDS")]
        max_lag_seconds: Option<f64>,
    },
    /// Held rows: list them, retry one after fixing its cause, or skip it.
    Held {
        #[command(subcommand)]
        action: held::HeldAction,
    },
    /// Register the Avro schemas of codec.schemas, or check them against the
    /// registry's compatibility rules.
    Schemas {
        #[command(subcommand)]
        action: SchemasAction,
    },
}

#[derive(Debug, Subcommand)]
pub enum SchemasAction {
    /// Register every schema under its subject (idempotent) and set the
    /// subject's compatibility level to codec.compatibility.
    Register,
    /// Check every schema against its subject's compatibility rule; exit 1
    /// naming each subject that fails, and why.
    Check,
}
