//! Kafka over SASL_SSL with ACLs (the stack's second listener: SCRAM-SHA-512,
//! the stack CA's certificate, StandardAuthorizer, no ACL = no access): the
//! relay publishes with exactly the ACLs the README documents, a topic it
//! may not write holds its rows with the ACL to grant while other topics
//! flow, and `relay check` tells refused credentials and an unknown CA from
//! an unreachable broker. ACLs are granted per test topic prefix through the
//! PLAINTEXT listener (whose anonymous principal is a super user), which the
//! test's consumer uses too.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::*;

/// The SASL_SSL listener and the relay's SCRAM user, from `scripts/stack env`.
struct Sasl {
    bootstrap: String,
    user: String,
    password: String,
    ca_file: String,
}

impl Sasl {
    fn from_env() -> Self {
        let var = env_var;
        Self {
            bootstrap: var("RELAY_KAFKA_SASL_BOOTSTRAP"),
            user: var("RELAY_KAFKA_SASL_USER"),
            password: var("RELAY_KAFKA_SASL_PASSWORD"),
            ca_file: var("RELAY_STACK_CA_FILE"),
        }
    }

    /// Config keys that make the relay authenticate over TLS.
    fn keys(&self, password: &str, ca_file: &str) -> String {
        format!(
            "kafka.security_protocol = \"sasl_ssl\"\nkafka.tls_ca_file = \"{ca_file}\"\nkafka.sasl.mechanism = \"SCRAM-SHA-512\"\nkafka.sasl.username = \"{}\"\nkafka.sasl.password = \"{password}\"\n",
            self.user
        )
    }
}

/// The test's relay config with `bootstrap` instead of the PLAINTEXT
/// listener, plus `extra` keys.
fn write_config(db: &TestDb, bootstrap: &str, extra: &str) -> PathBuf {
    let plaintext = format!("kafka.bootstrap_servers = \"{}\"", db.stack.bootstrap);
    let toml = db.config_toml(extra).replace(&plaintext, &format!("kafka.bootstrap_servers = \"{bootstrap}\""));
    let path = db.dir.path().join(format!("relay-{}.toml", uuid::Uuid::new_v4().simple()));
    std::fs::write(&path, toml).expect("write config");
    path
}

/// `kafka-acls --add` for the relay's principal through the PLAINTEXT
/// listener: `operations` on the topic `pattern` (`prefixed` or `literal`).
fn grant(stack: &Stack, user: &str, operations: &[&str], topic: &str, pattern: &str) {
    let mut command = Command::new(stack.repo.join("scripts/kafka-tool"));
    command.args([
        "org.apache.kafka.tools.AclCommand",
        "--bootstrap-server",
        &stack.bootstrap,
        "--add",
        "--allow-principal",
        &format!("User:{user}"),
        "--topic",
        topic,
        "--resource-pattern-type",
        pattern,
    ]);
    for operation in operations {
        command.args(["--operation", operation]);
    }
    let output = command.output().expect("run AclCommand");
    assert!(output.status.success(), "granting {operations:?} on {topic}: {}", String::from_utf8_lossy(&output.stderr));
}

/// Rows of `payment` whose `last_error` is set: (id, last_error, waiting_for).
async fn held_payments(client: &tokio_postgres::Client) -> Vec<(i64, String, Option<i64>)> {
    let rows = client
        .query(
            "SELECT id, last_error, waiting_for FROM outbox
             WHERE aggregate_type = 'payment' AND last_error IS NOT NULL AND published_at IS NULL ORDER BY id",
            &[],
        )
        .await
        .expect("read held rows");
    rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect()
}

