//! Paths that must behave the same whichever code reaches them: a row held
//! from its delivery report gets the same dead-letter copy as one held at
//! produce time; a record too large for its topic is held before later rows
//! of its entity can overtake it; and `relay replay` sends the same key
//! bytes (so the same partition) as the original publication, also with
//! Avro keys.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::ClientConfig;

use crate::common::*;

/// One raw record: key bytes as sent, partition, and the `event_id` and
/// `replayed` headers.
#[derive(Debug, Clone)]
struct RawRecord {
    key: Vec<u8>,
    partition: i32,
    event_id: String,
    replayed: bool,
}

/// Reads `topic` from the beginning until `count` records arrived (every
/// record, duplicates included); `deadline` passing fails the test.
fn read_raw(bootstrap: &str, topic: &str, count: usize, deadline: Duration) -> Vec<RawRecord> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("test-{}", uuid::Uuid::new_v4()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let started = Instant::now();
    let mut records = Vec::new();
    while records.len() < count {
        assert!(started.elapsed() < deadline, "{} of {count} records arrived from {topic}", records.len());
        if let Some(Ok(msg)) = consumer.poll(Duration::from_millis(200)) {
            let header = |name: &str| {
                msg.headers().and_then(|h| {
                    h.iter()
                        .find(|x| x.key == name)
                        .and_then(|x| x.value.map(|v| String::from_utf8_lossy(v).into_owned()))
                })
            };
            records.push(RawRecord {
                key: msg.key().map(<[u8]>::to_vec).unwrap_or_default(),
                partition: msg.partition(),
                event_id: header("event_id").unwrap_or_default(),
                replayed: header("replayed").as_deref() == Some("true"),
            });
        }
    }
    records
}

/// The held row's `last_error`, once it is held.
async fn held_reason(client: &tokio_postgres::Client, id: i64) -> String {
    wait_for("the row to be held", Duration::from_secs(60), || async {
        client
            .query_one("SELECT last_error FROM outbox WHERE id = $1 AND published_at IS NULL", &[&id])
            .await
            .ok()
            .and_then(|r| r.get::<_, Option<String>>(0))
    })
    .await
}

