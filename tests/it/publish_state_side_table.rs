//! `checkpoint.publish_state = "side_table"`: publish state in
//! `outbox_relay_published` instead of the outbox row, against the real
//! stack. Recorded per row with Kafka's partition and offset, shown by the
//! view `outbox_publish_state`, used by the restart check (no resend of
//! recorded rows), held rows, `relay status`, retention, and moved both
//! ways by `relay migrate` without publishing anything twice.

use std::collections::HashSet;
use std::time::Duration;

use crate::common::*;

const SIDE_TABLE: &str = "checkpoint.publish_state = \"side_table\"";

/// Every record of `topic` up to its end offsets, with the number of
/// event ids seen more than once.
fn all_records(bootstrap: &str, topic: &str, at_least: usize) -> (Vec<Record>, usize) {
    let records = consume(bootstrap, &[topic], at_least, Duration::from_secs(60));
    let distinct: HashSet<&str> =
        records.iter().filter_map(|r| r.headers.get("event_id").map(String::as_str)).collect();
    let duplicates = records.len() - distinct.len();
    (records, duplicates)
}

async fn side_rows(client: &tokio_postgres::Client) -> i64 {
    client.query_one("SELECT count(*) FROM outbox_relay_published", &[]).await.expect("count side rows").get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_are_recorded_beside_the_outbox_row_with_partition_and_offset() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let config = db.write_config(SIDE_TABLE);
    db.migrate(&config);
    let client = db.client().await;
    for n in 0..60 {
        insert_row(&client, "order", &format!("e-{}", n % 6), n / 6 + 1).await;
    }
    let mut relay = RelayProcess::start(&config);
    assert_eq!(wait_all_published(&client, Duration::from_secs(60)).await, 60, "{}", relay.warnings());
    let (records, duplicates) = all_records(&stack.bootstrap, &db.topic("order"), 60);
    assert_eq!((records.len(), duplicates), (60, 0));
    // Partition, offset and time per row, through the view.
    assert_all_present(&client, &records).await;
    assert_eq!(side_rows(&client).await, 60);
    let written: i64 = client
        .query_one("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL OR kafka_offset IS NOT NULL", &[])
        .await
        .expect("outbox columns")
        .get(0);
    assert_eq!(written, 0, "the outbox row itself is not written");
    let attempts: Vec<i32> = client
        .query("SELECT attempts FROM outbox_publish_state", &[])
        .await
        .expect("attempts")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(attempts.iter().all(|&a| a == 1), "one attempt each: {attempts:?}");

    let status = status_json(&config);
    assert_eq!(status["pending"], 0, "{status}");
    assert!(status["last_published_at"].is_string(), "{status}");
    relay.terminate(Duration::from_secs(20));

    // `relay replay` finds the published rows through the side table.
    let from_id: i64 =
        client.query_one("SELECT id FROM outbox ORDER BY id OFFSET 50 LIMIT 1", &[]).await.expect("an id").get(0);
    let output =
        relay_command(&config).args(["replay", "--from-id", &from_id.to_string()]).output().expect("relay replay");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("replayed 10 rows"), "{stdout}");
    db.cleanup().await;
}

