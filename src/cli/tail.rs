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
//! Values (and keys) are decoded by [`PayloadDecoder`]: the Confluent wire
//! format through the registry when one is configured, else JSON text as it
//! is, byte for byte; a tombstone (null value) is `null`. The
//! `state_cache` example reads a topic with the same [`TopicReader`] and
//! decoder.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apache_avro::schema::{Name, Names, ResolvedSchema};
use apache_avro::types::Value as AvroValue;
use apache_avro::Schema;
use chrono::{DateTime, SecondsFormat};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use schema_registry_converter::async_impl::avro::AvroDecoder;
use serde_json::value::RawValue;
use serde_json::{json, Value as JsonValue};

use crate::codec::registry::{sr_settings, RegistryError};
use crate::config::{Config, KafkaConfig, PayloadFormat, RegistryConfig};
use crate::telemetry::ErrorChain;

/// How long metadata and watermark requests may take at start.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// librdkafka refused the client configuration.
    #[error("cannot create a Kafka consumer")]
    Client(#[source] KafkaError),
    /// The brokers did not answer a metadata request: unreachable, or the
    /// credentials were refused (`relay check` tells which).
    #[error("cannot read the metadata of topic `{topic}` (run `relay check` to diagnose the connection)")]
    Metadata {
        topic: String,
        #[source]
        source: KafkaError,
    },
    /// The topic does not exist, or the principal may not describe it.
    #[error("topic `{topic}` cannot be read: {reason}")]
    NoSuchTopic { topic: String, reason: String },
    /// The end offsets of a partition could not be read.
    #[error("cannot read the offsets of {topic}/{partition}")]
    Watermarks {
        topic: String,
        partition: i32,
        #[source]
        source: KafkaError,
    },
    /// The partitions could not be assigned.
    #[error("cannot assign the partitions of `{topic}`")]
    Assign {
        topic: String,
        #[source]
        source: KafkaError,
    },
    /// Reading failed for a reason a retry cannot cure (authorization, the
    /// topic was deleted).
    #[error("reading `{topic}` failed")]
    Consume {
        topic: String,
        #[source]
        source: KafkaError,
    },
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
            Err(TailError::NoSuchTopic { reason, .. }) if options.follow => {
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
            Err(err) => return Err(err),
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

/// The relay's connection properties (bootstrap servers, TLS, SASL, the
/// raw `kafka.librdkafka` map) for a consumer that never commits: a group
/// id of its own is set because librdkafka wants one, but partitions are
/// assigned, not subscribed, so the group never joins or stores offsets.
pub fn consumer_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut client = crate::sink::connection::client_config(kafka);
    reader_settings(&mut client);
    client
}

/// A read-only consumer of `bootstrap` with no other settings (for tools
/// that are given brokers instead of a relay config).
pub fn plain_consumer_config(bootstrap: &str) -> ClientConfig {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", bootstrap);
    reader_settings(&mut client);
    client
}

fn reader_settings(client: &mut ClientConfig) {
    client
        .set("group.id", format!("relay-tail-{}", uuid::Uuid::new_v4().simple()))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("allow.auto.create.topics", "false")
        // Only committed records of exactly-once transactions (what a
        // consumer of the relay should see).
        .set("isolation.level", "read_committed");
}

/// Where a [`TopicReader`] starts on each partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The first offset each partition still holds.
    Beginning,
    /// The end offset at start: only records written later are read.
    End,
}

/// Reads every partition of one topic by assignment (no group membership,
/// no commits) and knows when it has read up to the end offsets the
/// partitions had when it started.
pub struct TopicReader {
    consumer: Arc<StreamConsumer>,
    topic: String,
    /// (partition, end offset when the reader started).
    ends: Vec<(i32, i64)>,
    /// Per partition, the offset after the last record returned.
    next: HashMap<i32, i64>,
}

