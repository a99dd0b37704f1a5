//! End to end against the real stack: outbox rows in, Kafka records out,
//! publish state recorded.

use std::collections::HashMap;
use std::time::Duration;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_arrive_with_key_topic_headers_payload_and_publish_state() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let config = db.write_config("");
    db.migrate(&config);
    let client = db.client().await;

    let mut relay = RelayProcess::start(&config);
    // Several transactions, several entities, two aggregate types, one row
    // with extra headers.
    let mut expected = HashMap::new();
    for tx in 0..10i64 {
        for entity in 0..5i64 {
            let aggregate = if entity % 2 == 0 { "order" } else { "profile" };
            let id = insert_row(&client, aggregate, &format!("e-{entity}"), tx).await;
            expected.insert(id, (aggregate.to_string(), format!("e-{entity}"), tx));
        }
    }
    client
        .execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, kind, payload, headers)
             VALUES ('order', 'e-traced', 'Traced', 'command', '{\"seq\": 99}',
                     '{\"traceparent\": \"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\"}')",
            &[],
        )
        .await
        .expect("insert traced row");

    let total = wait_all_published(&client, Duration::from_secs(60)).await;
    assert_eq!(total, 51);
    let records = consume(&stack.bootstrap, &[&db.topic("order"), &db.topic("profile")], 51, Duration::from_secs(60));
    assert_eq!(records.len(), 51, "exactly once in a clean run");

    let rows = client
        .query(
            "SELECT id, event_id::text, aggregate_type, aggregate_id, kafka_topic, kafka_partition, kafka_offset, attempts, last_error
             FROM outbox ORDER BY id",
            &[],
        )
        .await
        .expect("read publish state");
    let by_event: HashMap<String, &Record> =
        records.iter().map(|r| (r.headers.get("event_id").cloned().unwrap_or_default(), r)).collect();
    for row in &rows {
        let event_id: String = row.get(1);
        let record = by_event.get(&event_id).unwrap_or_else(|| panic!("no record for event {event_id}"));
        let aggregate_type: String = row.get(2);
        let aggregate_id: String = row.get(3);
        assert_eq!(record.key, aggregate_id, "key is the entity id");
        assert_eq!(record.topic, db.topic(&aggregate_type));
        assert_eq!(row.get::<_, Option<String>>(4).as_deref(), Some(record.topic.as_str()));
        assert_eq!(row.get::<_, Option<i32>>(5), Some(record.partition), "recorded partition");
        assert_eq!(row.get::<_, Option<i64>>(6), Some(record.offset), "recorded offset");
        assert_eq!(row.get::<_, i32>(7), 1, "one attempt");
        assert_eq!(row.get::<_, Option<String>>(8), None);
        assert_eq!(record.headers.get("aggregate_type"), Some(&aggregate_type));
        assert!(record.headers.contains_key("occurred_at"));
        let id: i64 = row.get(0);
        if let Some((_, _, seq)) = expected.get(&id) {
            assert_eq!(record.json()["seq"], serde_json::json!(seq));
            assert_eq!(record.headers.get("entity_version"), Some(&seq.to_string()));
            assert_eq!(record.headers.get("kind").map(String::as_str), Some("event"));
            assert_eq!(record.headers.get("event_type").map(String::as_str), Some("Changed"));
        } else {
            assert_eq!(
                record.headers.get("traceparent").map(String::as_str),
                Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            );
            assert_eq!(record.headers.get("kind").map(String::as_str), Some("command"));
            assert!(!record.headers.contains_key("entity_version"));
        }
    }
    // Per key, one partition and the insert order.
    let order = first_occurrence_order(&records.iter().filter(|r| r.key != "e-traced").cloned().collect::<Vec<_>>());
    for (key, seqs) in order {
        assert_eq!(seqs, (0..10).collect::<Vec<i64>>(), "order of {key}");
    }

    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0), "graceful stop exits 0\n{}", relay.log_text());
    db.cleanup().await;
}

