//! Test harness over the real local stack (`scripts/stack up`; the addresses
//! come from `scripts/stack env`). Each test gets its own database, slot and
//! topic prefix, so tests run in parallel.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::ClientConfig;
use tokio_postgres::{Client, NoTls};

mod python;
#[allow(unused_imports)] // the benches include this module and use none of these
pub use python::*;

/// A variable of `scripts/stack env` (or of scripts/test); its absence fails
/// the test with how to set it.
pub fn env_var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the tests with scripts/test, or `eval \"$(scripts/stack env)\"` first")
    })
}

/// Creates `topic` with `partitions` and broker-side `configs` (e.g.
/// `cleanup.policy`) before the relay sees it.
pub async fn create_topic(bootstrap: &str, topic: &str, partitions: i32, configs: &[(&str, &str)]) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", bootstrap).create().expect("admin client");
    let mut new_topic = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    for (key, value) in configs {
        new_topic = new_topic.set(key, value);
    }
    let results = admin.create_topics([&new_topic], &AdminOptions::new()).await.expect("create topic");
    for result in results {
        result.unwrap_or_else(|(name, code)| panic!("creating {name}: {code}"));
    }
}

/// Addresses of the running stack.
#[derive(Debug, Clone)]
pub struct Stack {
    pub postgres_url: String,
    pub bootstrap: String,
    pub registry: String,
    pub repo: PathBuf,
}

impl Stack {
    pub fn from_env() -> Self {
        Self {
            postgres_url: env_var("RELAY__POSTGRES__URL"),
            bootstrap: env_var("RELAY__KAFKA__BOOTSTRAP_SERVERS"),
            registry: env_var("RELAY__REGISTRY__URL"),
            repo: PathBuf::from(env!("CARGO_MANIFEST_DIR")),
        }
    }

    /// Runs `scripts/stack ARGS` (e.g. `stop kafka`) and asserts it worked.
    pub fn script(&self, args: &[&str]) {
        let status = Command::new(self.repo.join("scripts/stack")).args(args).status().expect("run scripts/stack");
        assert!(status.success(), "scripts/stack {args:?} failed");
    }
}

pub async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.expect("connect to postgres");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// A database of its own, with a unique slot name and topic prefix. Its
/// replication slots and the database are dropped by [`TestDb::cleanup`] at
/// the end of a test, or on drop when a test fails half-way.
pub struct TestDb {
    pub stack: Stack,
    pub name: String,
    pub url: String,
    pub slot: String,
    pub topic_prefix: String,
    pub dir: tempfile::TempDir,
    /// Set once the slots and the database are dropped.
    cleaned: bool,
}

impl TestDb {
    pub async fn new(stack: &Stack) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string()[..10].to_string();
        let name = format!("rt_{id}");
        let admin = connect(&stack.postgres_url).await;
        admin.batch_execute(&format!("CREATE DATABASE {name}")).await.expect("create test database");
        let (base, _) = stack.postgres_url.rsplit_once('/').expect("url has a database");
        Self {
            stack: stack.clone(),
            url: format!("{base}/{name}"),
            slot: format!("rt_{id}"),
            topic_prefix: format!("rt{id}"),
            name,
            dir: tempfile::tempdir().expect("tempdir"),
            cleaned: false,
        }
    }

    pub async fn client(&self) -> Client {
        connect(&self.url).await
    }

    /// The topic event rows of `aggregate_type` go to.
    pub fn topic(&self, aggregate_type: &str) -> String {
        format!("{}.{aggregate_type}", self.topic_prefix)
    }

    /// The (compacted) topic state rows of `aggregate_type` go to.
    pub fn state_topic(&self, aggregate_type: &str) -> String {
        format!("{}.{aggregate_type}.state", self.topic_prefix)
    }

    /// A relay config for this database. Every key is a dotted key at the
    /// top level, so `extra` can add any key (e.g. `kafka.linger_ms = 10`).
    pub fn config_toml(&self, extra: &str) -> String {
        format!(
            r#"
shutdown_timeout_ms = 10000
postgres.url = "{url}"
kafka.bootstrap_servers = "{bootstrap}"
registry.url = "{registry}"
source.slot_name = "{slot}"
source.publication_name = "{slot}_pub"
source.status_interval_ms = 200
telemetry.lag_sample_interval_ms = 200
routing.topic_template = "{prefix}.{{aggregate_type}}"
routing.state_topic_template = "{prefix}.{{aggregate_type}}.state"
routing.topic_partitions = 6
telemetry.http_listen = "127.0.0.1:0"
{extra}
"#,
            url = self.url,
            bootstrap = self.stack.bootstrap,
            registry = self.stack.registry,
            slot = self.slot,
            prefix = self.topic_prefix,
        )
    }

    pub fn write_config(&self, extra: &str) -> PathBuf {
        let path = self.dir.path().join(format!("relay-{}.toml", uuid::Uuid::new_v4().simple()));
        std::fs::write(&path, self.config_toml(extra)).expect("write config");
        path
    }

    /// `relay migrate` through the real binary.
    pub fn migrate(&self, config: &PathBuf) {
        let output = relay_command(config).arg("migrate").output().expect("run relay migrate");
        assert!(output.status.success(), "relay migrate failed: {}", String::from_utf8_lossy(&output.stderr));
    }

    /// Drops the slots and the database (call after every relay is
    /// stopped). Dropping a `TestDb` does the same, so a test that fails
    /// half-way leaks nothing; after this the drop does nothing.
    pub async fn cleanup(mut self) {
        drop_slots_and_database(&self.stack.postgres_url, &self.slot, &self.name).await;
        self.cleaned = true;
    }
}

