//! Poll mode (`source.mode = "poll"`) against the real stack: late commits
//! are never skipped, per-entity order holds under the documented rule, an
//! unrelated long transaction blocks nothing, the result equals logical
//! mode's, and kill -9 loses nothing.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use crate::common::*;

const POLL: &str = "source.mode = \"poll\"";

async fn published(client: &tokio_postgres::Client, ids: &[i64]) -> bool {
    let row = client
        .query_one("SELECT count(*) FROM outbox WHERE id = ANY($1) AND published_at IS NOT NULL", &[&ids])
        .await
        .expect("publish state");
    row.get::<_, i64>(0) == ids.len() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_that_commits_late_is_published() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let config = db.write_config(POLL);
    db.migrate(&config);
    let mut relay = RelayProcess::start(&config);

    // A inserts first (lowest id) and commits last; B and C insert and
    // commit in between, and are published while A is still open.
    let mut a = db.client().await;
    let other = db.client().await;
    let ta = a.transaction().await.expect("begin A");
    let id_a: i64 = ta
        .query_one(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, kind, payload)
             VALUES ('order', 'a', 'Changed', 'event', '{\"seq\": 1}') RETURNING id",
            &[],
        )
        .await
        .expect("insert A")
        .get(0);
    let id_b = insert_row(&other, "order", "b", 1).await;
    let id_c = insert_row(&other, "order", "c", 1).await;
    assert!(id_a < id_b && id_b < id_c, "A has the lowest id");
    wait_for("B and C to be published while A is open", Duration::from_secs(60), || async {
        published(&other, &[id_b, id_c]).await.then_some(())
    })
    .await;
    ta.commit().await.expect("commit A");

    assert_eq!(wait_all_published(&other, Duration::from_secs(60)).await, 3);
    let records = consume(&stack.bootstrap, &[&db.topic("order")], 3, Duration::from_secs(60));
    let keys: BTreeSet<&str> = records.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(keys, BTreeSet::from(["a", "b", "c"]));
    assert_all_present(&other, &records).await;
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0), "{}", relay.log_text());
    db.cleanup().await;
}

/// Two batches in flight (the next one read while the previous one is
/// published): a row that commits late, while small batches go out back to
/// back, is still found, every entity keeps its order, and a clean run
/// sends each row once (no poll reads a row of a batch in flight).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_commit_is_found_while_batches_are_pipelined() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let config = db.write_config(&format!("{POLL}\nsource.batch_rows = 20"));
    db.migrate(&config);
    let mut relay = RelayProcess::start(&config);
    let client = db.client().await;
    let mut late = db.client().await;
    let open = late.transaction().await.expect("begin");
    open.execute(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, kind, payload)
         VALUES ('entity', 'late', 'Changed', 'event', '{\"seq\": 1}')",
        &[],
    )
    .await
    .expect("insert the late row");
    spawn_workload(&db.url, 2_000, 10, 4).await.expect("workload");
    wait_for("the others to be published while the late row is open", Duration::from_secs(120), || async {
        let n: i64 =
            client.query_one("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL", &[]).await.ok()?.get(0);
        (n == 2_000).then_some(())
    })
    .await;
    open.commit().await.expect("commit the late row");
    assert_eq!(wait_all_published(&client, Duration::from_secs(60)).await, 2_001);
    let records = consume(&stack.bootstrap, &[&db.topic("entity")], 2_001, Duration::from_secs(60));
    assert_all_present(&client, &records).await;
    assert_per_key_order(&records);
    assert_eq!(records.len(), 2_001, "a clean run sends each row once");
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0), "{}", relay.log_text());
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_writers_keep_per_entity_order() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    // Small batches: many polls race the writers.
    let config = db.write_config(&format!("{POLL}\nsource.batch_rows = 50"));
    db.migrate(&config);
    let mut relay = RelayProcess::start(&config);
    let client = db.client().await;

    spawn_workload(&db.url, 3_000, 10, 8).await.expect("workload");
    assert_eq!(wait_all_published(&client, Duration::from_secs(120)).await, 3_000);
    let records = consume(&stack.bootstrap, &[&db.topic("entity")], 3_000, Duration::from_secs(60));
    assert_all_present(&client, &records).await;
    assert_per_key_order(&records);
    assert_eq!(records.len(), 3_000, "a clean run sends each row once");
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0), "{}", relay.log_text());
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unrelated_open_transaction_skips_nothing_and_blocks_nothing() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let config = db.write_config(POLL);
    db.migrate(&config);
    let mut relay = RelayProcess::start(&config);
    let client = db.client().await;

    // The long transaction takes an id below everything the writers insert.
    let mut long = db.client().await;
    let tx = long.transaction().await.expect("begin long transaction");
    let long_id: i64 = tx
        .query_one(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, kind, payload)
             VALUES ('audit', 'unrelated', 'Changed', 'event', '{\"seq\": 1}') RETURNING id",
            &[],
        )
        .await
        .expect("insert in the long transaction")
        .get(0);
    let workload = spawn_paced_workload(&db.url, 3_000, 10, 4, Some(200.0));
    // The scenario itself: the transaction stays open while the writers
    // keep going and their rows are published.
    wait_for("rows after the open transaction's id to be published", Duration::from_secs(60), || async {
        let row = client
            .query_one("SELECT count(*) FROM outbox WHERE id > $1 AND published_at IS NOT NULL", &[&long_id])
            .await
            .ok()?;
        (row.get::<_, i64>(0) >= 500).then_some(())
    })
    .await;
    let during: i64 = client
        .query_one("SELECT count(*) FROM outbox WHERE id > $1 AND published_at IS NOT NULL", &[&long_id])
        .await
        .expect("published while open")
        .get(0);
    assert!(during >= 500, "rows after the open transaction's id flow meanwhile: {during} published");
    tx.commit().await.expect("commit the long transaction");

    workload.await.expect("workload");
    assert_eq!(wait_all_published(&client, Duration::from_secs(120)).await, 3_001);
    let records = consume(&stack.bootstrap, &[&db.topic("entity"), &db.topic("audit")], 3_001, Duration::from_secs(60));
    assert_all_present(&client, &records).await;
    assert_per_key_order(&records);
    assert!(records.iter().any(|r| r.key == "unrelated"), "the late row is published");
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0), "{}", relay.log_text());
    db.cleanup().await;
}

