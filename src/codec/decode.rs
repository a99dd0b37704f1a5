//! Decoding what the relay published, for a reader: the inverse of the
//! encoding in [`crate::codec::avro`]. A Confluent-framed Avro datum is
//! decoded through the registry (the writer schema by its id) and rendered
//! as the JSON [`json_to_avro`](crate::codec::avro::json_to_avro) accepts
//! for it, so a payload that went out as Avro reads back as the payload;
//! JSON text is kept byte for byte; other bytes are told apart as text or
//! binary. `relay tail` and the `state_cache` example decode with
//! [`PayloadDecoder`].

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use apache_avro::schema::{Name, Names, ResolvedSchema};
use apache_avro::types::Value as AvroValue;
use apache_avro::Schema;
use chrono::{DateTime, SecondsFormat};
use schema_registry_converter::async_impl::avro::AvroDecoder;
use serde_json::value::RawValue;
use serde_json::{json, Value as JsonValue};

use crate::codec::registry::{sr_settings, RegistryError};
use crate::config::{Config, PayloadFormat, RegistryConfig};
use crate::telemetry::ErrorChain;

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

/// Bytes as lowercase hex, the form readers show bytes that are not text in.
pub fn hex(bytes: &[u8]) -> String {
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
///
/// One flat match arm per Avro value kind: the Avro -> JSON mapping as one
/// table, as the codec's JSON -> Avro one is.
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

    /// Encodes `payload` with the codec's `json_to_avro`, writes and reads
    /// the datum, and renders it back with `avro_to_json`.
    #[allow(deprecated)] // the one-call writer and reader are the clearest oracle here
    fn round_trip(schema: &str, payload: &JsonValue) -> JsonValue {
        let schema = Schema::parse_str(schema).expect("schema");
        let resolved = ResolvedSchema::new(&schema).expect("resolved");
        let value = crate::codec::avro::json_to_avro(payload, &schema, resolved.get_names()).expect("fits");
        let bytes = apache_avro::to_avro_datum(&schema, value).expect("encode");
        let decoded = apache_avro::from_avro_datum(&schema, &mut bytes.as_slice(), None).expect("decode");
        avro_to_json(&decoded, Some(&schema), resolved.get_names())
    }

    #[test]
    fn avro_datums_read_back_as_the_json_the_codec_accepts() {
        let schema = r#"{"type": "record", "name": "R", "fields": [
                {"name": "price", "type": {"type": "bytes", "logicalType": "decimal", "precision": 10, "scale": 2}},
                {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
                {"name": "on", "type": ["null", {"type": "int", "logicalType": "date"}]},
                {"name": "tier", "type": {"type": "enum", "name": "Tier", "symbols": ["A", "B"]}},
                {"name": "tags", "type": {"type": "map", "values": "string"}},
                {"name": "again", "type": ["null", "R"], "default": null}
            ]}"#;
        let payload = json!({"price": "59.97", "at": "2026-11-23T16:40:00.123Z", "on": "1815-12-10", "tier": "B",
            "tags": {"a": "1"}, "again": {"price": "-0.50", "at": "1970-01-01T00:00:00.000Z", "on": null, "tier": "A",
            "tags": {}, "again": null}});
        assert_eq!(round_trip(schema, &payload), payload);
    }

    #[test]
    fn plain_types_and_other_logical_types_round_trip() {
        let schema = r#"{"type": "record", "name": "P", "fields": [
                {"name": "flag", "type": "boolean"},
                {"name": "count", "type": "int"},
                {"name": "total", "type": "long"},
                {"name": "ratio", "type": "double"},
                {"name": "name", "type": "string"},
                {"name": "items", "type": {"type": "array", "items": "string"}},
                {"name": "id", "type": {"type": "string", "logicalType": "uuid"}},
                {"name": "since", "type": {"type": "long", "logicalType": "timestamp-micros"}},
                {"name": "note", "type": ["null", "string"]}
            ]}"#;
        let payload = json!({"flag": true, "count": -3, "total": 9_007_199_254_740_993_i64, "ratio": 0.25,
            "name": "Zoë", "items": ["a", "b"], "id": "5f1a3c0e-8d2b-4e59-9a7c-0b1d2e3f4a5b",
            "since": "2026-11-23T16:40:00.123456Z", "note": null});
        assert_eq!(round_trip(schema, &payload), payload);
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
    }
}
