//! Crashes and outages against the real stack: kill -9 of the relay, a
//! stopped broker, a restarted Postgres. These stop shared services, so they
//! run one at a time (cargo runs test binaries one after another, and a lock
//! serializes the tests of this binary).

use std::time::Duration;

use crate::common::*;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_dash_nine_repeatedly_loses_nothing_and_keeps_per_key_order() {
    let _serial = SERIAL.lock().await;
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let config = db.write_config("");
    db.migrate(&config);
    let client = db.client().await;

    // A steady 500 rows/s, as a service writes: the in-flight window (rows
    // Kafka acknowledged but not yet recorded) is then a few dozen rows.
    const TOTAL: usize = 20_000;
    const RATE: f64 = 500.0;
    let workload = spawn_paced_workload(&db.url, TOTAL, 50, 4, Some(RATE));
    let mut relay = RelayProcess::start(&config);
    let mut kills = 0;
    // Kill whenever the relay has made some progress, while the stream goes on.
    while kills < 6 {
        let before: i64 = client
            .query_one("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL", &[])
            .await
            .expect("count")
            .get(0);
        // Kill in the steady state: after progress, and once the relay has
        // caught up with the backlog that built up while the previous one was
        // dead and its lease ran out (draining a backlog at full speed, the
        // in-flight window is up to checkpoint.max_in_flight: see
        // tests/it/slow/large_transaction.rs).
        wait_for("the relay to publish more rows and catch up", Duration::from_secs(60), || async {
            let row = client
                .query_one(
                    "SELECT count(*) FILTER (WHERE published_at IS NOT NULL), count(*) FILTER (WHERE published_at IS NULL) FROM outbox",
                    &[],
                )
                .await
                .ok()?;
            let (now, pending): (i64, i64) = (row.get(0), row.get(1));
            ((now >= before + 500 && pending <= 50) || now == TOTAL as i64).then_some(())
        })
        .await;
        relay.kill9();
        kills += 1;
        relay = RelayProcess::start(&config);
    }
    workload.await.expect("workload");
    let total = wait_all_published(&client, Duration::from_secs(180)).await;
    assert_eq!(total, TOTAL as i64);
    // Read to the end offsets: every duplicate is counted.
    let records = consume(&stack.bootstrap, &[&db.topic("entity")], TOTAL, Duration::from_secs(120));
    assert_all_present(&client, &records).await;
    assert_per_key_order(&records);
    // Rows recorded as published are never sent again after a restart, so
    // a kill repeats only its in-flight window: at 500 rows/s and a 50 ms
    // flush interval a few dozen rows; 100 is 0.2 s of traffic. Without the
    // publish-state check on resume, a kill would repeat every row since
    // the slot's last reported position, far more than that.
    let duplicates = records.len() - TOTAL;
    let per_kill = duplicates as f64 / f64::from(kills);
    eprintln!("kill -9 x{kills} at {RATE} rows/s: {duplicates} duplicates, {per_kill:.1} per kill");
    assert!(per_kill <= 100.0, "{duplicates} duplicates after {kills} kills: {per_kill:.1} per kill");
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0), "{}", relay.log_text());
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_recovers_by_itself_and_check_names_kafka() {
    let _serial = SERIAL.lock().await;
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let config = db.write_config("");
    db.migrate(&config);
    let client = db.client().await;
    let mut relay = RelayProcess::start(&config);

    let first = spawn_workload(&db.url, 1_000, 20, 2);
    first.await.expect("first workload");
    wait_all_published(&client, Duration::from_secs(60)).await;

    {
        stack.script(&["stop", "kafka"]);
        let _restart = Restart { stack: &stack, component: "kafka" };
        // Writes go on while the broker is away.
        spawn_workload(&db.url, 1_000, 20, 2).await.expect("second workload");
        let output = relay_command(&config).arg("check").output().expect("relay check");
        assert!(!output.status.success(), "check must fail while Kafka is down");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let kafka_line = stdout.lines().find(|l| l.starts_with("kafka")).expect("a kafka line");
        assert!(kafka_line.contains("FAIL") && kafka_line.contains("unreachable"), "{kafka_line}");
        assert!(stdout.lines().any(|l| l.starts_with("postgres") && l.contains("ok")), "{stdout}");
        // The lag shows in /metrics and keeps rising while the broker is away.
        let first = wait_for("lag to show in /metrics", Duration::from_secs(20), || async {
            let age = relay.metric("outbox_relay_oldest_unpublished_age_seconds").await?;
            let rows = relay.metric("outbox_relay_unpublished_rows").await?;
            (age > 0.0 && rows > 0.0).then_some(age)
        })
        .await;
        wait_for("lag to rise", Duration::from_secs(20), || async {
            let age = relay.metric("outbox_relay_oldest_unpublished_age_seconds").await?;
            (age > first + 2.0).then_some(())
        })
        .await;
        let progress = reqwest::get(format!("{}/readyz", relay.http_base().await)).await.expect("readyz");
        assert!(progress.status().is_success(), "lenient readiness stays ready through a Kafka outage");
        // The outage lasts 20 s in all.
        tokio::time::sleep(Duration::from_secs(12)).await;
        let pending: i64 = client
            .query_one("SELECT count(*) FROM outbox WHERE published_at IS NULL", &[])
            .await
            .expect("count")
            .get(0);
        assert!(pending > 0, "rows written during the outage cannot be published yet");
    }
    wait_all_published(&client, Duration::from_secs(120)).await;
    wait_for("lag to drain to zero in /metrics", Duration::from_secs(30), || async {
        let rows = relay.metric("outbox_relay_unpublished_rows").await?;
        let age = relay.metric("outbox_relay_oldest_unpublished_age_seconds").await?;
        (rows == 0.0 && age == 0.0).then_some(())
    })
    .await;
    let records = consume(&stack.bootstrap, &[&db.topic("entity")], 2_000, Duration::from_secs(120));
    assert_all_present(&client, &records).await;
    assert_per_key_order(&records);
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0), "{}", relay.log_text());
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_reconnects_and_resumes_from_the_slot() {
    let _serial = SERIAL.lock().await;
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let config = db.write_config("");
    db.migrate(&config);
    let mut relay = RelayProcess::start(&config);

    spawn_workload(&db.url, 3_000, 20, 4).await.expect("first workload");
    {
        // Restart while the relay is still working through the backlog.
        stack.script(&["stop", "postgres"]);
        let _restart = Restart { stack: &stack, component: "postgres" };
    }
    spawn_workload(&db.url, 1_000, 20, 2).await.expect("second workload");
    let client = db.client().await;
    let total = wait_all_published(&client, Duration::from_secs(180)).await;
    assert_eq!(total, 4_000);
    let records = consume(&stack.bootstrap, &[&db.topic("entity")], 4_000, Duration::from_secs(120));
    assert_all_present(&client, &records).await;
    assert_per_key_order(&records);
    assert!(
        relay.log_text().contains("restarting from the last confirmed commit boundary"),
        "the relay noticed the restart"
    );
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0), "{}", relay.log_text());
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_down_at_start_is_retried_and_once_ids_are_cached_an_outage_does_not_stop_publishing() {
    let _serial = SERIAL.lock().await;
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let config = db.write_config(&format!(
        "codec.format = \"avro\"\ncodec.schemas_dir = \"{}\"\ncodec.state_schemas.profile = \"profile/CustomerProfile.avsc\"",
        stack.repo.join("schemas").display()
    ));
    db.migrate(&config);
    let client = db.client().await;
    let profile = |version: i64| {
        serde_json::json!({"customer_id": "cus-1", "version": version, "name": "Ada", "email": "ada@example.com",
            "tier": "GOLD", "addresses": [], "preferences": {}, "updated_at": "2026-11-23T16:40:00Z"})
    };
    let insert = |version: i64| {
        let client = &client;
        let payload = profile(version);
        async move {
            client
                .execute(
                    "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, kind, entity_version, payload)
                     VALUES ('profile', 'cus-1', 'ProfileChanged', 'state', $1, $2)",
                    &[&version, &payload],
                )
                .await
                .expect("insert");
        }
    };

    // 1. The registry is down when the relay starts: it retries and says so.
    let mut relay;
    {
        stack.script(&["stop", "registry"]);
        let _restart = Restart { stack: &stack, component: "registry" };
        relay = RelayProcess::start(&config);
        insert(1).await;
        wait_for("the relay to report the registry", Duration::from_secs(60), || async {
            let restarts = relay.metric("outbox_relay_pipeline_restarts_total{component=\"registry\"}").await?;
            (restarts >= 1.0 && relay.log_text().contains("schema registry unreachable")).then_some(())
        })
        .await;
    }
    // The registry is back (in-memory: empty); once the schema is
    // registered the relay resolves its id and publishes.
    let output = relay_command(&config).args(["schemas", "register"]).output().expect("register");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stdout));
    wait_all_published(&client, Duration::from_secs(90)).await;

    // 2. Ids are cached: a registry outage now does not stop publishing.
    {
        stack.script(&["stop", "registry"]);
        let _restart = Restart { stack: &stack, component: "registry" };
        insert(2).await;
        insert(3).await;
        wait_all_published(&client, Duration::from_secs(60)).await;
    }
    let records = consume(&stack.bootstrap, &[&db.state_topic("profile")], 3, Duration::from_secs(30));
    assert_eq!(records.iter().filter(|r| r.payload.first() == Some(&0)).count(), records.len(), "Avro wire format");
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0), "{}", relay.log_text());
    db.cleanup().await;
}

