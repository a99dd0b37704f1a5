//! Avro encoding of outbox payloads: a row's JSON payload is converted into an
//! Avro datum following a writer schema, with the envelope fields (event id,
//! type, aggregate, version, time) filled from the row's columns when the
//! payload leaves them out, and framed for a Confluent-compatible registry.
//!
//! The conversion is strict on purpose: a payload that does not fit the
//! schema is reported with the JSON path of the first offending value
//! instead of being coerced, so a bad row is held and explained rather than
//! published with silently changed data.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use apache_avro::schema::{
    DecimalSchema, EnumSchema, FixedSchema, InnerDecimalSchema, Name, RecordSchema, ResolvedSchema, UnionSchema,
};
use apache_avro::types::Value as AvroValue;
use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::{Days, Decimal, Duration, Millis, Months, Schema};
use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, SecondsFormat, Timelike, Utc};
use serde_json::{Map as JsonMap, Value as JsonValue};

use crate::error_class::ErrorClass;

/// A JSON value that does not fit the Avro schema.
///
/// Displays as `at $.items[2].price: expected decimal(10,2), found string "abc"`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("at {path}: expected {expected}, found {found}")]
pub struct AvroMismatch {
    /// JSON path of the offending value, e.g. `$.items[2].price`.
    pub path: String,
    /// What the schema wanted there, e.g. `decimal(10,2)` or `record OrderPlaced`.
    pub expected: String,
    /// A short description of the JSON value, e.g. `string "abc"`, `number 3.5`, `missing`.
    pub found: String,
}

/// Why a payload could not be turned into Avro bytes.
#[derive(Debug, thiserror::Error)]
pub enum AvroError {
    /// The payload does not fit the schema.
    #[error(transparent)]
    Mismatch(#[from] AvroMismatch),
    /// The Avro library refused the schema or the datum (one that
    /// [`json_to_avro`] built: the payload fitted the schema).
    #[error("cannot encode Avro datum")]
    Encode(#[source] apache_avro::Error),
}

impl AvroError {
    /// Either way the row cannot be encoded as it is: it is held.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Mismatch(_) | Self::Encode(_) => ErrorClass::Hold,
        }
    }
}

/// The outbox row's columns that can fill a record's envelope fields.
#[derive(Debug, Clone, Copy)]
pub struct Envelope<'a> {
    /// The row's event id, as UUID text.
    pub event_id: &'a str,
    /// The row's event type, e.g. `OrderPlaced`.
    pub event_type: &'a str,
    /// The row's aggregate type, e.g. `order`.
    pub aggregate_type: &'a str,
    /// The row's aggregate id (also the Kafka key).
    pub aggregate_id: &'a str,
    /// The row's entity version, if the producer records one.
    pub entity_version: Option<i64>,
    /// When the event happened.
    pub occurred_at: DateTime<Utc>,
}

/// The names of the top-level record fields that [`encode_payload`] fills
/// from the [`Envelope`] when the payload leaves them out.
pub const ENVELOPE_FIELDS: [&str; 6] =
    ["event_id", "event_type", "aggregate_type", "aggregate_id", "entity_version", "occurred_at"];

/// Converts `value` into an Avro value that fits `schema`.
///
/// `names` resolves named-type references (`Schema::Ref`): pass
/// `ResolvedSchema::new(&schema)?.get_names()` for a self-contained schema, or
/// the names of a `ResolvedSchema` built from all schemata of a
/// `Schema::parse_list`.
///
/// Accepted JSON per Avro type:
/// - `null`, `boolean`, `string`: the same JSON type;
/// - `int`, `long`: an integral JSON number in range; `float`, `double`: any number;
/// - `bytes`, `fixed`: a string, taken as its UTF-8 bytes (`fixed` needs the exact size);
/// - `record`: an object with exactly the schema's fields (missing fields take the
///   schema default if there is one; unknown keys are rejected to catch typos);
/// - `array`, `map`: an array, an object; `enum`: a listed symbol;
/// - unions: `null` picks the null branch, anything else the first branch that accepts it;
/// - `decimal`: a string like `"12.34"` or a number, exact at the schema's scale;
/// - `timestamp-*`: an RFC 3339 string or an integer in the type's unit;
///   `local-timestamp-*`: `"YYYY-MM-DDTHH:MM:SS(.f)"` or an integer;
/// - `date`: `"YYYY-MM-DD"` or integer days; `time-*`: `"HH:MM:SS(.f)"` or an integer;
/// - `uuid`: a UUID string; `duration`: `{"months": m, "days": d, "millis": ms}`.
pub fn json_to_avro<S: Borrow<Schema>>(
    value: &JsonValue,
    schema: &Schema,
    names: &HashMap<Name, S>,
) -> Result<AvroValue, AvroMismatch> {
    Converter { names }.convert(value, schema, &Path::Root, Mode::Payload)
}