/// The row `id` waits behind, once it waits.
async fn waiting_for(client: &tokio_postgres::Client, id: i64) -> i64 {
    wait_for("the row to wait", Duration::from_secs(60), || async {
        client
            .query_one("SELECT waiting_for FROM outbox WHERE id = $1 AND published_at IS NULL", &[&id])
            .await
            .ok()
            .and_then(|r| r.get::<_, Option<i64>>(0))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_held_from_its_delivery_report_gets_a_dead_letter_copy() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    // The broker refuses every record on this topic whose timestamp is
    // before its own clock: a permanent error that only the delivery report
    // tells (the producer stamps records at produce time, linger later).
    create_topic(&stack.bootstrap, &db.topic("audit"), 3, &[("message.timestamp.before.max.ms", "0")]).await;
    let dead_letter = db.topic("dead-letter");
    let config = db.write_config(&format!("routing.dead_letter_topic = \"{dead_letter}\"\nkafka.linger_ms = 20"));
    db.migrate(&config);
    let client = db.client().await;
    let mut relay = RelayProcess::start(&config);

    let held = insert_row(&client, "audit", "aud-1", 1).await;
    insert_row(&client, "order", "ord-1", 1).await;
    let reason = held_reason(&client, held).await;
    assert!(reason.to_lowercase().contains("timestamp"), "{reason}");
    let records = consume(&stack.bootstrap, &[&db.topic("order")], 1, Duration::from_secs(60));
    assert_eq!(records[0].key, "ord-1", "other topics keep flowing");

    let copies = consume(&stack.bootstrap, &[&dead_letter], 1, Duration::from_secs(30));
    assert_eq!(copies.len(), 1, "one dead-letter copy: {copies:?}");
    let copy = copies[0].json();
    assert_eq!(copy["row_id"], serde_json::json!(held));
    assert_eq!(copy["payload"], serde_json::json!({ "entity": "aud-1", "seq": 1 }));
    assert!(copy["reason"].as_str().unwrap_or_default().to_lowercase().contains("timestamp"), "{copy}");
    assert_eq!(copies[0].key, "aud-1", "the copy carries the record's key");
    assert!(copies[0].headers.get("held_reason").is_some_and(|r| r.to_lowercase().contains("timestamp")));
    assert!(relay.log_text().contains("held_at=Delivery"), "held from the delivery report");
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0), "{}", relay.log_text());
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_over_the_topics_size_limit_is_held_before_later_rows_of_its_entity_overtake_it() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let topic = db.topic("order");
    // Broker-side limit 10 kB; the client's own limit is the default (1 MB).
    create_topic(&stack.bootstrap, &topic, 3, &[("max.message.bytes", "10000")]).await;
    let config = db.write_config("");
    db.migrate(&config);
    let client = db.client().await;
    let mut relay = RelayProcess::start(&config);

    // Random text: compression cannot bring it under the limit either.
    let blob: String = (0..700).map(|_| uuid::Uuid::new_v4().simple().to_string()).collect();
    let big = serde_json::json!({ "entity": "ord-1", "seq": 1, "blob": blob });
    let e1: i64 = client
        .query_one(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, kind, entity_version, payload) \
             VALUES ('order', 'ord-1', 'Changed', 'event', 1, $1) RETURNING id",
            &[&big],
        )
        .await
        .expect("insert E1")
        .get(0);
    let e2 = insert_row(&client, "order", "ord-1", 2).await;
    let e3 = insert_row(&client, "order", "ord-1", 3).await;
    let reason = held_reason(&client, e1).await;
    assert!(reason.contains("max.message.bytes"), "{reason}");
    assert_eq!(waiting_for(&client, e2).await, e1);
    assert_eq!(waiting_for(&client, e3).await, e1);

    // The operator raises the limit, then releases the held row.
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", &stack.bootstrap).create().expect("admin client");
    let alter = rdkafka::admin::AlterConfig::new(rdkafka::admin::ResourceSpecifier::Topic(&topic))
        .set("max.message.bytes", "1000000");
    for result in admin.alter_configs([&alter], &AdminOptions::new()).await.expect("alter topic") {
        result.expect("limit raised");
    }
    let output = relay_command(&config).args(["held", "retry", &e1.to_string()]).output().expect("held retry");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    wait_all_published(&client, Duration::from_secs(60)).await;
    let records = consume(&stack.bootstrap, &[&topic], 3, Duration::from_secs(60));
    let order = first_occurrence_order(&records).remove("ord-1").unwrap_or_default();
    assert_eq!(order, vec![1, 2, 3], "first occurrences in entity order");
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0), "{}", relay.log_text());
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_with_avro_keys_sends_the_original_key_bytes_to_the_original_partition() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let topic = db.topic("order");
    // JSON values, Avro keys: the key subject comes from the routed topic.
    let config = db.write_config(&format!("codec.key_format = \"avro\"\nrouting.topics.order = \"{topic}\""));
    db.migrate(&config);
    let registered = relay_command(&config).args(["schemas", "register"]).output().expect("schemas register");
    assert!(registered.status.success(), "{}", String::from_utf8_lossy(&registered.stderr));
    let client = db.client().await;
    let mut relay = RelayProcess::start(&config);
    const ROWS: usize = 30;
    for i in 0..ROWS {
        insert_row(&client, "order", &format!("ord-{}", i % 10), i as i64).await;
    }
    wait_all_published(&client, Duration::from_secs(60)).await;
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0), "{}", relay.log_text());

    let output = relay_command(&config).args(["replay", "--from-id", "1"]).output().expect("relay replay");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.trim_end().ends_with(", 0 failed"), "{stdout}");

    let records = read_raw(&stack.bootstrap, &topic, 2 * ROWS, Duration::from_secs(60));
    let mut originals: HashMap<String, &RawRecord> = HashMap::new();
    for record in records.iter().filter(|r| !r.replayed) {
        assert_eq!(record.key.first(), Some(&0), "Avro key in the Confluent wire format");
        originals.insert(record.event_id.clone(), record);
    }
    assert_eq!(originals.len(), ROWS);
    let replays: Vec<&RawRecord> = records.iter().filter(|r| r.replayed).collect();
    assert_eq!(replays.len(), ROWS);
    for replay in replays {
        let original = originals.get(&replay.event_id).expect("replay of a published row");
        assert_eq!(replay.key, original.key, "same key bytes");
        assert_eq!(replay.partition, original.partition, "same partition");
    }
    db.cleanup().await;
}
