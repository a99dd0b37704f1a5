//! Why a run ended, what that means ([`ErrorClass`], answered by each
//! layer's own error), and the pacing of restarts.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::sync::watch;

use crate::checkpoint::CheckpointError;
use crate::codec::SchemaError;
use crate::database::{self, DatabaseError};
use crate::error_class::ErrorClass;
use crate::hold::TooManyHeld;
use crate::leader::LeaderError;
use crate::sink::SinkError;
use crate::source::logical::LogicalError;
use crate::source::poll::PollError;
use crate::source::slot::SlotError;
use crate::store::StoreError;

/// Why one run of the pipeline ended.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Database(#[from] DatabaseError),
    #[error("postgres")]
    Postgres(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Source(#[from] LogicalError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Poll(#[from] PollError),
    #[error(transparent)]
    Slot(#[from] SlotError),
    #[error(transparent)]
    TooManyHeld(#[from] TooManyHeld),
    #[error(transparent)]
    Leader(#[from] LeaderError),
    /// Retrying cannot help: the relay stops and says what to fix.
    #[error("stopped until an operator acts: {fix}")]
    NeedsOperator {
        fix: String,
        #[source]
        cause: Box<PipelineError>,
    },
}

impl PipelineError {
    /// What this failure means, as the failing layer's error says: by
    /// SQLSTATE codes, typed replication and Kafka errors, and slot state
    /// (see [`ErrorClass`]). A publish-state write refused because another
    /// relay took the lease over, or a Kafka producer fenced by a newer
    /// one, is [`ErrorClass::StepDown`]: the run ends and the relay steps
    /// down, it does not retry.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Database(e) => e.class(),
            Self::Postgres(e) => database::class_of(e),
            Self::Store(e) => e.class(),
            Self::Source(e) => e.class(),
            Self::Sink(e) => e.class(),
            Self::Schema(e) => e.class(),
            Self::Checkpoint(e) => e.class(),
            Self::Poll(e) => e.class(),
            Self::Slot(e) => e.class(),
            Self::TooManyHeld(e) => e.class(),
            Self::Leader(e) => e.class(),
            Self::NeedsOperator { fix, .. } => ErrorClass::Operator(fix.clone().into()),
        }
    }

    /// The `component` label of the restart metric and log line.
    pub(super) fn component(&self) -> &'static str {
        match self {
            Self::Database(_)
            | Self::Postgres(_)
            | Self::Store(_)
            | Self::Source(_)
            | Self::Poll(_)
            | Self::Slot(_)
            | Self::Leader(_) => "postgres",
            Self::Sink(_) | Self::TooManyHeld(_) | Self::Checkpoint(CheckpointError::TooManyHeld(_)) => "kafka",
            Self::Schema(_) => "registry",
            Self::Checkpoint(CheckpointError::Delivery(_)) => "kafka",
            Self::Checkpoint(_) => "postgres",
            Self::NeedsOperator { cause, .. } => cause.component(),
        }
    }
}

/// Turns a failure into a stop when only an operator can cure it; any
/// other failure is handed back to be retried.
pub(super) fn stop_for_operator(err: PipelineError) -> Result<PipelineError, PipelineError> {
    match err.class() {
        ErrorClass::Operator(_) if matches!(err, PipelineError::NeedsOperator { .. }) => Err(err),
        ErrorClass::Operator(fix) => Err(PipelineError::NeedsOperator { fix: fix.into_owned(), cause: Box::new(err) }),
        ErrorClass::Retry | ErrorClass::Hold | ErrorClass::StepDown => Ok(err),
    }
}

/// The delays between restarts.
pub(super) type Backoff = Box<dyn Iterator<Item = Duration> + Send>;

/// Exponential from 200 ms to 10 s, with jitter, without end.
pub(super) fn backoff() -> Backoff {
    Box::new(
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(10))
            .with_jitter()
            .without_max_times()
            .build(),
    )
}

/// Waits `delay`, or less if `stop` turns true. Returns whether to stop.
pub(super) async fn pause(delay: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    let stopped = tokio::select! {
        _ = tokio::time::sleep(delay) => false,
        _ = stop.wait_for(|s| *s) => true,
    };
    stopped || *stop.borrow()
}

#[cfg(test)]
#[path = "error_tests.rs"]
mod tests;
