//! Unit tests of the Avro codec (kept beside it, in their own file).
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
        occurred_at: Utc.with_ymd_and_hms(2026, 11, 23, 16, 40, 0).single().expect("valid time")
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
    assert_eq!(convert_str(r#""boolean""#, json!(true)), Ok(AvroValue::Boolean(true)));
    assert_eq!(convert_str(r#""int""#, json!(-7)), Ok(AvroValue::Int(-7)));
    assert_eq!(convert_str(r#""long""#, json!(1_i64 << 40)), Ok(AvroValue::Long(1 << 40)));
    assert_eq!(convert_str(r#""float""#, json!(1.5)), Ok(AvroValue::Float(1.5)));
    assert_eq!(convert_str(r#""float""#, json!(2)), Ok(AvroValue::Float(2.0)));
    assert_eq!(convert_str(r#""double""#, json!(0.1)), Ok(AvroValue::Double(0.1)));
    assert_eq!(convert_str(r#""string""#, json!("hé")), Ok(AvroValue::String("hé".into())));
    assert_eq!(convert_str(r#""bytes""#, json!("hé")), Ok(AvroValue::Bytes("hé".as_bytes().to_vec())));
    assert_eq!(
        convert_str(r#"{"type":"fixed","name":"F","size":3}"#, json!("abc")),
        Ok(AvroValue::Fixed(3, b"abc".to_vec()))
    );
}

#[test]
fn primitive_mismatches() {
    let m = mismatch(r#""int""#, json!(1_i64 << 40));
    assert_eq!((m.expected.as_str(), m.found.as_str()), ("int", "number 1099511627776"));
    assert_eq!(mismatch(r#""int""#, json!(3.5)).found, "number 3.5");
    assert_eq!(mismatch(r#""long""#, json!("1")).found, r#"string "1""#);
    assert_eq!(mismatch(r#""long""#, json!(u64::MAX)).expected, "long");
    assert_eq!(mismatch(r#""float""#, json!(1e300)).expected, "float");
    assert_eq!(mismatch(r#""boolean""#, json!(null)).found, "null");
    assert_eq!(mismatch(r#""string""#, json!(["a"])).found, "array of 1 items");
    assert_eq!(mismatch(r#""null""#, json!({})).found, "object with 0 keys");
    assert_eq!(mismatch(r#""bytes""#, json!(1)).expected, "bytes");
    let m = mismatch(r#"{"type":"fixed","name":"F","size":3}"#, json!("abcd"));
    assert_eq!(m.to_string(), r#"at $: expected fixed F (3 bytes), found string "abcd""#);
    let long = "x".repeat(100);
    assert_eq!(mismatch(r#""int""#, json!(long)).found, format!("string {:?}...", "x".repeat(40)));
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
        ("note".into(), AvroValue::Union(0, Box::new(AvroValue::Null))),
        ("count".into(), AvroValue::Int(1)),
        ("status".into(), AvroValue::Enum(1, "paid".into())),
        (
            "items".into(),
            AvroValue::Array(vec![AvroValue::Record(vec![
                ("sku".into(), AvroValue::String("s1".into())),
                ("price".into(), decimal_value(1234)),
            ])]),
        ),
        ("tags".into(), AvroValue::Map(HashMap::from([("a".to_owned(), AvroValue::Long(1))]))),
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
    assert_eq!(m.to_string(), r#"at $.items[2].price: expected decimal(10,2), found string "abc""#);

    let m = mismatch(ORDER, json!({"status": "paid", "items": []}));
    assert_eq!((m.path.as_str(), m.expected.as_str(), m.found.as_str()), ("$.id", "string", "missing"));

    let m = mismatch(ORDER, json!({"id": "o1", "status": "paid", "items": [], "cuont": 2}));
    assert_eq!(m.path, "$.cuont");
    assert_eq!(m.expected, "a field of record Order (id, note, count, status, items, tags)");
    assert_eq!(m.found, "unknown key with number 2");

    let m = mismatch(ORDER, json!({"id": "o1", "status": "shipped", "items": []}));
    assert_eq!(m.to_string(), r#"at $.status: expected one of [placed, paid], found string "shipped""#);

    let m = mismatch(ORDER, json!({"id": "o1", "status": "paid", "items": {}}));
    assert_eq!((m.path.as_str(), m.expected.as_str()), ("$.items", "array of record Item"));

    let m = mismatch(ORDER, json!({"id": "o1", "status": "paid", "items": [], "tags": {"a b": "x"}}));
    assert_eq!((m.path.as_str(), m.expected.as_str()), (r#"$.tags["a b"]"#, "long"));

    let m = mismatch(ORDER, json!([1]));
    assert_eq!((m.path.as_str(), m.expected.as_str(), m.found.as_str()), ("$", "record Order", "array of 1 items"));

    let m = mismatch(ORDER, json!({"id": "o1", "status": "paid", "items": [], "note": 5}));
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
    assert_eq!(m.found, "missing, and the schema default string \"\u{100}\" does not fit");
    let value = convert_str(schema, json!({"bad": "z"})).expect("defaults fit");
    assert_eq!(
        value,
        AvroValue::Record(vec![
            ("b".into(), AvroValue::Bytes(vec![0xff, 0x01])),
            ("u".into(), AvroValue::Union(0, Box::new(AvroValue::String("x".into())))),
            ("r".into(), AvroValue::Record(vec![("n".into(), AvroValue::Int(5))])),
            ("bad".into(), AvroValue::Bytes(b"z".to_vec())),
        ])
    );
}

#[test]
fn unions() {
    let nullable = r#"["null", "long"]"#;
    assert_eq!(convert_str(nullable, json!(null)), Ok(AvroValue::Union(0, Box::new(AvroValue::Null))));
    assert_eq!(convert_str(nullable, json!(4)), Ok(AvroValue::Union(1, Box::new(AvroValue::Long(4)))));
    // The single non-null branch reports its own expectation.
    assert_eq!(mismatch(nullable, json!("4")).expected, "long");

    let general = r#"["null", "int", "string", {"type": "enum", "name": "E", "symbols": ["A"]}]"#;
    assert_eq!(convert_str(general, json!(4)), Ok(AvroValue::Union(1, Box::new(AvroValue::Int(4)))));
    assert_eq!(convert_str(general, json!("A")), Ok(AvroValue::Union(2, Box::new(AvroValue::String("A".into())))));
    let m = mismatch(general, json!(true));
    assert_eq!(m.to_string(), "at $: expected one of [null, int, string, enum E], found boolean true");

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
    assert_eq!(convert_str(millis, json!(t)), Ok(AvroValue::TimestampMillis(secs * 1_000 + 123)));
    assert_eq!(convert_str(micros, json!(t)), Ok(AvroValue::TimestampMicros(secs * 1_000_000 + 123_456)));
    assert_eq!(convert_str(nanos, json!(t)), Ok(AvroValue::TimestampNanos(secs * 1_000_000_000 + 123_456_000)));
    // Offsets are honoured.
    assert_eq!(
        convert_str(millis, json!("2026-11-23T17:40:00.123+01:00")),
        Ok(AvroValue::TimestampMillis(secs * 1_000 + 123))
    );
    assert_eq!(convert_str(millis, json!(42)), Ok(AvroValue::TimestampMillis(42)));
    assert_eq!(convert_str(micros, json!(-42)), Ok(AvroValue::TimestampMicros(-42)));
    let m = mismatch(micros, json!("2026-11-23 16:40"));
    assert_eq!(m.to_string(), r#"at $: expected timestamp-micros, found string "2026-11-23 16:40""#);
    assert_eq!(mismatch(millis, json!(1.5)).found, "number 1.5");
    // Too far out for nanoseconds in an i64.
    assert_eq!(mismatch(nanos, json!("2999-01-01T00:00:00Z")).expected, "timestamp-nanos");

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
    assert_eq!(convert_str(local_micros, json!(5)), Ok(AvroValue::LocalTimestampMicros(5)));
    // A zone makes it not a local timestamp.
    assert_eq!(mismatch(local_millis, json!(t)).expected, "local-timestamp-millis");
    round_trip(&parse(micros), json!(t));
}

#[test]
fn dates_and_times() {
    let date = r#"{"type": "int", "logicalType": "date"}"#;
    assert_eq!(convert_str(date, json!("1970-01-02")), Ok(AvroValue::Date(1)));
    assert_eq!(convert_str(date, json!("1969-12-31")), Ok(AvroValue::Date(-1)));
    assert_eq!(convert_str(date, json!(20_000)), Ok(AvroValue::Date(20_000)));
    assert_eq!(mismatch(date, json!("2026-02-30")).to_string(), r#"at $: expected date, found string "2026-02-30""#);
    assert_eq!(mismatch(date, json!(1_i64 << 40)).expected, "date");

    let millis = r#"{"type": "int", "logicalType": "time-millis"}"#;
    let micros = r#"{"type": "long", "logicalType": "time-micros"}"#;
    assert_eq!(convert_str(millis, json!("01:02:03.456")), Ok(AvroValue::TimeMillis(3_723_456)));
    assert_eq!(convert_str(millis, json!("01:02:03")), Ok(AvroValue::TimeMillis(3_723_000)));
    assert_eq!(convert_str(micros, json!("01:02:03.456789")), Ok(AvroValue::TimeMicros(3_723_456_789)));
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
    assert_eq!(mismatch(string, json!("not-a-uuid")).to_string(), r#"at $: expected uuid, found string "not-a-uuid""#);
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
        assert_eq!(convert_str(bytes, input.clone()), Ok(decimal_value(unscaled)), "{input}");
        assert_eq!(convert_str(fixed, input.clone()), Ok(decimal_value(unscaled)), "{input}");
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
    assert_eq!(twos_complement(&digits("65536"), false), vec![0x01, 0x00, 0x00]);
    // More digits than an i128 holds.
    let wide = twos_complement(&digits(&"9".repeat(50)), false);
    assert_eq!(wide.len(), 21);
}

#[test]
fn durations() {
    let schema = r#"{"type": "fixed", "name": "Dur", "size": 12, "logicalType": "duration"}"#;
    assert_eq!(
        convert_str(schema, json!({"months": 1, "days": 2, "millis": 3})),
        Ok(AvroValue::Duration(Duration::new(Months::new(1), Days::new(2), Millis::new(3))))
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
    let resolved = ResolvedSchema::new_with_schemata(schemata.iter().collect()).expect("resolve");
    let order = &schemata[2];
    let value =
        json_to_avro(&json!({"total": {"amount": 5, "currency": "USD"}}), order, resolved.get_names()).expect("fits");
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
            ("refund".into(), AvroValue::Union(0, Box::new(AvroValue::Null))),
        ])
    );
    let m = json_to_avro(&json!({"total": {"amount": 5, "currency": "JPY"}}), order, resolved.get_names())
        .expect_err("JPY is not listed");
    assert_eq!(m.to_string(), r#"at $.total.currency: expected one of [EUR, USD], found string "JPY""#);
    let m = json_to_avro(&json!({"total": 1}), order, resolved.get_names()).expect_err("not a record");
    assert_eq!(m.expected, "record Money");

    // Without the names the reference cannot be followed: a mismatch, not a panic.
    let empty: HashMap<Name, Schema> = HashMap::new();
    let m = json_to_avro(&json!({"amount": 1}), &schemata[1], &empty).expect_err("unresolved");
    assert_eq!(m.path, "$.currency");
    assert_eq!(m.expected, "x.Currency (unresolved schema reference)");

    let bytes = encode_payload(&json!({"total": {"amount": 5, "currency": "EUR"}}), &envelope(), order, &resolved)
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
    let decoded =
        GenericDatumReader::builder(schema).build().expect("reader").read_value(&mut &bytes[..]).expect("decodes");
    match decoded {
        AvroValue::Record(fields) => fields,
        other => panic!("expected a record, got {other:?}"),
    }
}

fn field<'a>(fields: &'a [(String, AvroValue)], name: &str) -> &'a AvroValue {
    &fields.iter().find(|(n, _)| n == name).expect("field present").1
}

const ORDER_PLACED: &str = include_str!("../../schemas/order/OrderPlaced.avsc");
const ORDER_PAID: &str = include_str!("../../schemas/order/OrderPaid.avsc");
const ORDER_SHIPPED: &str = include_str!("../../schemas/order/OrderShipped.avsc");
const ORDER_DELIVERED: &str = include_str!("../../schemas/order/OrderDelivered.avsc");
const ORDER_STATE: &str = include_str!("../../schemas/order/OrderState.avsc");
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
    assert_eq!(field(&fields, "event_id"), &AvroValue::Uuid(uuid::Uuid::parse_str(env.event_id).expect("uuid")));
    assert_eq!(field(&fields, "event_type"), &AvroValue::String("OrderPlaced".into()));
    assert_eq!(field(&fields, "aggregate_type"), &AvroValue::String("order".into()));
    assert_eq!(field(&fields, "aggregate_id"), &AvroValue::String("ord-1001".into()));
    assert_eq!(field(&fields, "entity_version"), &AvroValue::Union(1, Box::new(AvroValue::Long(3))));
    assert_eq!(field(&fields, "occurred_at"), &AvroValue::TimestampMicros(env.occurred_at.timestamp_micros()));

    // Values in the payload win; no version gives null.
    let mut payload = payload;
    payload["event_type"] = json!("Custom");
    let env = Envelope { entity_version: None, ..envelope() };
    let bytes = encode_payload(&payload, &env, &schema, &resolved).expect("encodes");
    let fields = decode(&schema, &bytes);
    assert_eq!(field(&fields, "event_type"), &AvroValue::String("Custom".into()));
    assert_eq!(field(&fields, "entity_version"), &AvroValue::Union(0, Box::new(AvroValue::Null)));
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
    assert_eq!(field(&fields, "event_id"), &AvroValue::String(env.event_id.into()));
    assert_eq!(field(&fields, "entity_version"), &AvroValue::String("3".into()));
    assert_eq!(field(&fields, "occurred_at"), &AvroValue::TimestampMillis(env.occurred_at.timestamp_millis()));
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
    assert_eq!(field(&fields, "occurred_at"), &AvroValue::String("2026-11-23T16:40:00.123456Z".into()));

    let plain_long = parse(r#"{"type": "record", "name": "L", "fields": [{"name": "occurred_at", "type": "long"}]}"#);
    let resolved = ResolvedSchema::new(&plain_long).expect("resolve");
    let bytes = encode_payload(&json!({}), &env, &plain_long, &resolved).expect("encodes");
    assert_eq!(
        field(&decode(&plain_long, &bytes), "occurred_at"),
        &AvroValue::Long(env.occurred_at.timestamp_micros())
    );

    // No fitting form and no default: the error shows what the row had.
    let strict = parse(r#"{"type": "record", "name": "S", "fields": [{"name": "entity_version", "type": "long"}]}"#);
    let resolved = ResolvedSchema::new(&strict).expect("resolve");
    let env = Envelope { entity_version: None, ..envelope() };
    let err = encode_payload(&json!({}), &env, &strict, &resolved).expect_err("no version");
    assert_eq!(err.to_string(), "at $.entity_version: expected long, found null");
}

#[test]
fn non_record_schemas_and_payloads_are_left_alone() {
    let schema = parse(r#""string""#);
    let resolved = ResolvedSchema::new(&schema).expect("resolve");
    let bytes = encode_payload(&json!("hi"), &envelope(), &schema, &resolved).expect("encodes");
    assert_eq!(bytes, vec![4, b'h', b'i']);

    let record = parse(ORDER_PAID);
    let resolved = ResolvedSchema::new(&record).expect("resolve");
    let err = encode_payload(&json!([]), &envelope(), &record, &resolved).expect_err("not an object");
    assert!(matches!(err, AvroError::Mismatch(ref m) if m.path == "$"), "{err}");
}

#[test]
fn confluent_framing() {
    assert_eq!(confluent_frame(0x0102_0304, &[9, 8]), vec![0, 1, 2, 3, 4, 9, 8]);
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
        ("order/OrderDelivered.avsc", ORDER_DELIVERED),
        ("order/OrderState.avsc", ORDER_STATE),
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
            .filter_map(|(file, text)| before.rfind(&format!("`{file}`")).map(|at| (at, file, text)))
            .max_by_key(|(at, _, _)| *at)
            .map(|(_, file, text)| (*file, *text))
            .expect("example names its schema");
        let schema = parse(text);
        assert_eq!(schema.namespace(), Some("dev.outboxrelay.example"), "{file}");
        let resolved = ResolvedSchema::new(&schema).expect("resolve");
        let payload: JsonValue = serde_json::from_str(&body[..end]).expect("example is JSON");
        let bytes = encode_payload(&payload, &envelope(), &schema, &resolved).unwrap_or_else(|e| panic!("{file}: {e}"));
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
    let err = encode_payload(&payload, &envelope(), &schema, &resolved).expect_err("3 decimals");
    assert_eq!(err.to_string(), r#"at $.data.items[0].unit_price: expected decimal(12,2), found string "0.999""#);
    let env = Envelope { event_id: "nope", ..envelope() };
    let mut ok = payload;
    ok["data"]["items"] = json!([]);
    let err = encode_payload(&ok, &env, &schema, &resolved).expect_err("bad uuid");
    assert_eq!(err.to_string(), r#"at $.event_id: expected uuid, found string "nope""#);
}

fn arbitrary_json() -> impl Strategy<Value = JsonValue> {
    let leaf = prop_oneof![
        Just(JsonValue::Null),
        any::<bool>().prop_map(JsonValue::from),
        any::<i64>().prop_map(JsonValue::from),
        any::<u64>().prop_map(JsonValue::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(JsonValue::from),
        "[-+0-9.eE]{0,12}".prop_map(JsonValue::from),
        "[0-9]{4}-[0-9]{2}-[0-9]{2}(T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,9})?Z?)?".prop_map(JsonValue::from),
        prop_oneof![Just("EUR"), Just("GOLD"), Just("0b9f6c1e-3c3a-4f55-9d1e-2f9f0c6b7a10")].prop_map(JsonValue::from),
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
