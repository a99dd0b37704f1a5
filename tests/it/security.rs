//! Security against the real stack. Least privilege: the relay runs as a
//! `NOSUPERUSER` role that has exactly the grants `relay migrate
//! --print-grants ROLE` prints, in logical and in poll mode; `relay check`
//! names each grant taken away, one line each, and tells a table that does
//! not exist apart from a permission; the running relay stops with an
//! operator error that says which command prints the grants.
//!
//! `relay migrate` runs as the stack's superuser (the table's owner here).
//! Secrets: known passwords never appear in any output, log or endpoint.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use crate::common::*;
use relay::store::grants::{self, Privilege};

const PASSWORD: &str = "pg-Secret-7f3a9c";
/// The registry's basic-auth password (the stack's registry ignores it;
/// the relay sends it with every request).
const REGISTRY_PASSWORD: &str = "reg-Secret-91bd2e";
/// A SASL password the broker refuses (the stack's user has another).
const WRONG_SASL_PASSWORD: &str = "sasl-Wrong-4c1d0e";

/// A login role with nothing but the printed grants, in one test database.
struct RuntimeRole {
    name: String,
    /// The test database's URL as this role.
    url: String,
}

impl RuntimeRole {
    /// Creates the role and applies what `relay migrate --print-grants`
    /// prints for the owner's config (run as the owner).
    async fn create(db: &TestDb, owner_config: &PathBuf) -> Self {
        let name = format!("{}_rt", db.name);
        let client = db.client().await;
        // Nothing from PUBLIC either (Postgres 15 still grants USAGE on
        // schema public to everyone): the role has only what is printed.
        client.batch_execute("REVOKE ALL ON SCHEMA public FROM PUBLIC").await.expect("revoke from public");
        client
            .batch_execute(&format!(
                "CREATE ROLE {name} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT PASSWORD '{PASSWORD}'"
            ))
            .await
            .expect("create role");
        let output = relay_command(owner_config).args(["migrate", "--print-grants", &name]).output().expect("print");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let grants = String::from_utf8(output.stdout).expect("utf-8");
        client.batch_execute(&grants).await.unwrap_or_else(|e| panic!("apply the printed grants: {e}\n{grants}"));
        let url = db.url.replacen("relay:relay@", &format!("{name}:{PASSWORD}@"), 1);
        assert_ne!(url, db.url, "the stack's URL names user relay");
        Self { name, url }
    }

    /// A config of this role (the same keys as `extra` for the owner).
    fn config(&self, db: &TestDb, extra: &str) -> PathBuf {
        let path = db.dir.path().join(format!("{}-{}.toml", self.name, uuid::Uuid::new_v4().simple()));
        std::fs::write(&path, db.config_toml(extra).replace(&db.url, &self.url)).expect("write config");
        path
    }

    /// Takes its grants back and drops it (before the database goes).
    async fn drop(self, db: &TestDb) {
        let client = db.client().await;
        client.batch_execute(&format!("DROP OWNED BY {0}; DROP ROLE {0}", self.name)).await.expect("drop role");
    }
}

