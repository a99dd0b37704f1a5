//! The test harness itself (tests/it/common): `consume` reads duplicates that
//! come after the distinct messages it waits for, so "no duplicates" can
//! fail; a `TestDb` dropped without `cleanup` (a failing test) leaves no
//! database and no replication slot behind.

use std::time::Duration;

use crate::common::*;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

async fn leftovers(stack: &Stack, name: &str, slot: &str) -> (i64, i64) {
    let admin = connect(&stack.postgres_url).await;
    let row = admin
        .query_one(
            "SELECT (SELECT count(*) FROM pg_database WHERE datname = $1),
                    (SELECT count(*) FROM pg_replication_slots WHERE starts_with(slot_name::text, $2))",
            &[&name, &slot],
        )
        .await
        .expect("look for leftovers");
    (row.get(0), row.get(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_reads_duplicates_that_arrive_after_the_distinct_messages() {
    let stack = Stack::from_env();
    let topic = format!("harness-{}", uuid::Uuid::new_v4().simple());
    create_topic(&stack.bootstrap, &topic, 3, &[]).await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &stack.bootstrap)
        .set("enable.idempotence", "true")
        .create()
        .expect("producer");
    let send = |partition: i32, event_id: &'static str| {
        let (producer, topic) = (&producer, &topic);
        async move {
            let headers = OwnedHeaders::new().insert(Header { key: "event_id", value: Some(event_id.as_bytes()) });
            let record = FutureRecord::to(topic).partition(partition).key("k").payload("{}").headers(headers);
            producer.send(record, Duration::from_secs(30)).await.expect("produce");
        }
    };
    // Partition 0: the three distinct messages, then a copy of the first
    // (read in this order, so a reader that stops at 3 distinct never sees
    // it); partition 1: a copy of another; partition 2: nothing.
    for id in ["e1", "e2", "e3", "e1"] {
        send(0, id).await;
    }
    send(1, "e2").await;
    let records = consume(&stack.bootstrap, &[&topic], 3, Duration::from_secs(60));
    let mut ids: Vec<&str> = records.iter().filter_map(|r| r.headers.get("event_id").map(String::as_str)).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["e1", "e1", "e2", "e2", "e3"], "every copy up to the end offsets");
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", &stack.bootstrap).create().expect("admin");
    let _ = admin.delete_topics(&[&topic], &AdminOptions::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_db_dropped_without_cleanup_leaves_no_database_and_no_slot() {
    let stack = Stack::from_env();
    // A test that fails half-way with its relay still running and holding
    // the slot: the panic drops the relay, then the database.
    let (name, slot) = {
        let db = TestDb::new(&stack).await;
        let (name, slot) = (db.name.clone(), db.slot.clone());
        let config = db.write_config("");
        db.migrate(&config);
        let relay = RelayProcess::start(&config);
        let client = db.client().await;
        insert_row(&client, "order", "o-1", 1).await;
        wait_all_published(&client, Duration::from_secs(60)).await;
        assert_eq!(leftovers(&stack, &name, &slot).await, (1, 1), "the database and its slot exist");
        let failing = tokio::spawn(async move {
            let _relay = relay;
            let _db = db;
            panic!("a test failing half-way");
        });
        assert!(failing.await.is_err());
        (name, slot)
    };
    assert_eq!(leftovers(&stack, &name, &slot).await, (0, 0), "dropped with the failing test");

    // Dropped with a slot held by a session that is still open.
    let db = TestDb::new(&stack).await;
    let (name, slot) = (db.name.clone(), db.slot.clone());
    let config = db.write_config("");
    db.migrate(&config);
    let mut relay = RelayProcess::start(&config);
    wait_for("the relay's slot", Duration::from_secs(60), || async {
        (leftovers(&stack, &name, &slot).await.1 == 1).then_some(())
    })
    .await;
    drop(db);
    assert_eq!(leftovers(&stack, &name, &slot).await, (0, 0), "dropped although the relay held the slot");
    relay.kill9();

    // cleanup, then the drop: nothing left, and nothing fails.
    let db = TestDb::new(&stack).await;
    let (name, slot) = (db.name.clone(), db.slot.clone());
    db.cleanup().await;
    assert_eq!(leftovers(&stack, &name, &slot).await, (0, 0));
}