/// The README's ACLs and nothing more: WRITE, DESCRIBE, CREATE (the test
/// keeps `routing.create_topics = true`) and DESCRIBE_CONFIGS on the
/// relay's topic prefix; no cluster ACL (Kafka 3.0+ needs no
/// IDEMPOTENT_WRITE for an idempotent producer that may write a topic).
/// `order` rows go to a topic the relay creates itself; `payment` rows go
/// to an existing topic on which it has DESCRIBE only, so the broker
/// refuses the produce request: those rows are held (first) and wait
/// (later) with the ACL to grant, `order` keeps flowing, and once WRITE is
/// granted `relay held retry` publishes them in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_over_sasl_ssl_with_the_documented_acls_and_holds_an_unwritable_topic() {
    let stack = Stack::from_env();
    let sasl = Sasl::from_env();
    let db = TestDb::new(&stack).await;
    let denied = format!("{}-denied", db.topic_prefix);
    grant(
        &stack,
        &sasl.user,
        &["Write", "Describe", "Create", "DescribeConfigs"],
        &format!("{}.", db.topic_prefix),
        "prefixed",
    );
    create_topic(&stack.bootstrap, &denied, 3, &[]).await;
    grant(&stack, &sasl.user, &["Describe"], &denied, "literal");

    let extra = format!("{}routing.topics.payment = \"{denied}\"\n", sasl.keys(&sasl.password, &sasl.ca_file));
    let config = write_config(&db, &sasl.bootstrap, &extra);
    db.migrate(&config);
    let client = db.client().await;
    let mut relay = RelayProcess::start(&config);

    for seq in 1..=3 {
        insert_row(&client, "payment", "p-1", seq).await;
        for entity in ["o-1", "o-2", "o-3"] {
            insert_row(&client, "order", entity, seq).await;
        }
    }
    let records = consume(&stack.bootstrap, &[&db.topic("order")], 9, Duration::from_secs(90));
    assert_per_key_order(&records);
    assert_eq!(first_occurrence_order(&records).len(), 3, "every order entity arrived");

    let held = wait_for("the payment rows to be held and waiting", Duration::from_secs(60), || async {
        let held = held_payments(&client).await;
        (held.len() == 3).then_some(held)
    })
    .await;
    let (first, error, waiting_for) = &held[0];
    assert_eq!(*waiting_for, None, "the first payment row is the held one: {held:?}");
    assert!(error.contains(&format!("not authorized to write to topic `{denied}`")), "{error}");
    assert!(error.contains(&format!("grant WRITE on TOPIC {denied} to User:{}", sasl.user)), "{error}");
    assert!(held[1..].iter().all(|(_, _, behind)| *behind == Some(*first)), "later rows wait: {held:?}");
    assert!(relay.child.try_wait().expect("relay status").is_none(), "a held topic does not stop the relay");
    // Other topics keep flowing while the payment rows are held.
    insert_row(&client, "order", "o-4", 1).await;
    let records = consume(&stack.bootstrap, &[&db.topic("order")], 10, Duration::from_secs(60));
    assert_eq!(first_occurrence_order(&records).remove("o-4"), Some(vec![1]));

    // The fix, then the release: the held row and the rows behind it go out in order.
    grant(&stack, &sasl.user, &["Write"], &denied, "literal");
    let output = relay_command(&config).args(["held", "retry", &first.to_string()]).output().expect("relay held retry");
    assert!(output.status.success(), "relay held retry: {}", String::from_utf8_lossy(&output.stderr));
    let payments = consume(&stack.bootstrap, &[&denied], 3, Duration::from_secs(90));
    assert_eq!(first_occurrence_order(&payments).remove("p-1"), Some(vec![1, 2, 3]));
    wait_all_published(&client, Duration::from_secs(60)).await;

    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0));
    let log = relay.log_text();
    assert!(!log.contains(&sasl.password), "the SASL password appears in the relay's log");
    // No DESCRIBE_CONFIGS on the denied topic: a warning with the ACL, not a failure.
    assert!(log.contains(&format!("grant DESCRIBE_CONFIGS on TOPIC {denied} to User:{}", sasl.user)), "{log}");
    db.cleanup().await;
}

