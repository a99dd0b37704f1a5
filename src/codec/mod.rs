//! The codec stage: turns an outbox row's payload into the bytes of a Kafka
//! record value.
//!
//! `json`: the payload as Postgres printed it. `avro`: the payload converted
//! to an Avro datum by the schema configured for its (aggregate type, event
//! type), in the Confluent wire format with the schema's registry id. Ids are
//! resolved once, before the first row ([`Codec::prepare`]); after that a
//! registry outage cannot stop publishing. [`decode`] is the way back, for
//! the tools that read what was published.

pub mod avro;
pub mod decode;
pub mod registry;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use apache_avro::schema::ResolvedSchema;
use apache_avro::Schema;
use bytes::Bytes;

use crate::config::{Config, KeyFormat, PayloadFormat};
use crate::error_class::ErrorClass;
use crate::outbox::OutboxRow;
use crate::routing::{RouteTable, TopicKind};
use registry::{subject_name, Registry, RegistryError};

/// Why a payload could not be encoded. The row is held, never dropped.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("payload is not valid JSON")]
    Json(#[from] serde_json::Error),
    #[error("no schema for aggregate type `{aggregate_type}`, event type `{event_type}`: add `\"{aggregate_type}/{event_type}\"` or `\"{aggregate_type}\"` to {map}")]
    NoSchema { map: &'static str, aggregate_type: String, event_type: String },
    #[error("schema {file} has no registry id for topic `{topic}`")]
    NoSchemaId { file: String, topic: String },
    #[error("payload does not match schema {file}")]
    Mismatch { file: String, source: avro::AvroError },
}

impl CodecError {
    /// The row cannot be encoded as it is: it is held, never dropped.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Json(_) | Self::NoSchema { .. } | Self::NoSchemaId { .. } => ErrorClass::Hold,
            Self::Mismatch { source, .. } => source.class(),
        }
    }
}

/// Why the schemas could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("cannot read schema file {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("schema file {path} is not a valid Avro schema: {reason}")]
    Parse { path: String, reason: String },
    #[error("schema file {path} is not a named record")]
    Unnamed { path: String },
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

impl SchemaError {
    /// A broken schema file needs an operator and a restart; the registry's
    /// errors say for themselves ([`RegistryError::class`]): a rejected
    /// certificate needs an operator, other trouble (unreachable, not yet
    /// registered) may clear by itself. The fix is the relay's last line
    /// (the error itself follows it, with the detailed fix of a certificate).
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Read { .. } | Self::Parse { .. } | Self::Unnamed { .. } => {
                ErrorClass::operator("correct the schemas or codec.schemas")
            }
            Self::Registry(e) => e.class(),
        }
    }
}

/// One schema file, parsed, with its registry id per topic.
pub struct LoadedSchema {
    /// File name as configured (relative to `codec.schemas_dir`).
    pub file: String,
    /// The schema text as registered.
    pub text: String,
    /// The record's full name (for record-name subject strategies).
    pub full_name: String,
    pub schema: Schema,
}

/// A schema ready for the hot path: resolved and with its datum writer
/// built once. The schema is leaked to `'static` because the writer borrows
/// it; schemas are loaded once per process, so this is bounded.
struct Encoder {
    file: String,
    schema: &'static Schema,
    resolved: ResolvedSchema<'static>,
    writer: apache_avro::writer::datum::GenericDatumWriter<'static>,
    ids: HashMap<String, u32>,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder").field("file", &self.file).field("ids", &self.ids).finish()
    }
}

/// The schemas of `codec.schemas` (event and command messages) and
/// `codec.state_schemas` (state messages), keyed by `"<aggregate_type>"` or
/// `"<aggregate_type>/<event_type>"`, and the topic each goes to: what
/// `relay schemas register|check` and the codec work through.
pub struct SchemaSet {
    pub entries: Vec<SchemaEntry>,
}

/// One mapping of `codec.schemas` or `codec.state_schemas`.
pub struct SchemaEntry {
    /// `"<aggregate_type>"` or `"<aggregate_type>/<event_type>"`.
    pub key: String,
    /// Which map it came from: the kind of the rows it encodes.
    pub kind: TopicKind,
    /// Where those rows go.
    pub topic: String,
    pub schema: Arc<LoadedSchema>,
}

impl SchemaSet {
    /// Reads and parses every configured schema file.
    pub fn load(config: &Config) -> Result<Self, SchemaError> {
        let mut by_file: HashMap<String, Arc<LoadedSchema>> = HashMap::new();
        let mut entries = Vec::new();
        let maps = [(TopicKind::Event, &config.codec.schemas), (TopicKind::State, &config.codec.state_schemas)];
        for (kind, map) in maps {
            for (key, file) in map {
                let schema = match by_file.get(file) {
                    Some(loaded) => loaded.clone(),
                    None => {
                        let loaded = Arc::new(load_schema(&config.codec.schemas_dir, file)?);
                        by_file.insert(file.clone(), loaded.clone());
                        loaded
                    }
                };
                let topic = config.routing.topic_for(aggregate_type_of(key), kind);
                entries.push(SchemaEntry { key: key.clone(), kind, topic, schema });
            }
        }
        Ok(Self { entries })
    }