/// Encodes an outbox payload as an Avro datum (no framing).
///
/// If `schema` is a record, its fields named like [`ENVELOPE_FIELDS`] that
/// the payload object leaves out are filled from `envelope`, in whatever form
/// the field's schema takes (e.g. `occurred_at` as `timestamp-micros`,
/// `timestamp-millis` or an RFC 3339 string). `resolved` must resolve the
/// named types `schema` refers to (`ResolvedSchema::new(&schema)` for a
/// self-contained schema).
pub fn encode_payload(
    payload: &JsonValue,
    envelope: &Envelope<'_>,
    schema: &Schema,
    resolved: &ResolvedSchema<'_>,
) -> Result<Vec<u8>, AvroError> {
    let writer =
        GenericDatumWriter::builder(schema).resolved_schemata(resolved.clone()).build().map_err(AvroError::Encode)?;
    encode_payload_with(&writer, payload, envelope, schema, resolved)
}

/// [`encode_payload`] with a writer built once per schema: the hot path,
/// which must not resolve the schema again for every message.
pub fn encode_payload_with(
    writer: &GenericDatumWriter<'_>,
    payload: &JsonValue,
    envelope: &Envelope<'_>,
    schema: &Schema,
    resolved: &ResolvedSchema<'_>,
) -> Result<Vec<u8>, AvroError> {
    let names = resolved.get_names();
    let filled = fill_envelope(payload, envelope, schema, names);
    let value = json_to_avro(filled.as_ref().unwrap_or(payload), schema, names)?;
    writer.write_value_to_vec(value).map_err(AvroError::Encode)
}

/// Frames an Avro datum in the Confluent wire format: magic byte 0, the
/// registry's schema id as 4 bytes big-endian, then the datum.
pub fn confluent_frame(schema_id: u32, datum: &[u8]) -> Vec<u8> {
    let mut framed = Vec::with_capacity(5 + datum.len());
    framed.push(0);
    framed.extend_from_slice(&schema_id.to_be_bytes());
    framed.extend_from_slice(datum);
    framed
}

/// Returns a copy of `payload` with the missing envelope fields filled in, or
/// `None` when nothing needs filling (so the common case does not clone).
fn fill_envelope<S: Borrow<Schema>>(
    payload: &JsonValue,
    envelope: &Envelope<'_>,
    schema: &Schema,
    names: &HashMap<Name, S>,
) -> Option<JsonValue> {
    let converter = Converter { names };
    let Schema::Record(record) = converter.resolve(schema)? else {
        return None;
    };
    let object = payload.as_object()?;
    let mut filled: Option<JsonMap<String, JsonValue>> = None;
    for name in ENVELOPE_FIELDS {
        if object.contains_key(name) {
            continue;
        }
        let Some(field) = record.fields.iter().find(|f| f.name == name) else {
            continue;
        };
        let candidates = envelope_candidates(name, envelope);
        // The field's schema decides the form (uuid or string, micros or
        // millis or text...), so take the first rendering it accepts.
        let fitting =
            candidates.iter().find(|c| converter.convert(c, &field.schema, &Path::Root, Mode::Payload).is_ok());
        let chosen = match fitting {
            Some(c) => c.clone(),
            // Nothing fits: a default still applies, otherwise insert the
            // envelope's value so the mismatch error shows what was tried.
            None if field.default.is_some() => continue,
            None => match candidates.into_iter().next() {
                Some(c) => c,
                None => continue,
            },
        };
        filled.get_or_insert_with(|| object.clone()).insert(name.to_owned(), chosen);
    }
    filled.map(JsonValue::Object)
}

