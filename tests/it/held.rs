//! Held rows released by an operator (`relay held list|retry|skip`) while
//! the relay runs: the released rows are published in order, other
//! entities are not affected, skipped rows are settled.

use std::path::PathBuf;
use std::time::Duration;

use crate::common::*;

/// Records above 10 kB are refused by the producer: a permanent error that
/// an operator can fix by shrinking the payload.
const SMALL_MESSAGES: &str = "kafka.librdkafka.\"message.max.bytes\" = \"10000\"";

fn held(config: &PathBuf, args: &[&str]) -> std::process::Output {
    relay_command(config).arg("held").args(args).output().expect("run relay held")
}

fn held_ok(config: &PathBuf, args: &[&str]) -> String {
    let output = held(config, args);
    assert!(output.status.success(), "relay held {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn held_ids(config: &PathBuf) -> Vec<i64> {
    let list: serde_json::Value = serde_json::from_str(&held_ok(config, &["list", "--json"])).expect("held list JSON");
    list.as_array().expect("array").iter().map(|r| r["id"].as_i64().expect("id")).collect()
}

/// Per key, the `seq` of first occurrences in Kafka order.
fn seqs(records: &[Record], key: &str) -> Vec<i64> {
    first_occurrence_order(records).remove(key).unwrap_or_default()
}

/// Entity `bad`: seq 1 published, seq 2 too large (held), seqs 3.. waiting
/// behind it; entity `good`: seqs 1..=3 flow. Returns (held id, waiting ids).
async fn hold_an_entity(db: &TestDb, client: &tokio_postgres::Client, waiting: i64) -> (i64, Vec<i64>) {
    insert_row(client, "order", "bad", 1).await;
    let big = serde_json::json!({ "seq": 2, "blob": "x".repeat(20_000) });
    let held_id: i64 = client
        .query_one(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, kind, payload) VALUES ('order', 'bad', 'Huge', 'event', $1) RETURNING id",
            &[&big],
        )
        .await
        .expect("insert big row")
        .get(0);
    let mut waiting_ids = Vec::new();
    for seq in 3..3 + waiting {
        waiting_ids.push(insert_row(client, "order", "bad", seq).await);
    }
    for seq in 1..=3 {
        insert_row(client, "order", "good", seq).await;
    }
    let records = consume(&db.stack.bootstrap, &[&db.topic("order")], 4, Duration::from_secs(60));
    assert_eq!(seqs(&records, "good"), vec![1, 2, 3]);
    assert_eq!(seqs(&records, "bad"), vec![1]);
    let last = *waiting_ids.last().unwrap_or(&held_id);
    wait_for("the held and waiting rows to be recorded", Duration::from_secs(30), || async {
        let row = client
            .query_one(
                "SELECT count(*) FROM outbox WHERE id BETWEEN $1 AND $2 AND last_error IS NOT NULL",
                &[&held_id, &last],
            )
            .await
            .ok()?;
        (row.get::<_, i64>(0) == 1 + waiting).then_some(())
    })
    .await;
    (held_id, waiting_ids)
}

