//! Exactly-once delivery (`kafka.delivery = "exactly_once"`) against the
//! real stack: kill -9 at random moments, some of them between a
//! transaction's commit and its publish-state write (a test-only delay
//! holds that window open), and a `read_committed` consumer (Python
//! `confluent-kafka`, read to the end offsets) sees every row exactly once,
//! in per-key order, with publish state naming where each landed.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;

/// What the relay logs when the test delay after a commit begins.
const WINDOW_OPEN: &str = "test delay: committed, publish state not yet recorded";
const EXACTLY_ONCE: &str = "kafka.delivery = \"exactly_once\"\nkafka.transaction_interval_ms = 50";

/// One record as the Python consumer printed it.
#[derive(Debug, serde::Deserialize)]
struct Consumed {
    partition: i32,
    offset: i64,
    key: String,
    event_id: String,
    value: String,
}

/// Every record of `topic` up to its end offsets, read by Confluent's
/// Python client with `isolation`.
fn python_consume(stack: &Stack, topic: &str, isolation: &str) -> Vec<Consumed> {
    python_consume_to_end(stack, isolation, topic)
}

/// The relay with the window between commit and publish-state write held
/// open for `delay_ms` after every commit.
fn start_relay(config: &PathBuf, delay_ms: u64) -> RelayProcess {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("relay-logs");
    std::fs::create_dir_all(&dir).expect("log dir");
    let log = dir.join(format!("exactly-once-{}.log", uuid::Uuid::new_v4().simple()));
    let child = relay_command(config)
        .env("RUST_LOG", "info,relay=debug")
        .env("NO_COLOR", "1")
        .env("RELAY_TEST_AFTER_COMMIT_DELAY_MS", delay_ms.to_string())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("start relay");
    RelayProcess { child, log }
}