/// The JSON renderings of one envelope field, most natural first.
fn envelope_candidates(name: &str, envelope: &Envelope<'_>) -> Vec<JsonValue> {
    match name {
        "event_id" => vec![JsonValue::from(envelope.event_id)],
        "event_type" => vec![JsonValue::from(envelope.event_type)],
        "aggregate_type" => vec![JsonValue::from(envelope.aggregate_type)],
        "aggregate_id" => vec![JsonValue::from(envelope.aggregate_id)],
        "entity_version" => match envelope.entity_version {
            Some(v) => vec![JsonValue::from(v), JsonValue::from(v.to_string())],
            None => vec![JsonValue::Null],
        },
        "occurred_at" => vec![
            // Text first: it converts exactly into every timestamp logical
            // type and is what a string field wants.
            JsonValue::from(envelope.occurred_at.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
            // A plain long gets microseconds: Postgres' own precision, so
            // nothing is lost.
            JsonValue::from(envelope.occurred_at.timestamp_micros()),
        ],
        _ => Vec::new(),
    }
}

/// Where in the JSON document a value sits; rendered only for errors, so
/// walking the document allocates nothing.
enum Path<'a> {
    Root,
    Key(&'a Path<'a>, &'a str),
    Index(&'a Path<'a>, usize),
}

impl fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Path::Root => f.write_str("$"),
            Path::Key(parent, key) => {
                let plain = !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if plain {
                    write!(f, "{parent}.{key}")
                } else {
                    write!(f, "{parent}[{key:?}]")
                }
            }
            Path::Index(parent, i) => write!(f, "{parent}[{i}]"),
        }
    }
}

/// Whether a JSON value comes from a payload or from a schema's field
/// default, whose encoding the Avro spec defines differently for bytes and
/// unions.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Payload,
    Default,
}

struct Converter<'n, S> {
    names: &'n HashMap<Name, S>,
}