impl TopicReader {
    /// Looks up the topic's partitions and their end offsets, and assigns
    /// every partition at `start`.
    pub async fn open(client: ClientConfig, topic: &str, start: Start) -> Result<Self, TailError> {
        let consumer: Arc<StreamConsumer> = Arc::new(client.create().map_err(TailError::Client)?);
        let lookup = consumer.clone();
        let name = topic.to_string();
        // Metadata and watermark requests block: off the async threads.
        let offsets = tokio::task::spawn_blocking(move || partition_offsets(&lookup, &name)).await.map_err(|e| {
            TailError::NoSuchTopic { topic: topic.to_string(), reason: format!("the lookup failed: {e}") }
        })??;
        let mut assignment = TopicPartitionList::new();
        let mut next = HashMap::new();
        for &(partition, low, high) in &offsets {
            let (offset, from) = match start {
                Start::Beginning => (Offset::Beginning, low),
                Start::End => (Offset::Offset(high), high),
            };
            assignment
                .add_partition_offset(topic, partition, offset)
                .map_err(|source| TailError::Assign { topic: topic.to_string(), source })?;
            next.insert(partition, from);
        }
        consumer.assign(&assignment).map_err(|source| TailError::Assign { topic: topic.to_string(), source })?;
        let ends = offsets.iter().map(|&(partition, _, high)| (partition, high)).collect();
        Ok(Self { consumer, topic: topic.to_string(), ends, next })
    }

    /// Whether every record below the end offsets seen at start was read.
    /// The consumer's position counts too: it moves past offsets that are
    /// never returned (transaction markers, aborted records).
    pub fn caught_up(&self) -> bool {
        let positions = self.consumer.position().ok();
        self.ends.iter().all(|&(partition, end)| {
            let seen = self.next.get(&partition).copied().unwrap_or(0);
            let position = positions
                .as_ref()
                .and_then(|p| p.find_partition(&self.topic, partition))
                .and_then(|e| e.offset().to_raw())
                .unwrap_or(-1);
            seen.max(position) >= end
        })
    }

    /// The partitions read and their end offsets when the reader started.
    pub fn end_offsets(&self) -> &[(i32, i64)] {
        &self.ends
    }

    /// The next record, or `None` when none arrived within `wait`. Errors
    /// a retry may cure (a broker restarting) are logged and read past;
    /// the others end the read.
    pub async fn next(&mut self, wait: Duration) -> Result<Option<OwnedMessage>, TailError> {
        match tokio::time::timeout(wait, self.consumer.recv()).await {
            Err(_) => Ok(None),
            Ok(Ok(message)) => {
                let slot = self.next.entry(message.partition()).or_insert(0);
                *slot = (*slot).max(message.offset() + 1);
                Ok(Some(message.detach()))
            }
            Ok(Err(err)) if is_fatal(&err) => Err(TailError::Consume { topic: self.topic.clone(), source: err }),
            Ok(Err(err)) => {
                tracing::warn!(topic = %self.topic, error = %err, "consumer error; retrying");
                Ok(None)
            }
        }
    }
}

/// Errors that waiting cannot cure.
fn is_fatal(err: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        err.rdkafka_error_code(),
        Some(
            C::TopicAuthorizationFailed
                | C::GroupAuthorizationFailed
                | C::ClusterAuthorizationFailed
                | C::UnknownTopicOrPartition
                | C::UnknownTopic
                | C::UnknownPartition
                | C::Authentication
                | C::SaslAuthenticationFailed
        )
    )
}

/// (partition, low, high) of every partition of `topic`.
fn partition_offsets(consumer: &StreamConsumer, topic: &str) -> Result<Vec<(i32, i64, i64)>, TailError> {
    let metadata = consumer
        .fetch_metadata(Some(topic), METADATA_TIMEOUT)
        .map_err(|source| TailError::Metadata { topic: topic.to_string(), source })?;
    let entry = metadata.topics().iter().find(|t| t.name() == topic).ok_or_else(|| TailError::NoSuchTopic {
        topic: topic.to_string(),
        reason: "not in the brokers' metadata".into(),
    })?;
    if let Some(err) = entry.error() {
        let reason = RDKafkaErrorCode::from(err).to_string();
        return Err(TailError::NoSuchTopic { topic: topic.to_string(), reason });
    }
    if entry.partitions().is_empty() {
        return Err(TailError::NoSuchTopic { topic: topic.to_string(), reason: "it has no partitions".into() });
    }
    let mut offsets = Vec::new();
    for partition in entry.partitions() {
        let (low, high) = consumer
            .fetch_watermarks(topic, partition.id(), METADATA_TIMEOUT)
            .map_err(|source| TailError::Watermarks { topic: topic.to_string(), partition: partition.id(), source })?;
        offsets.push((partition.id(), low, high));
    }
    offsets.sort_unstable();
    Ok(offsets)
}

