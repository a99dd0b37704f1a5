//! The command line: `relay --config FILE` runs the relay; subcommands do
//! one-off operations against the same configuration.

pub mod check;
pub mod held;
pub mod migrate;
pub mod probe;
pub mod replay;
pub mod schemas;
pub mod status;
pub mod tail;

pub use schemas::SchemasAction;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// `relay --version`: the crate version and the git revision it was built
/// from (`unknown` outside a git checkout; see build.rs).
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (git ", env!("RELAY_GIT_REVISION"), ")");

/// Transactional outbox relay: publishes outbox rows from PostgreSQL to
/// Apache Kafka in commit order, keyed per entity, recording publish state.
#[derive(Debug, Parser)]
#[command(name = "relay", version = VERSION, about, long_about = None)]
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

/// The subcommands; each is carried out by the `run` of its module.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the relay (the default when no subcommand is given).
    Run,
    /// Apply migrations/ (idempotent) and create the publication and slot,
    /// as the outbox table's owner; in exactly-once mode also the compacted
    /// progress topic (when `routing.create_topics`).
    Migrate {
        /// Print, instead, the GRANTs the running relay's role ROLE needs
        /// with this config (least privilege; nothing is run).
        #[arg(long, value_name = "ROLE")]
        print_grants: Option<String>,
    },
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
    /// Re-publish already published rows (for a consumer that lost data), in
    /// id order, with headers `replayed: true` and `replayed_at`. Publish
    /// state is left as it is: a replay is not a publication.
    #[command(group(clap::ArgGroup::new("start").required(true).args(["since", "from_id"])))]
    Replay {
        /// Rows whose occurred_at is at or after this RFC 3339 time.
        #[arg(long, value_name = "TIME", value_parser = parse_rfc3339)]
        since: Option<chrono::DateTime<chrono::Utc>>,
        /// Rows with id >= N.
        #[arg(long, value_name = "N")]
        from_id: Option<i64>,
        /// Rows with id <= N (default: the highest published id at start).
        #[arg(long, value_name = "N")]
        to_id: Option<i64>,
        /// Only rows of this aggregate type.
        #[arg(long, value_name = "T")]
        aggregate_type: Option<String>,
    },
    /// GET PATH (e.g. /readyz) from this relay's own HTTP endpoint
    /// (telemetry.http_listen, 0.0.0.0 probed on 127.0.0.1); exit 1 unless
    /// it answers 2xx. The container image's healthcheck: it has no curl.
    Probe {
        /// The endpoint's path: /readyz, /healthz, /health/progress.
        #[arg(default_value = "/readyz")]
        path: String,
        /// Give up after this many milliseconds.
        #[arg(long, value_name = "MS", default_value_t = 2000)]
        timeout_ms: u64,
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
    /// Print what went out on TOPIC: partition, offset, key, headers and
    /// value (Avro decoded through the registry, JSON as it is, `null` for
    /// a tombstone). Read-only: no consumer group, no committed offsets.
    Tail {
        /// The topic to read.
        topic: String,
        /// Start at the beginning of each partition (default: at the end).
        #[arg(long)]
        from_beginning: bool,
        /// Stop after N records.
        #[arg(long, value_name = "N")]
        max: Option<u64>,
        /// Keep printing records as they arrive (default: stop at the end
        /// offsets seen at start).
        #[arg(long)]
        follow: bool,
        /// One JSON object per line: {topic, partition, offset, key,
        /// headers, value}.
        #[arg(long)]
        json: bool,
    },
}

fn parse_rfc3339(text: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| format!("{e}; expected RFC 3339, e.g. 2026-11-23T16:40:00Z"))
}