impl<'n, S: Borrow<Schema>> Converter<'n, S> {
    /// Follows named references; `None` when a reference is not resolvable.
    fn resolve<'s>(&self, schema: &'s Schema) -> Option<&'s Schema>
    where
        'n: 's,
    {
        let mut current = schema;
        // Bounded: a chain of references to references cannot be longer than
        // the number of names, and a cycle must not hang us.
        for _ in 0..=self.names.len() {
            match current {
                Schema::Ref { name } => current = self.names.get(name)?.borrow(),
                other => return Some(other),
            }
        }
        None
    }

    // One flat match arm per (Avro type, JSON kind) pair: the JSON -> Avro
    // mapping as one table, read top to bottom; split up, it would be
    // scattered over functions that each hold a few rows.
    fn convert(
        &self,
        value: &JsonValue,
        schema: &Schema,
        path: &Path<'_>,
        mode: Mode,
    ) -> Result<AvroValue, AvroMismatch> {
        let mismatch =
            || AvroMismatch { path: path.to_string(), expected: self.expected(schema), found: describe(value) };
        let Some(schema) = self.resolve(schema) else {
            return Err(mismatch());
        };
        let converted = match (schema, value) {
            (Schema::Null, JsonValue::Null) => Some(AvroValue::Null),
            (Schema::Boolean, JsonValue::Bool(b)) => Some(AvroValue::Boolean(*b)),
            (Schema::Int, JsonValue::Number(n)) => int(n).map(AvroValue::Int),
            (Schema::Long, JsonValue::Number(n)) => n.as_i64().map(AvroValue::Long),
            (Schema::Float, JsonValue::Number(n)) => {
                n.as_f64().map(|f| f as f32).filter(|f| f.is_finite()).map(AvroValue::Float)
            }
            (Schema::Double, JsonValue::Number(n)) => n.as_f64().map(AvroValue::Double),
            (Schema::String, JsonValue::String(s)) => Some(AvroValue::String(s.clone())),
            (Schema::Bytes, JsonValue::String(s)) => bytes(s, mode).map(AvroValue::Bytes),
            (Schema::Fixed(FixedSchema { size, .. }), JsonValue::String(s)) => {
                bytes(s, mode).filter(|b| b.len() == *size).map(|b| AvroValue::Fixed(*size, b))
            }
            (Schema::Enum(EnumSchema { symbols, .. }), JsonValue::String(s)) => symbols
                .iter()
                .position(|sym| sym == s)
                .and_then(|i| u32::try_from(i).ok())
                .map(|i| AvroValue::Enum(i, s.clone())),
            (Schema::Array(array), JsonValue::Array(items)) => {
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    out.push(self.convert(item, &array.items, &Path::Index(path, i), mode)?);
                }
                Some(AvroValue::Array(out))
            }
            (Schema::Map(map), JsonValue::Object(entries)) => {
                let mut out = HashMap::with_capacity(entries.len());
                for (key, item) in entries {
                    let item = self.convert(item, &map.types, &Path::Key(path, key), mode)?;
                    out.insert(key.clone(), item);
                }
                Some(AvroValue::Map(out))
            }
            (Schema::Record(record), JsonValue::Object(object)) => {
                return self.record(record, object, path, mode);
            }
            (Schema::Union(union), _) => return self.union(union, value, schema, path, mode),
            (Schema::Decimal(decimal), _) => self.decimal(decimal, value, mode),
            (Schema::BigDecimal, JsonValue::String(s)) => {
                apache_avro::BigDecimal::from_str(s).ok().map(AvroValue::BigDecimal)
            }
            (Schema::BigDecimal, JsonValue::Number(n)) => {
                apache_avro::BigDecimal::from_str(&n.to_string()).ok().map(AvroValue::BigDecimal)
            }
            (Schema::Uuid(_), JsonValue::String(s)) => uuid::Uuid::parse_str(s).ok().map(AvroValue::Uuid),
            (Schema::Date, JsonValue::String(s)) => date(s).map(AvroValue::Date),
            (Schema::Date, JsonValue::Number(n)) => int(n).map(AvroValue::Date),
            (Schema::TimeMillis, JsonValue::String(s)) => {
                time_of_day(s, 1_000).and_then(|t| i32::try_from(t).ok()).map(AvroValue::TimeMillis)
            }
            (Schema::TimeMillis, JsonValue::Number(n)) => {
                int(n).filter(|t| (0..86_400_000).contains(t)).map(AvroValue::TimeMillis)
            }
            (Schema::TimeMicros, JsonValue::String(s)) => time_of_day(s, 1_000_000).map(AvroValue::TimeMicros),
            (Schema::TimeMicros, JsonValue::Number(n)) => {
                n.as_i64().filter(|t| (0..86_400_000_000).contains(t)).map(AvroValue::TimeMicros)
            }
            (Schema::TimestampMillis, _) => {
                timestamp(value, |t| Some(t.timestamp_millis())).map(AvroValue::TimestampMillis)
            }
            (Schema::TimestampMicros, _) => {
                timestamp(value, |t| Some(t.timestamp_micros())).map(AvroValue::TimestampMicros)
            }
            (Schema::TimestampNanos, _) => timestamp(value, |t| t.timestamp_nanos_opt()).map(AvroValue::TimestampNanos),
            (Schema::LocalTimestampMillis, _) => {
                local_timestamp(value, |t| Some(t.timestamp_millis())).map(AvroValue::LocalTimestampMillis)
            }
            (Schema::LocalTimestampMicros, _) => {
                local_timestamp(value, |t| Some(t.timestamp_micros())).map(AvroValue::LocalTimestampMicros)
            }
            (Schema::LocalTimestampNanos, _) => {
                local_timestamp(value, |t| t.timestamp_nanos_opt()).map(AvroValue::LocalTimestampNanos)
            }
            (Schema::Duration(_), JsonValue::Object(object)) => duration(object),
            _ => None,
        };
        converted.ok_or_else(mismatch)
    }

    fn record(
        &self,
        record: &RecordSchema,
        object: &JsonMap<String, JsonValue>,
        path: &Path<'_>,
        mode: Mode,
    ) -> Result<AvroValue, AvroMismatch> {
        // Unknown keys first: a misspelt key would otherwise surface as a
        // "missing" error on the field it was meant to be.
        if let Some((key, value)) = object.iter().find(|(k, _)| !record.lookup.contains_key(*k)) {
            let fields: Vec<&str> = record.fields.iter().map(|f| f.name.as_str()).collect();
            return Err(AvroMismatch {
                path: Path::Key(path, key).to_string(),
                expected: format!("a field of record {} ({})", record.name.name(), fields.join(", ")),
                found: format!("unknown key with {}", describe(value)),
            });
        }
        let mut out = Vec::with_capacity(record.fields.len());
        for field in &record.fields {
            let field_path = Path::Key(path, &field.name);
            let value = match (object.get(&field.name), &field.default) {
                (Some(value), _) => self.convert(value, &field.schema, &field_path, mode)?,
                (None, Some(default)) => {
                    self.convert(default, &field.schema, &field_path, Mode::Default).map_err(|_| AvroMismatch {
                        path: field_path.to_string(),
                        expected: self.expected(&field.schema),
                        found: format!("missing, and the schema default {} does not fit", describe(default)),
                    })?
                }
                (None, None) => {
                    return Err(AvroMismatch {
                        path: field_path.to_string(),
                        expected: self.expected(&field.schema),
                        found: "missing".to_owned(),
                    });
                }
            };
            out.push((field.name.clone(), value));
        }
        Ok(AvroValue::Record(out))
    }

    fn union(
        &self,
        union: &UnionSchema,
        value: &JsonValue,
        schema: &Schema,
        path: &Path<'_>,
        mode: Mode,
    ) -> Result<AvroValue, AvroMismatch> {
        let variants = union.variants();
        let wrap = |i: usize, v: AvroValue| -> Result<AvroValue, AvroMismatch> {
            let index = u32::try_from(i).map_err(|_| AvroMismatch {
                path: path.to_string(),
                expected: self.expected(schema),
                found: describe(value),
            })?;
            Ok(AvroValue::Union(index, Box::new(v)))
        };
        if mode == Mode::Default {
            // The spec: a union field's default belongs to its first branch.
            let first = variants.first().ok_or_else(|| AvroMismatch {
                path: path.to_string(),
                expected: self.expected(schema),
                found: describe(value),
            })?;
            let converted = self.convert(value, first, path, mode)?;
            return wrap(0, converted);
        }
        if value.is_null() {
            if let Some(i) = variants.iter().position(|v| matches!(v, Schema::Null)) {
                return wrap(i, AvroValue::Null);
            }
        }
        let candidates: Vec<(usize, &Schema)> =
            variants.iter().enumerate().filter(|(_, v)| !matches!(v, Schema::Null)).collect();
        // The common ["null", X] shape: X's own error says more than a
        // generic "one of" would.
        if let [(i, only)] = candidates.as_slice() {
            let converted = self.convert(value, only, path, mode)?;
            return wrap(*i, converted);
        }
        for (i, variant) in candidates {
            if let Ok(converted) = self.convert(value, variant, path, mode) {
                return wrap(i, converted);
            }
        }
        Err(AvroMismatch { path: path.to_string(), expected: self.expected(schema), found: describe(value) })
    }

    fn decimal(&self, decimal: &DecimalSchema, value: &JsonValue, mode: Mode) -> Option<AvroValue> {
        let bytes = match (mode, value) {
            // Schema defaults of a decimal are its raw two's-complement bytes.
            (Mode::Default, JsonValue::String(s)) => bytes(s, Mode::Default)?,
            (Mode::Payload, JsonValue::String(s)) => decimal_bytes(s, decimal.precision, decimal.scale)?,
            // serde_json prints a parsed number back in its shortest exact
            // form, so "12.34" stays 12.34 here.
            (_, JsonValue::Number(n)) => decimal_bytes(&n.to_string(), decimal.precision, decimal.scale)?,
            _ => return None,
        };
        if let InnerDecimalSchema::Fixed(FixedSchema { size, .. }) = &decimal.inner {
            if bytes.len() > *size {
                return None;
            }
        }
        Some(AvroValue::Decimal(Decimal::from(bytes)))
    }

    /// A short description of what `schema` accepts, for error messages.
    fn expected(&self, schema: &Schema) -> String {
        let Some(schema) = self.resolve(schema) else {
            return match schema {
                Schema::Ref { name } => format!("{} (unresolved schema reference)", name),
                _ => "a resolvable schema".to_owned(),
            };
        };
        match schema {
            Schema::Null => "null".to_owned(),
            Schema::Boolean => "boolean".to_owned(),
            Schema::Int => "int".to_owned(),
            Schema::Long => "long".to_owned(),
            Schema::Float => "float".to_owned(),
            Schema::Double => "double".to_owned(),
            Schema::Bytes => "bytes".to_owned(),
            Schema::String => "string".to_owned(),
            Schema::Array(a) => format!("array of {}", self.expected(&a.items)),
            Schema::Map(m) => format!("map of {}", self.expected(&m.types)),
            Schema::Union(u) => {
                let parts: Vec<String> = u.variants().iter().map(|v| self.short(v)).collect();
                format!("one of [{}]", parts.join(", "))
            }
            Schema::Record(r) => format!("record {}", r.name.name()),
            Schema::Enum(e) => format!("one of [{}]", e.symbols.join(", ")),
            Schema::Fixed(f) => format!("fixed {} ({} bytes)", f.name.name(), f.size),
            Schema::Decimal(d) => format!("decimal({},{})", d.precision, d.scale),
            Schema::BigDecimal => "big-decimal".to_owned(),
            Schema::Uuid(_) => "uuid".to_owned(),
            Schema::Date => "date".to_owned(),
            Schema::TimeMillis => "time-millis".to_owned(),
            Schema::TimeMicros => "time-micros".to_owned(),
            Schema::TimestampMillis => "timestamp-millis".to_owned(),
            Schema::TimestampMicros => "timestamp-micros".to_owned(),
            Schema::TimestampNanos => "timestamp-nanos".to_owned(),
            Schema::LocalTimestampMillis => "local-timestamp-millis".to_owned(),
            Schema::LocalTimestampMicros => "local-timestamp-micros".to_owned(),
            Schema::LocalTimestampNanos => "local-timestamp-nanos".to_owned(),
            Schema::Duration(_) => "duration".to_owned(),
            Schema::Ref { name } => name.to_string(),
        }
    }

    /// Like [`Self::expected`], but an enum inside a union is named rather
    /// than listed, to keep the message to one line.
    fn short(&self, schema: &Schema) -> String {
        match self.resolve(schema) {
            Some(Schema::Enum(e)) => format!("enum {}", e.name.name()),
            _ => self.expected(schema),
        }
    }
}