async fn retry_after_fixing_the_payload(extra: &str) {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let config = db.write_config(extra);
    db.migrate(&config);
    let client = db.client().await;
    let mut relay = RelayProcess::start(&config);
    let (held_id, waiting) = hold_an_entity(&db, &client, 2).await;

    let mut expected = vec![held_id];
    expected.extend(&waiting);
    assert_eq!(held_ids(&config), expected);
    let text = held_ok(&config, &["list"]);
    assert!(text.contains("too large") && text.contains("waiting behind held row"), "{text}");
    // A waiting row cannot jump the queue.
    let refused = held(&config, &["retry", &waiting[0].to_string()]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains(&format!("waits behind held row {held_id}")));

    // The fix, then the release.
    client
        .execute("UPDATE outbox SET payload = '{\"seq\": 2}' WHERE id = $1", &[&held_id])
        .await
        .expect("fix the payload");
    let text = held_ok(&config, &["retry", &held_id.to_string()]);
    assert!(text.contains(&format!("released rows {held_id}, {}, {}", waiting[0], waiting[1])), "{text}");

    let records = consume(&stack.bootstrap, &[&db.topic("order")], 7, Duration::from_secs(60));
    assert_eq!(seqs(&records, "bad"), vec![1, 2, 3, 4], "released rows in order");
    assert_eq!(seqs(&records, "good"), vec![1, 2, 3], "other entities unaffected");
    assert_eq!(records.iter().filter(|r| r.key == "good").count(), 3, "nothing of other entities resent");
    wait_all_published(&client, Duration::from_secs(30)).await;
    assert!(held_ids(&config).is_empty());

    // The entity is not held any more: new rows flow.
    insert_row(&client, "order", "bad", 5).await;
    let records = consume(&stack.bootstrap, &[&db.topic("order")], 8, Duration::from_secs(60));
    assert_eq!(seqs(&records, "bad"), vec![1, 2, 3, 4, 5]);
    let retried: i64 = client
        .query_one("SELECT count(*) FROM outbox WHERE retry_requested_at IS NOT NULL AND published_at IS NOT NULL", &[])
        .await
        .expect("retry record")
        .get(0);
    assert_eq!(retried, 3, "the retry is recorded");
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0), "{}", relay.log_text());
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_publishes_the_fixed_row_and_the_rows_behind_it_in_order() {
    retry_after_fixing_the_payload(SMALL_MESSAGES).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_in_poll_mode() {
    retry_after_fixing_the_payload(&format!("{SMALL_MESSAGES}\nsource.mode = \"poll\"")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_settles_the_row_and_releases_the_rows_behind_it() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let config = db.write_config(SMALL_MESSAGES);
    db.migrate(&config);
    let client = db.client().await;
    let mut relay = RelayProcess::start(&config);
    let (held_id, _) = hold_an_entity(&db, &client, 2).await;

    let refused = held(&config, &["skip", &held_id.to_string(), "--reason", " "]);
    assert!(!refused.status.success(), "a reason is required");
    let text = held_ok(&config, &["skip", &held_id.to_string(), "--reason", "superseded by seq 3"]);
    assert!(text.contains(&format!("skipped row {held_id}")), "{text}");

    let records = consume(&stack.bootstrap, &[&db.topic("order")], 6, Duration::from_secs(60));
    assert_eq!(seqs(&records, "bad"), vec![1, 3, 4], "the rows behind the skipped one, in order");
    assert_eq!(seqs(&records, "good"), vec![1, 2, 3]);
    let row = client
        .query_one("SELECT published_at IS NULL, skip_reason, last_error FROM outbox WHERE id = $1", &[&held_id])
        .await
        .expect("skipped row");
    assert!(row.get::<_, bool>(0), "a skipped row is never published");
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("superseded by seq 3"));
    assert!(row.get::<_, Option<String>>(2).unwrap_or_default().contains("too large"), "why it was held stays");
    assert!(held_ids(&config).is_empty());
    let status = wait_for("relay status to settle", Duration::from_secs(30), || async {
        let status = status_json(&config);
        (status["pending"] == serde_json::json!(0)).then_some(status)
    })
    .await;
    assert_eq!(status["failed"], serde_json::json!(0), "{status}");
    assert_eq!(status["skipped"], serde_json::json!(1), "{status}");
    // A skipped row cannot be retried or skipped again.
    assert!(!held(&config, &["retry", &held_id.to_string()]).status.success());

    // After a restart the entity flows: the skipped row holds nothing.
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0), "{}", relay.log_text());
    let mut relay = RelayProcess::start(&config);
    insert_row(&client, "order", "bad", 5).await;
    let records = consume(&stack.bootstrap, &[&db.topic("order")], 7, Duration::from_secs(60));
    assert_eq!(seqs(&records, "bad"), vec![1, 3, 4, 5]);
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0), "{}", relay.log_text());
    db.cleanup().await;
}
