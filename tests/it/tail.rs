//! `relay tail` against the real stack: what it prints for records the
//! relay published is what Kafka's own console consumer shows, byte for
//! byte (JSON), or the row's payload (Avro through the registry); it stops
//! at the end offsets, follows new records, and joins no consumer group.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use crate::common::*;

/// One line of `relay tail --json`; the value kept as the bytes printed.
#[derive(Debug, serde::Deserialize)]
struct TailLine {
    topic: String,
    partition: i32,
    offset: i64,
    key: Value,
    headers: BTreeMap<String, Option<String>>,
    value: Box<RawValue>,
}

/// `relay tail ARGS` to completion; its stdout lines.
fn tail(config: &PathBuf, args: &[&str]) -> Vec<String> {
    let output = relay_command(config).arg("tail").args(args).output().expect("run relay tail");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "relay tail {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout.lines().map(str::to_string).collect()
}

fn tail_json(config: &PathBuf, args: &[&str]) -> Vec<TailLine> {
    let mut args = args.to_vec();
    args.push("--json");
    tail(config, &args).iter().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
}

/// What Kafka's console consumer prints for the first `count` records of
/// `topic`: (partition, offset) -> (key bytes, value bytes).
fn console_consumer(stack: &Stack, topic: &str, count: usize) -> HashMap<(i32, i64), (Vec<u8>, Vec<u8>)> {
    let output = Command::new(stack.repo.join("scripts/kafka-tool"))
        .args([
            "org.apache.kafka.tools.consumer.ConsoleConsumer",
            "--bootstrap-server",
            &stack.bootstrap,
            "--topic",
            topic,
            "--from-beginning",
            "--max-messages",
            &count.to_string(),
            "--timeout-ms",
            "60000",
            "--property",
            "print.partition=true",
            "--property",
            "print.offset=true",
            "--property",
            "print.key=true",
        ])
        .output()
        .expect("run the console consumer");
    assert!(output.status.success(), "console consumer failed: {}", String::from_utf8_lossy(&output.stderr));
    // Partition:P<TAB>Offset:O<TAB>key<TAB>value<LF>
    let mut records = HashMap::new();
    for line in output.stdout.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let fields: Vec<&[u8]> = line.splitn(4, |&b| b == b'\t').collect();
        assert_eq!(fields.len(), 4, "console consumer line {:?}", String::from_utf8_lossy(line));
        let number = |field: &[u8], label: &str| -> i64 {
            let text = String::from_utf8_lossy(field);
            text.strip_prefix(label).and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{label} in {text}"))
        };
        let at = (number(fields[0], "Partition:") as i32, number(fields[1], "Offset:"));
        records.insert(at, (fields[2].to_vec(), fields[3].to_vec()));
    }
    assert_eq!(records.len(), count, "console consumer records");
    records
}