/// A short description of a JSON value for error messages.
fn describe(value: &JsonValue) -> String {
    const MAX_CHARS: usize = 40;
    match value {
        JsonValue::Null => "null".to_owned(),
        JsonValue::Bool(b) => format!("boolean {b}"),
        JsonValue::Number(n) => format!("number {n}"),
        JsonValue::String(s) if s.chars().count() > MAX_CHARS => {
            let head: String = s.chars().take(MAX_CHARS).collect();
            format!("string {head:?}...")
        }
        JsonValue::String(s) => format!("string {s:?}"),
        JsonValue::Array(a) => format!("array of {} items", a.len()),
        JsonValue::Object(o) => format!("object with {} keys", o.len()),
    }
}

fn int(n: &serde_json::Number) -> Option<i32> {
    n.as_i64().and_then(|i| i32::try_from(i).ok())
}

/// Payload strings are UTF-8 text; schema defaults of bytes/fixed map each
/// code point U+0000..U+00FF to one byte, as the Avro spec defines.
fn bytes(s: &str, mode: Mode) -> Option<Vec<u8>> {
    match mode {
        Mode::Payload => Some(s.as_bytes().to_vec()),
        Mode::Default => s.chars().map(|c| u8::try_from(u32::from(c)).ok()).collect(),
    }
}

