//! Slot loss recovery (logical mode) against the real stack: a slot that is
//! invalidated by Postgres (`max_slot_wal_keep_size`), dropped, or dropped
//! by the relay over `source.max_slot_wal_bytes` loses no message. The
//! relay recreates it, catches up through the poll path and streams again.
//!
//! The tests change a cluster-wide setting and generate a lot of WAL, so
//! they run one at a time (`SERIAL`), and must run on a stack no other
//! suite shares while they run.

use std::time::Duration;

use crate::common::*;

/// One test at a time: the WAL one test generates would invalidate the
/// others' slots while `max_slot_wal_keep_size` is small.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Sets `max_slot_wal_keep_size` on the cluster and resets it when dropped,
/// also when the test fails.
struct KeepSizeGuard {
    url: String,
}

impl KeepSizeGuard {
    async fn set(url: &str, value: &str) -> Self {
        let admin = connect(url).await;
        admin
            .execute(&format!("ALTER SYSTEM SET max_slot_wal_keep_size = '{value}'"), &[])
            .await
            .expect("alter system");
        admin.execute("SELECT pg_reload_conf()", &[]).await.expect("reload");
        wait_for("the setting to apply", Duration::from_secs(10), || async {
            let now: String = connect(url).await.query_one("SHOW max_slot_wal_keep_size", &[]).await.ok()?.get(0);
            (now == value).then_some(())
        })
        .await;
        Self { url: url.to_string() }
    }
}

impl Drop for KeepSizeGuard {
    fn drop(&mut self) {
        let url = self.url.clone();
        // Drop cannot await; a thread with its own runtime can.
        let reset = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            runtime.block_on(async {
                let (admin, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("connect");
                tokio::spawn(connection);
                admin.execute("ALTER SYSTEM RESET max_slot_wal_keep_size", &[]).await.expect("alter system reset");
                admin.execute("SELECT pg_reload_conf()", &[]).await.expect("reload");
            });
        });
        let _ = reset.join();
    }
}

/// The slot's `wal_status` and retained WAL, `None` when it is gone.
async fn slot_state(client: &tokio_postgres::Client, slot: &str) -> Option<(Option<String>, Option<i64>)> {
    client
        .query_opt(
            "SELECT wal_status, pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .expect("slot state")
        .map(|r| (r.get(0), r.get(1)))
}

/// Writes about 15 MB of WAL (rows below the TOAST threshold are not
/// compressed), switches the WAL segment and checkpoints, so that segments
/// a slot needs become removable.
async fn generate_wal(client: &tokio_postgres::Client) {
    client.batch_execute("CREATE TABLE IF NOT EXISTS filler (b text)").await.expect("filler table");
    client
        .batch_execute("INSERT INTO filler SELECT repeat(md5(g::text), 45) FROM generate_series(1, 10000) AS g")
        .await
        .expect("filler rows");
    client.batch_execute("TRUNCATE filler").await.expect("truncate filler");
    client.query_one("SELECT pg_switch_wal()", &[]).await.expect("switch wal");
    client.batch_execute("CHECKPOINT").await.expect("checkpoint");
}

/// The value of `outbox_relay_slot_recoveries_total{reason="..."}`.
async fn recoveries(relay: &RelayProcess, reason: &str) -> f64 {
    let body = reqwest::get(format!("{}/metrics", relay.http_base().await))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body");
    let prefix = format!("outbox_relay_slot_recoveries_total{{reason=\"{reason}\"}} ");
    body.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0)
}

/// Publishes `n` rows with a running relay, then stops it: the slot has a
/// confirmed position and the relay is down.
async fn run_then_stop(db: &TestDb, config: &std::path::PathBuf, n: usize) {
    let client = db.client().await;
    let mut relay = RelayProcess::start(config);
    spawn_workload(&db.url, n, 6, 3).await.expect("workload");
    wait_all_published(&client, Duration::from_secs(60)).await;
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0), "{}", relay.log_text());
}

