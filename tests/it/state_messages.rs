//! State messages: rows of `kind = 'state'` go to their own compacted topic,
//! a NULL payload is a tombstone (a null value, read as such by Confluent's
//! Python client), a topic of the wrong kind holds its rows until an operator
//! fixes it, and `relay check` names such topics.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;

use crate::common::*;

fn admin(stack: &Stack) -> AdminClient<DefaultClientContext> {
    ClientConfig::new().set("bootstrap.servers", &stack.bootstrap).create().expect("admin client")
}

/// The `cleanup.policy` of `topic`.
async fn cleanup_policy(stack: &Stack, topic: &str) -> String {
    let results = admin(stack)
        .describe_configs([&ResourceSpecifier::Topic(topic)], &AdminOptions::new())
        .await
        .expect("describe configs");
    let resource = results.into_iter().next().expect("one result").expect("described");
    resource.get("cleanup.policy").and_then(|e| e.value.clone()).expect("cleanup.policy")
}

async fn create_policy_topic(stack: &Stack, topic: &str, policy: &str) {
    create_topic(&stack.bootstrap, topic, 3, &[("cleanup.policy", policy)]).await;
}

async fn set_cleanup_policy(stack: &Stack, topic: &str, policy: &str) {
    let change = AlterConfig::new(ResourceSpecifier::Topic(topic)).set("cleanup.policy", policy);
    for result in admin(stack).alter_configs([&change], &AdminOptions::new()).await.expect("alter configs") {
        result.expect("topic config altered");
    }
}

/// Every record of `topic` up to its end offsets, read by Confluent's
/// Python client (`tests/interop/consume_to_end.py`), in offset order per
/// partition.
fn python_read(stack: &Stack, topic: &str) -> Vec<serde_json::Value> {
    let mut records: Vec<serde_json::Value> = python_consume_to_end(stack, "read_committed", topic);
    records.sort_by_key(|r| (r["partition"].as_i64(), r["offset"].as_i64()));
    records
}

#[tokio::test(flavor = "multi_thread")]
async fn state_rows_go_to_a_compacted_topic_and_a_tombstone_is_a_null_value() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let config = db.write_config("");
    db.migrate(&config);
    let client = db.client().await;
    // Only state rows may lack a payload (migration 0007's CHECK).
    let refused = client
        .execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, kind, payload) VALUES ('order', 'o-1', 'Lost', 'event', NULL)",
            &[],
        )
        .await
        .expect_err("an event without a payload is refused");
    assert!(
        refused.to_string().contains("outbox_payload_or_tombstone")
            || format!("{refused:?}").contains("outbox_payload_or_tombstone"),
        "{refused:?}"
    );

    let mut relay = RelayProcess::start(&config);
    insert_row(&client, "order", "o-1", 1).await;
    insert_state(&client, "order", "o-1", 1, Some(serde_json::json!({"status": "placed"}))).await;
    insert_state(&client, "order", "o-2", 1, Some(serde_json::json!({"status": "placed"}))).await;
    insert_state(&client, "order", "o-1", 2, Some(serde_json::json!({"status": "paid"}))).await;
    let tombstone = insert_state(&client, "order", "o-1", 3, None).await;
    insert_row(&client, "order", "o-1", 2).await;
    wait_all_published(&client, Duration::from_secs(60)).await;

    assert_eq!(cleanup_policy(&stack, &db.state_topic("order")).await, "compact");
    assert_eq!(cleanup_policy(&stack, &db.topic("order")).await, "delete");

    let events = python_read(&stack, &db.topic("order"));
    assert_eq!(events.len(), 2, "only the event rows on the event topic: {events:?}");
    let states = python_read(&stack, &db.state_topic("order"));
    let of = |key: &str| states.iter().filter(|r| r["key"] == key).collect::<Vec<_>>();
    let o1 = of("o-1");
    assert_eq!(o1.len(), 3, "{states:?}");
    assert!(o1.iter().all(|r| r["partition"] == o1[0]["partition"]), "one partition per key: {o1:?}");
    assert_eq!(o1[0]["value"], r#"{"status": "placed"}"#);
    assert_eq!(o1[1]["value"], r#"{"status": "paid"}"#);
    assert_eq!(o1[2]["value_is_none"], true, "the tombstone is a null value, last: {o1:?}");
    assert_eq!(of("o-2").len(), 1);
    assert_eq!(of("o-2")[0]["value_is_none"], false);
    // Its publish state is recorded like any row's, at the offset read.
    let row = client
        .query_one("SELECT kafka_partition, kafka_offset FROM outbox WHERE id = $1", &[&tombstone])
        .await
        .expect("tombstone row");
    assert_eq!(i64::from(row.get::<_, i32>(0)), o1[2]["partition"].as_i64().expect("partition"));
    assert_eq!(row.get::<_, i64>(1), o1[2]["offset"].as_i64().expect("offset"));

    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0), "{}", relay.log_text());
    db.cleanup().await;
}