/// Per key, the `seq` values of the first occurrences, for comparing runs
/// whose event ids differ.
fn per_key(records: &[Record]) -> HashMap<String, Vec<i64>> {
    first_occurrence_order(records)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_and_poll_modes_publish_the_same_messages_in_the_same_per_key_order() {
    let stack = Stack::from_env();
    let logical_db = TestDb::new(&stack).await;
    let poll_db = TestDb::new(&stack).await;
    let logical_config = logical_db.write_config("");
    let poll_config = poll_db.write_config(POLL);
    logical_db.migrate(&logical_config);
    poll_db.migrate(&poll_config);
    let mut logical_relay = RelayProcess::start(&logical_config);
    let mut poll_relay = RelayProcess::start(&poll_config);

    let (a, b) =
        tokio::join!(spawn_workload(&logical_db.url, 1_500, 12, 6), spawn_workload(&poll_db.url, 1_500, 12, 6));
    a.expect("logical workload");
    b.expect("poll workload");
    let logical_client = logical_db.client().await;
    let poll_client = poll_db.client().await;
    assert_eq!(wait_all_published(&logical_client, Duration::from_secs(120)).await, 1_500);
    assert_eq!(wait_all_published(&poll_client, Duration::from_secs(120)).await, 1_500);
    let logical_records = consume(&stack.bootstrap, &[&logical_db.topic("entity")], 1_500, Duration::from_secs(60));
    let poll_records = consume(&stack.bootstrap, &[&poll_db.topic("entity")], 1_500, Duration::from_secs(60));
    assert_all_present(&logical_client, &logical_records).await;
    assert_all_present(&poll_client, &poll_records).await;

    let set = |records: &[Record]| -> BTreeSet<(String, i64)> {
        records.iter().map(|r| (r.key.clone(), r.json()["seq"].as_i64().expect("seq"))).collect()
    };
    assert_eq!(set(&logical_records), set(&poll_records), "the same messages");
    let (logical_order, poll_order) = (per_key(&logical_records), per_key(&poll_records));
    assert_eq!(
        logical_order,
        poll_order,
        "the same per-key order\nlogical relay: {}\npoll relay: {}",
        logical_relay.warnings(),
        poll_relay.warnings()
    );
    assert_per_key_order(&poll_records);
    // Each key in the same partition in both modes (same key, same partitioner).
    let partitions = |records: &[Record]| -> BTreeSet<(String, i32)> {
        records.iter().map(|r| (r.key.clone(), r.partition)).collect()
    };
    assert_eq!(partitions(&logical_records), partitions(&poll_records));

    assert_eq!(logical_relay.terminate(Duration::from_secs(15)), Some(0), "{}", logical_relay.log_text());
    assert_eq!(poll_relay.terminate(Duration::from_secs(15)), Some(0), "{}", poll_relay.log_text());
    logical_db.cleanup().await;
    poll_db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_dash_nine_mid_stream_loses_nothing() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let config = db.write_config(&format!("{POLL}\nsource.batch_rows = 200"));
    db.migrate(&config);
    let client = db.client().await;
    let workload = spawn_paced_workload(&db.url, 4_000, 10, 4, Some(600.0));
    let mut relay = RelayProcess::start(&config);

    for round in 1..=2i64 {
        wait_for("part of the stream to be published", Duration::from_secs(60), || async {
            let row = client.query_one("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL", &[]).await.ok()?;
            (row.get::<_, i64>(0) >= round * 800).then_some(())
        })
        .await;
        relay.kill9();
        relay = RelayProcess::start(&config);
    }

    workload.await.expect("workload");
    assert_eq!(wait_all_published(&client, Duration::from_secs(120)).await, 4_000, "{}", relay.log_text());
    let records = consume(&stack.bootstrap, &[&db.topic("entity")], 4_000, Duration::from_secs(60));
    assert_all_present(&client, &records).await;
    assert_per_key_order(&records);
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0), "{}", relay.log_text());
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_rows_hold_their_entity_in_poll_mode_too() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    // Records above 10 kB are refused by the producer: a permanent error.
    let config = db.write_config(&format!("{POLL}\nkafka.librdkafka.\"message.max.bytes\" = \"10000\""));
    db.migrate(&config);
    let client = db.client().await;
    let mut relay = RelayProcess::start(&config);

    insert_row(&client, "order", "bad", 1).await;
    let big = serde_json::json!({ "seq": 2, "blob": "x".repeat(20_000) });
    let held_id: i64 = client
        .query_one(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, kind, payload) VALUES ('order', 'bad', 'Huge', 'event', $1) RETURNING id",
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
    let seqs = |key: &str| -> Vec<i64> {
        records.iter().filter(|r| r.key == key).map(|r| r.json()["seq"].as_i64().expect("seq")).collect()
    };
    assert_eq!(seqs("good"), vec![1, 2, 3]);
    assert_eq!(seqs("bad"), vec![1], "nothing of the entity after the held row");
    let error_of = |id: i64| {
        let client = &client;
        async move {
            client
                .query_one("SELECT last_error FROM outbox WHERE id = $1 AND published_at IS NULL", &[&id])
                .await
                .ok()
                .and_then(|r| r.get::<_, Option<String>>(0))
        }
    };
    let held = wait_for("the held row's error", Duration::from_secs(30), || error_of(held_id)).await;
    assert!(held.contains("too large"), "{held}");
    let waiting = wait_for("the waiting row's error", Duration::from_secs(30), || error_of(waiting_id)).await;
    assert!(waiting.contains(&format!("held row {held_id}")), "{waiting}");

    // After a restart the entity still waits, and other entities flow.
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0), "{}", relay.log_text());
    let mut relay = RelayProcess::start(&config);
    let later = insert_row(&client, "order", "bad", 4).await;
    insert_row(&client, "order", "good", 4).await;
    consume(&stack.bootstrap, &[&db.topic("order")], 5, Duration::from_secs(60));
    let later_error = wait_for("the later row to be held behind", Duration::from_secs(30), || error_of(later)).await;
    assert!(later_error.contains(&format!("held row {held_id}")), "{later_error}");
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0), "{}", relay.log_text());
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_query_uses_the_partial_index_whatever_the_history() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let config_path = db.write_config(POLL);
    db.migrate(&config_path);
    let client = db.client().await;
    // A long history of published rows and a small backlog.
    client
        .batch_execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, kind, payload, published_at)
             SELECT 'order', 'o-' || (g % 1000), 'Changed', 'event', jsonb_build_object('seq', g), now()
             FROM generate_series(1, 200000) AS g;
             INSERT INTO outbox (aggregate_type, aggregate_id, event_type, kind, payload)
             SELECT 'order', 'o-' || g, 'Changed', 'event', jsonb_build_object('seq', g)
             FROM generate_series(1, 20) AS g;
             ANALYZE outbox;",
        )
        .await
        .expect("history");
    let config = relay::Config::load(&config_path).expect("config");
    // The columns the relay itself would select from this table.
    let store = relay::store::Store::new(&config);
    let table = store.table_layout(&client).await.expect("outbox columns");
    let sql = relay::store::RowQuery::poll(store.sql(), &table.columns);
    let explain = format!(
        "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {}",
        sql.replace("$1", "1000").replace("$2", "1048576").replace("$3", "'{}'").replace("$4", "'{}'")
    );
    let started = Instant::now();
    let plan: serde_json::Value = client.query_one(&explain, &[]).await.expect("explain").get(0);
    let text = plan.to_string();
    assert!(text.contains("outbox_unpublished_idx"), "the poll must walk the partial index: {plan:#}");
    assert!(!text.contains("\"Seq Scan\""), "no sequential scan of the history: {plan:#}");
    let root = &plan[0]["Plan"];
    assert_eq!(root["Actual Rows"], serde_json::json!(20), "{plan:#}");
    eprintln!("poll over 200k published rows: {:?} round trip, plan {plan}", started.elapsed());
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_trigger_exists_only_in_poll_mode() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let client = db.client().await;
    let triggers = || async {
        client
            .query_one("SELECT count(*) FROM pg_trigger WHERE tgname = 'outbox_relay_notify'", &[])
            .await
            .expect("count triggers")
            .get::<_, i64>(0)
    };
    db.migrate(&db.write_config("source.mode = \"poll\""));
    assert_eq!(triggers().await, 1, "poll mode wakes up on NOTIFY");
    db.migrate(&db.write_config(""));
    assert_eq!(triggers().await, 0, "logical-mode writers must not pay NOTIFY's commit lock");
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn very_large_rows_are_read_by_bytes_not_by_batch_rows() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    // 8 MB records (40 of them in the suite; `scripts/bench faults` runs 200
    // of 20 MB in release): the topic and the producer accept them;
    // source.batch_rows is the default (1,000), source.batch_max_bytes the
    // default (1 MiB).
    let env = |name: &str, default: i64| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    let (rows, mb) = (env("RELAY_LARGE_ROWS", 40), env("RELAY_LARGE_ROW_MB", 8));
    let limit = (mb * 1_000_000 * 2).to_string();
    let config =
        db.write_config(&format!("source.mode = \"poll\"\nkafka.librdkafka.\"message.max.bytes\" = \"{limit}\""));
    db.migrate(&config);
    let client = db.client().await;
    // One md5 is 32 characters; the rows are written in one statement each
    // so that Postgres never holds them all at once.
    for g in 1..=rows {
        client
            .execute(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, kind, payload)
                 SELECT 'blob', 'b-' || $1::bigint, 'Stored', 'event', jsonb_build_object('seq', $1::bigint, 'blob',
                     (SELECT string_agg(md5(random()::text || i::text), '') FROM generate_series(1, $2::bigint) AS i))",
                &[&g, &(mb * 1_000_000 / 32)],
            )
            .await
            .expect("insert a large row");
    }
    let name = db.topic("blob");
    create_topic(&stack.bootstrap, &name, 1, &[("max.message.bytes", &limit)]).await;
    let mut relay = RelayProcess::start(&config);
    let total = wait_all_published(&client, Duration::from_secs(1800)).await;
    assert_eq!(total, rows);
    let peak = peak_rss_kib(relay.child.id());
    let figure = format!("poll mode, {rows} rows of {mb} MB: peak RSS {} MiB", peak / 1024);
    eprintln!("{figure}");
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/large-rows-figures.md");
    let _ = std::fs::write(path, format!("- {} {figure}\n", chrono::Utc::now().format("%Y-%m-%d %H:%M")));
    // Reading batch_rows rows at once would hold all of them (twice: text
    // and row; 320 MB for 40 of 8 MB); by bytes, a few rows at a time.
    let bound = 250 * 1024 * (mb / 8).max(1) as u64;
    assert!(peak < bound, "peak RSS {peak} KiB, bound {bound} KiB");
    assert_eq!(relay.terminate(Duration::from_secs(30)), Some(0), "{}", relay.log_text());
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_warns_about_an_id_sequence_with_a_cache() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let config = db.write_config("source.mode = \"poll\"");
    db.migrate(&config);
    let client = db.client().await;
    let check = || {
        let output = relay_command(&config).arg("check").output().expect("relay check");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    assert!(!check().contains("CACHE"), "the default sequence takes ids one by one");
    client.batch_execute("ALTER TABLE outbox ALTER COLUMN id SET CACHE 20").await.expect("cache ids");
    let text = check();
    assert!(text.lines().any(|l| l.contains("WARN") && l.contains("CACHE 20")), "{text}");
    db.cleanup().await;
}