/// Starts the relay and checks that all `total` rows are published, every
/// one reached Kafka, and per-entity order holds; then that streaming works
/// again with `more` new rows. Returns the relay, still running.
async fn recover_and_verify(db: &TestDb, config: &std::path::PathBuf, total: usize, more: usize) -> RelayProcess {
    let client = db.client().await;
    let relay = RelayProcess::start(config);
    assert_eq!(wait_all_published(&client, Duration::from_secs(120)).await, total as i64, "{}", relay.log_text());
    spawn_workload(&db.url, more, 6, 3).await.expect("workload after recovery");
    let all = total + more;
    assert_eq!(wait_all_published(&client, Duration::from_secs(120)).await, all as i64, "{}", relay.log_text());
    let records = consume(&db.stack.bootstrap, &[&db.topic("entity")], all, Duration::from_secs(120));
    assert_all_present(&client, &records).await;
    assert_per_key_order(&records);
    let state = slot_state(&client, &db.slot).await;
    assert!(matches!(state, Some((Some(ref s), _)) if s != "lost"), "a usable slot again: {state:?}");
    relay
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_invalidated_by_max_slot_wal_keep_size_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let stack = Stack::from_env();
    let guard = KeepSizeGuard::set(&stack.postgres_url, "64MB").await;
    let db = TestDb::new(&stack).await;
    let config = db.write_config("");
    db.migrate(&config);
    let client = db.client().await;
    run_then_stop(&db, &config, 300).await;

    // Relay down, traffic goes on, and the slot falls behind by more than
    // max_slot_wal_keep_size: Postgres invalidates it at a checkpoint.
    spawn_workload(&db.url, 400, 6, 3).await.expect("workload while down");
    let started = std::time::Instant::now();
    loop {
        generate_wal(&client).await;
        let state = slot_state(&client, &db.slot).await;
        if matches!(state, Some((Some(ref s), _)) if s == "lost") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(300), "the slot was not invalidated: {state:?}");
    }
    spawn_workload(&db.url, 300, 6, 3).await.expect("workload after the invalidation");

    let mut relay = recover_and_verify(&db, &config, 1_000, 200).await;
    let log = relay.log_text();
    assert!(log.contains("slot recovery") && log.contains("reason=\"invalidated\""), "{log}");
    assert!(log.contains("catch-up phase done"), "{log}");
    assert_eq!(recoveries(&relay, "invalidated").await, 1.0);
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0), "{}", relay.log_text());
    drop(guard);
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_dropped_while_the_relay_is_down_loses_nothing() {
    a_dropped_slot_loses_nothing("").await;
}

/// The same in the side-table layout, with small catch-up batches: each
/// batch of the catch-up starts after the last one there, and none is
/// skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_dropped_while_the_relay_is_down_loses_nothing_in_the_side_table_layout() {
    a_dropped_slot_loses_nothing("checkpoint.publish_state = \"side_table\"\nsource.batch_rows = 50").await;
}

