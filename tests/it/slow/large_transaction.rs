//! A 100k-row transaction streams through with bounded memory.

use std::time::Duration;

use crate::common::*;

async fn insert_one_transaction(client: &tokio_postgres::Client, rows: i64, offset: i64) {
    client
        .execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, kind, entity_version, payload)
             SELECT 'bulk', 'entity-' || (g % 1000), 'Imported', 'event', g,
                    jsonb_build_object('entity', 'entity-' || (g % 1000), 'seq', g, 'pad', repeat('x', 250))
             FROM generate_series($1::bigint, $2::bigint) AS g",
            &[&(offset + 1), &(offset + rows)],
        )
        .await
        .expect("bulk insert in one transaction");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_thousand_rows_in_one_transaction_with_bounded_memory() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    // Small bounds make the bound visible at this size.
    let config =
        db.write_config("checkpoint.max_in_flight = 2000\nkafka.queue_max_messages = 2000\nsource.batch_rows = 500");
    db.migrate(&config);
    let client = db.client().await;
    let mut relay = RelayProcess::start(&config);

    insert_one_transaction(&client, 10_000, 0).await;
    wait_all_published(&client, Duration::from_secs(120)).await;
    let after_small = peak_rss_kib(relay.child.id());

    insert_one_transaction(&client, 100_000, 10_000).await;
    let total = wait_all_published(&client, Duration::from_secs(300)).await;
    assert_eq!(total, 110_000);
    let after_large = peak_rss_kib(relay.child.id());
    eprintln!("peak RSS after 10k-row transaction: {after_small} KiB, after 100k-row transaction: {after_large} KiB");
    // Memory proportional to the transaction would grow about tenfold.
    assert!(
        after_large <= after_small * 3 / 2 + 20 * 1024,
        "peak RSS grew from {after_small} KiB to {after_large} KiB for a 10x larger transaction"
    );
    let records = consume(&stack.bootstrap, &[&db.topic("bulk")], 110_000, Duration::from_secs(180));
    assert_all_present(&client, &records).await;
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0), "{}", relay.log_text());
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_at_ninety_percent_of_a_large_transaction_repeats_only_the_in_flight_window() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    // The in-flight window: rows handed to Kafka and not yet recorded are at
    // most checkpoint.max_in_flight (queued for the checkpoint stage) plus
    // checkpoint.batch_rows (being recorded), plus the one the sink holds
    // and the one the checkpoint stage awaits.
    const MAX_IN_FLIGHT: usize = 5_000;
    const BATCH_ROWS: usize = 1_000;
    let config =
        db.write_config(&format!("checkpoint.max_in_flight = {MAX_IN_FLIGHT}\ncheckpoint.batch_rows = {BATCH_ROWS}"));
    db.migrate(&config);
    let client = db.client().await;
    // The mechanism (skip what is recorded) does not depend on the size;
    // `scripts/bench large-transaction` runs it with 1M rows in release.
    let rows: i64 = std::env::var("RELAY_LARGE_TX_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000);
    insert_one_transaction(&client, rows, 0).await;
    let mut relay = RelayProcess::start(&config);
    wait_for("90% of the transaction to be published", Duration::from_secs(1800), || async {
        // Through the partial index of unpublished rows: cheap as it shrinks.
        let unpublished: i64 =
            client.query_one("SELECT count(*) FROM outbox WHERE published_at IS NULL", &[]).await.ok()?.get(0);
        (unpublished <= rows / 10).then_some(())
    })
    .await;
    relay.kill9();
    // The slot has no commit boundary inside the transaction: it streams the
    // whole transaction again, and the relay must skip what is recorded.
    let mut relay = RelayProcess::start(&config);
    let total = wait_all_published(&client, Duration::from_secs(1800)).await;
    assert_eq!(total, rows);
    let records = consume(&stack.bootstrap, &[&db.topic("bulk")], rows as usize, Duration::from_secs(900));
    let duplicates = records.len() - rows as usize;
    let skipped = relay.metric("outbox_relay_resend_skipped_total").await.unwrap_or(0.0);
    let figure = format!(
        "kill -9 at 90% of a {rows}-row transaction (checkpoint.max_in_flight {MAX_IN_FLIGHT}, batch_rows {BATCH_ROWS}): {duplicates} duplicates (bound {}); {skipped} rows skipped as already published",
        MAX_IN_FLIGHT + BATCH_ROWS + 2
    );
    eprintln!("{figure}");
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/large-transaction-figures.md");
    let _ = std::fs::write(path, format!("- {} {figure}\n", chrono::Utc::now().format("%Y-%m-%d %H:%M")));
    // At most the in-flight window; resending from the transaction's start
    // would be about 90% of the rows.
    assert!(duplicates <= MAX_IN_FLIGHT + BATCH_ROWS + 2, "{duplicates} duplicates");
    assert!(skipped >= (rows * 8 / 10) as f64, "the restart skipped {skipped} published rows");
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0), "{}", relay.log_text());
    db.cleanup().await;
}
