//! Paths that must behave the same whichever code reaches them: a row held
//! from its delivery report gets the same dead-letter copy as one held at
//! produce time, and `relay replay` sends the same key bytes (so the same
//! partition) as the original publication, also with Avro keys.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::ClientConfig;

use common::*;

/// Creates `topic` with broker-side `configs` before the relay sees it.
async fn create_topic(bootstrap: &str, topic: &str, configs: &[(&str, &str)]) {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", bootstrap).create().expect("admin client");
    let mut new_topic = NewTopic::new(topic, 3, TopicReplication::Fixed(1));
    for (key, value) in configs {
        new_topic = new_topic.set(key, value);
    }
    let results = admin.create_topics([&new_topic], &AdminOptions::new()).await.expect("create topic");
    for result in results {
        result.expect("topic created");
    }
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_held_from_its_delivery_report_gets_a_dead_letter_copy() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    // The broker refuses records over 10 kB on this topic; the client's own
    // limit is the default (1 MB), so the error comes only in the delivery report.
    create_topic(&stack.bootstrap, &db.topic("order"), &[("max.message.bytes", "10000")]).await;
    let dead_letter = db.topic("dead-letter");
    let config = db.write_config(&format!("routing.dead_letter_topic = \"{dead_letter}\""));
    db.migrate(&config);
    let client = db.client().await;
    let mut relay = RelayProcess::start(&config);

    // Random text, so that compression cannot bring it under the limit.
    let blob: String = (0..1_500).map(|_| uuid::Uuid::new_v4().simple().to_string()).collect();
    let big = serde_json::json!({ "seq": 1, "blob": blob });
    let held: i64 = client
        .query_one(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, kind, payload) \
             VALUES ('order', 'ord-big', 'Huge', 'event', $1) RETURNING id",
            &[&big],
        )
        .await
        .expect("insert big row")
        .get(0);
    let behind = insert_row(&client, "order", "ord-big", 2).await;
    insert_row(&client, "order", "ord-small", 1).await;

    let reason = wait_for("the big row to be held", Duration::from_secs(60), || async {
        client
            .query_one("SELECT last_error FROM outbox WHERE id = $1 AND published_at IS NULL", &[&held])
            .await
            .ok()
            .and_then(|r| r.get::<_, Option<String>>(0))
    })
    .await;
    assert!(reason.to_lowercase().contains("too large"), "{reason}");
    let waiting_for = wait_for("the later row of the entity to wait", Duration::from_secs(30), || async {
        client
            .query_one("SELECT waiting_for FROM outbox WHERE id = $1 AND published_at IS NULL", &[&behind])
            .await
            .ok()
            .and_then(|r| r.get::<_, Option<i64>>(0))
    })
    .await;
    assert_eq!(waiting_for, held, "waiting is a typed fact naming the held row");

    let copies = consume(&stack.bootstrap, &[&dead_letter], 1, Duration::from_secs(30));
    assert_eq!(copies.len(), 1, "one dead-letter copy: {copies:?}");
    let copy = copies[0].json();
    assert_eq!(copy["row_id"], serde_json::json!(held));
    assert_eq!(copy["payload"], big);
    assert!(copy["reason"].as_str().unwrap_or_default().to_lowercase().contains("too large"), "{copy}");
    assert_eq!(copies[0].key, "ord-big", "the copy carries the record's key");
    assert!(copies[0].headers.get("held_reason").is_some_and(|r| r.to_lowercase().contains("too large")));
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
