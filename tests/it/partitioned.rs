//! A range-partitioned outbox (partitioning by time is what large outboxes
//! do) streams under its own name; a publication that does not cover
//! exactly the outbox table stops the relay with the fix, instead of
//! letting commit boundaries move the slot past rows it never saw.

use std::time::{Duration, Instant};

use crate::common::*;

/// The default outbox layout, range-partitioned by `occurred_at`.
const PARTITIONED_OUTBOX: &str = r#"
CREATE TABLE outbox (
    id              bigint GENERATED ALWAYS AS IDENTITY,
    event_id        uuid        NOT NULL DEFAULT gen_random_uuid(),
    aggregate_type  text        NOT NULL,
    aggregate_id    text        NOT NULL,
    event_type      text        NOT NULL,
    kind            text        NOT NULL CHECK (kind IN ('event', 'state', 'command')),
    entity_version  bigint,
    payload         jsonb       NOT NULL,
    headers         jsonb,
    occurred_at     timestamptz NOT NULL DEFAULT now(),
    published_at    timestamptz,
    kafka_topic     text,
    kafka_partition int,
    kafka_offset    bigint,
    attempts        int         NOT NULL DEFAULT 0,
    last_error      text,
    PRIMARY KEY (id, occurred_at)
) PARTITION BY RANGE (occurred_at);
CREATE TABLE outbox_2025 PARTITION OF outbox FOR VALUES FROM (MINVALUE) TO ('2026-01-01');
CREATE TABLE outbox_2026 PARTITION OF outbox FOR VALUES FROM ('2026-01-01') TO (MAXVALUE);
"#;

async fn insert_at(client: &tokio_postgres::Client, entity: &str, seq: i64, occurred_at: &str) {
    client
        .execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, kind, entity_version, payload, occurred_at)
             VALUES ('order', $1, 'Changed', 'event', $2, jsonb_build_object('entity', $1::text, 'seq', $2::bigint), $3::text::timestamptz)",
            &[&entity, &seq, &occurred_at],
        )
        .await
        .expect("insert");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_partitioned_outbox_streams_every_partition() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let client = db.client().await;
    client.batch_execute(PARTITIONED_OUTBOX).await.expect("partitioned outbox");
    let config = db.write_config("");
    db.migrate(&config);
    let mut relay = RelayProcess::start(&config);
    // Rows land in both partitions, in one transaction and in several.
    let tx_rows =
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, kind, entity_version, payload, occurred_at)
        VALUES ('order', 'ord-a', 'Changed', 'event', 1, '{\"entity\": \"ord-a\", \"seq\": 1}', '2025-06-01'),
               ('order', 'ord-a', 'Changed', 'event', 2, '{\"entity\": \"ord-a\", \"seq\": 2}', now())";
    client.batch_execute(tx_rows).await.expect("one transaction over two partitions");
    for seq in 3..=6 {
        let when = if seq % 2 == 0 { "2025-07-01" } else { "2026-11-01" };
        insert_at(&client, "ord-a", seq, when).await;
    }
    insert_at(&client, "ord-b", 1, "2025-01-01").await;
    let total = wait_all_published(&client, Duration::from_secs(60)).await;
    assert_eq!(total, 7);
    let records = consume(&stack.bootstrap, &[&db.topic("order")], 7, Duration::from_secs(60));
    assert_eq!(records.len(), 7, "each row once");
    let order = first_occurrence_order(&records);
    assert_eq!(order["ord-a"], vec![1, 2, 3, 4, 5, 6], "commit order across partitions");
    assert_eq!(order["ord-b"], vec![1]);
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0), "{}", relay.log_text());
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_that_does_not_cover_the_outbox_stops_the_relay_with_the_fix() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let config = db.write_config("");
    db.migrate(&config);
    let client = db.client().await;
    // Someone changed the publication to cover another table instead.
    client
        .batch_execute(&format!(
            "CREATE TABLE audit (id bigint PRIMARY KEY); \
             ALTER PUBLICATION \"{slot}_pub\" SET TABLE audit",
            slot = db.slot
        ))
        .await
        .expect("point the publication elsewhere");
    let mut relay = RelayProcess::start(&config);
    let started = Instant::now();
    let code = loop {
        if let Some(status) = relay.child.try_wait().expect("relay status") {
            break status.code();
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the relay kept running: {}", relay.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let log = relay.log_text();
    assert_eq!(code, Some(1), "{log}");
    let last = log.lines().last().unwrap_or_default();
    assert!(last.starts_with("error: stopped until an operator acts"), "{log}");
    assert!(
        last.contains("covers [public.audit], not exactly the outbox table") && last.contains("publication_name"),
        "{log}"
    );
    db.cleanup().await;
}