impl Drop for TestDb {
    /// Runs the cleanup on a thread of its own with its own runtime: this
    /// may run inside a tokio runtime (no `block_on` there) or during a
    /// panic's unwinding. It never panics; errors are printed and ignored.
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        self.cleaned = true;
        let (admin_url, slot, name) = (self.stack.postgres_url.clone(), self.slot.clone(), self.name.clone());
        let spawned = std::thread::Builder::new().name(format!("drop-{name}")).spawn(move || {
            match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime.block_on(async {
                    let work = drop_slots_and_database(&admin_url, &slot, &name);
                    if tokio::time::timeout(Duration::from_secs(30), work).await.is_err() {
                        eprintln!("TestDb drop: dropping {name} took over 30 s; gave up");
                    }
                }),
                Err(err) => eprintln!("TestDb drop: no runtime to drop {name}: {err}"),
            }
        });
        match spawned {
            Ok(handle) => {
                let _ = handle.join();
            }
            Err(err) => eprintln!("TestDb drop: cannot start the cleanup thread for {}: {err}", self.name),
        }
    }
}

/// Drops the replication slots named `slot` or starting with it (ending the
/// sessions that hold them) and then the database `name` WITH (FORCE); tries
/// again while a relay still running recreates a slot in between. Best
/// effort: errors are printed, never raised.
async fn drop_slots_and_database(admin_url: &str, slot: &str, name: &str) {
    let admin = match tokio_postgres::connect(admin_url, NoTls).await {
        Ok((client, connection)) => {
            tokio::spawn(async move {
                let _ = connection.await;
            });
            client
        }
        Err(err) => {
            eprintln!("cleanup of {name}: cannot connect to postgres: {err}");
            return;
        }
    };
    let mut last_error = String::new();
    for _ in 0..50 {
        let slots = match admin
            .query(
                "SELECT slot_name, active_pid FROM pg_replication_slots WHERE starts_with(slot_name::text, $1)",
                &[&slot],
            )
            .await
        {
            Ok(rows) => rows,
            Err(err) => {
                eprintln!("cleanup of {name}: cannot list replication slots: {err}");
                return;
            }
        };
        // A slot held by a live session cannot be dropped: end the session
        // now and drop the slot on the next round.
        for row in &slots {
            let (slot_name, pid): (String, Option<i32>) = (row.get(0), row.get(1));
            let _ = match pid {
                Some(pid) => admin.execute("SELECT pg_terminate_backend($1)", &[&pid]).await,
                None => admin.execute("SELECT pg_drop_replication_slot($1)", &[&slot_name]).await,
            };
        }
        if slots.is_empty() {
            // Fails while a (recreated) slot of the database exists.
            match admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await {
                Ok(()) => return,
                Err(err) => last_error = err.to_string(),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("cleanup of {name}: gave up dropping the database and its slots: {last_error}");
}

/// `relay status --json` through the real binary, parsed.
pub fn status_json(config: &PathBuf) -> serde_json::Value {
    let output = relay_command(config).args(["status", "--json"]).output().expect("relay status");
    assert!(output.status.success(), "relay status: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("status JSON")
}

/// A `relay` command with no inherited `RELAY__*` overrides (the stack's
/// environment would otherwise point it at the shared database).
pub fn relay_command(config: &PathBuf) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_relay"));
    for (key, _) in std::env::vars() {
        if key.starts_with("RELAY__") || key == "RELAY_CONFIG" {
            command.env_remove(key);
        }
    }
    command.arg("--config").arg(config);
    command
}

/// A relay running as a child process, logging to a file.
pub struct RelayProcess {
    pub child: Child,
    pub log: PathBuf,
}

impl RelayProcess {
    /// Logs go to `target/tmp/relay-logs/` and stay there after the test,
    /// for the post-mortem of a failure.
    pub fn start(config: &PathBuf) -> Self {
        Self::start_with_env(config, &[])
    }

    /// [`RelayProcess::start`] with extra environment variables.
    pub fn start_with_env(config: &PathBuf, env: &[(&str, &str)]) -> Self {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("relay-logs");
        std::fs::create_dir_all(&dir).expect("log dir");
        let stem = config.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let log = dir.join(format!("{stem}-{}.log", chrono::Utc::now().format("%H%M%S%.3f")));
        let file = std::fs::File::create(&log).expect("log file");
        let filter = std::env::var("RELAY_TEST_LOG").unwrap_or_else(|_| "info,relay=debug".into());
        let child = relay_command(config)
            .envs(env.iter().copied())
            .env("RUST_LOG", filter)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start relay");
        Self { child, log }
    }

    /// SIGKILL: no drain, no final confirmation.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for the exit; returns the exit code.
    pub fn terminate(&mut self, deadline: Duration) -> Option<i32> {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let start = Instant::now();
        while start.elapsed() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill9();
        None
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The WARN and ERROR lines of the log, for an assertion's message.
    pub fn warnings(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().filter(|l| l.contains(" WARN ") || l.contains(" ERROR ")).collect();
        format!("{} ({} warnings and errors):\n{}", self.log.display(), lines.len(), lines.join("\n"))
    }

    /// The base URL of the relay's HTTP endpoint, read from its log.
    pub async fn http_base(&self) -> String {
        wait_for("the relay's http endpoint", Duration::from_secs(30), || async {
            let log = self.log_text();
            let line = log.lines().find(|l| l.contains("http endpoint listening"))?;
            let addr = line.split("addr=").nth(1)?.split_whitespace().next()?;
            Some(format!("http://{addr}"))
        })
        .await
    }

    /// The value of an unlabelled metric from `/metrics`, if present.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let body = reqwest::get(format!("{}/metrics", self.http_base().await)).await.ok()?.text().await.ok()?;
        body.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    }
}

impl RelayProcess {
    /// Waits for the relay to exit by itself; its exit code (`None` when a
    /// signal ended it). Fails the test after `deadline`.
    pub async fn exit_code(&mut self, deadline: Duration) -> Option<i32> {
        wait_for("the relay to stop", deadline, || {
            let code = self.child.try_wait().ok().flatten().map(|s| s.code());
            async move { code }
        })
        .await
    }
}

/// Starts a stopped stack component again when dropped, also when the test
/// fails half-way.
pub struct Restart<'a> {
    pub stack: &'a Stack,
    pub component: &'static str,
}

impl Drop for Restart<'_> {
    fn drop(&mut self) {
        self.stack.script(&["start", self.component]);
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill9();
        }
    }
}

