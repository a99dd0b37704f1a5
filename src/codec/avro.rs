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
    DecimalSchema, EnumSchema, FixedSchema, InnerDecimalSchema, Name, RecordSchema, ResolvedSchema,
    UnionSchema,
};
use apache_avro::types::Value as AvroValue;
use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::{Days, Decimal, Duration, Millis, Months, Schema};
use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, SecondsFormat, Timelike, Utc};
use serde_json::{Map as JsonMap, Value as JsonValue};

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
    /// The Avro library refused the schema or the datum.
    #[error("cannot encode Avro datum: {0}")]
    Encode(String),
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
pub const ENVELOPE_FIELDS: [&str; 6] = [
    "event_id",
    "event_type",
    "aggregate_type",
    "aggregate_id",
    "entity_version",
    "occurred_at",
];

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
    let writer = GenericDatumWriter::builder(schema)
        .resolved_schemata(resolved.clone())
        .build()
        .map_err(|e| AvroError::Encode(e.to_string()))?;
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
    writer
        .write_value_to_vec(value)
        .map_err(|e| AvroError::Encode(e.to_string()))
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
        let fitting = candidates.iter().find(|c| {
            converter
                .convert(c, &field.schema, &Path::Root, Mode::Payload)
                .is_ok()
        });
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
        filled
            .get_or_insert_with(|| object.clone())
            .insert(name.to_owned(), chosen);
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
            JsonValue::from(
                envelope
                    .occurred_at
                    .to_rfc3339_opts(SecondsFormat::AutoSi, true),
            ),
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
                let plain =
                    !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
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

    fn convert(
        &self,
        value: &JsonValue,
        schema: &Schema,
        path: &Path<'_>,
        mode: Mode,
    ) -> Result<AvroValue, AvroMismatch> {
        let mismatch = || AvroMismatch {
            path: path.to_string(),
            expected: self.expected(schema),
            found: describe(value),
        };
        let Some(schema) = self.resolve(schema) else {
            return Err(mismatch());
        };
        let converted = match (schema, value) {
            (Schema::Null, JsonValue::Null) => Some(AvroValue::Null),
            (Schema::Boolean, JsonValue::Bool(b)) => Some(AvroValue::Boolean(*b)),
            (Schema::Int, JsonValue::Number(n)) => int(n).map(AvroValue::Int),
            (Schema::Long, JsonValue::Number(n)) => n.as_i64().map(AvroValue::Long),
            (Schema::Float, JsonValue::Number(n)) => n
                .as_f64()
                .map(|f| f as f32)
                .filter(|f| f.is_finite())
                .map(AvroValue::Float),
            (Schema::Double, JsonValue::Number(n)) => n.as_f64().map(AvroValue::Double),
            (Schema::String, JsonValue::String(s)) => Some(AvroValue::String(s.clone())),
            (Schema::Bytes, JsonValue::String(s)) => bytes(s, mode).map(AvroValue::Bytes),
            (Schema::Fixed(FixedSchema { size, .. }), JsonValue::String(s)) => bytes(s, mode)
                .filter(|b| b.len() == *size)
                .map(|b| AvroValue::Fixed(*size, b)),
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
            (Schema::BigDecimal, JsonValue::String(s)) => apache_avro::BigDecimal::from_str(s)
                .ok()
                .map(AvroValue::BigDecimal),
            (Schema::BigDecimal, JsonValue::Number(n)) => {
                apache_avro::BigDecimal::from_str(&n.to_string())
                    .ok()
                    .map(AvroValue::BigDecimal)
            }
            (Schema::Uuid(_), JsonValue::String(s)) => {
                uuid::Uuid::parse_str(s).ok().map(AvroValue::Uuid)
            }
            (Schema::Date, JsonValue::String(s)) => date(s).map(AvroValue::Date),
            (Schema::Date, JsonValue::Number(n)) => int(n).map(AvroValue::Date),
            (Schema::TimeMillis, JsonValue::String(s)) => time_of_day(s, 1_000)
                .and_then(|t| i32::try_from(t).ok())
                .map(AvroValue::TimeMillis),
            (Schema::TimeMillis, JsonValue::Number(n)) => int(n)
                .filter(|t| (0..86_400_000).contains(t))
                .map(AvroValue::TimeMillis),
            (Schema::TimeMicros, JsonValue::String(s)) => {
                time_of_day(s, 1_000_000).map(AvroValue::TimeMicros)
            }
            (Schema::TimeMicros, JsonValue::Number(n)) => n
                .as_i64()
                .filter(|t| (0..86_400_000_000).contains(t))
                .map(AvroValue::TimeMicros),
            (Schema::TimestampMillis, _) => {
                timestamp(value, |t| Some(t.timestamp_millis())).map(AvroValue::TimestampMillis)
            }
            (Schema::TimestampMicros, _) => {
                timestamp(value, |t| Some(t.timestamp_micros())).map(AvroValue::TimestampMicros)
            }
            (Schema::TimestampNanos, _) => {
                timestamp(value, |t| t.timestamp_nanos_opt()).map(AvroValue::TimestampNanos)
            }
            (Schema::LocalTimestampMillis, _) => {
                local_timestamp(value, |t| Some(t.timestamp_millis()))
                    .map(AvroValue::LocalTimestampMillis)
            }
            (Schema::LocalTimestampMicros, _) => {
                local_timestamp(value, |t| Some(t.timestamp_micros()))
                    .map(AvroValue::LocalTimestampMicros)
            }
            (Schema::LocalTimestampNanos, _) => local_timestamp(value, |t| t.timestamp_nanos_opt())
                .map(AvroValue::LocalTimestampNanos),
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
                expected: format!(
                    "a field of record {} ({})",
                    record.name.name(),
                    fields.join(", ")
                ),
                found: format!("unknown key with {}", describe(value)),
            });
        }
        let mut out = Vec::with_capacity(record.fields.len());
        for field in &record.fields {
            let field_path = Path::Key(path, &field.name);
            let value = match (object.get(&field.name), &field.default) {
                (Some(value), _) => self.convert(value, &field.schema, &field_path, mode)?,
                (None, Some(default)) => self
                    .convert(default, &field.schema, &field_path, Mode::Default)
                    .map_err(|_| AvroMismatch {
                        path: field_path.to_string(),
                        expected: self.expected(&field.schema),
                        found: format!(
                            "missing, and the schema default {} does not fit",
                            describe(default)
                        ),
                    })?,
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
        let candidates: Vec<(usize, &Schema)> = variants
            .iter()
            .enumerate()
            .filter(|(_, v)| !matches!(v, Schema::Null))
            .collect();
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
        Err(AvroMismatch {
            path: path.to_string(),
            expected: self.expected(schema),
            found: describe(value),
        })
    }

    fn decimal(&self, decimal: &DecimalSchema, value: &JsonValue, mode: Mode) -> Option<AvroValue> {
        let bytes = match (mode, value) {
            // Schema defaults of a decimal are its raw two's-complement bytes.
            (Mode::Default, JsonValue::String(s)) => bytes(s, Mode::Default)?,
            (Mode::Payload, JsonValue::String(s)) => {
                decimal_bytes(s, decimal.precision, decimal.scale)?
            }
            // serde_json prints a parsed number back in its shortest exact
            // form, so "12.34" stays 12.34 here.
            (_, JsonValue::Number(n)) => {
                decimal_bytes(&n.to_string(), decimal.precision, decimal.scale)?
            }
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
    if int_part.is_empty()
        || !int_part
            .bytes()
            .chain(frac_part.bytes())
            .all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let mut digits: Vec<u8> = int_part
        .bytes()
        .chain(frac_part.bytes())
        .map(|b| b - b'0')
        .collect();
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
        && ((magnitude[0] == 0 && magnitude[1] & 0x80 == 0)
            || (magnitude[0] == 0xff && magnitude[1] & 0x80 != 0))
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
    Some(
        i64::from(time.num_seconds_from_midnight()) * per_second
            + nanos * per_second / 1_000_000_000,
    )
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
    if object
        .keys()
        .any(|k| !matches!(k.as_str(), "months" | "days" | "millis"))
    {
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
mod tests {
    use super::*;
    use apache_avro::reader::datum::GenericDatumReader;
    use chrono::TimeZone;
    use proptest::prelude::*;
    use serde_json::json;

    fn parse(schema: &str) -> Schema {
        Schema::parse_str(schema).expect("test schema parses")
    }

    /// Converts `value` against a self-contained schema.
    fn convert(schema: &Schema, value: JsonValue) -> Result<AvroValue, AvroMismatch> {
        let resolved = ResolvedSchema::new(schema).expect("test schema resolves");
        json_to_avro(&value, schema, resolved.get_names())
    }

    fn convert_str(schema: &str, value: JsonValue) -> Result<AvroValue, AvroMismatch> {
        convert(&parse(schema), value)
    }

    fn mismatch(schema: &str, value: JsonValue) -> AvroMismatch {
        convert_str(schema, value).expect_err("value should not fit")
    }

    /// Encodes `value` (after conversion), decodes it again and checks both
    /// sides agree.
    fn round_trip(schema: &Schema, value: JsonValue) -> AvroValue {
        let converted = convert(schema, value).expect("value fits");
        let bytes = GenericDatumWriter::builder(schema)
            .build()
            .expect("writer")
            .write_value_to_vec(converted.clone())
            .expect("encodes");
        let decoded = GenericDatumReader::builder(schema)
            .build()
            .expect("reader")
            .read_value(&mut bytes.as_slice())
            .expect("decodes");
        assert_eq!(decoded, converted);
        decoded
    }

    fn envelope() -> Envelope<'static> {
        Envelope {
            event_id: "0b9f6c1e-3c3a-4f55-9d1e-2f9f0c6b7a10",
            event_type: "OrderPlaced",
            aggregate_type: "order",
            aggregate_id: "ord-1001",
            entity_version: Some(3),
            occurred_at: Utc
                .with_ymd_and_hms(2026, 11, 23, 16, 40, 0)
                .single()
                .expect("valid time")
                + chrono::Duration::microseconds(123_456),
        }
    }

    fn decimal_value(unscaled: i64) -> AvroValue {
        // Minimal big-endian two's complement, as the converter produces.
        let bytes = unscaled.to_be_bytes();
        let mut start = 0;
        while start < 7
            && ((bytes[start] == 0 && bytes[start + 1] & 0x80 == 0)
                || (bytes[start] == 0xff && bytes[start + 1] & 0x80 != 0))
        {
            start += 1;
        }
        AvroValue::Decimal(Decimal::from(&bytes[start..]))
    }

    #[test]
    fn primitives() {
        assert_eq!(convert_str(r#""null""#, json!(null)), Ok(AvroValue::Null));
        assert_eq!(
            convert_str(r#""boolean""#, json!(true)),
            Ok(AvroValue::Boolean(true))
        );
        assert_eq!(convert_str(r#""int""#, json!(-7)), Ok(AvroValue::Int(-7)));
        assert_eq!(
            convert_str(r#""long""#, json!(1_i64 << 40)),
            Ok(AvroValue::Long(1 << 40))
        );
        assert_eq!(
            convert_str(r#""float""#, json!(1.5)),
            Ok(AvroValue::Float(1.5))
        );
        assert_eq!(
            convert_str(r#""float""#, json!(2)),
            Ok(AvroValue::Float(2.0))
        );
        assert_eq!(
            convert_str(r#""double""#, json!(0.1)),
            Ok(AvroValue::Double(0.1))
        );
        assert_eq!(
            convert_str(r#""string""#, json!("hé")),
            Ok(AvroValue::String("hé".into()))
        );
        assert_eq!(
            convert_str(r#""bytes""#, json!("hé")),
            Ok(AvroValue::Bytes("hé".as_bytes().to_vec()))
        );
        assert_eq!(
            convert_str(r#"{"type":"fixed","name":"F","size":3}"#, json!("abc")),
            Ok(AvroValue::Fixed(3, b"abc".to_vec()))
        );
    }

    #[test]
    fn primitive_mismatches() {
        let m = mismatch(r#""int""#, json!(1_i64 << 40));
        assert_eq!(
            (m.expected.as_str(), m.found.as_str()),
            ("int", "number 1099511627776")
        );
        assert_eq!(mismatch(r#""int""#, json!(3.5)).found, "number 3.5");
        assert_eq!(mismatch(r#""long""#, json!("1")).found, r#"string "1""#);
        assert_eq!(mismatch(r#""long""#, json!(u64::MAX)).expected, "long");
        assert_eq!(mismatch(r#""float""#, json!(1e300)).expected, "float");
        assert_eq!(mismatch(r#""boolean""#, json!(null)).found, "null");
        assert_eq!(
            mismatch(r#""string""#, json!(["a"])).found,
            "array of 1 items"
        );
        assert_eq!(mismatch(r#""null""#, json!({})).found, "object with 0 keys");
        assert_eq!(mismatch(r#""bytes""#, json!(1)).expected, "bytes");
        let m = mismatch(r#"{"type":"fixed","name":"F","size":3}"#, json!("abcd"));
        assert_eq!(
            m.to_string(),
            r#"at $: expected fixed F (3 bytes), found string "abcd""#
        );
        let long = "x".repeat(100);
        assert_eq!(
            mismatch(r#""int""#, json!(long)).found,
            format!("string {:?}...", "x".repeat(40))
        );
    }

    const ORDER: &str = r#"{
        "type": "record", "name": "Order", "namespace": "test",
        "fields": [
            {"name": "id", "type": "string"},
            {"name": "note", "type": ["null", "string"], "default": null},
            {"name": "count", "type": "int", "default": 1},
            {"name": "status", "type": {"type": "enum", "name": "Status", "symbols": ["placed", "paid"]}},
            {"name": "items", "type": {"type": "array", "items": {
                "type": "record", "name": "Item", "fields": [
                    {"name": "sku", "type": "string"},
                    {"name": "price", "type": {"type": "bytes", "logicalType": "decimal", "precision": 10, "scale": 2}}
                ]}}},
            {"name": "tags", "type": {"type": "map", "values": "long"}, "default": {}}
        ]
    }"#;

    fn order(items: JsonValue) -> JsonValue {
        json!({"id": "o1", "status": "paid", "items": items})
    }

    #[test]
    fn record_with_defaults_nested_records_arrays_maps_and_enums() {
        let schema = parse(ORDER);
        let decoded = round_trip(
            &schema,
            json!({
                "id": "o1", "status": "paid", "tags": {"a": 1},
                "items": [{"sku": "s1", "price": "12.34"}]
            }),
        );
        let expected = AvroValue::Record(vec![
            ("id".into(), AvroValue::String("o1".into())),
            (
                "note".into(),
                AvroValue::Union(0, Box::new(AvroValue::Null)),
            ),
            ("count".into(), AvroValue::Int(1)),
            ("status".into(), AvroValue::Enum(1, "paid".into())),
            (
                "items".into(),
                AvroValue::Array(vec![AvroValue::Record(vec![
                    ("sku".into(), AvroValue::String("s1".into())),
                    ("price".into(), decimal_value(1234)),
                ])]),
            ),
            (
                "tags".into(),
                AvroValue::Map(HashMap::from([("a".to_owned(), AvroValue::Long(1))])),
            ),
        ]);
        assert_eq!(decoded, expected);
    }

    #[test]
    fn record_mismatches_name_the_path() {
        let items = json!([
            {"sku": "a", "price": "1"},
            {"sku": "b", "price": 2},
            {"sku": "c", "price": "abc"}
        ]);
        let m = convert_str(ORDER, order(items)).expect_err("bad price");
        assert_eq!(
            m.to_string(),
            r#"at $.items[2].price: expected decimal(10,2), found string "abc""#
        );

        let m = mismatch(ORDER, json!({"status": "paid", "items": []}));
        assert_eq!(
            (m.path.as_str(), m.expected.as_str(), m.found.as_str()),
            ("$.id", "string", "missing")
        );

        let m = mismatch(
            ORDER,
            json!({"id": "o1", "status": "paid", "items": [], "cuont": 2}),
        );
        assert_eq!(m.path, "$.cuont");
        assert_eq!(
            m.expected,
            "a field of record Order (id, note, count, status, items, tags)"
        );
        assert_eq!(m.found, "unknown key with number 2");

        let m = mismatch(ORDER, json!({"id": "o1", "status": "shipped", "items": []}));
        assert_eq!(
            m.to_string(),
            r#"at $.status: expected one of [placed, paid], found string "shipped""#
        );

        let m = mismatch(ORDER, json!({"id": "o1", "status": "paid", "items": {}}));
        assert_eq!(
            (m.path.as_str(), m.expected.as_str()),
            ("$.items", "array of record Item")
        );

        let m = mismatch(
            ORDER,
            json!({"id": "o1", "status": "paid", "items": [], "tags": {"a b": "x"}}),
        );
        assert_eq!(
            (m.path.as_str(), m.expected.as_str()),
            (r#"$.tags["a b"]"#, "long")
        );

        let m = mismatch(ORDER, json!([1]));
        assert_eq!(
            (m.path.as_str(), m.expected.as_str(), m.found.as_str()),
            ("$", "record Order", "array of 1 items")
        );

        let m = mismatch(
            ORDER,
            json!({"id": "o1", "status": "paid", "items": [], "note": 5}),
        );
        assert_eq!((m.path.as_str(), m.expected.as_str()), ("$.note", "string"));
    }

    #[test]
    fn schema_defaults_follow_the_avro_spec() {
        let schema = r#"{"type": "record", "name": "D", "fields": [
            {"name": "b", "type": "bytes", "default": "\u00ff\u0001"},
            {"name": "u", "type": ["string", "null"], "default": "x"},
            {"name": "r", "type": {"type": "record", "name": "In", "fields": [
                {"name": "n", "type": "int", "default": 5}]}, "default": {}},
            {"name": "bad", "type": "bytes", "default": "\u0100"}
        ]}"#;
        let m = mismatch(schema, json!({}));
        assert_eq!(m.path, "$.bad");
        // U+0100 has no byte in the spec's encoding of bytes defaults.
        assert_eq!(
            m.found,
            "missing, and the schema default string \"\u{100}\" does not fit"
        );
        let value = convert_str(schema, json!({"bad": "z"})).expect("defaults fit");
        assert_eq!(
            value,
            AvroValue::Record(vec![
                ("b".into(), AvroValue::Bytes(vec![0xff, 0x01])),
                (
                    "u".into(),
                    AvroValue::Union(0, Box::new(AvroValue::String("x".into())))
                ),
                (
                    "r".into(),
                    AvroValue::Record(vec![("n".into(), AvroValue::Int(5))])
                ),
                ("bad".into(), AvroValue::Bytes(b"z".to_vec())),
            ])
        );
    }

    #[test]
    fn unions() {
        let nullable = r#"["null", "long"]"#;
        assert_eq!(
            convert_str(nullable, json!(null)),
            Ok(AvroValue::Union(0, Box::new(AvroValue::Null)))
        );
        assert_eq!(
            convert_str(nullable, json!(4)),
            Ok(AvroValue::Union(1, Box::new(AvroValue::Long(4))))
        );
        // The single non-null branch reports its own expectation.
        assert_eq!(mismatch(nullable, json!("4")).expected, "long");

        let general =
            r#"["null", "int", "string", {"type": "enum", "name": "E", "symbols": ["A"]}]"#;
        assert_eq!(
            convert_str(general, json!(4)),
            Ok(AvroValue::Union(1, Box::new(AvroValue::Int(4))))
        );
        assert_eq!(
            convert_str(general, json!("A")),
            Ok(AvroValue::Union(2, Box::new(AvroValue::String("A".into()))))
        );
        let m = mismatch(general, json!(true));
        assert_eq!(
            m.to_string(),
            "at $: expected one of [null, int, string, enum E], found boolean true"
        );

        let no_null = r#"["int", "string"]"#;
        assert_eq!(mismatch(no_null, json!(null)).found, "null");
        round_trip(&parse(general), json!("A"));
    }

    #[test]
    fn timestamps() {
        let millis = r#"{"type": "long", "logicalType": "timestamp-millis"}"#;
        let micros = r#"{"type": "long", "logicalType": "timestamp-micros"}"#;
        let nanos = r#"{"type": "long", "logicalType": "timestamp-nanos"}"#;
        let t = "2026-11-23T16:40:00.123456Z";
        let secs = 1_795_452_000_i64;
        assert_eq!(
            convert_str(millis, json!(t)),
            Ok(AvroValue::TimestampMillis(secs * 1_000 + 123))
        );
        assert_eq!(
            convert_str(micros, json!(t)),
            Ok(AvroValue::TimestampMicros(secs * 1_000_000 + 123_456))
        );
        assert_eq!(
            convert_str(nanos, json!(t)),
            Ok(AvroValue::TimestampNanos(
                secs * 1_000_000_000 + 123_456_000
            ))
        );
        // Offsets are honoured.
        assert_eq!(
            convert_str(millis, json!("2026-11-23T17:40:00.123+01:00")),
            Ok(AvroValue::TimestampMillis(secs * 1_000 + 123))
        );
        assert_eq!(
            convert_str(millis, json!(42)),
            Ok(AvroValue::TimestampMillis(42))
        );
        assert_eq!(
            convert_str(micros, json!(-42)),
            Ok(AvroValue::TimestampMicros(-42))
        );
        let m = mismatch(micros, json!("2026-11-23 16:40"));
        assert_eq!(
            m.to_string(),
            r#"at $: expected timestamp-micros, found string "2026-11-23 16:40""#
        );
        assert_eq!(mismatch(millis, json!(1.5)).found, "number 1.5");
        // Too far out for nanoseconds in an i64.
        assert_eq!(
            mismatch(nanos, json!("2999-01-01T00:00:00Z")).expected,
            "timestamp-nanos"
        );

        let local_millis = r#"{"type": "long", "logicalType": "local-timestamp-millis"}"#;
        let local_micros = r#"{"type": "long", "logicalType": "local-timestamp-micros"}"#;
        assert_eq!(
            convert_str(local_millis, json!("2026-11-23T16:40:00.123")),
            Ok(AvroValue::LocalTimestampMillis(secs * 1_000 + 123))
        );
        assert_eq!(
            convert_str(local_micros, json!("2026-11-23 16:40:00")),
            Ok(AvroValue::LocalTimestampMicros(secs * 1_000_000))
        );
        assert_eq!(
            convert_str(local_micros, json!(5)),
            Ok(AvroValue::LocalTimestampMicros(5))
        );
        // A zone makes it not a local timestamp.
        assert_eq!(
            mismatch(local_millis, json!(t)).expected,
            "local-timestamp-millis"
        );
        round_trip(&parse(micros), json!(t));
    }

    #[test]
    fn dates_and_times() {
        let date = r#"{"type": "int", "logicalType": "date"}"#;
        assert_eq!(
            convert_str(date, json!("1970-01-02")),
            Ok(AvroValue::Date(1))
        );
        assert_eq!(
            convert_str(date, json!("1969-12-31")),
            Ok(AvroValue::Date(-1))
        );
        assert_eq!(
            convert_str(date, json!(20_000)),
            Ok(AvroValue::Date(20_000))
        );
        assert_eq!(
            mismatch(date, json!("2026-02-30")).to_string(),
            r#"at $: expected date, found string "2026-02-30""#
        );
        assert_eq!(mismatch(date, json!(1_i64 << 40)).expected, "date");

        let millis = r#"{"type": "int", "logicalType": "time-millis"}"#;
        let micros = r#"{"type": "long", "logicalType": "time-micros"}"#;
        assert_eq!(
            convert_str(millis, json!("01:02:03.456")),
            Ok(AvroValue::TimeMillis(3_723_456))
        );
        assert_eq!(
            convert_str(millis, json!("01:02:03")),
            Ok(AvroValue::TimeMillis(3_723_000))
        );
        assert_eq!(
            convert_str(micros, json!("01:02:03.456789")),
            Ok(AvroValue::TimeMicros(3_723_456_789))
        );
        assert_eq!(convert_str(millis, json!(5)), Ok(AvroValue::TimeMillis(5)));
        assert_eq!(convert_str(micros, json!(5)), Ok(AvroValue::TimeMicros(5)));
        assert_eq!(mismatch(millis, json!("25:00:00")).expected, "time-millis");
        assert_eq!(mismatch(millis, json!(86_400_000)).expected, "time-millis");
        assert_eq!(mismatch(micros, json!(-1)).expected, "time-micros");
        round_trip(&parse(date), json!("2026-11-24"));
        round_trip(&parse(millis), json!("23:59:59.999"));
    }

    #[test]
    fn uuids() {
        let id = "0b9f6c1e-3c3a-4f55-9d1e-2f9f0c6b7a10";
        let parsed = uuid::Uuid::parse_str(id).expect("valid uuid");
        let string = r#"{"type": "string", "logicalType": "uuid"}"#;
        let fixed = r#"{"type": "fixed", "name": "U", "size": 16, "logicalType": "uuid"}"#;
        assert_eq!(convert_str(string, json!(id)), Ok(AvroValue::Uuid(parsed)));
        assert_eq!(convert_str(fixed, json!(id)), Ok(AvroValue::Uuid(parsed)));
        assert_eq!(
            mismatch(string, json!("not-a-uuid")).to_string(),
            r#"at $: expected uuid, found string "not-a-uuid""#
        );
        round_trip(&parse(string), json!(id));
        round_trip(&parse(fixed), json!(id));
    }

    #[test]
    fn decimals() {
        let bytes = r#"{"type": "bytes", "logicalType": "decimal", "precision": 10, "scale": 2}"#;
        let fixed = r#"{"type": "fixed", "name": "D", "size": 5, "logicalType": "decimal", "precision": 10, "scale": 2}"#;
        for (input, unscaled) in [
            (json!("12.34"), 1234),
            (json!(12.34), 1234),
            (json!("12.340"), 1234),
            (json!("12.3"), 1230),
            (json!("12"), 1200),
            (json!(12), 1200),
            (json!("-0.01"), -1),
            (json!("-1.28"), -128),
            (json!("1.28"), 128),
            (json!("+5"), 500),
            (json!("1.5e2"), 15_000),
            (json!("1234E-2"), 1234),
            (json!("0.5e1"), 500),
            (json!("0"), 0),
            (json!("-0.00"), 0),
            (json!("99999999.99"), 9_999_999_999),
            (json!("-99999999.99"), -9_999_999_999),
        ] {
            assert_eq!(
                convert_str(bytes, input.clone()),
                Ok(decimal_value(unscaled)),
                "{input}"
            );
            assert_eq!(
                convert_str(fixed, input.clone()),
                Ok(decimal_value(unscaled)),
                "{input}"
            );
        }
        for input in [
            json!("12.345"),
            json!(12.345),
            json!("1.2345e1"),
            json!("100000000.00"),
            json!("abc"),
            json!(""),
            json!("-"),
            json!("1."),
            json!(".5"),
            json!("1e"),
            json!("1e99999"),
            json!(" 1"),
            json!(null),
        ] {
            let m = convert_str(bytes, input.clone()).expect_err("not a decimal(10,2)");
            assert_eq!(m.expected, "decimal(10,2)", "{input}");
        }
        // Too wide for a 1-byte fixed even though the precision allows it.
        let tiny = r#"{"type": "fixed", "name": "T", "size": 1, "logicalType": "decimal", "precision": 2, "scale": 0}"#;
        assert_eq!(convert_str(tiny, json!("-99")), Ok(decimal_value(-99)));
        assert_eq!(convert_str(tiny, json!(99)), Ok(decimal_value(99)));
        round_trip(&parse(bytes), json!("-1234.56"));
        round_trip(&parse(fixed), json!("-1234.56"));

        let big = r#"{"type": "bytes", "logicalType": "big-decimal"}"#;
        let value = convert_str(big, json!("123.456")).expect("big decimal");
        assert!(matches!(value, AvroValue::BigDecimal(_)));
        assert_eq!(mismatch(big, json!("x")).expected, "big-decimal");
    }

    #[test]
    fn twos_complement_is_minimal() {
        let digits = |s: &str| s.bytes().map(|b| b - b'0').collect::<Vec<u8>>();
        assert_eq!(twos_complement(&[], false), vec![0]);
        assert_eq!(twos_complement(&digits("1234"), false), vec![0x04, 0xd2]);
        assert_eq!(twos_complement(&digits("128"), false), vec![0x00, 0x80]);
        assert_eq!(twos_complement(&digits("128"), true), vec![0x80]);
        assert_eq!(twos_complement(&digits("129"), true), vec![0xff, 0x7f]);
        assert_eq!(twos_complement(&digits("1"), true), vec![0xff]);
        assert_eq!(
            twos_complement(&digits("65536"), false),
            vec![0x01, 0x00, 0x00]
        );
        // More digits than an i128 holds.
        let wide = twos_complement(&digits(&"9".repeat(50)), false);
        assert_eq!(wide.len(), 21);
    }

    #[test]
    fn durations() {
        let schema = r#"{"type": "fixed", "name": "Dur", "size": 12, "logicalType": "duration"}"#;
        assert_eq!(
            convert_str(schema, json!({"months": 1, "days": 2, "millis": 3})),
            Ok(AvroValue::Duration(Duration::new(
                Months::new(1),
                Days::new(2),
                Millis::new(3)
            )))
        );
        assert_eq!(mismatch(schema, json!({"weeks": 1})).expected, "duration");
        assert_eq!(mismatch(schema, json!({"days": -1})).expected, "duration");
    }

    #[test]
    fn named_references_resolve_through_names() {
        let schemata = Schema::parse_list([
            r#"{"type": "enum", "name": "Currency", "namespace": "x", "symbols": ["EUR", "USD"]}"#,
            r#"{"type": "record", "name": "Money", "namespace": "x", "fields": [
                {"name": "amount", "type": "long"}, {"name": "currency", "type": "Currency"}]}"#,
            r#"{"type": "record", "name": "Order", "namespace": "x", "fields": [
                {"name": "total", "type": "Money"},
                {"name": "refund", "type": ["null", "x.Money"], "default": null}]}"#,
        ])
        .expect("schemata parse");
        let resolved =
            ResolvedSchema::new_with_schemata(schemata.iter().collect()).expect("resolve");
        let order = &schemata[2];
        let value = json_to_avro(
            &json!({"total": {"amount": 5, "currency": "USD"}}),
            order,
            resolved.get_names(),
        )
        .expect("fits");
        assert_eq!(
            value,
            AvroValue::Record(vec![
                (
                    "total".into(),
                    AvroValue::Record(vec![
                        ("amount".into(), AvroValue::Long(5)),
                        ("currency".into(), AvroValue::Enum(1, "USD".into())),
                    ])
                ),
                (
                    "refund".into(),
                    AvroValue::Union(0, Box::new(AvroValue::Null))
                ),
            ])
        );
        let m = json_to_avro(
            &json!({"total": {"amount": 5, "currency": "JPY"}}),
            order,
            resolved.get_names(),
        )
        .expect_err("JPY is not listed");
        assert_eq!(
            m.to_string(),
            r#"at $.total.currency: expected one of [EUR, USD], found string "JPY""#
        );
        let m = json_to_avro(&json!({"total": 1}), order, resolved.get_names())
            .expect_err("not a record");
        assert_eq!(m.expected, "record Money");

        // Without the names the reference cannot be followed: a mismatch, not a panic.
        let empty: HashMap<Name, Schema> = HashMap::new();
        let m = json_to_avro(&json!({"amount": 1}), &schemata[1], &empty).expect_err("unresolved");
        assert_eq!(m.path, "$.currency");
        assert_eq!(m.expected, "x.Currency (unresolved schema reference)");

        let bytes = encode_payload(
            &json!({"total": {"amount": 5, "currency": "EUR"}}),
            &envelope(),
            order,
            &resolved,
        )
        .expect("encodes");
        let decoded = GenericDatumReader::builder(order)
            .writer_schemata(schemata.iter().collect())
            .expect("resolve")
            .build()
            .expect("reader")
            .read_value(&mut bytes.as_slice())
            .expect("decodes");
        assert!(matches!(decoded, AvroValue::Record(_)));
    }

    fn decode(schema: &Schema, bytes: &[u8]) -> Vec<(String, AvroValue)> {
        let decoded = GenericDatumReader::builder(schema)
            .build()
            .expect("reader")
            .read_value(&mut &bytes[..])
            .expect("decodes");
        match decoded {
            AvroValue::Record(fields) => fields,
            other => panic!("expected a record, got {other:?}"),
        }
    }

    fn field<'a>(fields: &'a [(String, AvroValue)], name: &str) -> &'a AvroValue {
        &fields
            .iter()
            .find(|(n, _)| n == name)
            .expect("field present")
            .1
    }

    const ORDER_PLACED: &str = include_str!("../../schemas/order/OrderPlaced.avsc");
    const ORDER_PAID: &str = include_str!("../../schemas/order/OrderPaid.avsc");
    const ORDER_SHIPPED: &str = include_str!("../../schemas/order/OrderShipped.avsc");
    const CUSTOMER_PROFILE: &str = include_str!("../../schemas/profile/CustomerProfile.avsc");
    const SCHEMAS_README: &str = include_str!("../../schemas/README.md");

    #[test]
    fn envelope_fields_are_filled_from_the_row() {
        let schema = parse(ORDER_PLACED);
        let resolved = ResolvedSchema::new(&schema).expect("resolve");
        let payload = json!({"data": {
            "order_id": "ord-1001", "customer_id": "cus-42", "total": "1.00",
            "currency": "GBP", "items": []
        }});
        let env = envelope();
        let bytes = encode_payload(&payload, &env, &schema, &resolved).expect("encodes");
        let fields = decode(&schema, &bytes);
        assert_eq!(
            field(&fields, "event_id"),
            &AvroValue::Uuid(uuid::Uuid::parse_str(env.event_id).expect("uuid"))
        );
        assert_eq!(
            field(&fields, "event_type"),
            &AvroValue::String("OrderPlaced".into())
        );
        assert_eq!(
            field(&fields, "aggregate_type"),
            &AvroValue::String("order".into())
        );
        assert_eq!(
            field(&fields, "aggregate_id"),
            &AvroValue::String("ord-1001".into())
        );
        assert_eq!(
            field(&fields, "entity_version"),
            &AvroValue::Union(1, Box::new(AvroValue::Long(3)))
        );
        assert_eq!(
            field(&fields, "occurred_at"),
            &AvroValue::TimestampMicros(env.occurred_at.timestamp_micros())
        );

        // Values in the payload win; no version gives null.
        let mut payload = payload;
        payload["event_type"] = json!("Custom");
        let env = Envelope {
            entity_version: None,
            ..envelope()
        };
        let bytes = encode_payload(&payload, &env, &schema, &resolved).expect("encodes");
        let fields = decode(&schema, &bytes);
        assert_eq!(
            field(&fields, "event_type"),
            &AvroValue::String("Custom".into())
        );
        assert_eq!(
            field(&fields, "entity_version"),
            &AvroValue::Union(0, Box::new(AvroValue::Null))
        );
    }

    #[test]
    fn envelope_fields_take_the_form_of_their_schema() {
        let schema = parse(
            r#"{"type": "record", "name": "E", "fields": [
                {"name": "event_id", "type": "string"},
                {"name": "entity_version", "type": "string"},
                {"name": "occurred_at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
                {"name": "aggregate_id", "type": "long", "default": 0}
            ]}"#,
        );
        let resolved = ResolvedSchema::new(&schema).expect("resolve");
        let env = envelope();
        let bytes = encode_payload(&json!({}), &env, &schema, &resolved).expect("encodes");
        let fields = decode(&schema, &bytes);
        assert_eq!(
            field(&fields, "event_id"),
            &AvroValue::String(env.event_id.into())
        );
        assert_eq!(
            field(&fields, "entity_version"),
            &AvroValue::String("3".into())
        );
        assert_eq!(
            field(&fields, "occurred_at"),
            &AvroValue::TimestampMillis(env.occurred_at.timestamp_millis())
        );
        // "ord-1001" does not fit a long, so the default applies.
        assert_eq!(field(&fields, "aggregate_id"), &AvroValue::Long(0));

        let as_text = parse(
            r#"{"type": "record", "name": "T", "fields": [
                {"name": "occurred_at", "type": "string"},
                {"name": "event_type", "type": "string"}]}"#,
        );
        let resolved = ResolvedSchema::new(&as_text).expect("resolve");
        let bytes = encode_payload(&json!({}), &env, &as_text, &resolved).expect("encodes");
        let fields = decode(&as_text, &bytes);
        assert_eq!(
            field(&fields, "occurred_at"),
            &AvroValue::String("2026-11-23T16:40:00.123456Z".into())
        );

        let plain_long = parse(
            r#"{"type": "record", "name": "L", "fields": [{"name": "occurred_at", "type": "long"}]}"#,
        );
        let resolved = ResolvedSchema::new(&plain_long).expect("resolve");
        let bytes = encode_payload(&json!({}), &env, &plain_long, &resolved).expect("encodes");
        assert_eq!(
            field(&decode(&plain_long, &bytes), "occurred_at"),
            &AvroValue::Long(env.occurred_at.timestamp_micros())
        );

        // No fitting form and no default: the error shows what the row had.
        let strict = parse(
            r#"{"type": "record", "name": "S", "fields": [{"name": "entity_version", "type": "long"}]}"#,
        );
        let resolved = ResolvedSchema::new(&strict).expect("resolve");
        let env = Envelope {
            entity_version: None,
            ..envelope()
        };
        let err = encode_payload(&json!({}), &env, &strict, &resolved).expect_err("no version");
        assert_eq!(
            err.to_string(),
            "at $.entity_version: expected long, found null"
        );
    }

    #[test]
    fn non_record_schemas_and_payloads_are_left_alone() {
        let schema = parse(r#""string""#);
        let resolved = ResolvedSchema::new(&schema).expect("resolve");
        let bytes = encode_payload(&json!("hi"), &envelope(), &schema, &resolved).expect("encodes");
        assert_eq!(bytes, vec![4, b'h', b'i']);

        let record = parse(ORDER_PAID);
        let resolved = ResolvedSchema::new(&record).expect("resolve");
        let err =
            encode_payload(&json!([]), &envelope(), &record, &resolved).expect_err("not an object");
        assert!(
            matches!(err, AvroError::Mismatch(ref m) if m.path == "$"),
            "{err}"
        );
    }

    #[test]
    fn confluent_framing() {
        assert_eq!(
            confluent_frame(0x0102_0304, &[9, 8]),
            vec![0, 1, 2, 3, 4, 9, 8]
        );
        assert_eq!(confluent_frame(7, &[]), vec![0, 0, 0, 0, 7]);
    }

    /// Every example payload in schemas/README.md encodes against the schema
    /// named just before it, and every schema has one.
    #[test]
    fn readme_examples_encode() {
        let schemas = [
            ("order/OrderPlaced.avsc", ORDER_PLACED),
            ("order/OrderPaid.avsc", ORDER_PAID),
            ("order/OrderShipped.avsc", ORDER_SHIPPED),
            ("profile/CustomerProfile.avsc", CUSTOMER_PROFILE),
        ];
        let mut seen = Vec::new();
        let mut rest = SCHEMAS_README;
        while let Some(start) = rest.find("```json\n") {
            let before = &rest[..start];
            let body = &rest[start + "```json\n".len()..];
            let end = body.find("```").expect("closed code block");
            let (file, text) = schemas
                .iter()
                .filter_map(|(file, text)| {
                    before
                        .rfind(&format!("`{file}`"))
                        .map(|at| (at, file, text))
                })
                .max_by_key(|(at, _, _)| *at)
                .map(|(_, file, text)| (*file, *text))
                .expect("example names its schema");
            let schema = parse(text);
            assert_eq!(
                schema.namespace(),
                Some("dev.outboxrelay.example"),
                "{file}"
            );
            let resolved = ResolvedSchema::new(&schema).expect("resolve");
            let payload: JsonValue = serde_json::from_str(&body[..end]).expect("example is JSON");
            let bytes = encode_payload(&payload, &envelope(), &schema, &resolved)
                .unwrap_or_else(|e| panic!("{file}: {e}"));
            decode(&schema, &bytes);
            seen.push(file);
            rest = &body[end..];
        }
        seen.sort_unstable();
        let mut all: Vec<&str> = schemas.iter().map(|(f, _)| *f).collect();
        all.sort_unstable();
        assert_eq!(seen, all);
    }

    #[test]
    fn example_schemas_reject_typical_mistakes() {
        let schema = parse(ORDER_PLACED);
        let resolved = ResolvedSchema::new(&schema).expect("resolve");
        let payload = json!({"data": {
            "order_id": "o", "customer_id": "c", "total": "1.00", "currency": "EUR",
            "items": [{"sku": "s", "quantity": 1, "unit_price": "0.999"}]
        }});
        let err =
            encode_payload(&payload, &envelope(), &schema, &resolved).expect_err("3 decimals");
        assert_eq!(
            err.to_string(),
            r#"at $.data.items[0].unit_price: expected decimal(12,2), found string "0.999""#
        );
        let env = Envelope {
            event_id: "nope",
            ..envelope()
        };
        let mut ok = payload;
        ok["data"]["items"] = json!([]);
        let err = encode_payload(&ok, &env, &schema, &resolved).expect_err("bad uuid");
        assert_eq!(
            err.to_string(),
            r#"at $.event_id: expected uuid, found string "nope""#
        );
    }

    fn arbitrary_json() -> impl Strategy<Value = JsonValue> {
        let leaf = prop_oneof![
            Just(JsonValue::Null),
            any::<bool>().prop_map(JsonValue::from),
            any::<i64>().prop_map(JsonValue::from),
            any::<u64>().prop_map(JsonValue::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(JsonValue::from),
            "[-+0-9.eE]{0,12}".prop_map(JsonValue::from),
            "[0-9]{4}-[0-9]{2}-[0-9]{2}(T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,9})?Z?)?"
                .prop_map(JsonValue::from),
            prop_oneof![
                Just("EUR"),
                Just("GOLD"),
                Just("0b9f6c1e-3c3a-4f55-9d1e-2f9f0c6b7a10")
            ]
            .prop_map(JsonValue::from),
            ".{0,20}".prop_map(JsonValue::from),
        ];
        let keys = prop_oneof![
            Just("data".to_owned()),
            Just("items".to_owned()),
            Just("total".to_owned()),
            Just("event_id".to_owned()),
            Just("occurred_at".to_owned()),
            "[a-z_]{1,8}",
        ];
        leaf.prop_recursive(4, 48, 6, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(JsonValue::from),
                prop::collection::btree_map(keys.clone(), inner, 0..6)
                    .prop_map(|m| JsonValue::Object(m.into_iter().collect())),
            ]
        })
    }

    const KITCHEN_SINK: &str = r#"{"type": "record", "name": "K", "fields": [
        {"name": "a", "type": ["null", "int", "string", {"type": "array", "items": "K"}], "default": null},
        {"name": "b", "type": {"type": "map", "values": ["double", "boolean", "bytes"]}, "default": {}},
        {"name": "c", "type": {"type": "fixed", "name": "C", "size": 4, "logicalType": "decimal", "precision": 8, "scale": 3}, "default": "\u0000\u0000\u0000\u0000"},
        {"name": "d", "type": ["null", {"type": "int", "logicalType": "date"}, {"type": "long", "logicalType": "timestamp-nanos"}], "default": null},
        {"name": "e", "type": ["null", {"type": "long", "logicalType": "local-timestamp-micros"}, {"type": "int", "logicalType": "time-millis"}], "default": null},
        {"name": "f", "type": ["null", {"type": "fixed", "name": "Dur", "size": 12, "logicalType": "duration"}, "float"], "default": null},
        {"name": "g", "type": ["null", {"type": "bytes", "logicalType": "big-decimal"}], "default": null}
    ]}"#;

    proptest! {
        #[test]
        fn arbitrary_json_never_panics(value in arbitrary_json()) {
            for text in [ORDER_PLACED, ORDER_PAID, ORDER_SHIPPED, CUSTOMER_PROFILE, ORDER, KITCHEN_SINK] {
                let schema = parse(text);
                let resolved = ResolvedSchema::new(&schema).expect("resolve");
                // Whatever the outcome, anything accepted must also encode.
                if let Ok(converted) = json_to_avro(&value, &schema, resolved.get_names()) {
                    let writer = GenericDatumWriter::builder(&schema).build().expect("writer");
                    prop_assert!(writer.write_value_to_vec(converted).is_ok());
                }
                let _ = encode_payload(&value, &envelope(), &schema, &resolved);
            }
        }

        #[test]
        fn decimal_strings_never_panic(text in "[-+]?[0-9]{0,30}(\\.[0-9]{0,30})?([eE][-+]?[0-9]{0,6})?", scale in 0usize..20) {
            if let Some(bytes) = decimal_bytes(&text, 40, scale) {
                prop_assert!(!bytes.is_empty() && bytes.len() <= 17);
            }
        }
    }
}