/// Published rows, in either publish-state layout.
async fn published(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM outbox_publish_state WHERE published_at IS NOT NULL", &[])
        .await
        .expect("count")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_dash_nine_never_shows_a_row_twice_to_read_committed_consumers() {
    kill_dash_nine_six_times("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_dash_nine_in_poll_mode_never_shows_a_row_twice_to_read_committed_consumers() {
    kill_dash_nine_six_times("source.mode = \"poll\"").await;
}

/// The recovery from the progress topic records the rows of committed
/// Kafka transactions in the side table too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_dash_nine_with_publish_state_in_the_side_table_never_shows_a_row_twice() {
    kill_dash_nine_six_times("checkpoint.publish_state = \"side_table\"").await;
}

/// Writes 3,000 rows at 300 rows/s while the relay (`extra` keys) is killed
/// six times, then checks what a read_committed consumer got.
async fn kill_dash_nine_six_times(extra: &str) {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let config = db.write_config(&format!("{EXACTLY_ONCE}\n{extra}"));
    db.migrate(&config);
    let client = db.client().await;
    const TOTAL: usize = 3_000;
    let workload = spawn_paced_workload(&db.url, TOTAL, 20, 4, Some(300.0));
    let mut recoveries = 0;
    for kill in 0..6 {
        // Every other run holds the window after each commit open, so the
        // kill lands between a commit and its publish-state write.
        let in_window = kill % 2 == 0;
        let mut relay = start_relay(&config, if in_window { 400 } else { 0 });
        let before = published(&client).await;
        wait_for("progress before the kill", Duration::from_secs(120), || async {
            let now = published(&client).await;
            (now >= before + 150 || now == TOTAL as i64).then_some(())
        })
        .await;
        if in_window {
            // Right after a commit, while its rows are not recorded yet.
            let commits = relay.log_text().matches(WINDOW_OPEN).count();
            wait_for("a commit", Duration::from_secs(60), || async {
                let committed = relay.log_text().matches(WINDOW_OPEN).count() > commits;
                (committed || published(&client).await == TOTAL as i64).then_some(())
            })
            .await;
        }
        relay.kill9();
        if relay.log_text().contains("recorded rows that committed Kafka transactions carried") {
            recoveries += 1;
        }
    }
    workload.await.expect("workload");
    let mut relay = start_relay(&config, 0);
    relay.http_base().await; // up, so SIGTERM reaches its handler
    assert_eq!(wait_all_published(&client, Duration::from_secs(180)).await, TOTAL as i64, "{}", relay.log_text());
    if relay.log_text().contains("recorded rows that committed Kafka transactions carried") {
        recoveries += 1;
    }
    assert_eq!(relay.terminate(Duration::from_secs(20)), Some(0), "{}", relay.log_text());

    let topic = db.topic("entity");
    let committed = python_consume(&stack, &topic, "read_committed");
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for record in &committed {
        *seen.entry(record.event_id.as_str()).or_default() += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "rows seen more than once by read_committed: {} e.g. {:?}", twice.len(), twice.first());
    assert_eq!(committed.len(), TOTAL, "every row exactly once");
    // Not vacuous: some kills came between a commit and its recording.
    assert!(recoveries > 0, "no kill landed between a commit and its publish-state write");
    let uncommitted = python_consume(&stack, &topic, "read_uncommitted");
    eprintln!(
        "exactly-once: {} records for read_committed, {} for read_uncommitted ({} from aborted transactions), {recoveries} recoveries",
        committed.len(),
        uncommitted.len(),
        uncommitted.len() - committed.len()
    );

    // Per-key order, and publish state names where each row landed.
    let mut last: HashMap<&str, i64> = HashMap::new();
    for record in &committed {
        let value: serde_json::Value = serde_json::from_str(&record.value).expect("JSON payload");
        let seq = value["seq"].as_i64().expect("seq");
        let previous = last.insert(record.key.as_str(), seq).unwrap_or(0);
        assert_eq!(seq, previous + 1, "per-key order of {}", record.key);
    }
    let at: HashMap<&str, (i32, i64)> =
        committed.iter().map(|r| (r.event_id.as_str(), (r.partition, r.offset))).collect();
    let rows = client
        .query(
            "SELECT o.event_id::text, s.kafka_partition, s.kafka_offset \
             FROM outbox AS o JOIN outbox_publish_state AS s USING (id)",
            &[],
        )
        .await
        .expect("publish state");
    let wrong = rows
        .iter()
        .filter(|r| at.get(r.get::<_, String>(0).as_str()) != Some(&(r.get::<_, i32>(1), r.get::<_, i64>(2))))
        .count();
    assert_eq!(wrong, 0, "rows whose recorded partition and offset do not hold their message");
    db.cleanup().await;
}

async fn row_state(client: &tokio_postgres::Client, id: i64) -> (bool, Option<String>, Option<i64>) {
    let row = client
        .query_one("SELECT published_at IS NOT NULL, last_error, waiting_for FROM outbox WHERE id = $1", &[&id])
        .await
        .expect("row");
    (row.get(0), row.get(1), row.get(2))
}

async fn set_size_limit(bootstrap: &str, topic: &str, bytes: &str) {
    use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        rdkafka::ClientConfig::new().set("bootstrap.servers", bootstrap).create().expect("admin client");
    let alter = AlterConfig::new(ResourceSpecifier::Topic(topic)).set("max.message.bytes", bytes);
    for result in admin.alter_configs([&alter], &AdminOptions::new()).await.expect("alter topic") {
        result.expect("limit changed");
    }
}

/// A row the broker refuses inside a transaction (its topic's size limit
/// was lowered after the relay read it, so only the delivery report tells):
/// the transaction is aborted, the row held, its entity's later rows wait,
/// the rest is delivered once; after `held retry` the entity's rows arrive
/// once each, in order, for a read_committed consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_refused_inside_a_transaction_is_held_and_the_rest_delivered_once() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let config = db.write_config(EXACTLY_ONCE);
    db.migrate(&config);
    let client = db.client().await;
    let mut relay = start_relay(&config, 0);
    relay.http_base().await;
    // The relay learns the topic's (default) limit with a first row.
    insert_row(&client, "big", "warm", 1).await;
    wait_all_published(&client, Duration::from_secs(60)).await;
    let big = db.topic("big");
    set_size_limit(&stack.bootstrap, &big, "10000").await;

    // Random text: compression cannot bring it under the limit.
    let blob: String = (0..700).map(|_| uuid::Uuid::new_v4().simple().to_string()).collect();
    let payload = serde_json::json!({ "entity": "b-1", "seq": 1, "blob": blob });
    let e1: i64 = client
        .query_one(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, kind, entity_version, payload) \
             VALUES ('big', 'b-1', 'Changed', 'event', 1, $1) RETURNING id",
            &[&payload],
        )
        .await
        .expect("insert E1")
        .get(0);
    let e2 = insert_row(&client, "big", "b-1", 2).await;
    let e3 = insert_row(&client, "big", "b-1", 3).await;
    for seq in 1..=20 {
        insert_row(&client, "entity", &format!("e{}", seq % 4), seq / 4 + 1).await;
    }
    let held = wait_for("E1 held", Duration::from_secs(60), || async {
        let (published, error, _) = row_state(&client, e1).await;
        (!published).then_some(error).flatten()
    })
    .await;
    assert!(held.contains("MessageSizeTooLarge") || held.to_lowercase().contains("too large"), "{held}");
    for id in [e2, e3] {
        let state = wait_for("a later row to wait", Duration::from_secs(60), || async {
            let state = row_state(&client, id).await;
            (state.2.is_some()).then_some(state)
        })
        .await;
        assert_eq!(state.2, Some(e1), "waits behind E1: {state:?}");
    }
    let entity_rows = consume(&stack.bootstrap, &[&db.topic("entity")], 20, Duration::from_secs(60));
    assert_eq!(entity_rows.len(), 20, "the other topic's rows, once each");
    assert!(relay.log_text().contains("held_at=Delivery"), "{}", relay.log_text());

    set_size_limit(&stack.bootstrap, &big, "1000000").await;
    let output = relay_command(&config).args(["held", "retry", &e1.to_string()]).output().expect("held retry");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(wait_all_published(&client, Duration::from_secs(60)).await, 24, "{}", relay.log_text());
    assert_eq!(relay.terminate(Duration::from_secs(20)), Some(0), "{}", relay.log_text());
    let committed = python_consume(&stack, &big, "read_committed");
    let seqs: Vec<i64> = committed
        .iter()
        .filter(|r| r.key == "b-1")
        .map(|r| serde_json::from_str::<serde_json::Value>(&r.value).expect("JSON")["seq"].as_i64().expect("seq"))
        .collect();
    assert_eq!(seqs, vec![1, 2, 3], "E1, E2, E3 once each, in order");
    let entity = python_consume(&stack, &db.topic("entity"), "read_committed");
    assert_eq!(entity.len(), 20, "the other rows exactly once");
    db.cleanup().await;
}