/// Killed half-way through one large transaction (no commit boundary
/// inside it, so the slot streams all of it again): the restart check finds
/// the recorded rows in the side table and sends only the in-flight window
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_half_way_through_a_large_transaction_repeats_only_the_in_flight_window() {
    const ROWS: i64 = 20_000;
    const MAX_IN_FLIGHT: i64 = 2_000;
    const BATCH_ROWS: i64 = 500;
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let config = db.write_config(&format!(
        "{SIDE_TABLE}\ncheckpoint.max_in_flight = {MAX_IN_FLIGHT}\ncheckpoint.batch_rows = {BATCH_ROWS}"
    ));
    db.migrate(&config);
    let client = db.client().await;
    client
        .execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, kind, payload) \
             SELECT 'bulk', 'entity-' || (g % 100), 'Imported', 'event', \
                    jsonb_build_object('entity', 'entity-' || (g % 100), 'seq', g / 100 + 1) \
             FROM generate_series(0, $1::bigint - 1) AS g",
            &[&ROWS],
        )
        .await
        .expect("one large transaction");
    let mut relay = RelayProcess::start(&config);
    wait_for("half of the transaction to be recorded", Duration::from_secs(300), || async {
        (side_rows(&client).await >= ROWS / 2).then_some(())
    })
    .await;
    relay.kill9();
    let relay = RelayProcess::start(&config);
    assert_eq!(wait_all_published(&client, Duration::from_secs(300)).await, ROWS, "{}", relay.warnings());
    let (records, duplicates) = all_records(&stack.bootstrap, &db.topic("bulk"), ROWS as usize);
    let window = (MAX_IN_FLIGHT + BATCH_ROWS + 2) as usize;
    assert!(
        duplicates <= window,
        "{duplicates} rows sent twice, more than the in-flight window ({window}): recorded rows were sent again"
    );
    assert_per_key_order(&records);
    let skipped = relay.metric("outbox_relay_resend_skipped_total").await.unwrap_or(0.0);
    assert!(skipped >= (ROWS / 2) as f64 - window as f64, "restart check skipped only {skipped} rows");
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_rows_status_and_retry_in_the_side_table_layout() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let config = db.write_config(&format!("{SIDE_TABLE}\nkafka.librdkafka.\"message.max.bytes\" = \"10000\""));
    db.migrate(&config);
    let client = db.client().await;
    // A record too large for the producer is held; the entity's next row
    // waits behind it; another entity goes on.
    let big = serde_json::json!({ "seq": 1, "blob": "x".repeat(20_000) });
    let held: i64 = client
        .query_one(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, kind, payload) \
             VALUES ('order', 'e-held', 'Huge', 'event', $1) RETURNING id",
            &[&big],
        )
        .await
        .expect("insert held row")
        .get(0);
    let waiting = insert_row(&client, "order", "e-held", 2).await;
    insert_row(&client, "order", "e-free", 1).await;
    let status = status_json(&config);
    assert_eq!(status["pending"], 3, "pending before the relay ran: {status}");

    let mut relay = RelayProcess::start(&config);
    wait_for("the held and the waiting row", Duration::from_secs(60), || async {
        let status = status_json(&config);
        (status["held_or_waiting"] == 2 && status["waiting"] == 1 && status["pending"] == 0).then_some(())
    })
    .await;
    assert_eq!(side_rows(&client).await, 1, "only the free entity's row is published");

    // Fixed and retried: both go out, in order, and carry no error.
    client.execute("UPDATE outbox SET payload = '{\"seq\": 1}' WHERE id = $1", &[&held]).await.expect("fix payload");
    let output = relay_command(&config).args(["held", "retry", &held.to_string()]).output().expect("relay held retry");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(wait_all_published(&client, Duration::from_secs(60)).await, 3, "{}", relay.warnings());
    let errors: i64 = client
        .query_one(
            "SELECT count(*) FROM outbox_publish_state WHERE last_error IS NOT NULL OR waiting_for IS NOT NULL",
            &[],
        )
        .await
        .expect("errors")
        .get(0);
    assert_eq!(errors, 0, "publishing clears the error of a released row");
    let (records, _) = all_records(&stack.bootstrap, &db.topic("order"), 3);
    let held_entity: Vec<i64> = records.iter().filter(|r| r.key == "e-held").map(|r| r.offset).collect();
    assert_eq!(held_entity.len(), 2, "both rows of the held entity published");
    let offsets: Vec<i64> = client
        .query("SELECT kafka_offset FROM outbox_publish_state WHERE id = ANY($1) ORDER BY id", &[&vec![held, waiting]])
        .await
        .expect("offsets")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(offsets[0] < offsets[1], "the held row goes out before the row that waited behind it: {offsets:?}");
    let status = status_json(&config);
    assert_eq!((status["pending"].clone(), status["held_or_waiting"].clone()), (0.into(), 0.into()), "{status}");
    relay.terminate(Duration::from_secs(20));
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_old_rows_with_their_side_rows() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let config = db.write_config(&format!(
        "{SIDE_TABLE}\nretention.max_age_secs = 3600\nretention.batch_rows = 7\nretention.interval_secs = 1"
    ));
    db.migrate(&config);
    let client = db.client().await;
    for seq in 0..40 {
        insert_row(&client, "kept", &format!("e{}", seq % 4), seq).await;
    }
    let mut relay = RelayProcess::start(&config);
    wait_all_published(&client, Duration::from_secs(60)).await;
    client
        .batch_execute("UPDATE outbox_relay_published SET published_at = now() - interval '2 hours' WHERE id % 2 = 0")
        .await
        .expect("age rows");
    wait_for("old rows to be deleted", Duration::from_secs(30), || async {
        let n: i64 = client.query_one("SELECT count(*) FROM outbox", &[]).await.ok()?.get(0);
        (n == 20).then_some(())
    })
    .await;
    assert_eq!(side_rows(&client).await, 20, "the side rows of deleted rows go too");
    let orphans: i64 = client
        .query_one(
            "SELECT count(*) FROM outbox_relay_published p WHERE NOT EXISTS (SELECT 1 FROM outbox o WHERE o.id = p.id)",
            &[],
        )
        .await
        .expect("orphans")
        .get(0);
    assert_eq!(orphans, 0);
    assert_eq!(relay.metric("outbox_relay_retention_deleted_rows_total").await, Some(20.0));
    relay.terminate(Duration::from_secs(20));
    db.cleanup().await;
}