/// The held-row message of each way a topic can be out of reach: no ACL at
/// all (the broker will not even say whether it exists), and DESCRIBE but
/// no CREATE on a topic that does not exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_out_of_reach_holds_its_rows_with_the_acl_to_grant() {
    let stack = Stack::from_env();
    let sasl = Sasl::from_env();
    let db = TestDb::new(&stack).await;
    let (hidden, missing) = (format!("{}-hidden", db.topic_prefix), format!("{}-missing", db.topic_prefix));
    create_topic(&stack.bootstrap, &hidden, 3, &[]).await;
    grant(&stack, &sasl.user, &["Describe"], &missing, "literal");
    let extra = format!(
        "{}routing.topics.invoice = \"{hidden}\"\nrouting.topics.shipment = \"{missing}\"\n",
        sasl.keys(&sasl.password, &sasl.ca_file)
    );
    let config = write_config(&db, &sasl.bootstrap, &extra);
    db.migrate(&config);
    let client = db.client().await;
    let mut relay = RelayProcess::start(&config);
    insert_row(&client, "invoice", "i-1", 1).await;
    insert_row(&client, "shipment", "s-1", 1).await;
    let errors = wait_for("both rows to be held", Duration::from_secs(60), || async {
        let rows = client
            .query("SELECT aggregate_type, last_error FROM outbox WHERE last_error IS NOT NULL ORDER BY id", &[])
            .await
            .ok()?;
        (rows.len() == 2).then(|| rows.iter().map(|r| r.get::<_, String>(1)).collect::<Vec<_>>())
    })
    .await;
    let principal = format!("User:{}", sasl.user);
    assert!(errors[0].contains(&format!("not authorized to describe topic `{hidden}`")), "{errors:?}");
    assert!(errors[0].contains(&format!("grant DESCRIBE and WRITE on TOPIC {hidden} to {principal}")), "{errors:?}");
    assert!(errors[1].contains(&format!("not authorized to create topic `{missing}`")), "{errors:?}");
    assert!(errors[1].contains(&format!("grant CREATE on TOPIC {missing} to {principal}")), "{errors:?}");
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0));
    db.cleanup().await;
}

/// `relay check`'s kafka line with Kafka at `bootstrap` and `extra` config
/// keys, and whether the check passed.
fn check_kafka(db: &TestDb, bootstrap: &str, extra: &str) -> (bool, String) {
    let config = write_config(db, bootstrap, extra);
    let output = relay_command(&config).arg("check").output().expect("run relay check");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let line = stdout.lines().find(|l| l.starts_with("kafka")).unwrap_or_default().to_string();
    (output.status.success(), line)
}

/// A CA that signed nothing the stack serves, for the "unknown CA" case.
fn stranger_ca(dir: &Path) -> PathBuf {
    let (key, cert) = (dir.join("stranger.key"), dir.join("stranger.crt"));
    let status = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=stranger CA", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl");
    assert!(status.status.success(), "openssl: {}", String::from_utf8_lossy(&status.stderr));
    cert
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_tells_refused_credentials_and_unknown_ca_from_an_unreachable_broker() {
    let stack = Stack::from_env();
    let sasl = Sasl::from_env();
    let db = TestDb::new(&stack).await;

    let (ok, line) = check_kafka(&db, &sasl.bootstrap, &sasl.keys(&sasl.password, &sasl.ca_file));
    assert!(line.contains(" ok ") && line.contains(&format!("User:{}", sasl.user)), "{line}");
    let _ = ok; // Postgres has no outbox table here: only the kafka line counts.

    let (ok, line) = check_kafka(&db, &sasl.bootstrap, &sasl.keys("not-the-password", &sasl.ca_file));
    assert!(!ok, "{line}");
    assert!(line.contains("FAIL") && line.contains("authentication"), "{line}");
    assert!(line.contains("kafka.sasl.password") && !line.contains("unreachable"), "{line}");
    assert!(!line.contains("not-the-password"), "{line}");

    let stranger = stranger_ca(db.dir.path());
    let (ok, line) = check_kafka(&db, &sasl.bootstrap, &sasl.keys(&sasl.password, &stranger.to_string_lossy()));
    assert!(!ok, "{line}");
    assert!(line.contains("TLS handshake") && line.contains("kafka.tls_ca_file"), "{line}");
    assert!(!line.contains("unreachable"), "{line}");

    // A port nothing listens on: bound and dropped, so it is free.
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let (ok, line) = check_kafka(&db, &format!("127.0.0.1:{port}"), &sasl.keys(&sasl.password, &sasl.ca_file));
    assert!(!ok, "{line}");
    assert!(line.contains("unreachable") && line.contains("kafka.bootstrap_servers"), "{line}");
    assert!(!line.contains("authentication"), "{line}");
    db.cleanup().await;
}

