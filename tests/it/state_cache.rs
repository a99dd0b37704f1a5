//! The `state_cache` example against the real stack: state messages
//! produced straight to a compacted topic (stale versions, equal versions,
//! tombstones, a stale state after a tombstone) leave exactly the latest
//! state per key, from JSON or Confluent-framed Avro values; in follow mode
//! the HTTP endpoint serves changes as they arrive; and end to end, the cache
//! rebuilt from the example order service's compacted state topic (Avro,
//! through the relay) equals its `orders` table, deleted orders included.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::{json, Value};

use crate::common::*;

/// Builds the examples once (cargo does not build examples for
/// `cargo test --test state_cache`) and returns the executable of `name`.
fn example_binary(name: &str) -> &'static Path {
    static BINARIES: OnceLock<Vec<(String, PathBuf)>> = OnceLock::new();
    let binaries = BINARIES.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let output = Command::new(cargo)
            .args(["build", "--example", "state_cache", "--example", "order_service", "--message-format=json"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("run cargo build --example state_cache --example order_service");
        assert!(output.status.success(), "building the examples failed: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["kind"][0] == "example")
            .filter_map(|m| Some((m["target"]["name"].as_str()?.to_string(), PathBuf::from(m["executable"].as_str()?))))
            .collect()
    });
    binaries
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, path)| path.as_path())
        .expect("cargo names the example's executable")
}

/// The example with no inherited `RELAY__*` overrides (a `--config` would
/// otherwise take the stack's shared settings from the environment).
fn state_cache() -> Command {
    let mut command = Command::new(example_binary("state_cache"));
    for (key, _) in std::env::vars() {
        if key.starts_with("RELAY__") || key == "RELAY_CONFIG" {
            command.env_remove(key);
        }
    }
    command
}

/// Runs `state_cache ARGS --until-caught-up`; its stdout lines.
fn caught_up(args: &[&str]) -> Vec<String> {
    let output = state_cache().args(args).arg("--until-caught-up").output().expect("run state_cache");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "state_cache {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout.lines().map(str::to_string).collect()
}

async fn create_compacted_topic(stack: &Stack, topic: &str) {
    create_topic(&stack.bootstrap, topic, 3, &[("cleanup.policy", "compact")]).await;
}

fn producer(stack: &Stack) -> FutureProducer {
    ClientConfig::new().set("bootstrap.servers", &stack.bootstrap).create().expect("producer")
}

/// Sends one state message and waits for its acknowledgement: `version`
/// as the `entity_version` header (none when `None`), `value` `None` a
/// tombstone. Keys land on one partition each (librdkafka hashes the key),
/// so each key's messages keep this order.
async fn send(producer: &FutureProducer, topic: &str, key: &str, version: Option<i64>, value: Option<&[u8]>) {
    let text = version.map(|v| v.to_string());
    let mut headers = OwnedHeaders::new();
    if let Some(text) = &text {
        headers = headers.insert(Header { key: "entity_version", value: Some(text.as_bytes()) });
    }
    let mut record: FutureRecord<'_, str, [u8]> = FutureRecord::to(topic).key(key).headers(headers);
    if let Some(value) = value {
        record = record.payload(value);
    }
    producer.send(record, Duration::from_secs(30)).await.map_err(|(e, _)| e).expect("message acknowledged");
}

