//! Leadership among sidecars against the real stack: three relays on one
//! outbox, steady writes.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;

const RELAYS: usize = 3;

/// A config per relay, each with its own `application_name`, so the test
/// can tell their sessions apart in `pg_stat_activity`.
fn relay_configs(db: &TestDb, extra: &str) -> Vec<PathBuf> {
    (0..RELAYS)
        .map(|n| {
            let toml = db.config_toml(extra).replace(&db.url, &format!("{}?application_name=relay-{n}", db.url));
            let path = db.dir.path().join(format!("relay-{n}.toml"));
            std::fs::write(&path, toml).expect("write config");
            path
        })
        .collect()
}

/// The role a relay reports on `/readyz`.
async fn role(relay: &RelayProcess) -> Option<String> {
    let body: serde_json::Value =
        reqwest::get(format!("{}/readyz", relay.http_base().await)).await.ok()?.json().await.ok()?;
    body["role"].as_str().map(str::to_string)
}

/// Which relays report `active` right now.
async fn actives(relays: &[RelayProcess]) -> Vec<usize> {
    let mut out = Vec::new();
    for (n, relay) in relays.iter().enumerate() {
        if role(relay).await.as_deref() == Some("active") {
            out.push(n);
        }
    }
    out
}

/// The backend pid of the session that holds leadership.
async fn leadership_session(client: &tokio_postgres::Client) -> Option<i32> {
    client
        .query_opt(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) LIMIT 1",
            &[],
        )
        .await
        .ok()
        .flatten()
        .map(|r| r.get(0))
}

async fn published_count(client: &tokio_postgres::Client) -> i64 {
    client.query_one("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL", &[]).await.expect("count").get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ending_the_leadership_session_never_makes_two_actives() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let configs = relay_configs(&db, "source.mode = \"poll\"\nsource.batch_rows = 200");
    db.migrate(&configs[0]);
    let client = db.client().await;
    let relays: Vec<RelayProcess> = configs.iter().map(RelayProcess::start).collect();
    let first = wait_for("one relay to be active", Duration::from_secs(60), || async {
        let a = actives(&relays).await;
        (a.len() == 1).then(|| a[0])
    })
    .await;

    const TOTAL: usize = 6_000;
    let workload = spawn_paced_workload(&db.url, TOTAL, 50, 4, Some(300.0));
    wait_for("some rows published", Duration::from_secs(60), || async {
        (published_count(&client).await > 1_000).then_some(())
    })
    .await;
    let pid = leadership_session(&client).await.expect("a leadership session");
    client.execute("SELECT pg_terminate_backend($1)", &[&pid]).await.expect("terminate");
    let mut most = 0;
    for _ in 0..50 {
        most = most.max(actives(&relays).await.len());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    workload.await.expect("workload");
    wait_all_published(&client, Duration::from_secs(120)).await;
    let records = consume(&stack.bootstrap, &[&db.topic("entity")], TOTAL, Duration::from_secs(120));
    assert_all_present(&client, &records).await;
    assert_per_key_order(&records);
    let duplicates = records.len() - TOTAL;
    eprintln!("first active relay-{first}; most actives at once: {most}; duplicates: {duplicates}");
    assert!(most <= 1, "{most} relays reported active at once");
    assert!(duplicates <= 200, "{duplicates} duplicates");
    db.cleanup().await;
}