/// Two relays, exactly-once: the active one is frozen (SIGSTOP) past its
/// lease, the standby takes over (its `init_transactions` fences the frozen
/// producer); woken up, the old relay records nothing and nothing it sends
/// becomes visible: a read_committed consumer sees every row once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_leader_is_fenced_and_read_committed_sees_each_row_once() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let extra = format!("{EXACTLY_ONCE}\nleader.renew_interval_ms = 500\nleader.lease_timeout_ms = 3000");
    let configs: Vec<PathBuf> = (0..2)
        .map(|n| {
            let toml = db.config_toml(&extra).replace(&db.url, &format!("{}?application_name=eo-{n}", db.url));
            let path = db.dir.path().join(format!("eo-{n}.toml"));
            std::fs::write(&path, toml).expect("write config");
            path
        })
        .collect();
    db.migrate(&configs[0]);
    let client = db.client().await;
    client
        .batch_execute(
            "CREATE TABLE audit (app text, at timestamptz DEFAULT clock_timestamp());
             CREATE FUNCTION audit() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN INSERT INTO audit (app) VALUES (current_setting('application_name')); RETURN NULL; END $$;
             CREATE TRIGGER audit AFTER UPDATE ON outbox FOR EACH ROW EXECUTE FUNCTION audit();",
        )
        .await
        .expect("audit trigger");
    let mut relays: Vec<RelayProcess> = configs.iter().map(|c| start_relay(c, 0)).collect();
    let holder_pid = || async {
        let row = client.query_opt("SELECT holder FROM outbox_relay_leader", &[]).await.ok()??;
        let holder: String = row.get(0);
        holder.split(':').nth(1)?.parse::<u32>().ok()
    };
    let active = wait_for("a leader", Duration::from_secs(60), || async {
        let pid = holder_pid().await?;
        relays.iter().position(|r| r.child.id() == pid)
    })
    .await;
    const TOTAL: usize = 2_000;
    let workload = spawn_paced_workload(&db.url, TOTAL, 20, 4, Some(300.0));
    wait_for("some progress", Duration::from_secs(60), || async { (published(&client).await >= 300).then_some(()) })
        .await;

    let pid = relays[active].child.id().to_string();
    let signal = |name: &str| {
        let status = Command::new("kill").arg(format!("-{name}")).arg(&pid).status().expect("kill");
        assert!(status.success(), "kill -{name}");
    };
    signal("STOP");
    let standby = 1 - active;
    let standby_pid = relays[standby].child.id();
    wait_for("the standby to take over", Duration::from_secs(60), || async {
        (holder_pid().await? == standby_pid).then_some(())
    })
    .await;
    wait_for("the new leader to publish", Duration::from_secs(60), || async {
        let n: i64 = client
            .query_one("SELECT count(*) FROM audit WHERE app = $1", &[&format!("eo-{standby}")])
            .await
            .ok()?
            .get(0);
        (n > 0).then_some(())
    })
    .await;
    let woke = chrono::Utc::now();
    signal("CONT");
    workload.await.expect("workload");
    assert_eq!(wait_all_published(&client, Duration::from_secs(120)).await, TOTAL as i64);
    let late: i64 = client
        .query_one("SELECT count(*) FROM audit WHERE app = $1 AND at > $2", &[&format!("eo-{active}"), &woke])
        .await
        .expect("audit")
        .get(0);
    assert_eq!(late, 0, "the woken relay recorded publish state");
    for relay in &mut relays {
        assert_eq!(relay.terminate(Duration::from_secs(20)), Some(0), "{}", relay.log_text());
    }
    let committed = python_consume(&stack, &db.topic("entity"), "read_committed");
    let distinct: std::collections::HashSet<&str> = committed.iter().map(|r| r.event_id.as_str()).collect();
    assert_eq!((committed.len(), distinct.len()), (TOTAL, TOTAL), "every row exactly once");
    db.cleanup().await;
}