/// Polls `check` until it returns `Some`, failing the test after `deadline`.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(start.elapsed() < deadline, "timed out after {deadline:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One consumed Kafka record.
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: String,
    pub key: String,
    pub partition: i32,
    pub offset: i64,
    pub payload: Vec<u8>,
    pub headers: HashMap<String, String>,
}

impl Record {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload).expect("payload is JSON")
    }
}

/// Reads `topics` from the beginning until `count` distinct messages (by
/// `event_id`) arrived, then goes on reading to the end: it fetches the high
/// watermark of every partition of every topic at that moment and returns
/// only once its position on each partition has reached it (a partition with
/// no data counts as reached). The result holds every record up to those end
/// offsets, duplicates included, so "no duplicates" and duplicate counts
/// computed from it see everything written before the count was reached,
/// also copies that came after the first `count` distinct messages.
/// `deadline` (for the whole call) passing fails the test.
pub fn consume(bootstrap: &str, topics: &[&str], count: usize, deadline: Duration) -> Vec<Record> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("test-{}", uuid::Uuid::new_v4()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("topic.metadata.refresh.interval.ms", "500")
        .create()
        .expect("consumer");
    consumer.subscribe(topics).expect("subscribe");
    let mut records = Vec::new();
    let mut unique = std::collections::HashSet::new();
    // Next offset to read per (topic, partition), from the records seen.
    let mut next: HashMap<(String, i32), i64> = HashMap::new();
    // The end offsets to reach, fetched once `count` distinct messages arrived.
    let mut ends: Option<Vec<(String, i32, i64)>> = None;
    let start = Instant::now();
    loop {
        if ends.is_none() && unique.len() >= count {
            ends = Some(end_offsets(&consumer, topics, deadline.saturating_sub(start.elapsed())));
        }
        if let Some(ends) = &ends {
            let positions = consumer.position().ok();
            let behind: Vec<String> = ends
                .iter()
                .filter(|(topic, partition, high)| {
                    let seen = next.get(&(topic.clone(), *partition)).copied().unwrap_or(-1);
                    // The assignment's position also moves past records that
                    // are never returned (transaction markers).
                    let position = positions
                        .as_ref()
                        .and_then(|p| p.find_partition(topic, *partition))
                        .and_then(|e| e.offset().to_raw())
                        .unwrap_or(-1);
                    seen.max(position) < *high
                })
                .map(|(topic, partition, high)| format!("{topic}/{partition} (end {high})"))
                .collect();
            if behind.is_empty() {
                break;
            }
            assert!(
                start.elapsed() < deadline,
                "timed out after {deadline:?}: {count} distinct messages arrived from {topics:?}, but reading to the end offsets did not finish: {behind:?}"
            );
        } else {
            if start.elapsed() >= deadline {
                // Where the reading stands against the end offsets tells a
                // stalled consumer from records Kafka does not hold.
                let ends = end_offsets(&consumer, topics, Duration::from_secs(10));
                let read_to =
                    |topic: &String, partition: i32| next.get(&(topic.clone(), partition)).copied().unwrap_or(0);
                if !ends.is_empty() && ends.iter().all(|(topic, partition, high)| read_to(topic, *partition) >= *high) {
                    // Everything Kafka holds was read and messages are still
                    // missing: the caller's checks (`assert_all_present`)
                    // name them and where their publish state says they are.
                    eprintln!("consume: read to the end offsets with {} of {count} distinct messages", unique.len());
                    return records;
                }
                let standing: Vec<String> = ends
                    .iter()
                    .map(|(topic, partition, high)| {
                        format!("{topic}/{partition}: read to {} of {high}", read_to(topic, *partition))
                    })
                    .collect();
                panic!(
                    "timed out after {deadline:?}: {} of {count} distinct messages arrived from {topics:?} ({} records; {standing:?})",
                    unique.len(),
                    records.len()
                );
            }
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(msg)) => {
                let mut headers = HashMap::new();
                if let Some(h) = msg.headers() {
                    for header in h.iter() {
                        let value = header.value.map(|v| String::from_utf8_lossy(v).into_owned()).unwrap_or_default();
                        headers.insert(header.key.to_string(), value);
                    }
                }
                unique.insert(
                    headers.get("event_id").cloned().unwrap_or_else(|| format!("{}-{}", msg.partition(), msg.offset())),
                );
                let slot = next.entry((msg.topic().to_string(), msg.partition())).or_insert(0);
                *slot = (*slot).max(msg.offset() + 1);
                records.push(Record {
                    topic: msg.topic().to_string(),
                    key: msg.key().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default(),
                    partition: msg.partition(),
                    offset: msg.offset(),
                    payload: msg.payload().map(|p| p.to_vec()).unwrap_or_default(),
                    headers,
                });
            }
            Some(Err(err)) => {
                // Topics may not exist yet when the test starts consuming.
                let text = err.to_string();
                assert!(text.contains("UnknownTopic") || text.contains("Unknown topic"), "consumer error: {err}");
            }
            None => {}
        }
    }
    records
}

