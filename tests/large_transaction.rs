//! A 100k-row transaction streams through with bounded memory.

mod common;

use std::time::Duration;

use common::*;

/// Peak resident memory of a process, in KiB (Linux VmHWM).
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

async fn insert_one_transaction(client: &tokio_postgres::Client, rows: i64, offset: i64) {
    client
        .execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, kind, entity_version, payload)
             SELECT 'bulk', 'entity-' || (g % 1000), 'Imported', 'state', g,
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