/// Runs `relay check` with `config`: (success, stdout).
fn check(config: &PathBuf) -> (bool, String) {
    let output = relay_command(config).arg("check").output().expect("relay check");
    (output.status.success(), String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Writes rows, runs the relay as the runtime role until all are published,
/// and checks what Kafka got.
async fn publishes_as_the_runtime_role(extra: &str) {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let owner = db.write_config(extra);
    db.migrate(&owner);
    let role = RuntimeRole::create(&db, &owner).await;
    let client = db.client().await;
    let superuser: bool =
        client.query_one("SELECT rolsuper FROM pg_roles WHERE rolname = $1", &[&role.name]).await.expect("role").get(0);
    assert!(!superuser);
    let config = role.config(&db, extra);
    let (ok, stdout) = check(&config);
    assert!(ok, "relay check as the runtime role: {stdout}");

    const ROWS: i64 = 300;
    let mut relay = RelayProcess::start(&config);
    for seq in 0..ROWS {
        insert_row(&client, "entity", &format!("e{}", seq % 20), seq / 20 + 1).await;
    }
    assert_eq!(wait_all_published(&client, Duration::from_secs(120)).await, ROWS, "{}", relay.log_text());
    let records = consume(&stack.bootstrap, &[&db.topic("entity")], ROWS as usize, Duration::from_secs(60));
    assert_all_present(&client, &records).await;
    assert_per_key_order(&records);
    let log = relay.log_text();
    assert!(!log.contains("permission denied"), "{log}");
    assert_eq!(relay.terminate(Duration::from_secs(20)), Some(0), "{log}");
    role.drop(&db).await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_mode_runs_as_a_role_with_only_the_printed_grants() {
    // Retention on, so its DELETE runs (a long max age: it deletes nothing).
    publishes_as_the_runtime_role(
        "retention.enabled = true\nretention.interval_secs = 1\nretention.max_age_secs = 86400",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_mode_runs_as_a_role_with_only_the_printed_grants() {
    publishes_as_the_runtime_role("source.mode = \"poll\"").await;
}

/// Each required privilege taken away in turn: `relay check` fails with a
/// line naming it and its GRANT, and never sends the operator to `relay
/// migrate`. A missing table is told as such.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_each_missing_grant() {
    const EXTRA: &str = "retention.enabled = true";
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let owner = db.write_config(EXTRA);
    db.migrate(&owner);
    let role = RuntimeRole::create(&db, &owner).await;
    let client = db.client().await;
    let config = role.config(&db, EXTRA);
    let parsed = relay::Config::from_toml_str(&db.config_toml(EXTRA)).expect("config");
    let mut required = grants::required(&parsed);
    // One column alone too: the line names just that column.
    required.push(Privilege::UpdateColumns {
        table: grants::Table { schema: "public".into(), name: "outbox".into() },
        columns: vec!["published_at".to_string()],
    });
    for privilege in &required {
        client.batch_execute(&privilege.revoke(&role.name)).await.expect("revoke");
        let (ok, stdout) = check(&config);
        let line = format!("missing {}: {}", privilege.describe(), privilege.grant(&role.name));
        assert!(!ok, "check passed without {}: {stdout}", privilege.describe());
        assert!(stdout.lines().any(|l| l.trim() == line), "no line `{line}` in:\n{stdout}");
        assert!(stdout.contains("lacks 1 privilege(s)"), "only that one is missing:\n{stdout}");
        assert!(!stdout.contains("run `relay migrate`"), "a permission is not a migration:\n{stdout}");
        client.batch_execute(&privilege.grant(&role.name)).await.expect("grant back");
    }
    let (ok, stdout) = check(&config);
    assert!(ok, "every grant back: {stdout}");

    let absent = role.config(&db, &format!("{EXTRA}\noutbox.table = \"no_such_outbox\""));
    let (ok, stdout) = check(&absent);
    assert!(!ok && stdout.contains("do not exist; run `relay migrate`"), "{stdout}");
    role.drop(&db).await;
    db.cleanup().await;
}

/// A grant taken away while the relay runs: it stops with exit code 1 and
/// an operator error naming the permission and the command that prints the
/// grants; the row stays unpublished and is published once granted back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_grant_at_run_time_is_an_operator_error() {
    const EXTRA: &str = "source.mode = \"poll\"";
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let owner = db.write_config(EXTRA);
    db.migrate(&owner);
    let role = RuntimeRole::create(&db, &owner).await;
    let client = db.client().await;
    let config = role.config(&db, EXTRA);
    let publish_state = Privilege::UpdateColumns {
        table: grants::Table { schema: "public".into(), name: "outbox".into() },
        columns: vec!["published_at".to_string()],
    };
    client.batch_execute(&publish_state.revoke(&role.name)).await.expect("revoke");
    insert_row(&client, "entity", "a", 1).await;
    let mut relay = RelayProcess::start(&config);
    let code = relay.exit_code(Duration::from_secs(120)).await;
    let log = relay.log_text();
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("permission denied") && log.contains("--print-grants"), "{log}");
    let pending: i64 =
        client.query_one("SELECT count(*) FROM outbox WHERE published_at IS NULL", &[]).await.expect("count").get(0);
    assert_eq!(pending, 1);

    client.batch_execute(&publish_state.grant(&role.name)).await.expect("grant back");
    let mut relay = RelayProcess::start(&config);
    assert_eq!(wait_all_published(&client, Duration::from_secs(60)).await, 1, "{}", relay.log_text());
    assert_eq!(relay.terminate(Duration::from_secs(20)), Some(0));
    role.drop(&db).await;
    db.cleanup().await;
}

/// Runs the relay binary with `args` and logs at debug level for every
/// target: stdout and stderr together.
fn run_at_debug(config: &PathBuf, args: &[&str]) -> String {
    let output = relay_command(config).args(args).env("RUST_LOG", "debug").env("NO_COLOR", "1").output().expect("run");
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

/// The relay running with logs at debug level for every target, text or
/// JSON.
fn start_at_debug(config: &PathBuf, json: bool) -> RelayProcess {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("relay-logs");
    std::fs::create_dir_all(&dir).expect("log dir");
    let log = dir.join(format!("secrets-{}-{}.log", json, uuid::Uuid::new_v4().simple()));
    let mut command = relay_command(config);
    if json {
        command.arg("--log-json");
    }
    let child = command
        .env("RUST_LOG", "debug")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("start relay");
    RelayProcess { child, log }
}

/// Known passwords (in `postgres.url`, `registry.password` and
/// `kafka.sasl.password`, accepted and refused) never show:
/// not in `relay check` (also when Postgres is unreachable or the URL is
/// malformed), `status`, the HTTP endpoints, nor in text or JSON logs at
/// debug level of a relay that published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_appear_in_output_logs_or_endpoints() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let extra = format!("registry.username = \"reg-user\"\nregistry.password = \"{REGISTRY_PASSWORD}\"");
    let owner = db.write_config(&extra);
    db.migrate(&owner);
    let role = RuntimeRole::create(&db, &owner).await;
    let client = db.client().await;
    let config = role.config(&db, &extra);
    let mut seen: Vec<(String, String)> = Vec::new();
    for args in [&["check"][..], &["status"], &["status", "--json"], &["--log-json", "check"], &["held", "list"]] {
        seen.push((format!("relay {}", args.join(" ")), run_at_debug(&config, args)));
    }
    // Error paths echo what failed: an unreachable port, a malformed URL.
    let port = db.url.rsplit_once(':').and_then(|(_, rest)| rest.split_once('/')).map(|(p, _)| p.to_string());
    let port = port.expect("the URL names a port");
    for (what, bad) in [("unreachable", "1"), ("malformed", "no-port")] {
        let path = db.dir.path().join(format!("{what}.toml"));
        let text = std::fs::read_to_string(&config).expect("config").replace(&format!(":{port}/"), &format!(":{bad}/"));
        std::fs::write(&path, text).expect("write config");
        seen.push((format!("relay check, Postgres {what}"), run_at_debug(&path, &["check"])));
        seen.push((format!("relay migrate, Postgres {what}"), run_at_debug(&path, &["migrate"])));
    }

    // Kafka over SASL_SSL: the stack user's password, and one refused.
    let env = env_var;
    let sasl_password = env("RELAY_KAFKA_SASL_PASSWORD");
    for (what, password) in [("accepted", sasl_password.as_str()), ("refused", WRONG_SASL_PASSWORD)] {
        let keys = format!(
            "kafka.security_protocol = \"sasl_ssl\"\nkafka.tls_ca_file = \"{}\"\nkafka.sasl.username = \"{}\"\nkafka.sasl.password = \"{password}\"",
            env("RELAY_STACK_CA_FILE"),
            env("RELAY_KAFKA_SASL_USER"),
        );
        let text = std::fs::read_to_string(role.config(&db, &format!("{extra}\n{keys}"))).expect("config");
        let path = db.dir.path().join(format!("sasl-{what}.toml"));
        let bootstrap = format!("kafka.bootstrap_servers = \"{}\"", stack.bootstrap);
        let sasl = format!("kafka.bootstrap_servers = \"{}\"", env("RELAY_KAFKA_SASL_BOOTSTRAP"));
        std::fs::write(&path, text.replace(&bootstrap, &sasl)).expect("write config");
        let output = run_at_debug(&path, &["check"]);
        let told = output.lines().any(|l| l.starts_with("kafka") && l.contains("authentication to Kafka"));
        assert_eq!(told, what == "refused", "{output}");
        seen.push((format!("relay check, SASL password {what}"), output));
        if what == "refused" {
            // The run stops with an operator error; its whole output counts.
            seen.push(("relay run, SASL password refused".into(), run_at_debug(&path, &[])));
        }
    }

    for json in [false, true] {
        let mut relay = start_at_debug(&config, json);
        let id = insert_row(&client, "entity", "s", i64::from(json) + 1).await;
        wait_for("the row to be published", Duration::from_secs(60), || async {
            let row =
                client.query_one("SELECT published_at IS NOT NULL FROM outbox WHERE id = $1", &[&id]).await.ok()?;
            row.get::<_, bool>(0).then_some(())
        })
        .await;
        if !json {
            let base = relay.http_base().await;
            for path in ["/metrics", "/healthz", "/readyz"] {
                let body = reqwest::get(format!("{base}{path}")).await.expect("get").text().await.expect("body");
                seen.push((format!("GET {path}"), body));
            }
        }
        assert_eq!(relay.terminate(Duration::from_secs(20)), Some(0), "{}", relay.log_text());
        let log = relay.log_text();
        assert!(log.contains("DEBUG") || log.contains("\"DEBUG\""), "logs at debug level: {log}");
        seen.push((format!("relay log (json: {json})"), log));
    }
    for (what, text) in &seen {
        assert!(!text.trim().is_empty(), "{what} printed nothing");
        for secret in [PASSWORD, REGISTRY_PASSWORD, sasl_password.as_str(), WRONG_SASL_PASSWORD] {
            assert!(!text.contains(secret), "{what} shows a password:\n{text}");
        }
    }
    role.drop(&db).await;
    db.cleanup().await;
}

/// Poll mode as the runtime role on an outbox migrated for logical mode (no
/// NOTIFY trigger, which the role may not create): it warns and polls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_mode_without_its_trigger_warns_and_polls() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let owner = db.write_config("");
    db.migrate(&owner);
    let poll = db.write_config("source.mode = \"poll\"\nsource.poll_interval_ms = 200");
    let role = RuntimeRole::create(&db, &poll).await;
    let client = db.client().await;
    let config = role.config(&db, "source.mode = \"poll\"\nsource.poll_interval_ms = 200");
    let mut relay = RelayProcess::start(&config);
    insert_row(&client, "entity", "a", 1).await;
    assert_eq!(wait_all_published(&client, Duration::from_secs(60)).await, 1, "{}", relay.log_text());
    let log = relay.log_text();
    assert!(log.contains("the NOTIFY trigger is missing"), "{log}");
    assert_eq!(relay.terminate(Duration::from_secs(20)), Some(0), "{log}");
    role.drop(&db).await;
    db.cleanup().await;
}