/// A key or value as a reader sees it.
#[derive(Debug, Clone)]
pub enum Decoded {
    /// No bytes at all: a tombstone's value, or a record without a key.
    Null,
    /// Valid JSON text, kept byte for byte as it was published.
    Json(Box<RawValue>),
    /// A Confluent-framed Avro datum, decoded with the writer schema the
    /// registry holds under `schema_id`.
    Avro { schema_id: u32, value: JsonValue },
    /// UTF-8 text that is not JSON (e.g. a string key).
    Text(String),
    /// Bytes that are none of the above (shown in hex).
    Binary(Vec<u8>),
    /// A Confluent-framed datum that could not be decoded (registry
    /// unreachable, unknown schema id, bytes that do not fit the schema).
    Undecodable { reason: String, bytes: Vec<u8> },
}

impl Decoded {
    /// The JSON form for `--json` and the cache: JSON text as it is, an
    /// Avro datum as JSON, text as a string, bytes as `{"hex": ..}`.
    pub fn to_raw_json(&self) -> Box<RawValue> {
        let value = match self {
            Self::Json(raw) => return raw.clone(),
            Self::Null => JsonValue::Null,
            Self::Avro { value, .. } => value.clone(),
            Self::Text(text) => JsonValue::String(text.clone()),
            Self::Binary(bytes) => json!({ "hex": hex(bytes) }),
            Self::Undecodable { reason, bytes } => json!({ "hex": hex(bytes), "error": reason }),
        };
        serde_json::value::to_raw_value(&value).unwrap_or_else(|_| null_raw())
    }

    /// The decoded value as parsed JSON (`None` for a tombstone); an error
    /// for bytes that are neither JSON nor a decodable Avro datum.
    pub fn to_json(&self) -> Result<Option<JsonValue>, String> {
        match self {
            Self::Null => Ok(None),
            Self::Json(raw) => serde_json::from_str(raw.get()).map(Some).map_err(|e| e.to_string()),
            Self::Avro { value, .. } => Ok(Some(value.clone())),
            Self::Text(text) => Err(format!("not JSON: {} bytes of text", text.len())),
            Self::Binary(bytes) => Err(format!("not JSON: {} bytes of binary data", bytes.len())),
            Self::Undecodable { reason, .. } => Err(reason.clone()),
        }
    }

    /// The readable form: JSON and text as they are, `null`, hex.
    pub fn text(&self) -> String {
        match self {
            Self::Null => "null".into(),
            Self::Json(raw) => raw.get().to_string(),
            Self::Avro { value: JsonValue::String(text), .. } => text.clone(),
            Self::Avro { value, .. } => value.to_string(),
            Self::Text(text) => text.clone(),
            Self::Binary(bytes) => format!("hex:{}", hex(bytes)),
            Self::Undecodable { reason, bytes } => format!("hex:{} (undecodable: {reason})", hex(bytes)),
        }
    }
}