/// The catch-up phase (a lost slot) publishes in transactions too: a kill
/// inside it, then a restart, and read_committed sees each row once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_catch_up_phase_is_exactly_once_too() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let config = db.write_config(&format!("{EXACTLY_ONCE}\nsource.batch_rows = 100"));
    db.migrate(&config);
    let client = db.client().await;
    // The slot is lost while rows wait: the next start catches up through
    // the poll path.
    client.query_one("SELECT pg_drop_replication_slot($1)", &[&db.slot]).await.expect("drop slot");
    const TOTAL: usize = 2_000;
    spawn_workload(&db.url, TOTAL, 20, 4).await.expect("workload");
    let mut relay = start_relay(&config, 200);
    wait_for("the catch-up phase to commit", Duration::from_secs(60), || async {
        let log = relay.log_text();
        (log.contains("catch-up phase due") && log.contains(WINDOW_OPEN)).then_some(())
    })
    .await;
    relay.kill9();
    let mut relay = start_relay(&config, 0);
    relay.http_base().await;
    assert_eq!(wait_all_published(&client, Duration::from_secs(120)).await, TOTAL as i64, "{}", relay.log_text());
    assert_eq!(relay.terminate(Duration::from_secs(20)), Some(0), "{}", relay.log_text());
    let committed = python_consume(&stack, &db.topic("entity"), "read_committed");
    let distinct: std::collections::HashSet<&str> = committed.iter().map(|r| r.event_id.as_str()).collect();
    assert_eq!((committed.len(), distinct.len()), (TOTAL, TOTAL), "every row exactly once");
    db.cleanup().await;
}

/// One outbox row for the sink, as a source would hand it on.
fn source_row(id: i64, entity: &str) -> relay::outbox::SourceEvent {
    relay::outbox::SourceEvent::Row(relay::outbox::OutboxRow {
        id,
        event_id: uuid::Uuid::new_v4(),
        aggregate_type: "entity".into(),
        aggregate_id: entity.into(),
        event_type: "Changed".into(),
        kind: "event".into(),
        entity_version: None,
        payload: Some(bytes::Bytes::from(format!("{{\"seq\":{id}}}"))),
        headers: None,
        occurred_at: chrono::Utc::now(),
        committed_at: None,
        xid: None,
    })
}

