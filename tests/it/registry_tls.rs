//! The schema registry over HTTPS: the stack's registry also serves TLS
//! (`RELAY_REGISTRY_TLS_URL`) with a certificate from the stack's CA
//! (`RELAY_STACK_CA_FILE`). With `registry.tls_ca_file` every client of the
//! registry (the relay's codec, `relay schemas`, `relay check`) trusts that
//! CA; without it the certificate is rejected and `relay check` names the
//! key that fixes it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::*;
use serde_json::{json, Value};

/// The registry's HTTPS API base, e.g. `https://127.0.0.1:58083/apis/ccompat/v7`.
fn tls_url() -> String {
    env_var("RELAY_REGISTRY_TLS_URL")
}

/// An Avro config for `db` whose registry is the HTTPS one, trusting `ca`.
fn https_config(db: &TestDb, ca: Option<&Path>) -> PathBuf {
    let mut extra = format!(
        r#"codec.format = "avro"
codec.schemas_dir = "{}"
codec.schemas."order/OrderPlaced" = "order/OrderPlaced.avsc"
codec.schemas."order/OrderPaid" = "order/OrderPaid.avsc"
codec.schemas."order/OrderShipped" = "order/OrderShipped.avsc"
codec.schemas."profile" = "profile/CustomerProfile.avsc"
"#,
        db.stack.repo.join("schemas").display()
    );
    if let Some(ca) = ca {
        extra += &format!("registry.tls_ca_file = \"{}\"\n", ca.display());
    }
    let path = db.write_config(&extra);
    let text = std::fs::read_to_string(&path)
        .expect("config")
        .replace(&format!("registry.url = \"{}\"", db.stack.registry), &format!("registry.url = \"{}\"", tls_url()));
    assert!(text.contains(&tls_url()), "the config must point at the HTTPS registry");
    std::fs::write(&path, text).expect("config");
    path
}

/// Runs `relay ARGS`: (success, stdout, stderr).
fn relay(config: &PathBuf, args: &[&str]) -> (bool, String, String) {
    let output = relay_command(config).args(args).output().expect("run relay");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (output.status.success(), text(&output.stdout), text(&output.stderr))
}

/// The `registry` line of `relay check`.
fn registry_line(stdout: &str) -> String {
    stdout.lines().find(|l| l.starts_with("registry")).unwrap_or_else(|| panic!("no registry line: {stdout}")).into()
}

/// Decodes `count` records of `topics` with Python `confluent-kafka`, whose
/// registry client also fetches the schemas over HTTPS, trusting `ca`.
fn python_consume(stack: &Stack, ca: &Path, topics: &[String], count: usize) -> Vec<Value> {
    python_consume_avro(stack, &tls_url(), Some(ca), topics, count)
}

/// A CA of its own that signed nothing the stack serves.
fn other_ca(dir: &Path) -> PathBuf {
    let (key, crt) = (dir.join("other-ca.key"), dir.join("other-ca.crt"));
    let status = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=someone else"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl");
    assert!(status.success(), "openssl could not make a CA");
    crt
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemas_are_registered_checked_and_read_over_https() {
    let stack = Stack::from_env();
    let ca = PathBuf::from(env_var("RELAY_STACK_CA_FILE"));
    let db = TestDb::new(&stack).await;
    let config = https_config(&db, Some(&ca));
    db.migrate(&config);

    let (ok, stdout, stderr) = relay(&config, &["check"]);
    let line = registry_line(&stdout);
    assert!(ok && line.contains(" ok ") && line.contains(&tls_url()), "{line}\n{stderr}");
    let (ok, stdout, stderr) = relay(&config, &["schemas", "register"]);
    assert!(ok, "{stdout}\n{stderr}");
    assert_eq!(stdout.lines().filter(|l| l.starts_with("ok")).count(), 4, "{stdout}");
    let (ok, stdout, stderr) = relay(&config, &["schemas", "check"]);
    assert!(ok && stdout.matches("compatible").count() == 4, "{stdout}\n{stderr}");

    // The relay looks its ids up over HTTPS (codec.auto_register is off).
    let client = db.client().await;
    let mut relay = RelayProcess::start(&config);
    let paid = json!({"data": {"amount": "59.97", "paid_at": "2026-11-23T16:41:02.517Z"}});
    let shipped = json!({"data": {"carrier": "DHL", "tracking": null, "shipped_on": "2026-11-24"}});
    for (event_type, version, payload) in [("OrderPaid", 1i64, &paid), ("OrderShipped", 2, &shipped)] {
        client
            .execute(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, kind, entity_version, payload)
                 VALUES ('order', 'ord-tls', $1, 'event', $2, $3)",
                &[&event_type, &version, payload],
            )
            .await
            .expect("insert");
    }
    wait_all_published(&client, Duration::from_secs(60)).await;
    let records = python_consume(&stack, &ca, &[db.topic("order")], 2);
    let types: Vec<&str> = records.iter().filter_map(|r| r["headers"]["event_type"].as_str()).collect();
    assert_eq!(types, ["OrderPaid", "OrderShipped"]);
    assert_eq!(records[0]["value"]["data"]["amount"], json!("59.97"));
    assert_eq!(records[1]["value"]["data"]["carrier"], json!("DHL"));
    assert!(records.iter().all(|r| r["magic"] == json!(0)), "Confluent wire format");
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0), "{}", relay.log_text());
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_registry_certificate_names_registry_tls_ca_file() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let other = other_ca(db.dir.path());
    // No CA file (the system's roots do not know the stack's CA), then the wrong CA.
    for ca in [None, Some(other.as_path())] {
        let config = https_config(&db, ca);
        let (ok, stdout, stderr) = relay(&config, &["check"]);
        assert!(!ok, "check must fail: {stdout}");
        let line = registry_line(&stdout);
        assert!(line.contains("FAIL") && line.contains("registry.tls_ca_file"), "{line}\n{stderr}");
        assert!(line.contains("UnknownIssuer") && !line.contains("unreachable"), "{line}");
        let (ok, stdout, stderr) = relay(&config, &["schemas", "register"]);
        assert!(!ok && stdout.contains("registry.tls_ca_file"), "{stdout}\n{stderr}");
    }

    // The relay itself stops for an operator (exit 1) naming the key,
    // instead of retrying a certificate that will not change.
    let config = https_config(&db, None);
    db.migrate(&config);
    let mut relay = RelayProcess::start(&config);
    let code = wait_for("the relay to stop", Duration::from_secs(60), || {
        let exited = relay.child.try_wait().expect("try_wait").map(|status| status.code());
        async move { exited }
    })
    .await;
    let log = relay.log_text();
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("registry.tls_ca_file"), "{log}");
    db.cleanup().await;
}