/// The publish latency's two outer parts are measured: commit -> read from
/// the slot once per transaction with outbox rows, producer -> Kafka's
/// acknowledgement once per record. Transactions without outbox rows do
/// not count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_parts_are_measured_per_transaction_and_per_record() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let config = db.write_config("");
    db.migrate(&config);
    let client = db.client().await;
    client.batch_execute("CREATE TABLE other (n int)").await.expect("create other table");

    let relay = RelayProcess::start(&config);
    for tx in 0..5 {
        let mut statements = String::from("BEGIN;");
        for entity in 0..4 {
            statements.push_str(&format!(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, kind, payload) \
                 VALUES ('order', 'e-{entity}', 'Changed', 'event', '{{\"seq\": {tx}}}');"
            ));
        }
        statements.push_str("COMMIT; INSERT INTO other VALUES (1);");
        client.batch_execute(&statements).await.expect("write a transaction of four rows");
    }
    assert_eq!(wait_all_published(&client, Duration::from_secs(60)).await, 20);

    let count = |name: &'static str| {
        let relay = &relay;
        async move { relay.metric(&format!("{name}_count")).await }
    };
    assert_eq!(count("outbox_relay_publish_latency_seconds").await, Some(20.0), "{}", relay.warnings());
    assert_eq!(count("outbox_relay_kafka_ack_seconds").await, Some(20.0), "one per record");
    assert_eq!(count("outbox_relay_source_delay_seconds").await, Some(5.0), "one per transaction with outbox rows");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_order_beats_id_order() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let config = db.write_config("");
    db.migrate(&config);
    let mut relay = RelayProcess::start(&config);

    // A takes the lower id but commits after B; both write one entity.
    let mut a = db.client().await;
    let b = db.client().await;
    let ta = a.transaction().await.expect("begin A");
    let id_a: i64 = ta
        .query_one(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, kind, payload) VALUES ('order', 'same', 'A', 'event', '{\"seq\": 1}') RETURNING id",
            &[],
        )
        .await
        .expect("insert A")
        .get(0);
    let id_b = insert_row(&b, "order", "same", 2).await;
    assert!(id_a < id_b);
    ta.commit().await.expect("commit A");

    let records = consume(&stack.bootstrap, &[&db.topic("order")], 2, Duration::from_secs(60));
    let seqs: Vec<i64> = records.iter().map(|r| r.json()["seq"].as_i64().expect("seq")).collect();
    assert_eq!(seqs, vec![2, 1], "B committed first, so B's message comes first");
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0));
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_keep_per_key_commit_order() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let config = db.write_config("");
    db.migrate(&config);
    let mut relay = RelayProcess::start(&config);
    let client = db.client().await;

    spawn_workload(&db.url, 2_000, 5, 8).await.expect("workload");
    let total = wait_all_published(&client, Duration::from_secs(120)).await;
    assert_eq!(total, 2_000);
    let records = consume(&stack.bootstrap, &[&db.topic("entity")], 2_000, Duration::from_secs(60));
    assert_all_present(&client, &records).await;
    assert_per_key_order(&records);
    let partitions_per_key = records.iter().fold(HashMap::<&str, std::collections::HashSet<i32>>::new(), |mut m, r| {
        m.entry(&r.key).or_default().insert(r.partition);
        m
    });
    assert!(partitions_per_key.values().all(|p| p.len() == 1), "each key in one partition");
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0));
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_match_the_java_client() {
    let stack = Stack::from_env();
    let libs = std::env::var("RELAY_KAFKA_LIBS").expect("RELAY_KAFKA_LIBS (from scripts/stack env)");
    let db = TestDb::new(&stack).await;
    let config = db.write_config("");
    db.migrate(&config);
    let mut relay = RelayProcess::start(&config);
    let client = db.client().await;

    // ASCII, UTF-8 and long keys.
    let mut keys: Vec<String> = (0..150).map(|i| format!("customer-{i}")).collect();
    keys.extend(["ü", "日本語-キー", "", " ", "a".repeat(300).as_str()].iter().map(|s| s.to_string()));
    for key in &keys {
        insert_row(&client, "partitioned", key, 1).await;
    }
    wait_all_published(&client, Duration::from_secs(60)).await;
    let rows = client.query("SELECT aggregate_id, kafka_partition FROM outbox", &[]).await.expect("publish state");
    let relay_partition: HashMap<String, i32> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();

    let mut java = std::process::Command::new("java")
        .arg("-cp")
        .arg(format!("{libs}/*"))
        .arg(stack.repo.join("tests/java/JavaPartitioner.java"))
        .arg("6")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run java");
    {
        use std::io::Write;
        let mut stdin = java.stdin.take().expect("stdin");
        for key in &keys {
            writeln!(stdin, "{key}").expect("write key");
        }
    }
    let output = java.wait_with_output().expect("java output");
    assert!(output.status.success(), "java partitioner failed");
    let text = String::from_utf8(output.stdout).expect("utf-8");
    let mut compared = 0;
    for line in text.lines() {
        let (key, partition) = line.rsplit_once('\t').expect("key<TAB>partition");
        let partition: i32 = partition.parse().expect("partition");
        assert_eq!(relay_partition.get(key), Some(&partition), "partition of key {key:?}");
        compared += 1;
    }
    assert_eq!(compared, keys.len());
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0));
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_error_holds_the_row_and_its_entity_but_not_others() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    // Records above 10 kB are refused by the producer: a permanent error.
    let config = db.write_config("kafka.librdkafka.\"message.max.bytes\" = \"10000\"");
    db.migrate(&config);
    let client = db.client().await;
    let mut relay = RelayProcess::start(&config);

    insert_row(&client, "order", "bad", 1).await;
    let big = serde_json::json!({ "seq": 2, "blob": "x".repeat(20_000) });
    let held_id: i64 = client
        .query_one(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, kind, payload, headers) VALUES ('order', 'bad', 'Huge', 'event', $1,
             '{\"traceparent\": \"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\"}') RETURNING id",
            &[&big],
        )
        .await
        .expect("insert big row")
        .get(0);
    let waiting_id = insert_row(&client, "order", "bad", 3).await;
    for seq in 1..=3 {
        insert_row(&client, "order", "good", seq).await;
    }

    let records = consume(&stack.bootstrap, &[&db.topic("order")], 4, Duration::from_secs(60));
    let good: Vec<i64> =
        records.iter().filter(|r| r.key == "good").map(|r| r.json()["seq"].as_i64().expect("seq")).collect();
    assert_eq!(good, vec![1, 2, 3], "other entities keep flowing");
    let bad: Vec<i64> =
        records.iter().filter(|r| r.key == "bad").map(|r| r.json()["seq"].as_i64().expect("seq")).collect();
    assert_eq!(bad, vec![1], "nothing of the entity after the held row");

    let state = |id: i64| {
        let client = &client;
        async move {
            let row = client
                .query_one("SELECT published_at IS NOT NULL, attempts, last_error FROM outbox WHERE id = $1", &[&id])
                .await
                .expect("row state");
            (row.get::<_, bool>(0), row.get::<_, i32>(1), row.get::<_, Option<String>>(2))
        }
    };
    let (published, attempts, error) = wait_for("the held row's state", Duration::from_secs(30), || async {
        let s = state(held_id).await;
        s.2.is_some().then_some(s)
    })
    .await;
    assert!(!published);
    assert_eq!(attempts, 1);
    assert!(error.as_deref().unwrap_or("").contains("too large"), "{error:?}");
    let (published, attempts, error) = wait_for("the waiting row's state", Duration::from_secs(30), || async {
        let s = state(waiting_id).await;
        s.2.is_some().then_some(s)
    })
    .await;
    assert!(!published);
    assert_eq!(attempts, 0, "never sent");
    assert!(error.as_deref().unwrap_or("").contains(&format!("held row {held_id}")), "{error:?}");

    let log = relay.log_text();
    let held_line = log.lines().find(|l| l.contains("row held")).expect("the held row is logged");
    assert!(held_line.contains("0af7651916cd43dd8448eb211c80319c"), "trace context in the log line: {held_line}");
    assert!(!log.contains("xxxxxxxxxx"), "payloads are never logged");

    // After a restart the entity still waits; status counts the held rows.
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0), "{}", relay.log_text());
    let mut relay = RelayProcess::start(&config);
    let later = insert_row(&client, "order", "bad", 4).await;
    insert_row(&client, "order", "good", 4).await;
    consume(&stack.bootstrap, &[&db.topic("order")], 5, Duration::from_secs(60));
    wait_for("the later row to be held behind", Duration::from_secs(30), || async {
        state(later).await.2.is_some().then_some(())
    })
    .await;
    let status = wait_for("relay status to show nothing pending", Duration::from_secs(30), || async {
        let status = status_json(&config);
        (status["pending"] == serde_json::json!(0)).then_some(status)
    })
    .await;
    assert_eq!(status["failed"], serde_json::json!(3), "{status}");
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0), "{}", relay.log_text());
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_relay_lets_the_slot_release_wal() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let config = db.write_config("");
    db.migrate(&config);
    let client = db.client().await;
    let mut relay = RelayProcess::start(&config);
    insert_row(&client, "order", "o-1", 1).await;
    wait_all_published(&client, Duration::from_secs(60)).await;

    // Traffic on other tables only: nothing for the relay to publish, yet the
    // slot's confirmed position must follow the WAL instead of pinning it.
    client.batch_execute("CREATE TABLE other (id bigserial, note text)").await.expect("other table");
    for _ in 0..20 {
        client
            .batch_execute("INSERT INTO other (note) SELECT repeat('x', 100) FROM generate_series(1, 100)")
            .await
            .expect("write");
    }
    let target: String = client.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.expect("lsn").get(0);
    wait_slot_confirmed_past(
        &client,
        &db.slot,
        &target,
        "the idle slot to confirm past unrelated WAL",
        Duration::from_secs(90),
    )
    .await;
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0), "{}", relay.log_text());
    db.cleanup().await;
}

