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
mod exactly_once;
mod harness;
mod held;
mod kafka_security;
mod leadership;
mod partitioned;
mod pipeline_paths;
mod poll;
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

/// Minutes of work each (volume, memory bounds, the container image).
mod slow {
    mod image;
    mod large_transaction;
    mod soak;
}

/// Tests that stop Postgres, Kafka or the registry, or change cluster-wide
/// settings.
mod exclusive {
    mod chaos;
    mod slot_recovery;
}
