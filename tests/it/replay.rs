//! `relay replay` against the real stack: already published rows are
//! published again with a `replayed: true` header, in id order per key,
//! filtered by id, time and aggregate type, without touching publish state;
//! failed deliveries make it exit non-zero.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::common::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// Every record of `topic` up to its current end (the high watermark of each
/// partition when called): no waiting for records that may never come.
fn consume_to_end(bootstrap: &str, topic: &str) -> Vec<Record> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("test-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).expect("metadata");
    let partitions: Vec<i32> = metadata.topics()[0].partitions().iter().map(|p| p.id()).collect();
    assert!(!partitions.is_empty(), "topic {topic} has partitions");
    let mut ends = HashMap::new();
    let mut assignment = TopicPartitionList::new();
    for &p in &partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10)).expect("watermarks");
        if high > low {
            ends.insert(p, high);
            assignment.add_partition_offset(topic, p, Offset::Beginning).expect("assign");
        }
    }
    if ends.is_empty() {
        return Vec::new();
    }
    consumer.assign(&assignment).expect("assign");
    let mut records = Vec::new();
    let start = Instant::now();
    while !ends.is_empty() {
        assert!(start.elapsed() < Duration::from_secs(60), "timed out reading {topic} to its end; missing {ends:?}");
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(msg)) => {
                let mut headers = HashMap::new();
                if let Some(h) = msg.headers() {
                    for header in h.iter() {
                        let value = header.value.map(|v| String::from_utf8_lossy(v).into_owned()).unwrap_or_default();
                        headers.insert(header.key.to_string(), value);
                    }
                }
                if ends.get(&msg.partition()).is_some_and(|end| msg.offset() + 1 >= *end) {
                    ends.remove(&msg.partition());
                }
                records.push(Record {
                    topic: msg.topic().to_string(),
                    key: msg.key().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default(),
                    partition: msg.partition(),
                    offset: msg.offset(),
                    payload: msg.payload().map(|p| p.to_vec()).unwrap_or_default(),
                    headers,
                });
            }
            Some(Err(err)) => panic!("consumer error: {err}"),
            None => {}
        }
    }
    records.sort_by_key(|r| (r.partition, r.offset));
    records
}

/// The publish state of every row, in id order.
async fn publish_state(client: &tokio_postgres::Client) -> Vec<(i64, String, String, i32, i64, i32, Option<String>)> {
    client
        .query(
            "SELECT id, published_at::text, kafka_topic, kafka_partition, kafka_offset, attempts, last_error FROM outbox ORDER BY id",
            &[],
        )
        .await
        .expect("publish state")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5), r.get(6)))
        .collect()
}

/// event_id -> (row id, aggregate type) of every row.
async fn rows_by_event_id(client: &tokio_postgres::Client) -> HashMap<String, (i64, String)> {
    client
        .query("SELECT event_id::text, id, aggregate_type FROM outbox", &[])
        .await
        .expect("event ids")
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect()
}

fn is_replayed(record: &Record) -> bool {
    record.headers.get("replayed").map(String::as_str) == Some("true")
}