/// The running relay does not retry refused credentials forever (librdkafka
/// would, with rows piling up in its queue): it stops with exit code 1 and
/// one line naming the keys to fix, and never prints the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_password_stops_the_relay_with_the_keys_to_fix() {
    let stack = Stack::from_env();
    let sasl = Sasl::from_env();
    let db = TestDb::new(&stack).await;
    let config = write_config(&db, &sasl.bootstrap, &sasl.keys("not-the-password", &sasl.ca_file));
    db.migrate(&config);
    insert_row(&db.client().await, "order", "o-1", 1).await;
    let mut relay = RelayProcess::start(&config);
    let started = std::time::Instant::now();
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
    assert!(last.contains("authentication to Kafka") && last.contains("kafka.sasl.password"), "{log}");
    assert!(!log.contains("not-the-password"), "the password appears in the log");
    db.cleanup().await;
}

/// Exactly-once over SASL_SSL: with the README's ACLs (the topics and the
/// progress topic by prefix, the transactional id by prefix) rows arrive;
/// without the transactional-id ACL the relay stops with exit code 1 and
/// the ACL to grant, instead of retrying.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_needs_the_transactional_id_acl_and_says_so() {
    let stack = Stack::from_env();
    let sasl = Sasl::from_env();
    let db = TestDb::new(&stack).await;
    let prefix = format!("{}.", db.topic_prefix);
    grant(&stack, &sasl.user, &["Write", "Describe", "Create", "DescribeConfigs", "Read"], &prefix, "prefixed");
    let transactional_id = format!("{}-txn", db.topic_prefix);
    let extra = format!(
        "{}kafka.delivery = \"exactly_once\"\nkafka.transactional_id = \"{transactional_id}\"\nkafka.progress_topic = \"{prefix}progress\"\n",
        sasl.keys(&sasl.password, &sasl.ca_file)
    );
    let config = write_config(&db, &sasl.bootstrap, &extra);
    db.migrate(&config);
    let client = db.client().await;
    insert_row(&client, "order", "o-1", 1).await;
    let mut relay = RelayProcess::start(&config);
    let code = relay.exit_code(Duration::from_secs(120)).await;
    let log = relay.log_text();
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("TRANSACTIONAL_ID") && log.contains("kafka.transactional_id"), "{log}");

    let mut command = Command::new(stack.repo.join("scripts/kafka-tool"));
    command.args([
        "org.apache.kafka.tools.AclCommand",
        "--bootstrap-server",
        &stack.bootstrap,
        "--add",
        "--allow-principal",
        &format!("User:{}", sasl.user),
        "--transactional-id",
        &transactional_id,
        "--resource-pattern-type",
        "prefixed",
        "--operation",
        "Write",
        "--operation",
        "Describe",
    ]);
    let output = command.output().expect("run AclCommand");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let mut relay = RelayProcess::start(&config);
    assert_eq!(wait_all_published(&client, Duration::from_secs(60)).await, 1, "{}", relay.log_text());
    assert_eq!(relay.terminate(Duration::from_secs(20)), Some(0), "{}", relay.log_text());
    db.cleanup().await;
}