/// The zombie case at the Kafka level, without the lease in front of it: a
/// second producer with the same transactional id initializes
/// transactions; the first one's next transaction fails as fenced (the sink
/// stops with `SinkError::Fenced`, it does not retry), and nothing it sent
/// after that is visible to a read_committed consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_fences_a_zombie_producer_and_nothing_it_sends_becomes_visible() {
    use relay::hold::HeldEntities;
    use relay::sink::{KafkaSink, SinkError};
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let config = relay::Config::from_toml_str(&db.config_toml(EXACTLY_ONCE)).expect("config");
    relay::sink::progress::ensure_topic(&config).await.expect("progress topic");

    let zombie = KafkaSink::new(&config, HeldEntities::default(), relay::codec::Codec::json()).expect("sink");
    zombie.init_transactions().await.expect("init transactions");
    let (rows, input) = tokio::sync::mpsc::channel(8);
    let (output, mut committed) = tokio::sync::mpsc::channel(8);
    let run = tokio::spawn(zombie.run(input, output));
    rows.send(source_row(1, "a")).await.expect("send");
    let first = tokio::time::timeout(Duration::from_secs(60), committed.recv()).await;
    assert!(matches!(first, Ok(Some(_))), "the first transaction commits");

    let successor = KafkaSink::new(&config, HeldEntities::default(), relay::codec::Codec::json()).expect("sink");
    successor.init_transactions().await.expect("the successor fences the zombie");
    rows.send(source_row(2, "a")).await.expect("send");
    let stopped = tokio::time::timeout(Duration::from_secs(60), run).await.expect("the zombie stops").expect("join");
    assert!(matches!(stopped, Err(SinkError::Fenced(_))), "stopped as fenced: {stopped:?}");
    assert!(committed.recv().await.is_none(), "nothing of the fenced transaction goes on to the checkpoint");

    let seen = python_consume(&stack, &db.topic("entity"), "read_committed");
    let seqs: Vec<String> = seen.iter().map(|r| r.event_id.clone()).collect();
    assert_eq!(seqs.len(), 1, "only the first row is visible to read_committed: {seen:?}");
    db.cleanup().await;
}

/// `relay migrate` in exactly-once mode creates the progress topic,
/// compacted, before any relay runs (the administrator's step, so the
/// relay's principal needs no CREATE for it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_creates_the_compacted_progress_topic() {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let progress = db.topic("progress");
    let config = db.write_config(&format!("{EXACTLY_ONCE}\nkafka.progress_topic = \"{progress}\""));
    db.migrate(&config);
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        rdkafka::ClientConfig::new().set("bootstrap.servers", &stack.bootstrap).create().expect("admin client");
    let described = admin
        .describe_configs([&ResourceSpecifier::Topic(&progress)], &AdminOptions::new())
        .await
        .expect("describe the progress topic");
    let resource = described.into_iter().next().expect("one result").expect("the progress topic exists");
    let policy = resource.get("cleanup.policy").and_then(|entry| entry.value.clone());
    assert_eq!(policy.as_deref(), Some("compact"), "{resource:?}");
    db.cleanup().await;
}

/// Records publish state with plain SQL (outbox-row layout), failing every
/// call after the first `allowed`: a recovery killed part-way.
struct CutShort {
    client: tokio_postgres::Client,
    allowed: std::sync::atomic::AtomicUsize,
}

impl relay::store::PublishStateStore for CutShort {
    fn record_published(
        &self,
        rows: &[&relay::store::Published],
    ) -> impl std::future::Future<Output = Result<Vec<i64>, relay::store::StoreError>> + Send {
        let rows: Vec<(i64, i32, i64)> = rows.iter().map(|r| (r.id, r.partition, r.offset)).collect();
        let allowed = self.allowed.load(std::sync::atomic::Ordering::SeqCst);
        self.allowed.store(allowed.saturating_sub(1), std::sync::atomic::Ordering::SeqCst);
        async move {
            if allowed == 0 {
                return Err(relay::store::StoreError::NoTable("test: the recovery was cut short here".into()));
            }
            let mut ids = Vec::new();
            for (id, partition, offset) in rows {
                self.client
                    .execute(
                        "UPDATE outbox SET published_at = now(), kafka_partition = $2, kafka_offset = $3 WHERE id = $1",
                        &[&id, &partition, &offset],
                    )
                    .await?;
                ids.push(id);
            }
            Ok(ids)
        }
    }