async fn a_dropped_slot_loses_nothing(extra: &str) {
    let _serial = SERIAL.lock().await;
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let config = db.write_config(extra);
    db.migrate(&config);
    let client = db.client().await;
    run_then_stop(&db, &config, 300).await;

    spawn_workload(&db.url, 200, 6, 3).await.expect("workload before the drop");
    client.query_one("SELECT pg_drop_replication_slot($1)", &[&db.slot]).await.expect("drop the slot");
    spawn_workload(&db.url, 300, 6, 3).await.expect("workload after the drop");

    let mut relay = recover_and_verify(&db, &config, 800, 200).await;
    let log = relay.log_text();
    assert!(log.contains("slot recovery") && log.contains("reason=\"missing\""), "{log}");
    assert_eq!(recoveries(&relay, "missing").await, 1.0);
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0), "{}", relay.log_text());

    // A restart after a finished catch-up streams only: no second catch-up.
    let before = client.query_one("SELECT count(*) FROM outbox", &[]).await.expect("count").get::<_, i64>(0);
    let mut relay = RelayProcess::start(&config);
    spawn_workload(&db.url, 60, 6, 3).await.expect("workload");
    assert_eq!(wait_all_published(&client, Duration::from_secs(60)).await, before + 60);
    let log = relay.log_text();
    assert!(!log.contains("catch-up phase"), "{log}");
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0), "{}", relay.log_text());
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_over_the_relays_wal_budget_is_dropped_and_recovered() {
    let _serial = SERIAL.lock().await;
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let budget: i64 = 16 << 20;
    let config = db.write_config(&format!("source.max_slot_wal_bytes = {budget}"));
    db.migrate(&config);
    let client = db.client().await;
    run_then_stop(&db, &config, 200).await;

    // The relay cannot read while it is down: the slot retains WAL past the budget.
    spawn_workload(&db.url, 300, 6, 3).await.expect("workload while down");
    let started = std::time::Instant::now();
    loop {
        generate_wal(&client).await;
        let state = slot_state(&client, &db.slot).await;
        if matches!(state, Some((_, Some(retained))) if retained > 2 * budget) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "WAL did not grow: {state:?}");
    }
    spawn_workload(&db.url, 100, 6, 3).await.expect("more rows");

    let mut relay = recover_and_verify(&db, &config, 600, 100).await;
    let log = relay.log_text();
    assert!(log.contains("max_slot_wal_bytes") && log.contains("reason=\"wal_budget\""), "{log}");
    assert_eq!(recoveries(&relay, "wal_budget").await, 1.0);
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0), "{}", relay.log_text());
    db.cleanup().await;
}

/// The budget holds during the catch-up phase too, when the new slot does
/// not move at all: with the broker down the phase cannot finish, the slot
/// grows past the budget, and the run drops it (not only the next start).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_budget_holds_during_the_catch_up_phase() {
    let _serial = SERIAL.lock().await;
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let budget: i64 = 16 << 20;
    let config = db.write_config(&format!("source.max_slot_wal_bytes = {budget}"));
    db.migrate(&config);
    let client = db.client().await;
    run_then_stop(&db, &config, 200).await;
    // The slot is lost while the relay is down: its next start recreates it
    // and publishes the rows in between through the catch-up phase.
    client.query_one("SELECT pg_drop_replication_slot($1)", &[&db.slot]).await.expect("drop slot");
    spawn_workload(&db.url, 300, 6, 3).await.expect("workload while down");

    let mut relay = {
        stack.script(&["stop", "kafka"]);
        let _restart = Restart { stack: &stack, component: "kafka" };
        let relay = RelayProcess::start(&config);
        wait_for("the catch-up phase to begin", Duration::from_secs(60), || async {
            relay.log_text().contains("catch-up phase due").then_some(())
        })
        .await;
        let started = std::time::Instant::now();
        while !relay.log_text().contains("stopping the stream and dropping the slot") {
            generate_wal(&client).await;
            assert!(
                started.elapsed() < Duration::from_secs(180),
                "the run never enforced the budget: {}",
                relay.log_text()
            );
        }
        let log = relay.log_text();
        assert!(!log.contains("catch-up phase done"), "the phase could not finish without a broker: {log}");
        relay
    };
    // Broker back: the next run recovers the slot again and publishes all.
    assert_eq!(wait_all_published(&client, Duration::from_secs(180)).await, 500, "{}", relay.log_text());
    let records = consume(&stack.bootstrap, &[&db.topic("entity")], 500, Duration::from_secs(60));
    assert_all_present(&client, &records).await;
    assert_per_key_order(&records);
    assert!(recoveries(&relay, "wal_budget").await >= 1.0, "{}", relay.log_text());
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0), "{}", relay.log_text());
    db.cleanup().await;
}
