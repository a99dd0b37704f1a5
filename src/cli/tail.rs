//! `relay tail TOPIC`: prints what went out on a topic, record by record:
//! partition, offset, key, headers and the value decoded for a human (or,
//! with `--json`, for a script).
//!
//! The consumer is read-only: it assigns the topic's partitions itself and
//! never joins a group or commits an offset, so tailing a topic changes
//! nothing any real consumer group sees. Without `--follow` it reads to the
//! end offsets it saw at start and stops; without `--from-beginning` it
//! starts at those end offsets (so only `--follow` prints anything).
//! `--follow` of a topic that does not exist yet waits for it and reads it
//! from the beginning: all of it was written after tail started.
//!
//! Reading is [`TopicReader`]'s; values (and keys) are decoded by
//! [`PayloadDecoder`]: the Confluent wire format through the registry when
//! one is configured, else JSON text as it is, byte for byte; a tombstone
//! (null value) is `null`.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use rdkafka::message::{Headers, Message, OwnedMessage};
use serde_json::value::RawValue;
use serde_json::Value as JsonValue;

use crate::codec::decode::{hex, Decoded, PayloadDecoder};
use crate::codec::registry::RegistryError;
use crate::config::Config;
use crate::sink::consumer::{consumer_config, ReadError, Start, TopicReader};

/// How long one wait for a record lasts before the stop conditions are
/// looked at again.
const POLL_STEP: Duration = Duration::from_millis(200);
/// How often `--follow` looks again for a topic that does not exist yet.
const TOPIC_WAIT: Duration = Duration::from_millis(500);

/// What `relay tail` was asked to do.
#[derive(Debug, Clone)]
pub struct TailOptions {
    pub topic: String,
    /// Start at the beginning of each partition instead of its end.
    pub from_beginning: bool,
    /// Stop after this many records.
    pub max: Option<u64>,
    /// Keep waiting for new records instead of stopping at the end offsets
    /// seen at start.
    pub follow: bool,
    /// One JSON object per line instead of readable text.
    pub json: bool,
}