/// The two's-complement big-endian unscaled value of the decimal literal
/// `text` at `scale`, or `None` if it is not a decimal, needs more fractional
/// digits than `scale` (we never round money) or more digits than `precision`.
fn decimal_bytes(text: &str, precision: usize, scale: usize) -> Option<Vec<u8>> {
    // Far beyond any real precision; keeps "1e999999999" from allocating.
    const MAX_EXPONENT: i64 = 1_000;
    let (negative, unsigned) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
        Some(at) => {
            let exponent: i64 = unsigned[at + 1..].parse().ok()?;
            if exponent.abs() > MAX_EXPONENT {
                return None;
            }
            (&unsigned[..at], exponent)
        }
        None => (unsigned, 0),
    };
    let (int_part, frac_part) = match mantissa.split_once('.') {
        Some((i, f)) if !f.is_empty() => (i, f),
        Some(_) => return None,
        None => (mantissa, ""),
    };
    if int_part.is_empty() || !int_part.bytes().chain(frac_part.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut digits: Vec<u8> = int_part.bytes().chain(frac_part.bytes()).map(|b| b - b'0').collect();
    let frac_digits = i64::try_from(frac_part.len()).ok()? - exponent;
    let scale = i64::try_from(scale).ok()?;
    if frac_digits > scale {
        // Extra fractional digits are fine only if they are zeros: then no
        // value is lost.
        let extra = usize::try_from(frac_digits - scale).ok()?;
        let keep = digits.len().saturating_sub(extra);
        if digits[keep..].iter().any(|&d| d != 0) {
            return None;
        }
        digits.truncate(keep);
    } else {
        let pad = usize::try_from(scale - frac_digits).ok()?;
        digits.resize(digits.len() + pad, 0);
    }
    let first_significant = digits.iter().position(|&d| d != 0).unwrap_or(digits.len());
    let digits = &digits[first_significant..];
    if digits.len() > precision {
        return None;
    }
    Some(twos_complement(digits, negative))
}