/// The consumer groups the brokers know.
fn group_names(stack: &Stack) -> Vec<String> {
    let consumer: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", &stack.bootstrap).create().expect("consumer");
    let groups = consumer.fetch_group_list(None, Duration::from_secs(10)).expect("group list");
    groups.groups().iter().map(|g| g.name().to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_records_match_the_console_consumer_byte_for_byte() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let config = db.write_config("");
    db.migrate(&config);
    let client = db.client().await;
    let mut relay = RelayProcess::start(&config);
    for seq in 0..4 {
        for entity in ["e-1", "e-2", "e-3"] {
            insert_row(&client, "order", entity, seq).await;
        }
    }
    client
        .execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, kind, payload, headers)
             VALUES ('order', 'e-traced', 'Traced', 'command', '{\"text\": \"tab\\there, ünïcode\", \"n\": 1.50}',
                     '{\"traceparent\": \"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\"}')",
            &[],
        )
        .await
        .expect("insert traced row");
    insert_state(&client, "profile", "p-1", 1, Some(json!({"name": "Ada"}))).await;
    insert_state(&client, "profile", "p-2", 1, Some(json!({"name": "Grace"}))).await;
    insert_state(&client, "profile", "p-1", 2, Some(json!({"name": "Ada L."}))).await;
    insert_state(&client, "profile", "p-1", 3, None).await;
    wait_all_published(&client, Duration::from_secs(60)).await;
    let groups_before = group_names(&stack);

    // Without --max it reads to the end offsets and stops: every record.
    let topic = db.topic("order");
    let lines = tail_json(&config, &[&topic, "--from-beginning"]);
    assert_eq!(lines.len(), 13, "every record of {topic}, then stop");
    let console = console_consumer(&stack, &topic, 13);
    for line in &lines {
        assert_eq!(line.topic, topic);
        let (key, value) = console
            .get(&(line.partition, line.offset))
            .unwrap_or_else(|| panic!("console consumer has no record at {}/{}", line.partition, line.offset));
        assert_eq!(
            line.key.as_str().map(str::as_bytes),
            Some(key.as_slice()),
            "key at {}/{}",
            line.partition,
            line.offset
        );
        assert_eq!(
            line.value.get().as_bytes(),
            value.as_slice(),
            "value at {}/{}: {} against {}",
            line.partition,
            line.offset,
            line.value.get(),
            String::from_utf8_lossy(value)
        );
    }
    // Each row is the record its publish state names, with its headers.
    let rows = client
        .query(
            "SELECT event_id::text, aggregate_id, payload, kafka_partition, kafka_offset FROM outbox
             WHERE aggregate_type = 'order'",
            &[],
        )
        .await
        .expect("publish state");
    let by_position: HashMap<(i32, i64), &TailLine> = lines.iter().map(|l| ((l.partition, l.offset), l)).collect();
    for row in &rows {
        let at = (row.get::<_, Option<i32>>(3).expect("partition"), row.get::<_, Option<i64>>(4).expect("offset"));
        let line = by_position.get(&at).unwrap_or_else(|| panic!("no record at {at:?}"));
        assert_eq!(line.key, json!(row.get::<_, String>(1)));
        assert_eq!(line.headers.get("event_id").cloned().flatten(), Some(row.get::<_, String>(0)));
        let value: Value = serde_json::from_str(line.value.get()).expect("JSON value");
        assert_eq!(value, row.get::<_, Value>(2));
    }
    let traced = lines.iter().find(|l| l.key == json!("e-traced")).expect("traced record");
    assert_eq!(
        traced.headers.get("traceparent").cloned().flatten().as_deref(),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );

    // --max stops early.
    assert_eq!(tail_json(&config, &[&topic, "--from-beginning", "--max", "5"]).len(), 5);
    // Without --from-beginning and --follow there is nothing to read.
    assert!(tail(&config, &[&topic]).is_empty());

    // The state topic: the tombstone is a null value after p-1's states.
    let state_topic = db.state_topic("profile");
    let states = tail_json(&config, &[&state_topic, "--from-beginning"]);
    assert_eq!(states.len(), 4);
    let console = console_consumer(&stack, &state_topic, 4);
    for line in &states {
        let (key, value) = &console[&(line.partition, line.offset)];
        assert_eq!(line.key.as_str().map(str::as_bytes), Some(key.as_slice()));
        assert_eq!(line.value.get().as_bytes(), value.as_slice());
    }
    let mut p1: Vec<&TailLine> = states.iter().filter(|l| l.key == json!("p-1")).collect();
    p1.sort_by_key(|l| l.offset);
    let p1: Vec<(&str, Option<&str>)> =
        p1.iter().map(|l| (l.value.get(), l.headers.get("entity_version").and_then(|v| v.as_deref()))).collect();
    assert_eq!(
        p1,
        vec![(r#"{"name": "Ada"}"#, Some("1")), (r#"{"name": "Ada L."}"#, Some("2")), ("null", Some("3"))],
        "p-1's states in order, then its tombstone"
    );
    // The readable form: one line per record.
    let text = tail(&config, &[&state_topic, "--from-beginning"]);
    assert_eq!(text.len(), 4, "{text:#?}");
    assert!(
        text.iter().any(|l| l.contains(" key=p-1 ") && l.contains("entity_version=3") && l.ends_with(" value=null")),
        "{text:#?}"
    );

    // Read-only: no consumer group appeared.
    let new_groups: Vec<String> = group_names(&stack).into_iter().filter(|g| !groups_before.contains(g)).collect();
    assert!(new_groups.iter().all(|g| !g.starts_with("relay-tail-")), "relay tail joined a group: {new_groups:?}");

    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0), "{}", relay.log_text());
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_prints_only_what_arrives_and_stops_on_sigterm() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let config = db.write_config("");
    db.migrate(&config);
    let client = db.client().await;
    let mut relay = RelayProcess::start(&config);
    insert_row(&client, "order", "before", 1).await;
    wait_all_published(&client, Duration::from_secs(60)).await;

    let (child, lines, stderr_lines) = spawn_follow(&config, &db.topic("order"));
    wait_for_line(&stderr_lines, "following").await;

    insert_row(&client, "order", "after", 1).await;
    let mut seen: Vec<Value> = Vec::new();
    wait_for("the new record in relay tail's output", Duration::from_secs(60), || {
        json_lines(&lines, &mut seen);
        let found = seen.iter().any(|l| l["key"] == json!("after"));
        async move { found.then_some(()) }
    })
    .await;
    assert!(seen.iter().all(|l| l["key"] != json!("before")), "a record from before the start was printed: {seen:?}");
    assert_eq!(seen.len(), 1, "{seen:?}");

    stop_tail(child).await;

    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0), "{}", relay.log_text());
    db.cleanup().await;
}

