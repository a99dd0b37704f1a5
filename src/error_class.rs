//! What a failure means for the relay, decided by the error itself: every
//! layer's error enum has a `class()` that matches each of its variants
//! (no catch-all, so a new variant must be classified where it is added)
//! and asks a wrapped error for its own class. The pipeline only acts on
//! the answer ([`crate::pipeline::PipelineError::class`]).

use std::borrow::Cow;

/// What to do about a failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorClass {
    /// A retry can cure it (connection lost, broker down): the run
    /// restarts from its last confirmed commit boundary, with backoff.
    Retry,
    /// Only an operator can (privilege missing, table missing, credentials
    /// refused): the relay stops, and its last line names this fix.
    Operator(Cow<'static, str>),
    /// This one row can never be published as it is (payload does not fit
    /// its schema, record too large): the stage that meets it holds the
    /// row, and later rows of its entity wait behind it.
    Hold,
    /// This relay's lease term is over (another relay took over, or fenced
    /// its Kafka producer): the run ends and the relay stands by, never
    /// retrying into a duplicate.
    StepDown,
}

impl ErrorClass {
    /// [`ErrorClass::Operator`] with a fix written once in the code.
    pub const fn operator(fix: &'static str) -> Self {
        Self::Operator(Cow::Borrowed(fix))
    }
}

/// An error whose own text already names its cause (rdkafka's `KafkaError`
/// prints its error code and returns that code as its source, as does
/// tokio-postgres with its cause): shown as that text alone, so an error
/// chain that holds it as a source prints the cause once.
#[derive(Debug, Clone)]
pub struct Leaf<E>(pub E);

impl<E: std::fmt::Display> std::fmt::Display for Leaf<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl<E: std::fmt::Debug + std::fmt::Display> std::error::Error for Leaf<E> {}

/// A shared cause, for errors that must stay `Clone`.
pub type Cause = std::sync::Arc<dyn std::error::Error + Send + Sync>;

/// A [`Cause`] that is only text (an HTTP status, a library's message).
pub fn text_cause(text: impl Into<String>) -> Cause {
    let boxed: Box<dyn std::error::Error + Send + Sync> = text.into().into();
    boxed.into()
}