fn null_raw() -> Box<RawValue> {
    RawValue::from_string("null".into()).unwrap_or_else(|_| unreachable!("`null` is JSON"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Decodes keys and values: Confluent-framed Avro through the registry
/// (when one is configured), JSON text as it is, other text as text.
pub struct PayloadDecoder {
    avro: Option<AvroDecoder>,
    /// Each writer schema with its named types, by registry id (for the
    /// scale of decimals behind a named reference).
    resolved: Mutex<HashMap<u32, Arc<WriterSchema>>>,
}

impl PayloadDecoder {
    /// Decodes through `registry` when given; without one, Avro datums
    /// show as bytes.
    pub fn new(registry: Option<&RegistryConfig>) -> Result<Self, RegistryError> {
        let avro = registry.map(|config| sr_settings(config).map(AvroDecoder::new)).transpose()?;
        Ok(Self { avro, resolved: Mutex::default() })
    }

    /// The registry of the relay's config when `codec.format = "avro"` or a
    /// `registry.url` is set.
    pub fn for_config(config: &Config) -> Result<Self, RegistryError> {
        let use_registry = config.codec.format == PayloadFormat::Avro || !config.registry.url.is_empty();
        Self::new(use_registry.then_some(&config.registry))
    }

    /// Decodes one key or value. Never fails: what cannot be decoded is
    /// returned as [`Decoded::Undecodable`] with the reason.
    pub async fn decode(&self, bytes: Option<&[u8]>) -> Decoded {
        let Some(bytes) = bytes else { return Decoded::Null };
        if let (Some(avro), [0, _, _, _, _, ..]) = (&self.avro, bytes) {
            return match avro.decode_with_schema(Some(bytes)).await {
                Ok(Some(decoded)) => {
                    let id = decoded.schema.id;
                    let value = match self.resolved_schema(id, &decoded.schema.parsed) {
                        Some(resolved) => avro_to_json(&decoded.value, Some(&resolved.schema), &resolved.names),
                        None => avro_to_json(&decoded.value, Some(&decoded.schema.parsed), &NO_NAMES),
                    };
                    Decoded::Avro { schema_id: id, value }
                }
                Ok(None) => Decoded::Null,
                Err(err) => Decoded::Undecodable { reason: ErrorChain(&err).to_string(), bytes: bytes.to_vec() },
            };
        }
        if let Ok(raw) = serde_json::from_slice::<&RawValue>(bytes) {
            return Decoded::Json(raw.to_owned());
        }
        match std::str::from_utf8(bytes) {
            Ok(text) if !text.chars().any(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r')) => {
                Decoded::Text(text.to_string())
            }
            _ => Decoded::Binary(bytes.to_vec()),
        }
    }

    /// Decodes a record key: an Avro datum as for values, else the entity
    /// id as text (never parsed as JSON: an id `42` stays the text `42`).
    pub async fn decode_key(&self, bytes: Option<&[u8]>) -> Decoded {
        match bytes {
            Some([0, _, _, _, _, ..]) if self.avro.is_some() => self.decode(bytes).await,
            Some(bytes) => match std::str::from_utf8(bytes) {
                Ok(text) => Decoded::Text(text.to_string()),
                Err(_) => Decoded::Binary(bytes.to_vec()),
            },
            None => Decoded::Null,
        }
    }

    fn resolved_schema(&self, id: u32, schema: &Schema) -> Option<Arc<WriterSchema>> {
        let mut cache = self.resolved.lock().ok()?;
        if let Some(resolved) = cache.get(&id) {
            return Some(resolved.clone());
        }
        let resolved = Arc::new(WriterSchema::new(schema)?);
        cache.insert(id, resolved.clone());
        Some(resolved)
    }
}

/// A writer schema with its named types, owned (for the cache by id).
struct WriterSchema {
    schema: Schema,
    names: Names,
}

impl WriterSchema {
    fn new(schema: &Schema) -> Option<Self> {
        let names = ResolvedSchema::new(schema)
            .ok()?
            .get_names()
            .iter()
            .map(|(name, schema)| (name.clone(), (*schema).clone()))
            .collect();
        Some(Self { schema: schema.clone(), names })
    }
}

/// Named types of a schema, for [`avro_to_json`].
pub trait SchemaNames {
    fn lookup(&self, name: &Name) -> Option<&Schema>;
}

impl SchemaNames for Names {
    fn lookup(&self, name: &Name) -> Option<&Schema> {
        self.get(name)
    }
}

impl SchemaNames for apache_avro::schema::NamesRef<'_> {
    fn lookup(&self, name: &Name) -> Option<&Schema> {
        self.get(name).copied()
    }
}

struct NoNames;

impl SchemaNames for NoNames {
    fn lookup(&self, _: &Name) -> Option<&Schema> {
        None
    }
}

const NO_NAMES: NoNames = NoNames;

/// Renders a decoded Avro datum as the JSON the relay's Avro codec accepts
/// for it (`codec::avro::json_to_avro`), so a payload that went out as
/// Avro reads back as the payload: unions as their branch's value (no
/// `{"type": value}` wrapping), enums as their symbol, decimals as strings
/// at the schema's scale (`"59.97"`), `date` as `"YYYY-MM-DD"`, `time-*` as
/// `"HH:MM:SS.fff"`, `timestamp-*` as RFC 3339 in UTC with the unit's
/// precision (`"2026-11-23T16:40:00.123Z"`), `local-timestamp-*` without
/// the zone, `uuid` as text, `duration` as `{"months", "days", "millis"}`,
/// `bytes` and `fixed` as UTF-8 text when they are (else one character per
/// byte, Avro's own JSON encoding), and NaN or infinite floats as strings.
/// `schema` (the writer schema) is needed only for the scale of decimals.
pub fn avro_to_json(value: &AvroValue, schema: Option<&Schema>, names: &dyn SchemaNames) -> JsonValue {
    let schema = schema.map(|s| match s {
        Schema::Ref { name } => names.lookup(name).unwrap_or(s),
        _ => s,
    });
    match value {
        AvroValue::Null => JsonValue::Null,
        AvroValue::Boolean(b) => JsonValue::Bool(*b),
        AvroValue::Int(n) => json!(n),
        AvroValue::Long(n) => json!(n),
        AvroValue::Float(f) => float(f64::from(*f)),
        AvroValue::Double(f) => float(*f),
        AvroValue::Bytes(bytes) | AvroValue::Fixed(_, bytes) => bytes_json(bytes),
        AvroValue::String(text) => JsonValue::String(text.clone()),
        AvroValue::Enum(_, symbol) => JsonValue::String(symbol.clone()),
        AvroValue::Uuid(uuid) => JsonValue::String(uuid.to_string()),
        AvroValue::Union(index, inner) => {
            let branch = match schema {
                Some(Schema::Union(union)) => union.variants().get(*index as usize),
                _ => None,
            };
            avro_to_json(inner, branch, names)
        }
        AvroValue::Array(items) => {
            let item_schema = match schema {
                Some(Schema::Array(array)) => Some(&*array.items),
                _ => None,
            };
            JsonValue::Array(items.iter().map(|item| avro_to_json(item, item_schema, names)).collect())
        }
        AvroValue::Map(entries) => {
            let value_schema = match schema {
                Some(Schema::Map(map)) => Some(&*map.types),
                _ => None,
            };
            let sorted: BTreeMap<&String, &AvroValue> = entries.iter().collect();
            JsonValue::Object(
                sorted.into_iter().map(|(k, v)| (k.clone(), avro_to_json(v, value_schema, names))).collect(),
            )
        }
        AvroValue::Record(fields) => {
            let record = match schema {
                Some(Schema::Record(record)) => Some(record),
                _ => None,
            };
            let field_schema =
                |name: &str| record.and_then(|r| r.fields.iter().find(|f| f.name == name)).map(|field| &field.schema);
            JsonValue::Object(
                fields.iter().map(|(name, v)| (name.clone(), avro_to_json(v, field_schema(name), names))).collect(),
            )
        }
        AvroValue::Decimal(decimal) => {
            let scale = match schema {
                Some(Schema::Decimal(d)) => d.scale,
                _ => 0,
            };
            match Vec::<u8>::try_from(decimal) {
                Ok(bytes) => JsonValue::String(decimal_text(&bytes, scale)),
                Err(err) => JsonValue::String(format!("<decimal: {err}>")),
            }
        }
        AvroValue::BigDecimal(decimal) => JsonValue::String(decimal.to_string()),
        AvroValue::Date(days) => DateTime::from_timestamp(i64::from(*days) * 86_400, 0)
            .map(|t| JsonValue::String(t.date_naive().format("%Y-%m-%d").to_string()))
            .unwrap_or_else(|| json!(days)),
        AvroValue::TimeMillis(ms) => time_of_day(i64::from(*ms) * 1_000_000, "%H:%M:%S%.3f"),
        AvroValue::TimeMicros(us) => time_of_day(us.saturating_mul(1_000), "%H:%M:%S%.6f"),
        AvroValue::TimestampMillis(ms) => timestamp(DateTime::from_timestamp_millis(*ms), *ms, SecondsFormat::Millis),
        AvroValue::TimestampMicros(us) => timestamp(DateTime::from_timestamp_micros(*us), *us, SecondsFormat::Micros),
        AvroValue::TimestampNanos(ns) => {
            timestamp(Some(DateTime::from_timestamp_nanos(*ns)), *ns, SecondsFormat::Nanos)
        }
        AvroValue::LocalTimestampMillis(ms) => local(DateTime::from_timestamp_millis(*ms), *ms, "%.3f"),
        AvroValue::LocalTimestampMicros(us) => local(DateTime::from_timestamp_micros(*us), *us, "%.6f"),
        AvroValue::LocalTimestampNanos(ns) => local(Some(DateTime::from_timestamp_nanos(*ns)), *ns, "%.9f"),
        AvroValue::Duration(d) => json!({
            "months": u32::from(d.months()),
            "days": u32::from(d.days()),
            "millis": u32::from(d.millis()),
        }),
    }
}

fn float(f: f64) -> JsonValue {
    serde_json::Number::from_f64(f).map(JsonValue::Number).unwrap_or_else(|| JsonValue::String(f.to_string()))
}

fn bytes_json(bytes: &[u8]) -> JsonValue {
    match std::str::from_utf8(bytes) {
        Ok(text) => JsonValue::String(text.to_string()),
        Err(_) => JsonValue::String(bytes.iter().map(|&b| char::from(b)).collect()),
    }
}

fn time_of_day(nanos: i64, format: &str) -> JsonValue {
    let (secs, sub) = (nanos.div_euclid(1_000_000_000), nanos.rem_euclid(1_000_000_000));
    u32::try_from(secs)
        .ok()
        .and_then(|secs| chrono::NaiveTime::from_num_seconds_from_midnight_opt(secs, sub as u32))
        .map(|t| JsonValue::String(t.format(format).to_string()))
        .unwrap_or_else(|| json!(nanos))
}

fn timestamp(time: Option<DateTime<chrono::Utc>>, raw: i64, precision: SecondsFormat) -> JsonValue {
    time.map(|t| JsonValue::String(t.to_rfc3339_opts(precision, true))).unwrap_or_else(|| json!(raw))
}

fn local(time: Option<DateTime<chrono::Utc>>, raw: i64, fraction: &str) -> JsonValue {
    time.map(|t| JsonValue::String(t.naive_utc().format(&format!("%Y-%m-%dT%H:%M:%S{fraction}")).to_string()))
        .unwrap_or_else(|| json!(raw))
}

/// The decimal text of a big-endian two's-complement unscaled value at
/// `scale`: `[0x17, 0x6d]` at scale 2 is `"59.97"`.
fn decimal_text(bytes: &[u8], scale: usize) -> String {
    let negative = bytes.first().is_some_and(|b| b & 0x80 != 0);
    // The magnitude, big-endian base 256.
    let mut magnitude: Vec<u8> = if negative {
        let mut inverted: Vec<u8> = bytes.iter().map(|b| !b).collect();
        for byte in inverted.iter_mut().rev() {
            let (sum, carry) = byte.overflowing_add(1);
            *byte = sum;
            if !carry {
                break;
            }
        }
        inverted
    } else {
        bytes.to_vec()
    };
    // Repeated division by 10, least significant digit first.
    let mut digits = Vec::new();
    while magnitude.iter().any(|&b| b != 0) {
        let mut remainder = 0u32;
        for byte in magnitude.iter_mut() {
            let current = (remainder << 8) | u32::from(*byte);
            *byte = (current / 10) as u8;
            remainder = current % 10;
        }
        digits.push(b'0' + remainder as u8);
    }
    while digits.len() <= scale {
        digits.push(b'0');
    }
    digits.reverse();
    let text = String::from_utf8(digits).unwrap_or_default();
    let (whole, fraction) = text.split_at(text.len() - scale);
    let sign = if negative { "-" } else { "" };
    if scale == 0 {
        format!("{sign}{whole}")
    } else {
        format!("{sign}{whole}.{fraction}")
    }
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
    fn decimals_read_back_at_their_scale() {
        assert_eq!(decimal_text(&[0x17, 0x6d], 2), "59.97");
        assert_eq!(decimal_text(&[0x05], 2), "0.05");
        assert_eq!(decimal_text(&[0x00], 2), "0.00");
        assert_eq!(decimal_text(&[0xff], 2), "-0.01");
        assert_eq!(decimal_text(&[0xe8, 0x93], 2), "-59.97");
        assert_eq!(decimal_text(&[0x01, 0x00], 0), "256");
        // More than 128 bits: 2^128 = 340282366920938463463374607431768211456.
        let mut big = vec![0x01];
        big.extend([0u8; 16]);
        assert_eq!(decimal_text(&big, 3), "340282366920938463463374607431768211.456");
    }

    #[test]
    #[allow(deprecated)] // the one-call writer and reader are the clearest oracle here
    fn avro_datums_read_back_as_the_json_the_codec_accepts() {
        let schema = Schema::parse_str(
            r#"{"type": "record", "name": "R", "fields": [
                {"name": "price", "type": {"type": "bytes", "logicalType": "decimal", "precision": 10, "scale": 2}},
                {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
                {"name": "on", "type": ["null", {"type": "int", "logicalType": "date"}]},
                {"name": "tier", "type": {"type": "enum", "name": "Tier", "symbols": ["A", "B"]}},
                {"name": "tags", "type": {"type": "map", "values": "string"}},
                {"name": "again", "type": ["null", "R"], "default": null}
            ]}"#,
        )
        .expect("schema");
        let payload = json!({"price": "59.97", "at": "2026-11-23T16:40:00.123Z", "on": "1815-12-10", "tier": "B",
            "tags": {"a": "1"}, "again": {"price": "-0.50", "at": "1970-01-01T00:00:00.000Z", "on": null, "tier": "A",
            "tags": {}, "again": null}});
        let resolved = ResolvedSchema::new(&schema).expect("resolved");
        let value = crate::codec::avro::json_to_avro(&payload, &schema, resolved.get_names()).expect("fits");
        let bytes = apache_avro::to_avro_datum(&schema, value).expect("encode");
        let decoded = apache_avro::from_avro_datum(&schema, &mut bytes.as_slice(), None).expect("decode");
        assert_eq!(avro_to_json(&decoded, Some(&schema), resolved.get_names()), payload);
    }

    #[tokio::test]
    async fn json_stays_byte_for_byte_and_other_bytes_are_told_apart() {
        let decoder = PayloadDecoder::new(None).expect("decoder");
        let raw = br#"{"b": 1,  "a": [1.50]}"#;
        let decoded = decoder.decode(Some(raw)).await;
        assert_eq!(decoded.to_raw_json().get().as_bytes(), raw);
        assert!(matches!(decoder.decode(None).await, Decoded::Null));
        assert!(matches!(decoder.decode(Some(b"ord-1")).await, Decoded::Text(t) if t == "ord-1"));
        assert!(matches!(decoder.decode_key(Some(b"42")).await, Decoded::Text(t) if t == "42"));
        assert!(
            matches!(decoder.decode(Some(&[0, 0, 0, 0, 1, 2])).await, Decoded::Binary(b) if b == [0, 0, 0, 0, 1, 2])
        );
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