/// The role a relay reports on `/readyz`.
async fn role(relay: &RelayProcess) -> Option<String> {
    let body: serde_json::Value =
        reqwest::get(format!("{}/readyz", relay.http_base().await)).await.ok()?.json().await.ok()?;
    body["role"].as_str().map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_active_relay_among_sidecars_and_the_standby_takes_over() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let config = db.write_config("");
    db.migrate(&config);
    let client = db.client().await;
    let mut first = RelayProcess::start(&config);
    wait_for("the first relay to be active", Duration::from_secs(30), || async {
        (role(&first).await.as_deref() == Some("active")).then_some(())
    })
    .await;
    let mut second = RelayProcess::start(&config);
    wait_for("the second relay to stand by", Duration::from_secs(30), || async {
        (role(&second).await.as_deref() == Some("standby")).then_some(())
    })
    .await;

    let workload = spawn_workload(&db.url, 3_000, 20, 4);
    wait_for("some rows published", Duration::from_secs(60), || async {
        let n: i64 =
            client.query_one("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL", &[]).await.ok()?.get(0);
        (n > 500).then_some(())
    })
    .await;
    first.kill9();
    wait_for("the standby to take over", Duration::from_secs(60), || async {
        (role(&second).await.as_deref() == Some("active")).then_some(())
    })
    .await;
    workload.await.expect("workload");
    wait_all_published(&client, Duration::from_secs(120)).await;
    let records = consume(&stack.bootstrap, &[&db.topic("entity")], 3_000, Duration::from_secs(60));
    assert_all_present(&client, &records).await;
    assert_per_key_order(&records);
    assert_eq!(second.terminate(Duration::from_secs(15)), Some(0), "{}", second.log_text());
    db.cleanup().await;
}

