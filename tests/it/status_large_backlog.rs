//! `relay status` (and the lag gauges, sampled from the same query) on a
//! backlog larger than `PENDING_COUNT_LIMIT`: pending rows are counted one
//! by one up to 10,000 and estimated above it from the span of their ids,
//! so a sample reads a bounded number of rows however large the backlog. Both publish-state layouts, against the real stack, on a
//! table autovacuum has not analyzed yet (right after a bulk insert), where
//! the planner would otherwise choose to scan the whole outbox.

use crate::common::*;

/// Sequential scans of the outbox so far, once every other session of the
/// database has ended (a backend reports its counts when it exits).
async fn outbox_seq_scans(client: &tokio_postgres::Client) -> i64 {
    wait_other_sessions_ended(client, "the other sessions to end", std::time::Duration::from_secs(30)).await;
    client.batch_execute("SELECT pg_stat_clear_snapshot()").await.expect("fresh statistics");
    client
        .query_one("SELECT seq_scan FROM pg_stat_user_tables WHERE relname = 'outbox'", &[])
        .await
        .expect("outbox statistics")
        .get(0)
}

async fn fill(client: &tokio_postgres::Client, rows: i64) {
    client
        .execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, kind, entity_version, payload) \
             SELECT 'order', 'e-' || g, 'Changed', 'event', 1, jsonb_build_object('n', g) \
             FROM generate_series(1, $1::bigint) g",
            &[&rows],
        )
        .await
        .expect("fill the outbox");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_rows_are_counted_up_to_the_limit_and_estimated_from_ids_above_it() {
    let stack = Stack::from_env();
    for layout in ["", "checkpoint.publish_state = \"side_table\""] {
        let db = TestDb::new(&stack).await;
        let config = db.write_config(layout);
        db.migrate(&config);
        let client = db.client().await;
        // No ANALYZE of the outbox during the test.
        client.batch_execute("ALTER TABLE outbox SET (autovacuum_enabled = false)").await.expect("autovacuum off");
        fill(&client, 10_000).await;
        let scans = outbox_seq_scans(&client).await;
        let status = status_json(&config);
        assert_eq!((status["pending"].as_i64(), status["pending_estimated"].as_bool()), (Some(10_000), Some(false)));
        assert!(status["oldest_pending_age_seconds"].as_f64().is_some(), "{status}");

        // 3,000 ids that never reach the table (rolled back, or a sequence's
        // cache), then 2,000 rows: 12,000 pending, over the limit; the
        // estimate is the span of their ids, gaps included.
        client.query_one("SELECT setval('outbox_id_seq', nextval('outbox_id_seq') + 2999)", &[]).await.expect("gap");
        fill(&client, 2_000).await;
        let status = status_json(&config);
        assert_eq!(
            (status["pending"].as_i64(), status["pending_estimated"].as_bool()),
            (Some(15_000), Some(true)),
            "{layout}: {status}"
        );
        assert!(status["oldest_pending_age_seconds"].as_f64().is_some(), "{status}");
        let text = relay_command(&config).arg("status").output().expect("relay status");
        let text = String::from_utf8_lossy(&text.stdout);
        assert!(text.contains("about 15000 (over 10000: estimated from their ids)"), "{text}");
        assert_eq!(outbox_seq_scans(&client).await, scans, "{layout}: relay status scanned the whole outbox");
        db.cleanup().await;
    }
}
