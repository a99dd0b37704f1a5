//! Memory stays bounded with nothing scraping `/metrics`: the relay's
//! resident memory after 400,000 published rows exceeds the one after the
//! first 40,000 by less than 4 MiB. It guards the recorder's upkeep on a
//! timer: without it, every histogram observation stays in memory until a
//! scrape drains it, a growth per row that this test fails on.
//!
//! A property of memory, not a timing: the test waits on conditions only.
//! The steady-rate soak with RSS over time is `scripts/bench soak`.

use std::time::Duration;

use crate::common::*;

const FIRST: i64 = 40_000;
const TOTAL: i64 = 400_000;
/// Allowed growth of the resident set from FIRST to TOTAL rows, in KiB.
const BOUND_KIB: u64 = 4 * 1024;
/// Concurrent writer sessions.
const WRITERS: i64 = 4;

/// Resident memory of a process now, in KiB (Linux VmRSS).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Writes `rows` outbox rows, each in a transaction of its own, from
/// `WRITERS` sessions at once. The loop runs in Postgres (a procedure that
/// commits after every row), so the writing is not what takes the time.
async fn write_rows(db: &TestDb, rows: i64) {
    let mut writers = Vec::new();
    for _ in 0..WRITERS {
        let client = db.client().await;
        writers.push(tokio::spawn(async move {
            // Two statements, not one string: a CALL in a multi-statement
            // query runs in its implicit transaction and cannot commit.
            client.batch_execute("SET synchronous_commit = off").await.expect("session setting");
            client.batch_execute(&format!("CALL soak_write({})", rows / WRITERS)).await.expect("write rows");
        }));
    }
    for writer in writers {
        writer.await.expect("writer");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_flat_over_400k_rows_when_nothing_scrapes_metrics() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    // Small in-flight bounds: the relay's buffers are full (at their bound)
    // early in both phases, so what grows after is what piles up per row.
    let config = db.write_config("checkpoint.max_in_flight = 2000\nkafka.queue_max_messages = 2000");
    db.migrate(&config);
    let client = db.client().await;
    client
        .batch_execute(
            "CREATE PROCEDURE soak_write(n bigint) LANGUAGE plpgsql AS $$
             BEGIN
               FOR i IN 1..n LOOP
                 INSERT INTO outbox (aggregate_type, aggregate_id, event_type, kind, payload)
                 VALUES ('entity', 'entity-' || (i % 1000), 'Changed', 'event',
                         jsonb_build_object('entity', 'entity-' || (i % 1000), 'seq', i, 'pad', repeat('x', 200)));
                 COMMIT;
               END LOOP;
             END $$",
        )
        .await
        .expect("writer procedure");
    // Nothing in this test reads /metrics: the relay's port is random and
    // only its log names it.
    let mut relay = RelayProcess::start(&config);
    let pid = relay.child.id();

    // Many small transactions, as applications write them.
    let started = std::time::Instant::now();
    write_rows(&db, FIRST).await;
    assert_eq!(wait_all_published(&client, Duration::from_secs(180)).await, FIRST, "{}", relay.log_text());
    let after_first = rss_kib(pid);
    eprintln!("{FIRST} rows published after {:?}: RSS {after_first} KiB", started.elapsed());

    write_rows(&db, TOTAL - FIRST).await;
    assert_eq!(wait_all_published(&client, Duration::from_secs(600)).await, TOTAL, "{}", relay.log_text());
    let after_all = rss_kib(pid);
    eprintln!("{TOTAL} rows published after {:?}: RSS {after_all} KiB", started.elapsed());

    eprintln!(
        "relay RSS with nothing scraping /metrics: {after_first} KiB after {FIRST} rows, {after_all} KiB after {TOTAL} rows ({:+} KiB)",
        after_all as i64 - after_first as i64
    );
    assert!(
        after_all <= after_first + BOUND_KIB,
        "the relay's RSS grew from {after_first} KiB after {FIRST} rows to {after_all} KiB after {TOTAL} rows \
         with nothing scraping /metrics: more than {BOUND_KIB} KiB, memory grows with the rows published"
    );
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0), "{}", relay.log_text());
    db.cleanup().await;
}