/// Each record batch of `topic` as the broker stored it: per partition, in
/// log order, `(producer id, record count)`, read with Kafka's own
/// `DumpLogSegments` from the stack's data directory.
fn stored_batches(topic: &str) -> HashMap<i32, Vec<(i64, usize)>> {
    let data = std::path::PathBuf::from(std::env::var("RELAY_STACK_DIR").expect("RELAY_STACK_DIR")).join("kafka/data");
    let libs = std::env::var("RELAY_KAFKA_LIBS").expect("RELAY_KAFKA_LIBS");
    let mut batches = HashMap::new();
    for entry in std::fs::read_dir(&data).expect("kafka data dir").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(partition) = name.strip_prefix(&format!("{topic}-")).and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        let mut segments: Vec<_> = std::fs::read_dir(entry.path())
            .expect("partition dir")
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        segments.sort();
        let output = std::process::Command::new("java")
            .arg("-cp")
            .arg(format!("{libs}/*"))
            .arg("kafka.tools.DumpLogSegments")
            .arg("--files")
            .arg(segments.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(","))
            .output()
            .expect("run DumpLogSegments");
        let text = String::from_utf8_lossy(&output.stdout);
        let field = |line: &str, name: &str| -> Option<i64> {
            line.split(&format!("{name}: ")).nth(1)?.split_whitespace().next()?.parse().ok()
        };
        let list: Vec<(i64, usize)> = text
            .lines()
            .filter(|l| l.starts_with("baseOffset:"))
            .filter_map(|l| Some((field(l, "producerId")?, field(l, "count")? as usize)))
            .collect();
        batches.insert(partition, list);
    }
    batches
}