/// The config cannot see a topic made by hand: a state row bound for a
/// topic that is not compacted is held, with the topic's policy and the fix
/// in its error, its entity's later rows wait, and after the operator
/// compacts the topic `relay held retry` publishes them in order.
#[tokio::test(flavor = "multi_thread")]
async fn a_state_row_bound_for_a_topic_that_is_not_compacted_is_held_until_the_topic_is_fixed() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let by_hand = format!("{}.profiles-by-hand", db.topic("x"));
    create_policy_topic(&stack, &by_hand, "delete").await;
    let config = db.write_config(&format!("routing.state_topics.profile = \"{by_hand}\""));
    db.migrate(&config);
    let client = db.client().await;
    let mut relay = RelayProcess::start(&config);
    let first = insert_state(&client, "profile", "p-1", 1, Some(serde_json::json!({"v": 1}))).await;
    let second = insert_state(&client, "profile", "p-1", 2, Some(serde_json::json!({"v": 2}))).await;
    insert_row(&client, "order", "o-1", 1).await;
    let error: String = wait_for("the state row to be held", Duration::from_secs(60), || async {
        let row = client.query_one("SELECT last_error FROM outbox WHERE id = $1", &[&first]).await.ok()?;
        row.get::<_, Option<String>>(0)
    })
    .await;
    assert!(error.contains("is not compacted") && error.contains(&by_hand), "{error}");
    assert!(error.contains("routing.state_topics.profile") && error.contains("cleanup.policy=compact"), "{error}");
    // Other entities flow; nothing of p-1 went out.
    consume(&stack.bootstrap, &[&db.topic("order")], 1, Duration::from_secs(60));
    let pending: i64 = client
        .query_one("SELECT count(*) FROM outbox WHERE id IN ($1, $2) AND published_at IS NULL", &[&first, &second])
        .await
        .expect("count")
        .get(0);
    assert_eq!(pending, 2);

    set_cleanup_policy(&stack, &by_hand, "compact").await;
    let output = relay_command(&config).args(["held", "retry", &first.to_string()]).output().expect("held retry");
    assert!(output.status.success(), "held retry: {}", String::from_utf8_lossy(&output.stderr));
    wait_all_published(&client, Duration::from_secs(60)).await;
    let records = python_read(&stack, &by_hand);
    let values: Vec<&str> = records.iter().map(|r| r["value"].as_str().expect("value")).collect();
    assert_eq!(values, vec![r#"{"v": 1}"#, r#"{"v": 2}"#]);

    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0), "{}", relay.log_text());
    db.cleanup().await;
}

/// `relay check` names an event topic that is compacted and a state topic
/// that is not, each with its fix, and fails.
#[tokio::test(flavor = "multi_thread")]
async fn check_names_topics_whose_cleanup_policy_does_not_fit_their_kind() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let config: PathBuf = db.write_config("");
    db.migrate(&config);
    let output = relay_command(&config).arg("check").output().expect("relay check");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "a fresh setup passes: {text}");

    create_policy_topic(&stack, &db.topic("audit"), "compact").await;
    create_policy_topic(&stack, &db.state_topic("customer"), "delete").await;
    let output = relay_command(&config).arg("check").output().expect("relay check");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(!output.status.success(), "{text}");
    let lines: HashMap<&str, &str> = [("audit", "event topic"), ("customer", "state topic")].into_iter().collect();
    for (aggregate_type, kind) in lines {
        assert!(
            text.lines().any(|l| l.contains(kind) && l.contains(&format!("aggregate type `{aggregate_type}`"))),
            "{kind} of {aggregate_type} named: {text}"
        );
    }
    assert!(
        text.contains("set its cleanup.policy=delete") && text.contains("set its cleanup.policy=compact"),
        "{text}"
    );
    db.cleanup().await;
}

/// Poll mode and the catch-up phase cut their batches by the payloads'
/// stored size in SQL: a tombstone counts 0 bytes. (Counted as NULL, a run
/// of tombstones at the head of a batch left all but the first out of it.)
#[tokio::test(flavor = "multi_thread")]
async fn the_poll_query_takes_a_run_of_tombstones_in_one_batch() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let path = db.write_config("source.mode = \"poll\"");
    db.migrate(&path);
    let client = db.client().await;
    for id in ["a", "b", "c"] {
        insert_state(&client, "order", id, 2, None).await;
    }
    insert_state(&client, "order", "d", 1, Some(serde_json::json!({"v": 1}))).await;
    let config =
        relay::config::Config::from_toml_str(&std::fs::read_to_string(&path).expect("config")).expect("config parses");
    let store = relay::store::Store::new(&config);
    let layout = store.table_layout(&client).await.expect("table layout");
    let sql = relay::store::RowQuery::poll(store.sql(), &layout.columns);
    let none: Vec<i64> = Vec::new();
    let rows = client.query(&sql, &[&1000i64, &1_048_576i64, &none, &none]).await.expect("poll query");
    assert_eq!(rows.len(), 4, "every pending row fits one batch, tombstones included");
    db.cleanup().await;
}