/// A state message to send: key, `entity_version` header, value (`None`
/// for a tombstone).
type StateMessage = (&'static str, Option<i64>, Option<Value>);

/// The messages of the JSON test, in send order, and the cache they leave.
fn json_messages() -> (Vec<StateMessage>, Vec<&'static str>) {
    let messages = vec![
        ("a", Some(1), Some(json!({"n": 1}))),
        ("a", Some(2), Some(json!({"n": 2}))),
        ("a", Some(1), Some(json!({"n": "stale"}))),
        ("b", Some(1), Some(json!({"n": 1}))),
        ("b", Some(2), None),
        ("b", Some(1), Some(json!({"n": "stale after the tombstone"}))),
        ("c", Some(3), Some(json!({"n": 3}))),
        ("c", Some(2), Some(json!({"n": "older"}))),
        ("d", Some(1), Some(json!({"n": "first"}))),
        ("d", Some(1), Some(json!({"n": "same version"}))),
        ("e", Some(5), Some(json!({"nested": {"list": [1, 2.5, null]}, "text": "ünïcode"}))),
        ("f", Some(1), None),
        ("g", None, Some(json!({"n": "no version"}))),
        ("h", Some(1), Some(json!({"n": 1}))),
        ("h", Some(2), None),
        ("h", Some(3), Some(json!({"n": "recreated"}))),
    ];
    let expected = vec![
        r#"{"key":"a","entity_version":2,"value":{"n":2}}"#,
        r#"{"key":"c","entity_version":3,"value":{"n":3}}"#,
        r#"{"key":"d","entity_version":1,"value":{"n":"first"}}"#,
        r#"{"key":"e","entity_version":5,"value":{"nested":{"list":[1,2.5,null]},"text":"ünïcode"}}"#,
        r#"{"key":"g","entity_version":null,"value":{"n":"no version"}}"#,
        r#"{"key":"h","entity_version":3,"value":{"n":"recreated"}}"#,
    ];
    (messages, expected)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn until_caught_up_prints_exactly_the_latest_state_per_key() {
    let stack = Stack::from_env();
    let topic = format!("sc{}.json.state", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    create_compacted_topic(&stack, &topic).await;
    let producer = producer(&stack);
    let (messages, expected) = json_messages();
    for (key, version, value) in &messages {
        let bytes = value.as_ref().map(|v| serde_json::to_vec(v).expect("JSON"));
        send(&producer, &topic, key, *version, bytes.as_deref()).await;
    }
    let lines = caught_up(&["--brokers", &stack.bootstrap, "--topic", &topic]);
    assert_eq!(lines, expected);
    // A restart reads the topic from the beginning again: the same cache.
    assert_eq!(caught_up(&["--brokers", &stack.bootstrap, "--topic", &topic]), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(deprecated)] // the one-call datum writer is the simplest producer here
async fn avro_values_decode_through_the_registry_named_by_the_relay_config() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let config = db.write_config("");
    let topic = db.state_topic("profile");
    create_compacted_topic(&stack, &topic).await;
    let text = std::fs::read_to_string(stack.repo.join("schemas/profile/CustomerProfile.avsc")).expect("schema");
    let schema = apache_avro::Schema::parse_str(&text).expect("schema parses");
    let registry = relay::codec::registry::Registry::new(&relay::config::RegistryConfig {
        url: stack.registry.clone(),
        ..Default::default()
    })
    .expect("registry client");
    let id = registry
        .register(&format!("{topic}-value"), &text, "dev.outboxrelay.example.CustomerProfile")
        .await
        .expect("schema registered");
    let profile = |id: &str, version: i64, name: &str| {
        json!({"customer_id": id, "version": version, "name": name, "email": format!("{id}@example.com"), "tier": "GOLD",
            "addresses": [{"line1": "12 St James's Square", "city": "London", "country": "GB", "postcode": null}],
            "preferences": {"newsletter": "weekly"}, "updated_at": "2026-11-23T16:40:00.123Z", "birthday": "1815-12-10"})
    };
    let encode = |payload: &Value| {
        let resolved = apache_avro::schema::ResolvedSchema::new(&schema).expect("resolved");
        let value = relay::codec::avro::json_to_avro(payload, &schema, resolved.get_names()).expect("fits the schema");
        relay::codec::avro::confluent_frame(id, &apache_avro::to_avro_datum(&schema, value).expect("datum"))
    };
    let producer = producer(&stack);
    let (v1, v2, v3) = (profile("cus-1", 1, "Ada"), profile("cus-1", 2, "Ada L."), profile("cus-2", 1, "Grace"));
    send(&producer, &topic, "cus-1", Some(1), Some(&encode(&v1))).await;
    send(&producer, &topic, "cus-2", Some(1), Some(&encode(&v3))).await;
    send(&producer, &topic, "cus-1", Some(2), Some(&encode(&v2))).await;
    send(&producer, &topic, "cus-1", Some(1), Some(&encode(&v1))).await;
    send(&producer, &topic, "cus-3", Some(1), Some(&encode(&profile("cus-3", 1, "Hedy")))).await;
    send(&producer, &topic, "cus-3", Some(2), None).await;

    let lines = caught_up(&["--config", &config.to_string_lossy(), "--topic", &topic]);
    let entries: Vec<Value> = lines.iter().map(|l| serde_json::from_str(l).expect("JSON line")).collect();
    assert_eq!(
        entries,
        vec![
            json!({"key": "cus-1", "entity_version": 2, "value": v2}),
            json!({"key": "cus-2", "entity_version": 1, "value": v3}),
        ]
    );
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_mode_serves_changes_as_they_arrive() {
    let stack = Stack::from_env();
    let topic = format!("sc{}.follow.state", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    create_compacted_topic(&stack, &topic).await;
    let producer = producer(&stack);
    send(&producer, &topic, "k-1", Some(1), Some(br#"{"n": 1}"#)).await;
    send(&producer, &topic, "k-2", Some(1), Some(br#"{"n": 1}"#)).await;

    let mut child = state_cache()
        .args(["--brokers", &stack.bootstrap, "--topic", &topic, "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start state_cache");
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    let stdout = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let mut seen: Vec<String> = Vec::new();
    let url = wait_for("the cache to catch up", Duration::from_secs(60), || {
        seen.extend(lines.try_iter());
        let url = seen.iter().find_map(|l| l.strip_prefix("listening on ")).map(str::to_string);
        let caught_up = seen.iter().any(|l| l == "caught up: 2 keys");
        async move { url.filter(|_| caught_up) }
    })
    .await;
    let cache = || async {
        let response = reqwest::get(&url).await.ok()?;
        response.json::<Value>().await.ok()
    };
    let initial = cache().await.expect("GET /cache");
    assert_eq!(
        initial,
        json!([{"key": "k-1", "entity_version": 1, "value": {"n": 1}}, {"key": "k-2", "entity_version": 1, "value": {"n": 1}}])
    );

    send(&producer, &topic, "k-1", Some(2), Some(br#"{"n": 2}"#)).await;
    send(&producer, &topic, "k-2", Some(2), None).await;
    let expected = json!([{"key": "k-1", "entity_version": 2, "value": {"n": 2}}]);
    let served = wait_for("the cache to apply the update and the tombstone", Duration::from_secs(30), || async {
        cache().await.filter(|c| *c == expected)
    })
    .await;
    assert_eq!(served, expected);
    let one = reqwest::get(format!("{url}/k-1")).await.expect("GET /cache/k-1");
    assert_eq!(one.json::<Value>().await.expect("JSON"), expected[0]);
    let gone = reqwest::get(format!("{url}/k-2")).await.expect("GET /cache/k-2");
    assert_eq!(gone.status().as_u16(), 404);
    seen.extend(lines.try_iter());
    wait_for("the change lines", Duration::from_secs(10), || {
        seen.extend(lines.try_iter());
        let done =
            seen.iter().any(|l| l == "put k-1 v2 (keys: 2)") && seen.iter().any(|l| l == "delete k-2 v2 (keys: 1)");
        async move { done.then_some(()) }
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
}

/// The demo's flow as a test: the order service changes orders (a delivered
/// order's next change deletes it and writes its tombstone), the relay
/// publishes events and state in Avro; every record decodes with Confluent's
/// Python `AvroDeserializer` (tombstones as `None`), and the cache rebuilt
/// from the beginning of the compacted state topic (twice: a restart reads
/// it again) equals the `orders` table exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_rebuilt_from_the_state_topic_equals_the_order_services_table() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let schemas = stack.repo.join("schemas");
    let config = db.write_config(&format!(
        "codec.format = \"avro\"\ncodec.auto_register = true\ncodec.schemas_dir = \"{}\"\n\
         codec.schemas.\"order/OrderPlaced\" = \"order/OrderPlaced.avsc\"\n\
         codec.schemas.\"order/OrderPaid\" = \"order/OrderPaid.avsc\"\n\
         codec.schemas.\"order/OrderShipped\" = \"order/OrderShipped.avsc\"\n\
         codec.schemas.\"order/OrderDelivered\" = \"order/OrderDelivered.avsc\"\n\
         codec.state_schemas.order = \"order/OrderState.avsc\"",
        schemas.display()
    ));
    db.migrate(&config);
    let client = db.client().await;
    let mut relay = RelayProcess::start(&config);
    let status = Command::new(example_binary("order_service"))
        .args(["--url", &db.url, "--rate", "300", "--seconds", "3", "--orders", "6"])
        .stdout(Stdio::null())
        .status()
        .expect("run the order service");
    assert!(status.success(), "order service failed");
    // One more deletion, so that the final state certainly lacks an order.
    let tx_client = db.client().await;
    let gone: String =
        tx_client.query_one("SELECT id FROM orders ORDER BY id LIMIT 1", &[]).await.expect("an order exists").get(0);
    tx_client
        .batch_execute(&format!(
            "BEGIN;
             INSERT INTO outbox (aggregate_type, aggregate_id, event_type, kind, entity_version, payload)
                 SELECT 'order', id, 'OrderDeleted', 'state', version + 1, NULL FROM orders WHERE id = '{gone}';
             DELETE FROM orders WHERE id = '{gone}';
             COMMIT;"
        ))
        .await
        .expect("delete an order with its tombstone");
    let total = wait_all_published(&client, Duration::from_secs(120)).await;
    let tombstones: i64 = client
        .query_one("SELECT count(*) FROM outbox WHERE kind = 'state' AND payload IS NULL", &[])
        .await
        .expect("count tombstones")
        .get(0);
    assert!(tombstones >= 2, "the service deleted delivered orders: {tombstones} tombstones");

    // Every record of both topics decodes with Confluent's deserializer.
    let records: Vec<Value> = python_consume_avro(
        &stack,
        &stack.registry,
        None,
        &[db.topic("order"), db.state_topic("order")],
        total as usize,
    );
    assert_eq!(records.len() as i64, total);
    let nulls = records.iter().filter(|r| r["value"].is_null()).count() as i64;
    assert_eq!(nulls, tombstones, "tombstones arrive as None");
    assert!(records.iter().filter(|r| !r["value"].is_null()).all(|r| r["magic"] == 0), "Confluent wire format");
    assert!(
        records
            .iter()
            .any(|r| r["headers"]["event_type"] == "OrderDelivered" && r["value"]["data"]["delivered_at"].is_string()),
        "OrderDelivered decodes"
    );

    let orders: Vec<Value> = client
        .query("SELECT id, upper(status), version FROM orders ORDER BY id", &[])
        .await
        .expect("orders")
        .iter()
        .map(|r| json!({"key": r.get::<_, String>(0), "status": r.get::<_, String>(1), "version": r.get::<_, i64>(2)}))
        .collect();
    assert!(!orders.iter().any(|o| o["key"] == gone.as_str()));
    let topic = db.state_topic("order");
    for run in ["first", "restarted"] {
        let lines = caught_up(&["--config", &config.to_string_lossy(), "--topic", &topic]);
        let cache: Vec<Value> = lines
            .iter()
            .map(|l| serde_json::from_str::<Value>(l).expect("JSON line"))
            .map(|e| json!({"key": e["key"], "status": e["value"]["status"], "version": e["value"]["version"]}))
            .collect();
        assert_eq!(cache, orders, "{run} cache against the orders table");
    }
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0), "{}", relay.log_text());
    db.cleanup().await;
}
