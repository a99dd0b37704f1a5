//! TLS to Postgres: the stack's server has a certificate signed by its own
//! CA (`RELAY_PG_CA_FILE`). With `sslmode=require` and `postgres.tls_ca_file`
//! every connection of the relay, the replication stream included, is
//! encrypted and verified; a wrong CA is refused.

use std::time::Duration;

use crate::common::*;

fn ca_file() -> String {
    std::env::var("RELAY_PG_CA_FILE").expect("RELAY_PG_CA_FILE (from scripts/stack env)")
}

/// A config for `db` over TLS, verified against `ca`.
fn tls_config(db: &TestDb, ca: Option<&str>) -> std::path::PathBuf {
    let path = db.write_config(&ca.map(|ca| format!("postgres.tls_ca_file = \"{ca}\"")).unwrap_or_default());
    let text = std::fs::read_to_string(&path)
        .expect("config")
        .replace(&format!("postgres.url = \"{}\"", db.url), &format!("postgres.url = \"{}?sslmode=require\"", db.url));
    std::fs::write(&path, text).expect("config");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_is_encrypted_and_verified() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let config = tls_config(&db, Some(&ca_file()));
    db.migrate(&config);
    let client = db.client().await;
    let mut relay = RelayProcess::start(&config);
    for seq in 0..20 {
        insert_row(&client, "secure", &format!("e{}", seq % 3), seq).await;
    }
    wait_all_published(&client, Duration::from_secs(60)).await;
    let sessions = client
        .query(
            "SELECT a.backend_type, coalesce(s.ssl, false) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
             WHERE a.pid <> pg_backend_pid() AND a.datname = current_database()",
            &[],
        )
        .await
        .expect("sessions");
    assert!(sessions.len() >= 3, "the relay's sessions: {}", sessions.len());
    assert!(sessions.iter().any(|r| r.get::<_, String>(0) == "walsender"), "the replication stream is among them");
    for row in &sessions {
        assert!(row.get::<_, bool>(1), "a {} session is not encrypted", row.get::<_, String>(0));
    }
    let records = consume(&stack.bootstrap, &[&db.topic("secure")], 20, Duration::from_secs(30));
    assert_all_present(&client, &records).await;
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0), "{}", relay.log_text());
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_is_refused() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    db.migrate(&db.write_config(""));
    let other = db.dir.path().join("other-ca");
    let status = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=someone else"])
        .arg("-keyout")
        .arg(other.with_extension("key"))
        .arg("-out")
        .arg(other.with_extension("crt"))
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl");
    assert!(status.success());
    let wrong = tls_config(&db, Some(&other.with_extension("crt").display().to_string()));
    let output = relay_command(&wrong).arg("check").output().expect("relay check");
    assert!(!output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().find(|l| l.starts_with("postgres")).expect("a postgres line");
    assert!(line.contains("FAIL"), "{line}");

    // Without a CA file the connection is encrypted but not verified (libpq's `require`).
    let unverified = tls_config(&db, None);
    let output = relay_command(&unverified).arg("check").output().expect("relay check");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().find(|l| l.starts_with("postgres")).expect("a postgres line");
    assert!(line.contains("ok"), "{line}");
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_sslmode_prefer_encrypts_when_the_server_offers_tls() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let config = db.write_config("");
    db.migrate(&config);
    let client = db.client().await;
    let mut relay = RelayProcess::start(&config);
    insert_row(&client, "plain", "e1", 1).await;
    wait_all_published(&client, Duration::from_secs(60)).await;
    let sessions = client
        .query(
            "SELECT a.backend_type, coalesce(s.ssl, false) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
             WHERE a.pid <> pg_backend_pid() AND a.datname = current_database()",
            &[],
        )
        .await
        .expect("sessions");
    assert!(sessions.iter().any(|r| r.get::<_, String>(0) == "walsender"), "the replication stream is among them");
    for row in &sessions {
        assert!(row.get::<_, bool>(1), "a {} session is not encrypted", row.get::<_, String>(0));
    }
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0), "{}", relay.log_text());
    db.cleanup().await;
}
