//! The integration tests, against the real local stack (`scripts/test`
//! starts it): one binary, so librdkafka and the stack's clients are linked
//! once, and one module per file.
//!
//! `scripts/test` runs each top-level module as a process of its own,
//! several at a time: every test has its own database, slot and topic
//! prefix. The modules in `slow` run the same way but are left out of
//! `scripts/test --fast`. The modules in `exclusive` stop or reconfigure a
//! service the others share, so they run afterwards, one file at a time,
//! with nothing else running.

mod common;

mod avro;
mod cli;
mod deploy;
mod harness;
mod held;
mod partitioned;
mod pipeline_paths;
mod publish_state_side_table;
mod registry_tls;
mod relay_e2e;
mod replay;
mod retention;
mod security;
mod state_cache;
mod state_messages;
mod status_large_backlog;
mod tail;
mod tls;

/// A minute or more each: volume, memory bounds, paced workloads through
/// failovers and restarts, the container image.
mod slow {
    mod exactly_once;
    mod image;
    mod kafka_security;
    mod large_transaction;
    mod leadership;
    mod poll;
    mod soak;
}

/// Tests that stop Postgres, Kafka or the registry, or change cluster-wide
/// settings: `scripts/test` runs them alone.
mod exclusive {
    mod chaos;
    mod slot_recovery;
}