/// Resets `synchronous_standby_names` even if the test fails half-way.
struct NoSyncStandby<'a>(&'a Stack);

impl Drop for NoSyncStandby<'_> {
    fn drop(&mut self) {
        let _ = std::process::Command::new("psql")
            .arg(&self.0.postgres_url)
            .args(["-qAtc", "ALTER SYSTEM RESET synchronous_standby_names", "-c", "SELECT pg_reload_conf()"])
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_not_visible_yet_is_waited_for_never_confirmed_past() {
    let _serial = SERIAL.lock().await;
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let config = db.write_config("");
    db.migrate(&config);
    let client = db.client().await;
    // Only the test's writer waits for the standby: the relay's own writes
    // (lease renewals, publish state) commit locally, as they would where
    // just the application's transactions are synchronous.
    let admin = connect(&stack.postgres_url).await;
    admin
        .batch_execute(&format!("ALTER DATABASE {} SET synchronous_commit = local", db.name))
        .await
        .expect("relay sessions commit locally");
    let mut relay = RelayProcess::start(&config);
    insert_row(&client, "order", "before", 1).await;
    wait_all_published(&client, Duration::from_secs(60)).await;

    // Before any commit may wait: the table the probes below write to.
    client.batch_execute("CREATE TABLE sync_probe (n int)").await.expect("probe table");
    // A synchronous standby that does not exist: a commit is written to the
    // WAL (and decoded) but stays invisible until the standby confirms it.
    let guard = NoSyncStandby(&stack);
    // One statement per call: ALTER SYSTEM cannot run in a transaction block.
    admin
        .batch_execute("ALTER SYSTEM SET synchronous_standby_names = 'absent_standby'")
        .await
        .expect("require a synchronous standby");
    admin.batch_execute("SELECT pg_reload_conf()").await.expect("reload");
    // The reload reaches the server processes asynchronously: wait until a
    // probe commit (on a table of its own) really waits for the standby.
    wait_for("commits to wait for the absent standby", Duration::from_secs(30), || async {
        let url = db.url.clone();
        // Each probe commits once the standby is no longer required.
        tokio::spawn(async move {
            let probe = connect(&url).await;
            let _ = probe.batch_execute("SET synchronous_commit = on; INSERT INTO sync_probe VALUES (1)").await;
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let waiting: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep' AND query LIKE '%INSERT INTO sync_probe%'",
                &[],
            )
            .await
            .ok()?
            .get(0);
        (waiting > 0).then_some(())
    })
    .await;
    let writer_url = db.url.clone();
    let writer = tokio::spawn(async move {
        let writer = connect(&writer_url).await;
        writer.batch_execute("SET synchronous_commit = on").await.expect("the writer waits for the standby");
        insert_row(&writer, "order", "invisible", 1).await
    });
    let invisible = consume(&stack.bootstrap, &[&db.topic("order")], 2, Duration::from_secs(60));
    assert!(invisible.iter().any(|r| r.key == "invisible"), "the decoded row was published");
    let after: String = admin.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.expect("lsn").get(0);
    wait_for("the relay to wait for the invisible row", Duration::from_secs(60), || async {
        let rows = relay.metric("outbox_relay_unrecorded_rows").await?;
        (rows >= 1.0).then_some(())
    })
    .await;
    // The relay says so every 10 s: after the second time it has waited
    // well past any short deadline after which it could have given up and
    // confirmed anyway.
    wait_for("the relay to have waited for over 10 s", Duration::from_secs(60), || async {
        (relay.log_text().matches("not visible yet").count() >= 2).then_some(())
    })
    .await;
    let confirmed_past: bool = admin
        .query_one(
            "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
            &[&db.slot, &after],
        )
        .await
        .expect("slot")
        .get(0);
    assert!(!confirmed_past, "the slot was confirmed past a row whose publish state is not recorded");

    drop(guard);
    let id = writer.await.expect("writer commits once the standby is no longer required");
    let total = wait_all_published(&client, Duration::from_secs(60)).await;
    assert_eq!(total, 2, "row {id} recorded once visible");
    wait_slot_confirmed_past(&client, &db.slot, &after, "the slot to move on", Duration::from_secs(30)).await;
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0), "{}", relay.log_text());
    db.cleanup().await;
}