/// Switching layouts: a relay refuses to start while the publish state is
/// in the other layout (it would take published rows for unpublished
/// ones), and `relay migrate` moves it, both ways, so nothing is sent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_migrate_moves_publish_state_between_layouts_without_resending() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let in_row = db.write_config("");
    let side = db.write_config(SIDE_TABLE);
    db.migrate(&in_row);
    let client = db.client().await;
    let topic = db.topic("order");

    let batch = |from: i64, n: i64| {
        let client = &client;
        async move {
            // Three entities, seq 1.. per entity across batches.
            for k in from..from + n {
                insert_row(client, "order", &format!("e-{}", k % 3), k / 3 + 1).await;
            }
        }
    };
    batch(0, 10).await;
    let mut relay = RelayProcess::start(&in_row);
    assert_eq!(wait_all_published(&client, Duration::from_secs(60)).await, 10);
    relay.terminate(Duration::from_secs(20));

    // Side table configured, not moved yet: the relay stops and says why.
    batch(10, 5).await;
    let mut refused = RelayProcess::start(&side);
    let code = refused.exit_code(Duration::from_secs(60)).await;
    assert_ne!(code, Some(0), "{}", refused.log_text());
    let log = refused.log_text();
    assert!(log.contains("checkpoint.publish_state") && log.contains("relay migrate"), "{log}");
    assert_eq!(all_records(&stack.bootstrap, &topic, 10).0.len(), 10, "nothing sent while refused");

    db.migrate(&side);
    assert_eq!(side_rows(&client).await, 10, "the published rows moved into the side table");
    let mut relay = RelayProcess::start(&side);
    assert_eq!(wait_all_published(&client, Duration::from_secs(60)).await, 15, "{}", relay.warnings());
    relay.terminate(Duration::from_secs(20));
    let (records, duplicates) = all_records(&stack.bootstrap, &topic, 15);
    assert_eq!((records.len(), duplicates), (15, 0));

    // And back.
    batch(15, 5).await;
    let mut refused = RelayProcess::start(&in_row);
    assert_ne!(refused.exit_code(Duration::from_secs(60)).await, Some(0), "{}", refused.log_text());
    db.migrate(&in_row);
    assert_eq!(side_rows(&client).await, 0, "the side table is emptied");
    let unmarked: i64 = client
        .query_one("SELECT count(*) FROM outbox WHERE id <= 15 AND published_at IS NULL", &[])
        .await
        .expect("in-row state")
        .get(0);
    assert_eq!(unmarked, 0, "every published row has its state in the row again");
    let mut relay = RelayProcess::start(&in_row);
    assert_eq!(wait_all_published(&client, Duration::from_secs(60)).await, 20, "{}", relay.warnings());
    relay.terminate(Duration::from_secs(20));
    let (records, duplicates) = all_records(&stack.bootstrap, &topic, 20);
    assert_eq!((records.len(), duplicates), (20, 0));
    assert_per_key_order(&records);
    assert_all_present(&client, &records).await;
    db.cleanup().await;
}