    /// Each distinct subject once, with its schema.
    pub fn unique_subjects(&self, config: &Config) -> Vec<(String, Arc<LoadedSchema>)> {
        let mut seen = std::collections::HashSet::new();
        self.subjects(config)
            .filter(|(subject, _, _)| seen.insert(subject.clone()))
            .map(|(subject, _, schema)| (subject, schema.clone()))
            .collect()
    }

    /// The registry subject of each entry, by the configured strategy.
    pub fn subjects<'a>(
        &'a self,
        config: &'a Config,
    ) -> impl Iterator<Item = (String, &'a str, &'a Arc<LoadedSchema>)> + 'a {
        self.entries.iter().map(move |e| {
            (subject_name(config.codec.subject_strategy, &e.topic, &e.schema.full_name), e.topic.as_str(), &e.schema)
        })
    }
}

fn load_schema(dir: &Path, file: &str) -> Result<LoadedSchema, SchemaError> {
    let path = dir.join(file);
    let shown = path.display().to_string();
    let text =
        std::fs::read_to_string(&path).map_err(|e| SchemaError::Read { path: shown.clone(), reason: e.to_string() })?;
    let schema =
        Schema::parse_str(&text).map_err(|e| SchemaError::Parse { path: shown.clone(), reason: e.to_string() })?;
    let full_name = schema.name().map(|n| n.fullname(None)).ok_or(SchemaError::Unnamed { path: shown })?;
    Ok(LoadedSchema { file: file.to_string(), text, full_name, schema })
}

/// The aggregate type of a `codec.schemas` key.
fn aggregate_type_of(key: &str) -> &str {
    key.split('/').next().unwrap_or(key)
}

/// The topics whose keys are Avro strings when `codec.key_format = "avro"`:
/// those of the aggregate types in `codec.schemas` and `codec.state_schemas`,
/// and of `routing.topics` and `routing.state_topics`.
pub fn key_topics(config: &Config) -> std::collections::BTreeSet<String> {
    let routing = &config.routing;
    let events = config.codec.schemas.keys().map(|key| routing.topic_for(aggregate_type_of(key), TopicKind::Event));
    let states =
        config.codec.state_schemas.keys().map(|key| routing.topic_for(aggregate_type_of(key), TopicKind::State));
    events.chain(states).chain(routing.topics.values().cloned()).chain(routing.state_topics.values().cloned()).collect()
}

/// Encodes payloads in the configured format.
#[derive(Debug, Clone)]
pub struct Codec {
    format: PayloadFormat,
    /// Avro only: encoder per (kind, mapping key).
    schemas: Arc<HashMap<(TopicKind, String), Arc<Encoder>>>,
    /// Avro keys only: the key schema's id per topic.
    key_ids: Arc<HashMap<String, u32>>,
}

/// The Avro schema of an Avro-encoded key: the entity id as a string.
pub const KEY_SCHEMA: &str = "\"string\"";

impl Codec {
    /// A codec that needs no preparation (JSON).
    pub fn json() -> Self {
        Self { format: PayloadFormat::Json, schemas: Arc::default(), key_ids: Arc::default() }
    }

    /// Loads the schemas and resolves every (schema, topic) id in the
    /// registry once: registering it when `codec.auto_register` is on,
    /// else looking it up (a schema that is not registered is an error
    /// naming the subject).
    pub async fn prepare(config: &Config) -> Result<Self, SchemaError> {
        let mut key_ids = HashMap::new();
        if config.codec.key_format == KeyFormat::Avro {
            let registry = Registry::new(&config.registry)?;
            for topic in key_topics(config) {
                let subject = format!("{topic}-key");
                let id = if config.codec.auto_register {
                    registry.register(&subject, KEY_SCHEMA, "string").await?
                } else {
                    registry.lookup(&subject, KEY_SCHEMA, "key schema \"string\"").await?
                };
                key_ids.insert(topic, id);
            }
        }
        let key_ids = Arc::new(key_ids);
        if config.codec.format == PayloadFormat::Json {
            return Ok(Self { key_ids, ..Self::json() });
        }
        let set = SchemaSet::load(config)?;
        let registry = Registry::new(&config.registry)?;
        let mut ids: HashMap<(String, String), u32> = HashMap::new();
        for (subject, topic, schema) in set.subjects(config) {
            let id = if config.codec.auto_register {
                registry.register(&subject, &schema.text, &schema.full_name).await?
            } else {
                registry.lookup(&subject, &schema.text, &schema.file).await?
            };
            tracing::info!(subject = %subject, id, file = %schema.file, "schema resolved");
            ids.insert((schema.file.clone(), topic.to_string()), id);
        }
        let mut encoders: HashMap<String, Arc<Encoder>> = HashMap::new();
        let mut schemas = HashMap::new();
        for SchemaEntry { key, kind, schema, .. } in &set.entries {
            let encoder = match encoders.get(&schema.file) {
                Some(encoder) => encoder.clone(),
                None => {
                    let leaked: &'static Schema = Box::leak(Box::new(schema.schema.clone()));
                    let invalid =
                        |e: apache_avro::Error| SchemaError::Parse { path: schema.file.clone(), reason: e.to_string() };
                    let resolved = ResolvedSchema::new(leaked).map_err(invalid)?;
                    let writer = apache_avro::writer::datum::GenericDatumWriter::builder(leaked)
                        .resolved_schemata(resolved.clone())
                        .build()
                        .map_err(invalid)?;
                    let ids = ids
                        .iter()
                        .filter(|((file, _), _)| *file == schema.file)
                        .map(|((_, topic), id)| (topic.clone(), *id))
                        .collect();
                    let encoder =
                        Arc::new(Encoder { file: schema.file.clone(), schema: leaked, resolved, writer, ids });
                    encoders.insert(schema.file.clone(), encoder.clone());
                    encoder
                }
            };
            schemas.insert((*kind, key.clone()), encoder);
        }
        Ok(Self { format: PayloadFormat::Avro, schemas: Arc::new(schemas), key_ids })
    }