/// Publishes rows with a running relay and stops it.
async fn publish_with_relay(db: &TestDb, config: &std::path::PathBuf, rows: &[(&str, &str, i64)]) {
    let client = db.client().await;
    let mut relay = RelayProcess::start(config);
    for (aggregate_type, aggregate_id, seq) in rows {
        insert_row(&client, aggregate_type, aggregate_id, *seq).await;
    }
    wait_all_published(&client, Duration::from_secs(60)).await;
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0), "{}", relay.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_published_rows_from_an_id_in_order_without_touching_publish_state() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let config = db.write_config("");
    db.migrate(&config);
    let mut rows = Vec::new();
    for seq in 1..=6 {
        for key in ["a", "b", "c", "d"] {
            rows.push(("order", key, seq));
        }
    }
    publish_with_relay(&db, &config, &rows).await;

    let client = db.client().await;
    let before = publish_state(&client).await;
    assert_eq!(before.len(), 24);
    let from_id = before[10].0;
    let to_id = before.last().expect("rows").0;
    let output =
        relay_command(&config).args(["replay", "--from-id", &from_id.to_string()]).output().expect("run relay replay");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "relay replay failed: {stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains(&format!("replayed 14 rows from id {from_id} to {to_id} in ")), "{stdout}");
    assert!(stdout.trim_end().ends_with(", 0 failed"), "{stdout}");

    let by_event = rows_by_event_id(&client).await;
    let records = consume_to_end(&stack.bootstrap, &db.topic("order"));
    let (replayed, original): (Vec<&Record>, Vec<&Record>) = records.iter().partition(|r| is_replayed(r));
    assert_eq!(original.len(), 24, "the original publication is still there, once");
    assert_eq!(replayed.len(), 14, "each row from --from-id on is replayed exactly once");
    let originals: HashMap<&str, &Record> = original.iter().map(|r| (r.headers["event_id"].as_str(), *r)).collect();

    let mut replayed_ids = HashSet::new();
    let mut replayed_at = HashSet::new();
    for record in &replayed {
        let event_id = record.headers["event_id"].as_str();
        let (id, _) = by_event[event_id];
        assert!(id >= from_id, "row {id} is before --from-id {from_id} and must not be replayed");
        assert!(replayed_ids.insert(id), "row {id} replayed twice");
        let first = originals[event_id];
        assert_eq!(record.key, first.key, "same key");
        assert_eq!(record.partition, first.partition, "same partition (same key, same partitioner)");
        assert_eq!(record.payload, first.payload, "same payload bytes");
        for (key, value) in &first.headers {
            assert_eq!(record.headers.get(key), Some(value), "header {key} as originally published");
        }
        let at = &record.headers["replayed_at"];
        chrono::DateTime::parse_from_rfc3339(at).unwrap_or_else(|e| panic!("replayed_at {at} is RFC 3339: {e}"));
        replayed_at.insert(at.clone());
        assert!(record.offset > first.offset);
    }
    let expected: HashSet<i64> = before.iter().map(|r| r.0).filter(|id| *id >= from_id).collect();
    assert_eq!(replayed_ids, expected);
    assert_eq!(replayed_at.len(), 1, "one replayed_at per run");

    // Per key, the replayed records come in id order (records are sorted by offset).
    let mut per_key: HashMap<&str, Vec<i64>> = HashMap::new();
    for record in &replayed {
        per_key.entry(record.key.as_str()).or_default().push(by_event[&record.headers["event_id"]].0);
    }
    for (key, ids) in per_key {
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted, "replayed records of key {key} in id order");
    }

    assert_eq!(publish_state(&client).await, before, "a replay is not a publication: publish state unchanged");
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_and_aggregate_type_select_what_is_replayed() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let config = db.write_config("");
    db.migrate(&config);
    publish_with_relay(&db, &config, &[("order", "o1", 1), ("customer", "c1", 1), ("customer", "c2", 1)]).await;
    let client = db.client().await;
    // occurred_at defaults to the inserting transaction's start, so rows
    // inserted after this point have occurred_at >= since.
    let since: String = client
        .query_one("SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')", &[])
        .await
        .expect("now")
        .get(0);
    publish_with_relay(&db, &config, &[("order", "o1", 2), ("customer", "c1", 2), ("customer", "c3", 1)]).await;
    let before = publish_state(&client).await;

    let output = relay_command(&config)
        .args(["replay", "--since", &since, "--aggregate-type", "customer"])
        .output()
        .expect("run relay replay");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "relay replay failed: {stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("replayed 2 rows from id "), "{stdout}");

    let by_event = rows_by_event_id(&client).await;
    let customers = consume_to_end(&stack.bootstrap, &db.topic("customer"));
    let replayed: Vec<(String, i64)> = customers
        .iter()
        .filter(|r| is_replayed(r))
        .map(|r| (r.key.clone(), r.json()["seq"].as_i64().expect("seq")))
        .collect();
    let mut replayed_sorted = replayed.clone();
    replayed_sorted.sort();
    assert_eq!(replayed_sorted, vec![("c1".to_string(), 2), ("c3".to_string(), 1)], "only customer rows since --since");
    assert_eq!(customers.len(), 4 + 2);
    for record in customers.iter().filter(|r| is_replayed(r)) {
        assert_eq!(by_event[&record.headers["event_id"]].1, "customer");
    }
    let orders = consume_to_end(&stack.bootstrap, &db.topic("order"));
    assert_eq!(orders.len(), 2, "no order row is replayed");
    assert!(!orders.iter().any(is_replayed));

    // A range with nothing in it replays nothing and succeeds.
    let max_id = before.last().expect("rows").0;
    let output = relay_command(&config)
        .args(["replay", "--from-id", &(max_id + 1).to_string()])
        .output()
        .expect("run relay replay");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains("replayed 0 rows"));

    // Neither --since nor --from-id: refused by the argument parser.
    let output =
        relay_command(&config).args(["replay", "--aggregate-type", "customer"]).output().expect("run relay replay");
    assert!(!output.status.success());
    assert_eq!(publish_state(&client).await, before, "publish state unchanged");
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_deliveries_are_counted_and_exit_non_zero() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let config = db.write_config("");
    db.migrate(&config);
    publish_with_relay(&db, &config, &[("order", "o1", 1), ("order", "o2", 1)]).await;
    let client = db.client().await;
    let before = publish_state(&client).await;

    // The same rows routed to a topic that does not exist: every delivery fails.
    let missing = format!("{}.missing", db.topic_prefix);
    let broken = db.write_config(&format!(
        "routing.topics.order = \"{missing}\"\nkafka.message_timeout_ms = 5000\nkafka.librdkafka.\"topic.metadata.propagation.max.ms\" = \"1000\""
    ));
    let output = relay_command(&broken).args(["replay", "--from-id", "1"]).output().expect("run relay replay");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("replayed 2 rows from id ") && stdout.trim_end().ends_with(", 2 failed"), "{stdout}");
    assert_eq!(publish_state(&client).await, before, "publish state unchanged");
    db.cleanup().await;
}