/// Why a topic could not be read. All of them stop the command; none is
/// about one record (a record that cannot be decoded is printed undecoded,
/// with the reason).
#[derive(Debug, thiserror::Error)]
pub enum TailError {
    /// The topic could not be read.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// The registry settings cannot be used (`registry.tls_ca_file`).
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// Standard output was closed or failed.
    #[error("cannot write the output")]
    Output(#[source] std::io::Error),
}

/// Runs `relay tail` on standard output.
pub async fn run(
    config: &Config,
    options: &TailOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<ExitCode, TailError> {
    let mut out = std::io::stdout().lock();
    tail(config, options, &mut out, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

/// Prints each record of `options.topic` to `out` until the end offsets
/// seen at start (or forever with `--follow`), `--max` records, or
/// `shutdown`. Returns how many records were printed.
pub async fn tail(
    config: &Config,
    options: &TailOptions,
    out: &mut dyn Write,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<u64, TailError> {
    let decoder = PayloadDecoder::for_config(config)?;
    let mut start = if options.from_beginning { Start::Beginning } else { Start::End };
    tokio::pin!(shutdown);
    let mut waiting = false;
    let mut reader = loop {
        match TopicReader::open(consumer_config(&config.kafka), &options.topic, start).await {
            Ok(reader) => break reader,
            // Following a topic the relay has not created yet (its first row
            // of that type is still to come): wait for it.
            Err(ReadError::NoSuchTopic { reason, .. }) if options.follow => {
                if !waiting {
                    eprintln!("relay tail: waiting for topic {} ({reason})", options.topic);
                    waiting = true;
                }
                // Every record of a topic that did not exist when tail began
                // was written after it began: read them all, or a burst
                // published right after the topic was created is missed.
                start = Start::Beginning;
                tokio::select! {
                    _ = &mut shutdown => return Ok(0),
                    _ = tokio::time::sleep(TOPIC_WAIT) => {}
                }
            }
            Err(err) => return Err(err.into()),
        }
    };
    if options.follow {
        // On stderr, so scripts reading stdout see records only; once it
        // is printed, every record written later is read.
        let from = if start == Start::Beginning { "the beginning" } else { "the end" };
        let partitions = reader.end_offsets().len();
        eprintln!("relay tail: following {} ({partitions} partitions) from {from}", options.topic);
    } else if !options.from_beginning {
        eprintln!("relay tail: starting at the end without --follow reads nothing; add --from-beginning or --follow");
    }
    let mut printed = 0u64;
    loop {
        if options.max.is_some_and(|max| printed >= max) || (!options.follow && reader.caught_up()) {
            break;
        }
        let message = tokio::select! {
            _ = &mut shutdown => break,
            next = reader.next(POLL_STEP) => next?,
        };
        let Some(message) = message else { continue };
        let record = TailRecord::decode(&decoder, &message).await;
        let line = if options.json { record.json_line() } else { record.text_line() };
        match writeln!(out, "{line}").and_then(|()| out.flush()) {
            Ok(()) => printed += 1,
            // The reader went away (`relay tail ... | head`): done.
            Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => break,
            Err(err) => return Err(TailError::Output(err)),
        }
    }
    Ok(printed)
}

/// One record as `relay tail` prints it.
#[derive(Debug, Clone)]
pub struct TailRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Decoded,
    /// Header names and values, in the record's order (values as UTF-8
    /// text, or hex).
    pub headers: Vec<(String, Option<String>)>,
    pub value: Decoded,
}

impl TailRecord {
    /// Decodes `message`'s key and value with `decoder`.
    pub async fn decode(decoder: &PayloadDecoder, message: &OwnedMessage) -> Self {
        let headers = message
            .headers()
            .map(|headers| {
                headers
                    .iter()
                    .map(|h| {
                        let value = h.value.map(|v| match std::str::from_utf8(v) {
                            Ok(text) => text.to_string(),
                            Err(_) => format!("hex:{}", hex(v)),
                        });
                        (h.key.to_string(), value)
                    })
                    .collect()
            })
            .unwrap_or_default();
        Self {
            topic: message.topic().to_string(),
            partition: message.partition(),
            offset: message.offset(),
            key: decoder.decode_key(message.key()).await,
            headers,
            value: decoder.decode(message.payload()).await,
        }
    }

    /// The value of header `name` (the last one of that name).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().rev().find(|(n, _)| n == name).and_then(|(_, v)| v.as_deref())
    }

    /// `{"topic", "partition", "offset", "key", "headers": {..}, "value"}`
    /// on one line; a JSON value keeps the bytes it was published with.
    /// Headers repeated under one name keep the last value.
    pub fn json_line(&self) -> String {
        #[derive(serde::Serialize)]
        struct Line<'a> {
            topic: &'a str,
            partition: i32,
            offset: i64,
            key: JsonValue,
            headers: serde_json::Map<String, JsonValue>,
            value: Box<RawValue>,
        }
        let key = match &self.key {
            Decoded::Text(text) => JsonValue::String(text.clone()),
            other => serde_json::from_str(other.to_raw_json().get()).unwrap_or(JsonValue::Null),
        };
        let headers = self
            .headers
            .iter()
            .map(|(name, value)| (name.clone(), value.clone().map_or(JsonValue::Null, JsonValue::String)))
            .collect();
        let line = Line {
            topic: &self.topic,
            partition: self.partition,
            offset: self.offset,
            key,
            headers,
            value: self.value.to_raw_json(),
        };
        serde_json::to_string(&line).unwrap_or_else(|e| format!("{{\"error\":{:?}}}", e.to_string()))
    }

    /// `p3 @17 key=ord-1 headers={event_id=.., kind=state} value={..}`.
    pub fn text_line(&self) -> String {
        let headers: Vec<String> =
            self.headers.iter().map(|(name, value)| format!("{name}={}", value.as_deref().unwrap_or("null"))).collect();
        format!(
            "p{} @{} key={} headers={{{}}} value={}",
            self.partition,
            self.offset,
            self.key.text(),
            headers.join(", "),
            self.value.text()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_print_as_json_and_as_text() {
        let record = TailRecord {
            topic: "t".into(),
            partition: 1,
            offset: 7,
            key: Decoded::Text("ord-1".into()),
            headers: vec![("kind".into(), Some("state".into()))],
            value: Decoded::Null,
        };
        assert_eq!(
            record.json_line(),
            r#"{"topic":"t","partition":1,"offset":7,"key":"ord-1","headers":{"kind":"state"},"value":null}"#
        );
        assert_eq!(record.text_line(), "p1 @7 key=ord-1 headers={kind=state} value=null");
    }
}