    async fn record_held(&self, _rows: &[&relay::store::HeldState]) -> Result<Vec<i64>, relay::store::StoreError> {
        Ok(Vec::new())
    }

    async fn in_progress(&self, _xids: &[u32]) -> Result<std::collections::HashSet<u32>, relay::store::StoreError> {
        Ok(Default::default())
    }
}

/// Two committed transactions whose rows a crash kept from being recorded,
/// and a recovery killed after recording one of them: the next start still
/// records both, so neither is sent again. (Seen in CI: a relay killed
/// during its recovery had recorded the newer transaction only; the next
/// one stopped reading the progress topic at that record and sent the
/// older one's 204 rows a second time to read_committed consumers.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovery_cut_short_leaves_nothing_to_send_twice() {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use relay::delivery::{ProgressRecord, ProgressRow};
    use relay::sink::progress::ProgressReader;
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let progress = db.topic("progress");
    let extra = format!("{EXACTLY_ONCE}\nkafka.progress_topic = \"{progress}\"");
    db.migrate(&db.write_config(&extra));
    let config = relay::Config::from_toml_str(&db.config_toml(&extra)).expect("config");
    relay::sink::progress::ensure_topic(&config).await.expect("progress topic");
    let client = db.client().await;
    let ids: Vec<i64> = client
        .query(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, kind, payload)
             SELECT 'entity', 'e-' || g, 'Changed', 'event', '{}'::jsonb FROM generate_series(1, 4) g RETURNING id",
            &[],
        )
        .await
        .expect("insert")
        .iter()
        .map(|r| r.get(0))
        .collect();

    // Two committed transactions, oldest first, as the sink writes them.
    let producer: FutureProducer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", &stack.bootstrap).create().expect("producer");
    let topic = db.topic("entity");
    for (n, pair) in ids.chunks(2).enumerate() {
        let rows = pair
            .iter()
            .enumerate()
            .map(|(i, &id)| ProgressRow { id, topic: topic.clone(), partition: 0, offset: (n * 2 + i) as i64 })
            .collect();
        let record = ProgressRecord { transactional_id: config.transactional_id(), rows };
        // The record exactly as the sink writes it inside a transaction.
        let outbound = record.outbound(&progress).expect("progress record");
        let payload = outbound.payload.expect("a progress record has a payload");
        producer
            .send(
                FutureRecord::to(&progress).key(outbound.key.as_ref()).payload(payload.as_ref()),
                Duration::from_secs(30),
            )
            .await
            .expect("progress record delivered");
    }

    let cut_short = CutShort { client: db.client().await, allowed: 1.into() };
    let mut progress_reader = ProgressReader::open(&config).await.expect("progress reader");
    let first = relay::checkpoint::progress::recover(&config, &cut_short, &client, &mut progress_reader).await;
    assert!(first.is_err(), "the first recovery stops after one record: {first:?}");
    let whole = CutShort { client: db.client().await, allowed: usize::MAX.into() };
    let mut progress_reader = ProgressReader::open(&config).await.expect("progress reader");
    relay::checkpoint::progress::recover(&config, &whole, &client, &mut progress_reader)
        .await
        .expect("the next recovery");

    for (i, id) in ids.iter().enumerate() {
        let row = client
            .query_one("SELECT published_at IS NOT NULL, kafka_offset FROM outbox WHERE id = $1", &[id])
            .await
            .expect("row");
        let (published, offset): (bool, Option<i64>) = (row.get(0), row.get(1));
        assert!(published, "row {id} is recorded as published, so no start sends it again");
        assert_eq!(offset, Some(i as i64), "row {id} recorded where its transaction put it");
    }
    db.cleanup().await;
}