/// Starts `relay tail TOPIC --follow --json`; its stdout and stderr lines
/// arrive on the two receivers as they are printed.
fn spawn_follow(
    config: &PathBuf,
    topic: &str,
) -> (TailChild, std::sync::mpsc::Receiver<String>, std::sync::mpsc::Receiver<String>) {
    let mut child = relay_command(config)
        .args(["tail", topic, "--follow", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start relay tail --follow");
    let lines = line_channel(child.stdout.take().expect("stdout"));
    let stderr_lines = line_channel(child.stderr.take().expect("stderr"));
    (TailChild(child), lines, stderr_lines)
}

/// The lines `output` prints, on a channel as they are printed.
fn line_channel(output: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(output).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

/// Moves the JSON lines that arrived on `lines` into `seen`.
fn json_lines(lines: &std::sync::mpsc::Receiver<String>, seen: &mut Vec<Value>) {
    seen.extend(lines.try_iter().map(|l| serde_json::from_str::<Value>(&l).expect("JSON line")));
}

/// A `relay tail` process, killed when dropped: a failed assertion must
/// not leave it following a topic forever.
struct TailChild(std::process::Child);

impl Drop for TailChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until a line containing `text` arrives on `lines`.
async fn wait_for_line(lines: &std::sync::mpsc::Receiver<String>, text: &str) {
    let mut seen = Vec::new();
    wait_for(&format!("relay tail to print \"{text}\""), Duration::from_secs(30), || {
        seen.extend(lines.try_iter());
        let found = seen.iter().any(|l| l.contains(text));
        async move { found.then_some(()) }
    })
    .await;
}

/// SIGTERM to `child`; asserts it exits 0.
async fn stop_tail(mut child: TailChild) {
    let _ = Command::new("kill").arg("-TERM").arg(child.0.id().to_string()).status();
    let status = wait_for("relay tail to stop", Duration::from_secs(20), || {
        let status = child.0.try_wait().ok().flatten();
        async move { status }
    })
    .await;
    assert!(status.success(), "relay tail --follow exits 0 on SIGTERM: {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_of_a_topic_that_does_not_exist_yet_prints_everything_published_to_it() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let config = db.write_config("");
    db.migrate(&config);
    let client = db.client().await;
    let (child, lines, stderr_lines) = spawn_follow(&config, &db.topic("order"));
    wait_for_line(&stderr_lines, "waiting for topic").await;

    // A burst, all of it published before tail looks again: tail is
    // stopped (SIGSTOP) while the relay creates the topic and sends it.
    for n in 0..50 {
        insert_row(&client, "order", &format!("burst-{n}"), 1).await;
    }
    let pid = child.0.id().to_string();
    assert!(Command::new("kill").args(["-STOP", &pid]).status().expect("kill -STOP").success());
    let mut relay = RelayProcess::start(&config);
    wait_all_published(&client, Duration::from_secs(60)).await;
    assert!(Command::new("kill").args(["-CONT", &pid]).status().expect("kill -CONT").success());
    let mut seen: Vec<Value> = Vec::new();
    wait_for("all 50 records in relay tail's output", Duration::from_secs(60), || {
        json_lines(&lines, &mut seen);
        let count = seen.len();
        async move { (count >= 50).then_some(()) }
    })
    .await;
    stop_tail(child).await;
    json_lines(&lines, &mut seen);
    let mut keys: Vec<String> = seen.iter().map(|l| l["key"].as_str().unwrap_or_default().to_string()).collect();
    keys.sort();
    let mut expected: Vec<String> = (0..50).map(|n| format!("burst-{n}")).collect();
    expected.sort();
    assert_eq!(keys, expected, "each record once");

    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0), "{}", relay.log_text());
    db.cleanup().await;
}

fn avro_config(db: &TestDb, schemas_dir: &Path) -> PathBuf {
    db.write_config(&format!(
        r#"codec.format = "avro"
codec.key_format = "avro"
codec.schemas_dir = "{}"
codec.schemas."order/OrderPlaced" = "order/OrderPlaced.avsc"
codec.state_schemas."profile" = "profile/CustomerProfile.avsc"
"#,
        schemas_dir.display()
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn avro_values_and_keys_decode_through_the_registry_to_the_payload() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let config = avro_config(&db, &stack.repo.join("schemas"));
    db.migrate(&config);
    let output = relay_command(&config).args(["schemas", "register"]).output().expect("relay schemas register");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stdout));
    let client = db.client().await;
    let mut relay = RelayProcess::start(&config);

    // Every field in the form the codec reads and tail writes back.
    let profile = json!({"customer_id": "cus-42", "version": 7, "name": "Ada Lovelace", "email": "ada@example.com",
        "tier": "GOLD", "addresses": [{"line1": "12 St James's Square", "city": "London", "country": "GB", "postcode": "SW1Y 4JH"},
        {"line1": "Ockham Park", "city": "Ockham", "country": "GB", "postcode": null}],
        "preferences": {"newsletter": "weekly", "sms": "never"}, "updated_at": "2026-11-23T16:40:00.123Z", "birthday": "1815-12-10"});
    insert_state(&client, "profile", "cus-42", 7, Some(profile.clone())).await;
    insert_state(&client, "profile", "cus-43", 1, None).await;
    let placed = json!({"data": {"order_id": "ord-1", "customer_id": "cus-42", "total": "59.97", "currency": "EUR",
        "items": [{"sku": "MUG-01", "quantity": 2, "unit_price": "12.99"}, {"sku": "TEE-07", "quantity": 1, "unit_price": "33.99"}]}});
    client
        .execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, kind, entity_version, payload)
             VALUES ('order', 'ord-1', 'OrderPlaced', 'event', 1, $1)",
            &[&placed],
        )
        .await
        .expect("insert order row");
    wait_all_published(&client, Duration::from_secs(60)).await;

    // The bytes really are Confluent-framed Avro, key and value.
    let raw = consume(&stack.bootstrap, &[&db.state_topic("profile")], 2, Duration::from_secs(60));
    let framed = raw.iter().find(|r| !r.payload.is_empty()).expect("the profile record");
    assert_eq!(framed.payload[0], 0, "magic byte");
    assert!(framed.key.starts_with('\0'), "the key is Avro too");

    let states = tail_json(&config, &[&db.state_topic("profile"), "--from-beginning"]);
    assert_eq!(states.len(), 2);
    let by_key: HashMap<String, &TailLine> =
        states.iter().map(|l| (l.key.as_str().expect("key decoded to a string").to_string(), l)).collect();
    let value: Value = serde_json::from_str(by_key["cus-42"].value.get()).expect("JSON");
    assert_eq!(value, profile, "the decoded value is the row's payload");
    assert_eq!(by_key["cus-43"].value.get(), "null", "a tombstone");

    let orders = tail_json(&config, &[&db.topic("order"), "--from-beginning"]);
    assert_eq!(orders.len(), 1);
    let order: Value = serde_json::from_str(orders[0].value.get()).expect("JSON");
    assert_eq!(orders[0].key, json!("ord-1"));
    assert_eq!(order["data"], placed["data"], "the payload's fields");
    // The envelope fields the codec filled from the row.
    assert_eq!(order["aggregate_id"], json!("ord-1"));
    assert_eq!(order["entity_version"], json!(1));
    assert_eq!(
        Some(&order["event_id"]),
        orders[0].headers.get("event_id").cloned().flatten().map(Value::String).as_ref()
    );
    // The readable form names the decoded key and shows the JSON value.
    let text = tail(&config, &[&db.topic("order"), "--from-beginning"]);
    assert!(text[0].contains(" key=ord-1 ") && text[0].contains(r#""total":"59.97""#), "{text:?}");

    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0), "{}", relay.log_text());
    db.cleanup().await;
}