    /// The record key for `row` on `topic`: the entity id as UTF-8, or as
    /// a Confluent-framed Avro string when `codec.key_format = "avro"`.
    /// Partitioning hashes these bytes, as a Java producer with the same
    /// serializer would.
    pub fn encode_key(&self, row: &OutboxRow, topic: &str) -> Result<Bytes, CodecError> {
        if self.key_ids.is_empty() {
            return Ok(Bytes::copy_from_slice(row.aggregate_id.as_bytes()));
        }
        let id = *self
            .key_ids
            .get(topic)
            .ok_or_else(|| CodecError::NoSchemaId { file: "key schema \"string\"".into(), topic: topic.to_string() })?;
        Ok(Bytes::from(avro::confluent_frame(id, &avro_string_datum(&row.aggregate_id))))
    }

    /// The record value for `row`, published to `topic`: `None` for a
    /// tombstone (a state row without a payload), which is never encoded.
    pub fn encode(&self, row: &OutboxRow, topic: &str) -> Result<Option<Bytes>, CodecError> {
        let Some(payload) = &row.payload else {
            return Ok(None);
        };
        match self.format {
            // Postgres already printed the jsonb as canonical JSON text.
            PayloadFormat::Json => Ok(Some(payload.clone())),
            PayloadFormat::Avro => {
                let kind = TopicKind::of_row(&row.kind);
                let schema = self
                    .schemas
                    .get(&(kind, format!("{}/{}", row.aggregate_type, row.event_type)))
                    .or_else(|| self.schemas.get(&(kind, row.aggregate_type.to_string())))
                    .ok_or_else(|| CodecError::NoSchema {
                        map: match kind {
                            TopicKind::Event => "codec.schemas",
                            TopicKind::State => "codec.state_schemas",
                        },
                        aggregate_type: row.aggregate_type.to_string(),
                        event_type: row.event_type.to_string(),
                    })?;
                let id = *schema
                    .ids
                    .get(topic)
                    .ok_or_else(|| CodecError::NoSchemaId { file: schema.file.clone(), topic: topic.to_string() })?;
                let payload: serde_json::Value = serde_json::from_slice(payload)?;
                let event_id = row.event_id.to_string();
                let envelope = avro::Envelope {
                    event_id: &event_id,
                    event_type: &row.event_type,
                    aggregate_type: &row.aggregate_type,
                    aggregate_id: &row.aggregate_id,
                    entity_version: row.entity_version,
                    occurred_at: row.occurred_at,
                };
                let datum =
                    avro::encode_payload_with(&schema.writer, &payload, &envelope, schema.schema, &schema.resolved)
                        .map_err(|source| CodecError::Mismatch { file: schema.file.clone(), source })?;
                Ok(Some(Bytes::from(avro::confluent_frame(id, &datum))))
            }
        }
    }
}

/// The Avro binary encoding of a string: its length as a zig-zag varint,
/// then the UTF-8 bytes.
fn avro_string_datum(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + 2);
    let len = text.len() as i64;
    let mut zigzag = ((len << 1) ^ (len >> 63)) as u64;
    loop {
        let byte = (zigzag & 0x7f) as u8;
        zigzag >>= 7;
        if zigzag == 0 {
            out.push(byte);
            break;
        }
        out.push(byte | 0x80);
    }
    out.extend_from_slice(text.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(deprecated)] // the one-call reader is the clearest oracle here
    fn avro_string_key_decodes_with_apache_avro() {
        for text in ["", "order-1", &"k".repeat(300), "日本語"] {
            let datum = avro_string_datum(text);
            let value = apache_avro::from_avro_datum(&Schema::String, &mut datum.as_slice(), None).expect("decodes");
            assert_eq!(value, apache_avro::types::Value::String(text.to_string()));
        }
    }
}
