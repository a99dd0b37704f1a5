//! Retention deletes old published rows in small batches and never held rows.

use std::time::Duration;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_published_rows_are_deleted_and_held_rows_kept() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let config =
        db.write_config("retention.max_age_secs = 3600\nretention.batch_rows = 7\nretention.interval_secs = 1");
    db.migrate(&config);
    let client = db.client().await;
    for seq in 0..40 {
        insert_row(&client, "kept", &format!("e{}", seq % 4), seq).await;
    }
    let mut relay = RelayProcess::start(&config);
    wait_all_published(&client, Duration::from_secs(60)).await;
    // Age half of them past the retention, and fake one held row among the old.
    client
        .batch_execute(
            "UPDATE outbox SET published_at = now() - interval '2 hours' WHERE id % 2 = 0;
             UPDATE outbox SET published_at = NULL, last_error = 'held for the test' WHERE id = 2;",
        )
        .await
        .expect("age rows");
    wait_for("old published rows to be deleted", Duration::from_secs(30), || async {
        let n: i64 = client
            .query_one("SELECT count(*) FROM outbox WHERE published_at < now() - interval '1 hour'", &[])
            .await
            .ok()?
            .get(0);
        (n == 0).then_some(())
    })
    .await;
    let remaining: i64 = client.query_one("SELECT count(*) FROM outbox", &[]).await.expect("count").get(0);
    assert_eq!(remaining, 21, "20 recent rows and the held one remain");
    let held: i64 = client.query_one("SELECT count(*) FROM outbox WHERE id = 2", &[]).await.expect("held").get(0);
    assert_eq!(held, 1, "held rows are never deleted");
    let deleted = relay.metric("outbox_relay_retention_deleted_rows_total").await.expect("retention metric");
    assert_eq!(deleted, 19.0);

    // The delete's row search can use the partial index on published_at
    // (a table this small may be scanned, so sequential scans are discouraged).
    client.batch_execute("SET enable_seqscan = off").await.expect("set");
    let plan: Vec<String> = client
        .query(
            "EXPLAIN SELECT id FROM outbox WHERE published_at IS NOT NULL \
             AND published_at < now() - interval '1 hour' ORDER BY published_at LIMIT 7",
            &[],
        )
        .await
        .expect("explain")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(plan.join("\n").contains("outbox_published_at_idx"), "{}", plan.join("\n"));
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0), "{}", relay.log_text());
    db.cleanup().await;
}
