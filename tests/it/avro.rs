//! Avro mode against the real registry, proven with a client nobody here
//! wrote: Python `confluent-kafka` and its schema-registry AvroDeserializer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::*;
use serde_json::{json, Value};

fn avro_config(db: &TestDb, schemas_dir: &Path) -> PathBuf {
    db.write_config(&format!(
        r#"codec.format = "avro"
codec.schemas_dir = "{}"
codec.schemas."order/OrderPlaced" = "order/OrderPlaced.avsc"
codec.schemas."order/OrderPaid" = "order/OrderPaid.avsc"
codec.schemas."order/OrderShipped" = "order/OrderShipped.avsc"
codec.state_schemas."profile" = "profile/CustomerProfile.avsc"
"#,
        schemas_dir.display()
    ))
}

fn relay_ok(config: &PathBuf, args: &[&str]) -> String {
    let output = relay_command(config).args(args).output().expect("run relay");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "relay {args:?} failed:\n{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    stdout
}

/// Decodes `count` records of `topics` with the Python client.
fn python_consume(stack: &Stack, topics: &[String], count: usize) -> Vec<Value> {
    python_consume_avro(stack, &stack.registry, None, topics, count)
}

async fn insert(
    client: &tokio_postgres::Client,
    aggregate_type: &str,
    id: &str,
    event_type: &str,
    kind: &str,
    version: i64,
    payload: &Value,
) -> i64 {
    client
        .query_one(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, kind, entity_version, payload)
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
            &[&aggregate_type, &id, &event_type, &kind, &version, payload],
        )
        .await
        .expect("insert")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_avro_deserializer_reads_back_every_example_schema() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let config = avro_config(&db, &stack.repo.join("schemas"));
    db.migrate(&config);
    let registered = relay_ok(&config, &["schemas", "register"]);
    assert_eq!(registered.lines().filter(|l| l.starts_with("ok")).count(), 4, "{registered}");
    let client = db.client().await;
    let mut relay = RelayProcess::start(&config);

    let placed = json!({"data": {"order_id": "ord-1", "customer_id": "cus-42", "total": "59.97", "currency": "EUR",
        "items": [{"sku": "MUG-01", "quantity": 2, "unit_price": "12.99"}, {"sku": "TEE-07", "quantity": 1, "unit_price": "33.99"}]}});
    let paid = json!({"data": {"amount": "59.97", "paid_at": "2026-11-23T16:41:02.517Z"}});
    let shipped = json!({"data": {"carrier": "DHL", "tracking": null, "shipped_on": "2026-11-24"}});
    let profile = json!({"customer_id": "cus-42", "version": 7, "name": "Ada Lovelace", "email": "ada@example.com", "tier": "GOLD",
        "addresses": [{"line1": "12 St James's Square", "city": "London", "country": "GB", "postcode": "SW1Y 4JH"}],
        "preferences": {"newsletter": "weekly"}, "updated_at": "2026-11-23T16:40:00.123Z", "birthday": "1815-12-10"});
    insert(&client, "order", "ord-1", "OrderPlaced", "event", 1, &placed).await;
    insert(&client, "order", "ord-1", "OrderPaid", "event", 2, &paid).await;
    insert(&client, "order", "ord-1", "OrderShipped", "event", 3, &shipped).await;
    insert(&client, "profile", "cus-42", "ProfileChanged", "state", 7, &profile).await;
    wait_all_published(&client, Duration::from_secs(60)).await;

    let records = python_consume(&stack, &[db.topic("order"), db.state_topic("profile")], 4);
    let by_type: HashMap<String, &Value> =
        records.iter().map(|r| (r["headers"]["event_type"].as_str().unwrap_or_default().to_string(), r)).collect();
    for record in &records {
        assert_eq!(record["magic"], json!(0), "Confluent wire format");
    }
    let placed_rec = by_type["OrderPlaced"];
    assert_eq!(placed_rec["key"], json!("ord-1"));
    assert_eq!(placed_rec["value"]["data"]["total"], json!("59.97"));
    assert_eq!(placed_rec["value"]["data"]["items"][1]["unit_price"], json!("33.99"));
    assert_eq!(placed_rec["value"]["data"]["currency"], json!("EUR"));
    // The envelope comes from the row's columns.
    assert_eq!(placed_rec["value"]["aggregate_id"], json!("ord-1"));
    assert_eq!(placed_rec["value"]["entity_version"], json!(1));
    assert_eq!(placed_rec["value"]["event_id"], placed_rec["headers"]["event_id"]);
    let paid_rec = by_type["OrderPaid"];
    assert_eq!(paid_rec["value"]["data"]["amount"], json!("59.97"));
    assert!(paid_rec["value"]["data"]["paid_at"].as_str().unwrap_or_default().starts_with("2026-11-23T16:41:02.517"));
    let shipped_rec = by_type["OrderShipped"];
    assert_eq!(shipped_rec["value"]["data"]["shipped_on"], json!("2026-11-24"));
    assert_eq!(shipped_rec["value"]["data"]["tracking"], Value::Null);
    let profile_rec = by_type["ProfileChanged"];
    assert_eq!(profile_rec["value"]["name"], json!("Ada Lovelace"));
    assert_eq!(profile_rec["value"]["tier"], json!("GOLD"));
    assert_eq!(profile_rec["value"]["birthday"], json!("1815-12-10"));
    assert_eq!(profile_rec["value"]["addresses"][0]["postcode"], json!("SW1Y 4JH"));
    // Distinct subjects (topic + record name) mean distinct ids.
    let ids: std::collections::HashSet<i64> = records.iter().filter_map(|r| r["schema_id"].as_i64()).collect();
    assert_eq!(ids.len(), 4);

    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0), "{}", relay.log_text());
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_not_matching_its_schema_is_held_with_the_field_path() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let config = avro_config(&db, &stack.repo.join("schemas"));
    let dead_letter = db.topic("dead-letter");
    let text =
        std::fs::read_to_string(&config).expect("config") + &format!("routing.dead_letter_topic = \"{dead_letter}\"\n");
    std::fs::write(&config, text).expect("config");
    db.migrate(&config);
    relay_ok(&config, &["schemas", "register"]);
    let client = db.client().await;
    let mut relay = RelayProcess::start(&config);

    let bad = json!({"data": {"amount": "12.345", "paid_at": "2026-11-23T16:41:02Z"}});
    let good = json!({"data": {"amount": "1.00", "paid_at": "2026-11-23T16:41:02Z"}});
    let held = insert(&client, "order", "ord-bad", "OrderPaid", "event", 1, &bad).await;
    let behind = insert(&client, "order", "ord-bad", "OrderPaid", "event", 2, &good).await;
    insert(&client, "order", "ord-good", "OrderPaid", "event", 1, &good).await;

    let records = python_consume(&stack, &[db.topic("order")], 1);
    assert_eq!(records[0]["key"], json!("ord-good"), "other entities keep flowing");
    let error = |id: i64| {
        let client = &client;
        async move {
            client
                .query_one("SELECT last_error FROM outbox WHERE id = $1 AND published_at IS NULL", &[&id])
                .await
                .ok()
                .and_then(|r| r.get::<_, Option<String>>(0))
        }
    };
    let reason = wait_for("the bad row to be held", Duration::from_secs(30), || error(held)).await;
    assert!(
        reason.contains("$.data.amount") && reason.contains("decimal(12,2)") && reason.contains("12.345"),
        "{reason}"
    );
    let waiting = wait_for("the later row to wait", Duration::from_secs(30), || error(behind)).await;
    assert!(waiting.contains(&format!("held row {held}")), "{waiting}");
    // A JSON copy with the reason went to the dead-letter topic.
    let copies = consume(&stack.bootstrap, &[&dead_letter], 1, Duration::from_secs(30));
    let copy = copies[0].json();
    assert_eq!(copy["row_id"], json!(held));
    assert_eq!(copy["payload"], bad);
    assert!(copy["reason"].as_str().unwrap_or_default().contains("$.data.amount"), "{copy}");
    assert_eq!(copies[0].key, "ord-bad");
    // The held rows do not pin the slot: once recorded, it moves past them.
    let after: String = client.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.expect("lsn").get(0);
    wait_slot_confirmed_past(&client, &db.slot, &after, "the slot to move past the held rows", Duration::from_secs(30))
        .await;
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0), "{}", relay.log_text());
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_evolution_compatible_passes_incompatible_is_refused() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let dir = db.dir.path().join("schemas");
    std::fs::create_dir_all(dir.join("order")).expect("dir");
    std::fs::create_dir_all(dir.join("profile")).expect("dir");
    for file in
        ["order/OrderPlaced.avsc", "order/OrderPaid.avsc", "order/OrderShipped.avsc", "profile/CustomerProfile.avsc"]
    {
        std::fs::copy(stack.repo.join("schemas").join(file), dir.join(file)).expect("copy schema");
    }
    let config = avro_config(&db, &dir);
    db.migrate(&config);
    relay_ok(&config, &["schemas", "register"]);
    let client = db.client().await;
    let mut relay = RelayProcess::start(&config);
    let old = json!({"data": {"amount": "5.00", "paid_at": "2026-11-23T16:41:02Z"}});
    insert(&client, "order", "ord-e", "OrderPaid", "event", 1, &old).await;
    wait_all_published(&client, Duration::from_secs(60)).await;
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0));

    // v2: an optional field with a default: compatible.
    let paid_path = dir.join("order/OrderPaid.avsc");
    let mut schema: Value = serde_json::from_str(&std::fs::read_to_string(&paid_path).expect("read")).expect("json");
    let fields = schema["fields"].as_array_mut().expect("fields");
    fields.push(json!({"name": "channel", "type": ["null", "string"], "default": null}));
    std::fs::write(&paid_path, schema.to_string()).expect("write v2");
    let checked = relay_ok(&config, &["schemas", "check"]);
    assert!(checked.contains("OrderPaid") && !checked.contains("FAIL"), "{checked}");
    relay_ok(&config, &["schemas", "register"]);
    let mut relay = RelayProcess::start(&config);
    insert(
        &client,
        "order",
        "ord-e",
        "OrderPaid",
        "event",
        2,
        &json!({"data": {"amount": "6.00", "paid_at": "2026-11-23T16:42:00Z"}, "channel": "web"}),
    )
    .await;
    insert(&client, "order", "ord-e", "OrderPaid", "event", 3, &old).await;
    wait_all_published(&client, Duration::from_secs(60)).await;
    let records = python_consume(&stack, &[db.topic("order")], 3);
    let versions: Vec<i64> = records.iter().filter_map(|r| r["value"]["entity_version"].as_i64()).collect();
    assert_eq!(versions, vec![1, 2, 3]);
    assert_eq!(records[1]["value"]["channel"], json!("web"));
    assert_eq!(records[2]["value"]["channel"], Value::Null);
    assert_ne!(records[0]["schema_id"], records[1]["schema_id"], "v2 has its own id");
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0));

    // v3: a new required field without a default: refused, naming the subject.
    let fields = schema["fields"].as_array_mut().expect("fields");
    fields.push(json!({"name": "approved_by", "type": "string"}));
    std::fs::write(&paid_path, schema.to_string()).expect("write v3");
    let output = relay_command(&config).args(["schemas", "check"]).output().expect("schemas check");
    assert!(!output.status.success(), "an incompatible change must fail the check");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().find(|l| l.starts_with("FAIL")).unwrap_or_else(|| panic!("no FAIL line: {stdout}"));
    assert!(line.contains(&format!("{}-dev.outboxrelay.example.OrderPaid", db.topic("order"))), "{line}");
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn avro_keys_decode_with_the_registry_and_keep_one_partition_per_entity() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let config = avro_config(&db, &stack.repo.join("schemas"));
    let text = std::fs::read_to_string(&config).expect("config") + "codec.key_format = \"avro\"\n";
    std::fs::write(&config, text).expect("config");
    db.migrate(&config);
    let registered = relay_ok(&config, &["schemas", "register"]);
    assert!(registered.contains(&format!("{}-key", db.topic("order"))), "{registered}");
    let client = db.client().await;
    let mut relay = RelayProcess::start(&config);
    for (i, order) in ["ord-a", "ord-b", "ord-a", "ord-c", "ord-a"].iter().enumerate() {
        let paid = json!({"data": {"amount": format!("{i}.00"), "paid_at": "2026-11-23T16:41:02Z"}});
        insert(&client, "order", order, "OrderPaid", "event", i as i64, &paid).await;
    }
    wait_all_published(&client, Duration::from_secs(60)).await;
    let records = python_consume(&stack, &[db.topic("order")], 5);
    let mut partitions: HashMap<String, std::collections::HashSet<i64>> = HashMap::new();
    for record in &records {
        assert_eq!(record["key_magic"], json!(0), "key in the Confluent wire format");
        let key = record["key"].as_str().expect("decoded key").to_string();
        assert_eq!(Some(key.as_str()), record["value"]["aggregate_id"].as_str());
        partitions.entry(key).or_default().insert(record["partition"].as_i64().expect("partition"));
    }
    assert_eq!(partitions.len(), 3);
    assert!(partitions.values().all(|p| p.len() == 1), "one partition per entity");
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0), "{}", relay.log_text());
    db.cleanup().await;
}