/// The high watermark of every partition of `topics` now, as (topic,
/// partition, end offset); a partition with no data (low = high) is left
/// out, as is a topic that does not exist.
fn end_offsets(consumer: &BaseConsumer, topics: &[&str], budget: Duration) -> Vec<(String, i32, i64)> {
    let timeout = budget.clamp(Duration::from_secs(1), Duration::from_secs(30));
    let mut ends = Vec::new();
    for topic in topics {
        let metadata = consumer.fetch_metadata(Some(topic), timeout).expect("topic metadata");
        for t in metadata.topics().iter().filter(|t| t.name() == *topic && t.error().is_none()) {
            for partition in t.partitions() {
                let (low, high) =
                    consumer.fetch_watermarks(topic, partition.id(), timeout).expect("partition watermarks");
                if high > low {
                    ends.push((topic.to_string(), partition.id(), high));
                }
            }
        }
    }
    ends
}

/// Inserts one outbox row in its own transaction; returns its id.
pub async fn insert_row(client: &Client, aggregate_type: &str, aggregate_id: &str, seq: i64) -> i64 {
    let payload = serde_json::json!({ "entity": aggregate_id, "seq": seq });
    client
        .query_one(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, kind, entity_version, payload)
             VALUES ($1, $2, 'Changed', 'event', $3, $4) RETURNING id",
            &[&aggregate_type, &aggregate_id, &seq, &payload],
        )
        .await
        .expect("insert outbox row")
        .get(0)
}

