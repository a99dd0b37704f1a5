//! The codec stage: turns an outbox row's payload into the bytes of a Kafka
//! record value.

pub mod avro;
use bytes::Bytes;

use crate::config::PayloadFormat;
use crate::source::OutboxRow;

/// Why a payload could not be encoded. The row is held, never dropped.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("payload is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("payload format {0:?} is not available in this build")]
    Unsupported(PayloadFormat),
}

/// Encodes payloads in the configured format.
#[derive(Debug, Clone)]
pub struct Codec {
    format: PayloadFormat,
}

impl Codec {
    pub fn new(format: PayloadFormat) -> Self {
        Self { format }
    }

    /// The record value for `row`.
    pub fn encode(&self, row: &OutboxRow) -> Result<Bytes, CodecError> {
        match self.format {
            // Postgres already printed the jsonb as canonical JSON text.
            PayloadFormat::Json => Ok(row.payload.clone()),
            PayloadFormat::Avro => Err(CodecError::Unsupported(PayloadFormat::Avro)),
        }
    }
}
