//! Encoding cost per message: the row's JSON payload to an Avro datum in
//! the Confluent wire format, against a baseline measured in the same run
//! (parsing the same JSON, which any encoding has to do).
//! Run: `cargo bench --bench codec` (no services needed).

use std::time::Instant;

use apache_avro::schema::ResolvedSchema;
use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::Schema;
use relay::codec::avro::{confluent_frame, encode_payload, encode_payload_with, Envelope};

const ITERATIONS: usize = 100_000;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn time_per_op(mut f: impl FnMut()) -> f64 {
    let runs: Vec<f64> = (0..5)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..ITERATIONS {
                f();
            }
            start.elapsed().as_secs_f64() * 1e6 / ITERATIONS as f64
        })
        .collect();
    median(runs)
}

fn main() {
    let text = include_str!("schemas/EntityChanged.avsc");
    let schema = Schema::parse_str(text).expect("bench schema");
    let payload = serde_json::json!({ "entity": "entity-42", "seq": 1234, "pad": "x".repeat(200) });
    let bytes = serde_json::to_vec(&payload).expect("payload");
    let occurred_at = chrono::Utc::now();
    let envelope = Envelope {
        event_id: "6f1c1a52-36cb-4d6a-9a0b-2b8e1b9e4f11",
        event_type: "Changed",
        aggregate_type: "entity",
        aggregate_id: "entity-42",
        entity_version: Some(1234),
        occurred_at,
    };

    let parse = time_per_op(|| {
        let value: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
        std::hint::black_box(value);
    });
    // As the relay does it: schema resolved and writer built once.
    let resolved = ResolvedSchema::new(&schema).expect("resolved");
    let writer = GenericDatumWriter::builder(&schema).resolved_schemata(resolved.clone()).build().expect("writer");
    let avro = time_per_op(|| {
        let value: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
        let datum = encode_payload_with(&writer, &value, &envelope, &schema, &resolved).expect("encode");
        std::hint::black_box(confluent_frame(7, &datum));
    });
    let datum =
        encode_payload(&payload, &envelope, &schema, &ResolvedSchema::new(&schema).expect("resolved")).expect("encode");
    println!("| measure | per message |\n|---|---|");
    println!("| baseline: parse the {} B JSON payload | {parse:.2} µs |", bytes.len());
    println!("| JSON mode (payload passed through) | 0 µs (no work) |");
    println!(
        "| Avro mode: parse + convert + encode + frame ({} B out) | {avro:.2} µs ({:.1} x baseline) |",
        datum.len() + 5,
        avro / parse
    );
}