/// Inserts one state row (`event_type` StateChanged) in its own
/// transaction; a `None` payload is a tombstone. Returns its id.
pub async fn insert_state(
    client: &Client,
    aggregate_type: &str,
    aggregate_id: &str,
    version: i64,
    payload: Option<serde_json::Value>,
) -> i64 {
    client
        .query_one(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, kind, entity_version, payload)
             VALUES ($1, $2, 'StateChanged', 'state', $3, $4) RETURNING id",
            &[&aggregate_type, &aggregate_id, &version, &payload],
        )
        .await
        .expect("insert state row")
        .get(0)
}

/// Waits until `client`'s is the only session on its database: a backend
/// reports its statistics (and its CPU to the postmaster) when it exits.
pub async fn wait_other_sessions_ended(client: &Client, what: &str, deadline: Duration) {
    wait_for(what, deadline, || async {
        let others: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .ok()?
            .get(0);
        (others == 0).then_some(())
    })
    .await;
}

/// Waits until every row of the outbox is published; returns the count.
pub async fn wait_all_published(client: &Client, deadline: Duration) -> i64 {
    wait_for("every outbox row to be marked published", deadline, || async {
        let row = client
            // The view shows both publish-state layouts alike.
            .query_one("SELECT count(*) FILTER (WHERE published_at IS NULL), count(*) FROM outbox_publish_state", &[])
            .await
            .ok()?;
        let (pending, total): (i64, i64) = (row.get(0), row.get(1));
        (pending == 0).then_some(total)
    })
    .await
}

/// Per key, the `seq` payload field of the first occurrence of each message,
/// in Kafka order: duplicates may repeat an earlier message but must never
/// reorder first occurrences.
pub fn first_occurrence_order(records: &[Record]) -> HashMap<String, Vec<i64>> {
    let mut seen = std::collections::HashSet::new();
    let mut by_key: HashMap<String, Vec<i64>> = HashMap::new();
    let mut sorted: Vec<&Record> = records.iter().collect();
    sorted.sort_by_key(|r| (r.topic.clone(), r.partition, r.offset));
    for record in sorted {
        let event_id = record.headers.get("event_id").cloned().unwrap_or_default();
        if seen.insert(event_id) {
            let seq = record.json()["seq"].as_i64().expect("seq");
            by_key.entry(record.key.clone()).or_default().push(seq);
        }
    }
    by_key
}

/// Starts `writers` concurrent writers that together insert `total` rows over
/// `entities` entities. Each write locks its entity row and bumps its version
/// in the same transaction as the outbox insert (the documented rule), so per
/// entity the commit order is the `seq` order 1, 2, 3...
pub fn spawn_workload(url: &str, total: usize, entities: usize, writers: usize) -> tokio::task::JoinHandle<()> {
    spawn_paced_workload(url, total, entities, writers, None)
}