/// A broker accepts any sequence number from a producer it holds no state
/// for on a partition, so if a producer's first request there failed
/// unpersisted while its second landed, the first records could never be
/// placed before the second (an entity's rows 1-3 could land after 4-6,
/// right after the relay created the topic). The relay therefore sends
/// each partition's first record of a run alone and the rest only after
/// Kafka acknowledged it. Shown on the broker's own log: with a backlog
/// ready at once and a kill -9 in between, every producer's first batch on
/// every partition holds one record; and per-key order holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_producers_first_batch_on_a_partition_is_a_single_record() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let config = db.write_config("");
    db.migrate(&config);
    let client = db.client().await;
    let backlog = |round: i64| {
        format!(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, kind, entity_version, payload)
             SELECT 'entity', 'e-' || (g % 30), 'Changed', 'event', {round} * 20 + g / 30 + 1,
                    jsonb_build_object('seq', {round} * 20 + g / 30 + 1)
             FROM generate_series(0, 599) g"
        )
    };
    client.batch_execute(&backlog(0)).await.expect("first backlog");

    let mut relay = RelayProcess::start(&config);
    wait_for("part of the backlog to be published", Duration::from_secs(60), || async {
        let row = client.query_one("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL", &[]).await.ok()?;
        (row.get::<_, i64>(0) >= 100).then_some(())
    })
    .await;
    relay.kill9();
    client.batch_execute(&backlog(1)).await.expect("second backlog");
    let mut relay = RelayProcess::start(&config);
    assert_eq!(wait_all_published(&client, Duration::from_secs(120)).await, 1_200, "{}", relay.log_text());
    let topic = db.topic("entity");
    let records = consume(&stack.bootstrap, &[&topic], 1_200, Duration::from_secs(60));
    assert_all_present(&client, &records).await;
    assert_per_key_order(&records);
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0), "{}", relay.log_text());

    let batches = stored_batches(&topic);
    assert_eq!(batches.len(), 6, "six partitions on disk: {batches:?}");
    let mut producers = std::collections::BTreeSet::new();
    for (partition, list) in &batches {
        let mut seen = std::collections::HashSet::new();
        for (producer, count) in list {
            producers.insert(*producer);
            if seen.insert(*producer) {
                assert_eq!(
                    *count, 1,
                    "the first batch of producer {producer} on partition {partition} holds {count} records: {list:?}"
                );
            }
        }
    }
    assert!(producers.len() >= 2, "both runs wrote (kill -9 in between): producers {producers:?}");
    db.cleanup().await;
}
