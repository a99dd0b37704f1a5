//! The source stage: reads outbox rows in commit order.
//!
//! Two implementations feed the same downstream path: [`logical`] (streaming
//! with `pgoutput`, the default) and ordered polling ([`poll`]). Logical mode
//! manages its replication slot in [`slot`] and, after the slot was created
//! or recreated, first runs the [`catchup`] phase through the poll path. A
//! source emits [`SourceEvent`]s into a bounded channel; when the channel is
//! full it stops reading, which is how Kafka backpressure reaches Postgres.
//!
//! [`SourceEvent`]: crate::outbox::SourceEvent

pub mod catchup;
pub mod logical;
pub mod pgoutput;
pub mod poll;
pub mod slot;