/// Minimal two's-complement big-endian bytes of the integer with decimal
/// `digits` (most significant first) and the given sign.
fn twos_complement(digits: &[u8], negative: bool) -> Vec<u8> {
    // Magnitude in base 256, big-endian, built by multiply-and-add.
    let mut magnitude: Vec<u8> = vec![0];
    for &d in digits {
        let mut carry = u16::from(d);
        for byte in magnitude.iter_mut().rev() {
            let v = u16::from(*byte) * 10 + carry;
            *byte = (v & 0xff) as u8;
            carry = v >> 8;
        }
        if carry > 0 {
            magnitude.insert(0, carry as u8);
        }
    }
    // Room for the sign bit.
    if magnitude[0] & 0x80 != 0 {
        magnitude.insert(0, 0);
    }
    if negative {
        for byte in magnitude.iter_mut() {
            *byte = !*byte;
        }
        for byte in magnitude.iter_mut().rev() {
            let (v, overflow) = byte.overflowing_add(1);
            *byte = v;
            if !overflow {
                break;
            }
        }
    }
    // Drop redundant sign-extension bytes.
    while magnitude.len() > 1
        && ((magnitude[0] == 0 && magnitude[1] & 0x80 == 0) || (magnitude[0] == 0xff && magnitude[1] & 0x80 != 0))
    {
        magnitude.remove(0);
    }
    magnitude
}

fn date(s: &str) -> Option<i32> {
    let day = NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()?;
    let days = day.signed_duration_since(NaiveDate::default()).num_days();
    i32::try_from(days).ok()
}

/// Time of day in `per_second` units (1_000 or 1_000_000); finer digits
/// are truncated, as for timestamps.
fn time_of_day(s: &str, per_second: i64) -> Option<i64> {
    let time = NaiveTime::parse_from_str(s, "%H:%M:%S%.f").ok()?;
    let nanos = i64::from(time.nanosecond());
    // chrono encodes a leap second as nanos >= 1e9; Avro has no room for it.
    if nanos >= 1_000_000_000 {
        return None;
    }
    Some(i64::from(time.num_seconds_from_midnight()) * per_second + nanos * per_second / 1_000_000_000)
}

fn timestamp(value: &JsonValue, unit: impl Fn(DateTime<Utc>) -> Option<i64>) -> Option<i64> {
    match value {
        JsonValue::String(s) => unit(DateTime::parse_from_rfc3339(s).ok()?.with_timezone(&Utc)),
        JsonValue::Number(n) => n.as_i64(),
        _ => None,
    }
}

fn local_timestamp(value: &JsonValue, unit: impl Fn(DateTime<Utc>) -> Option<i64>) -> Option<i64> {
    match value {
        JsonValue::String(s) => {
            let local = NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
                .or_else(|_| NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f"))
                .ok()?;
            // Avro counts local timestamps as if the wall time were UTC.
            unit(local.and_utc())
        }
        JsonValue::Number(n) => n.as_i64(),
        _ => None,
    }
}

fn duration(object: &JsonMap<String, JsonValue>) -> Option<AvroValue> {
    if object.keys().any(|k| !matches!(k.as_str(), "months" | "days" | "millis")) {
        return None;
    }
    let part = |key: &str| -> Option<u32> {
        match object.get(key) {
            Some(v) => v.as_u64().and_then(|n| u32::try_from(n).ok()),
            None => Some(0),
        }
    };
    Some(AvroValue::Duration(Duration::new(
        Months::new(part("months")?),
        Days::new(part("days")?),
        Millis::new(part("millis")?),
    )))
}

#[cfg(test)]
#[path = "avro_tests.rs"]
mod tests;