/// [`spawn_workload`] at about `rows_per_sec` in all (as fast as possible if `None`).
pub fn spawn_paced_workload(
    url: &str,
    total: usize,
    entities: usize,
    writers: usize,
    rows_per_sec: Option<f64>,
) -> tokio::task::JoinHandle<()> {
    let url = url.to_string();
    tokio::spawn(async move {
        let setup = connect(&url).await;
        setup
            .batch_execute("CREATE TABLE IF NOT EXISTS entities (id text PRIMARY KEY, version bigint NOT NULL)")
            .await
            .expect("entities table");
        let mut tasks = Vec::new();
        for w in 0..writers {
            let url = url.clone();
            let share = total / writers + usize::from(w < total % writers);
            tasks.push(tokio::spawn(async move {
                let mut client = connect(&url).await;
                let mut ticker = rows_per_sec.map(|rate| {
                    let mut t = tokio::time::interval(Duration::from_secs_f64(writers as f64 / rate));
                    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    t
                });
                for i in 0..share {
                    if let Some(ticker) = ticker.as_mut() {
                        ticker.tick().await;
                    }
                    let entity = format!("entity-{}", (i * writers + w) % entities);
                    let tx = client.transaction().await.expect("begin");
                    let version: i64 = tx
                        .query_one(
                            "INSERT INTO entities (id, version) VALUES ($1, 1)
                             ON CONFLICT (id) DO UPDATE SET version = entities.version + 1 RETURNING version",
                            &[&entity],
                        )
                        .await
                        .expect("lock entity")
                        .get(0);
                    let payload = serde_json::json!({ "entity": entity, "seq": version, "pad": "x".repeat(200) });
                    // occurred_at from the clock at the INSERT, the last
                    // statement before COMMIT (not now(), the transaction's
                    // start): latency figures then start at the commit.
                    tx.execute(
                        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, kind, entity_version, payload, occurred_at)
                         VALUES ('entity', $1, 'Changed', 'event', $2, $3, clock_timestamp())",
                        &[&entity, &version, &payload],
                    )
                    .await
                    .expect("insert outbox row");
                    tx.commit().await.expect("commit");
                }
            }));
        }
        for task in tasks {
            task.await.expect("writer");
        }
    })
}

/// Asserts per-key order: the first occurrences of each key's messages come
/// in `seq` order 1..=n with nothing missing.
pub fn assert_per_key_order(records: &[Record]) {
    for (key, seqs) in first_occurrence_order(records) {
        let expected: Vec<i64> = (1..=seqs.len() as i64).collect();
        assert_eq!(seqs, expected, "per-key order of {key} (first occurrences)");
    }
}

/// Asserts every outbox row's event id is among the records.
pub async fn assert_all_present(client: &Client, records: &[Record]) {
    let ids: std::collections::HashSet<&str> =
        records.iter().filter_map(|r| r.headers.get("event_id").map(String::as_str)).collect();
    let rows = client
        .query(
            "SELECT o.event_id::text, o.id, s.kafka_partition, s.kafka_offset, s.published_at::text \
             FROM outbox AS o JOIN outbox_publish_state AS s USING (id)",
            &[],
        )
        .await
        .expect("read event ids");
    let at: HashMap<(i32, i64), &str> = records
        .iter()
        .map(|r| ((r.partition, r.offset), r.headers.get("event_id").map(String::as_str).unwrap_or("")))
        .collect();
    // For each missing row: its id, where its publish state says it landed,
    // and what the consumer found there.
    let missing: Vec<String> = rows
        .iter()
        .filter(|r| !ids.contains(r.get::<_, String>(0).as_str()))
        .map(|r| {
            let (partition, offset): (Option<i32>, Option<i64>) = (r.get(2), r.get(3));
            let found = partition.zip(offset).and_then(|key| at.get(&key).copied());
            format!(
                "row {} ({}) recorded at {partition:?}/{offset:?} ({:?}); Kafka there: {found:?}",
                r.get::<_, i64>(1),
                r.get::<_, String>(0),
                r.get::<_, Option<String>>(4)
            )
        })
        .collect();
    assert!(missing.is_empty(), "{} of {} messages never reached Kafka: {missing:#?}", missing.len(), rows.len());
}

/// Waits until the test database's slot has confirmed a position at or past
/// `lsn` (text form), i.e. the slot no longer retains WAL before it.
pub async fn wait_slot_confirmed_past(client: &Client, slot: &str, lsn: &str, what: &str, deadline: Duration) {
    wait_for(what, deadline, || async {
        let row = client
            .query_one(
                "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot, &lsn],
            )
            .await
            .ok()?;
        row.get::<_, bool>(0).then_some(())
    })
    .await
}

/// Peak resident memory of a process, in KiB (Linux VmHWM).
pub fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}
