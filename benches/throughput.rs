//! Relay throughput and latency against the real local stack, with a
//! baseline measured in the same run: Kafka's own producer performance tool
//! sending records of the same size with the same producer guarantees.
//!
//! Run: `scripts/bench` (brings the stack up, then `cargo bench --bench throughput`).
//! Writes a Markdown table to stdout and `target/bench-throughput.md`.

#[path = "../tests/it/common/mod.rs"]
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

#[path = "support/scale.rs"]
mod scale;

const ROWS: usize = 100_000;
const ENTITIES: usize = 1_000;
const WRITERS: usize = 8;
const LIVE_ROWS: usize = 20_000;
const LIVE_RATE: f64 = 2_000.0;

/// The live phase's rate: `BENCH_LIVE_RATE` rows/s, else [`LIVE_RATE`].
fn live_rate() -> f64 {
    std::env::var("BENCH_LIVE_RATE")
        .ok()
        .and_then(|r| r.parse().ok())
        .filter(|r: &f64| r.is_finite() && *r > 0.0)
        .unwrap_or(LIVE_RATE)
}

/// A memory figure of `/proc/<pid>/status` in MiB (`field` e.g. `VmHWM:`).
fn status_mib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix(field)).map(|v| v.trim().trim_end_matches("kB").trim().to_string())
        })
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

fn peak_rss_mib(pid: u32) -> f64 {
    status_mib(pid, "VmHWM:")
}

/// Clock ticks per second of `/proc/*/stat` times (USER_HZ, 100 on Linux).
const TICKS_PER_SEC: f64 = 100.0;

/// CPU seconds (user + system) a process used so far; with `children`, also
/// those of its exited, reaped children.
fn cpu_seconds(pid: u32, children: bool) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the command name, which is in parentheses and may hold spaces.
    let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else { return 0.0 };
    let fields: Vec<f64> = rest.split(' ').map(|f| f.parse().unwrap_or(0.0)).collect();
    // utime, stime, cutime, cstime are fields 14-17 of stat, 12-15 here.
    let own = fields.get(11).unwrap_or(&0.0) + fields.get(12).unwrap_or(&0.0);
    let reaped = if children { fields.get(13).unwrap_or(&0.0) + fields.get(14).unwrap_or(&0.0) } else { 0.0 };
    (own + reaped) / TICKS_PER_SEC
}

/// Where `scripts/stack` keeps the components' state and pid files.
fn stack_dir(stack: &Stack) -> std::path::PathBuf {
    std::env::var_os("RELAY_STACK_DIR").map_or_else(|| stack.repo.join(".stack"), Into::into)
}

/// CPU seconds of the stack's Postgres so far, in three parts: the
/// walsenders (logical decoding for the slot), the client backends (the
/// relay's SQL: publish state, lease, lag samples), and the rest (the
/// postmaster, background workers such as the WAL writer and autovacuum,
/// and every backend that already exited).
#[derive(Debug, Clone, Copy, Default)]
struct PostgresCpu {
    walsender: f64,
    backends: f64,
    other: f64,
}

impl PostgresCpu {
    fn total(&self) -> f64 {
        self.walsender + self.backends + self.other
    }

    fn minus(&self, earlier: &Self) -> Self {
        Self {
            walsender: self.walsender - earlier.walsender,
            backends: self.backends - earlier.backends,
            other: self.other - earlier.other,
        }
    }
}

fn postgres_cpu_seconds(stack: &Stack) -> PostgresCpu {
    let pid_file = stack_dir(stack).join("pg/data/postmaster.pid");
    let Some(postmaster) = std::fs::read_to_string(pid_file).ok().and_then(|s| s.lines().next()?.trim().parse().ok())
    else {
        return PostgresCpu { other: f64::NAN, ..Default::default() };
    };
    let mut cpu = PostgresCpu { other: cpu_seconds(postmaster, true), ..Default::default() };
    let Ok(entries) = std::fs::read_dir("/proc") else { return cpu };
    for pid in entries.flatten().filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok()) {
        let parent = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(") ").and_then(|(_, r)| r.split(' ').nth(1)?.parse::<u32>().ok()));
        if parent != Some(postmaster) {
            continue;
        }
        // The process title: "postgres: walsender ...", "postgres: <user>
        // <db> <host>(<port>) ..." for a client backend, else a worker.
        let title = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let seconds = cpu_seconds(pid, false);
        if title.contains("walsender") {
            cpu.walsender += seconds;
        } else if title.contains('(') {
            cpu.backends += seconds;
        } else {
            cpu.other += seconds;
        }
    }
    cpu
}

/// CPU seconds of the stack's Kafka broker so far.
fn broker_cpu_seconds(stack: &Stack) -> f64 {
    std::fs::read_to_string(stack_dir(stack).join("kafka/kafka.pid"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .map_or(f64::NAN, |pid| cpu_seconds(pid, false))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

/// Kafka's ProducerPerformance with the relay's producer settings.
fn baseline_records_per_sec(bootstrap: &str, topic: &str) -> f64 {
    let libs = std::env::var("RELAY_KAFKA_LIBS").expect("RELAY_KAFKA_LIBS");
    let output = Command::new("java")
        .args(["-Xmx512m", "-cp", &format!("{libs}/*"), "org.apache.kafka.tools.ProducerPerformance"])
        .args(["--topic", topic, "--num-records", &ROWS.to_string(), "--record-size", "300", "--throughput", "-1"])
        .args([
            "--producer-props",
            &format!("bootstrap.servers={bootstrap}"),
            "acks=all",
            "enable.idempotence=true",
            "linger.ms=5",
            "compression.type=lz4",
        ])
        .output()
        .expect("run ProducerPerformance");
    let text = String::from_utf8_lossy(&output.stdout);
    // Last line: "100000 records sent, 81234.5 records/sec (23.24 MB/sec), ..."
    text.lines()
        .rev()
        .find_map(|l| l.split(" records sent, ").nth(1))
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| {
            panic!("cannot read ProducerPerformance output:\n{text}\n{}", String::from_utf8_lossy(&output.stderr))
        })
}

/// One way of running the relay, measured on the same workload.
struct Scenario {
    name: &'static str,
    extra_toml: String,
    avro: bool,
    publish_state: PublishState,
    /// `sslmode=disable` in the relay's Postgres URL: what TLS to Postgres
    /// costs (the stack's Postgres serves TLS; the default `prefer` uses it).
    plain_postgres: bool,
}

/// Where a bench run's relay records publish state, if at all.
#[derive(Clone, Copy, PartialEq)]
enum PublishState {
    /// The default: in the outbox row.
    OutboxRow,
    /// `checkpoint.publish_state = "side_table"`.
    SideTable,
    /// None recorded (bench-only switch), to measure what recording it
    /// costs; completion is read from Kafka.
    Skipped,
}

impl PublishState {
    /// The config lines that select it.
    fn toml(self) -> &'static str {
        match self {
            PublishState::SideTable => "checkpoint.publish_state = \"side_table\"\n",
            PublishState::OutboxRow | PublishState::Skipped => "",
        }
    }

    /// A cheap query that is true once `total` rows' publish state is
    /// recorded (no scan of the whole outbox: its CPU would count as the
    /// drain's).
    fn recorded_query(self, total: usize) -> String {
        match self {
            // An index-only count of the narrow side table.
            PublishState::SideTable => format!("SELECT count(*) >= {total} FROM outbox_relay_published"),
            // Through the partial index of unpublished rows, which empties.
            PublishState::OutboxRow | PublishState::Skipped => {
                "SELECT NOT EXISTS (SELECT 1 FROM outbox WHERE published_at IS NULL)".to_string()
            }
        }
    }
}

/// The relay's own count of acknowledged rows over all topics (the sum of
/// `outbox_relay_published_total`'s series), read from `/metrics`.
async fn relay_acknowledged(relay: &RelayProcess) -> Option<f64> {
    let body = reqwest::get(format!("{}/metrics", relay.http_base().await)).await.ok()?.text().await.ok()?;
    let series = body
        .lines()
        .filter(|l| l.starts_with("outbox_relay_published_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
    Some(series.sum())
}

/// Waits until the publish state of all `total` rows is recorded without
/// loading Postgres meanwhile (its backends' CPU counts as the drain's):
/// first the relay's own count of acknowledged rows (from `/metrics`),
/// then one cheap query per 100 ms until the last of them are recorded.
/// (Not the tests' `wait_all_published`: it reads the view over both
/// layouts, a join of the whole table every 100 ms, which would load
/// Postgres during the drain.)
async fn wait_recorded(
    client: &tokio_postgres::Client,
    relay: &RelayProcess,
    publish_state: PublishState,
    total: usize,
    deadline: Duration,
) {
    wait_for("the relay to count every row acknowledged", deadline, || async {
        (relay_acknowledged(relay).await? >= total as f64).then_some(())
    })
    .await;
    wait_recorded_in_postgres(client, publish_state, total, deadline).await;
}

/// Waits until Postgres holds the publish state of `total` rows, one
/// cheap query per 100 ms.
async fn wait_recorded_in_postgres(
    client: &tokio_postgres::Client,
    publish_state: PublishState,
    total: usize,
    deadline: Duration,
) {
    let done = publish_state.recorded_query(total);
    wait_for("every row's publish state to be recorded", deadline, || async {
        client.query_one(&done, &[]).await.ok()?.get::<_, bool>(0).then_some(())
    })
    .await;
}

/// Waits until `topic` holds `total` records (the sum of its partitions'
/// high watermarks): the end of a drain when no publish state is recorded.
async fn wait_kafka_holds(stack: &Stack, topic: &str, total: i64, deadline: Duration) {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", &stack.bootstrap).create().expect("consumer");
    wait_for(&format!("{total} records on {topic}"), deadline, || async {
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(5)).ok()?;
        let partitions = metadata.topics().first()?.partitions().len() as i32;
        let mut held = 0;
        for partition in 0..partitions {
            held += consumer.fetch_watermarks(topic, partition, Duration::from_secs(5)).ok()?.1;
        }
        (held >= total).then_some(())
    })
    .await;
}

struct Figures {
    drain_rate: f64,
    drain_rss: f64,
    /// CPU seconds per 100k rows during the drain: the relay, Postgres, the broker.
    drain_cpu: [f64; 3],
    /// Postgres's part of it, split.
    drain_postgres: PostgresCpu,
    live: Vec<f64>,
    /// The relay's own histograms over the live phase, each as (bucket
    /// bound in seconds, samples in it or below), in the order of
    /// [`RELAY_HISTOGRAMS`].
    live_relay: [Vec<(f64, f64)>; 3],
    live_rss: f64,
    write_rate: f64,
}

async fn run_scenario(stack: &Stack, scenario: &Scenario) -> Figures {
    let db = TestDb::new(stack).await;
    let config = db.write_config(&format!("{}\n{}", scenario.extra_toml, scenario.publish_state.toml()));
    if scenario.plain_postgres {
        let text = std::fs::read_to_string(&config).expect("read config");
        let plain = text.replace(
            &format!("postgres.url = \"{}\"", db.url),
            &format!("postgres.url = \"{}?sslmode=disable\"", db.url),
        );
        assert_ne!(plain, text, "the URL is in the config");
        std::fs::write(&config, plain).expect("write config");
    }
    db.migrate(&config);
    if scenario.avro {
        let output = relay_command(&config).args(["schemas", "register"]).output().expect("register schemas");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stdout));
    }
    let client = db.client().await;

    // Drain: 100k rows written by 8 writers with the relay stopped, then the
    // relay publishes the backlog (pure relay throughput).
    let started = Instant::now();
    spawn_workload(&db.url, ROWS, ENTITIES, WRITERS).await.expect("workload");
    let write_rate = ROWS as f64 / started.elapsed().as_secs_f64();
    // The writers' sessions gone first: a backend that exits during the
    // drain moves its whole CPU time into the postmaster's reaped total.
    wait_other_sessions_ended(&client, "the writers' sessions to end", Duration::from_secs(60)).await;
    let (postgres_before, broker_before) = (postgres_cpu_seconds(stack), broker_cpu_seconds(stack));
    let recorded = scenario.publish_state != PublishState::Skipped;
    let skip: &[(&str, &str)] = if recorded { &[] } else { &[("RELAY_BENCH_SKIP_PUBLISH_STATE", "1")] };
    let relay = RelayProcess::start_with_env(&config, skip);
    let started = Instant::now();
    let topic = db.topic("entity");
    if recorded {
        wait_recorded(&client, &relay, scenario.publish_state, ROWS, Duration::from_secs(900)).await;
    } else {
        wait_kafka_holds(stack, &topic, ROWS as i64, Duration::from_secs(900)).await;
    }
    let drain_rate = ROWS as f64 / started.elapsed().as_secs_f64();
    let drain_rss = peak_rss_mib(relay.child.id());
    let per_100k = 100_000.0 / ROWS as f64;
    let postgres = postgres_cpu_seconds(stack).minus(&postgres_before);
    let drain_postgres = PostgresCpu {
        walsender: postgres.walsender * per_100k,
        backends: postgres.backends * per_100k,
        other: postgres.other * per_100k,
    };
    let drain_cpu = [
        cpu_seconds(relay.child.id(), false) * per_100k,
        drain_postgres.total(),
        (broker_cpu_seconds(stack) - broker_before) * per_100k,
    ];

    // Live: writers at a steady rate (live_rate()) while the relay runs;
    // latency from each row's commit (occurred_at; the transactions are
    // short) to the moment a consumer holds the record.
    let consumer_topic = db.topic("entity");
    let bootstrap = stack.bootstrap.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let consumer_done = done.clone();
    let consumer = std::thread::spawn(move || {
        consume_new_with_latency(&bootstrap, &consumer_topic, LIVE_ROWS, &consumer_done, ready_tx)
    });
    ready_rx.recv_timeout(Duration::from_secs(60)).expect("consumer assigned");
    let relay_before = relay_histograms(&relay).await;
    spawn_paced_workload(&db.url, LIVE_ROWS, ENTITIES, WRITERS, Some(live_rate())).await.expect("live workload");
    if recorded {
        wait_recorded(&client, &relay, scenario.publish_state, ROWS + LIVE_ROWS, Duration::from_secs(600)).await;
    } else {
        wait_kafka_holds(stack, &topic, (ROWS + LIVE_ROWS) as i64, Duration::from_secs(600)).await;
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut live = consumer.join().expect("consumer");
    live.sort_by(|a, b| a.total_cmp(b));
    let relay_after = relay_histograms(&relay).await;
    let live_relay = std::array::from_fn(|i| bucket_delta(&relay_before[i], &relay_after[i]));
    let live_rss = peak_rss_mib(relay.child.id());
    drop(relay);
    db.cleanup().await;
    Figures { drain_rate, drain_rss, drain_cpu, drain_postgres, live, live_relay, live_rss, write_rate }
}

/// The poll query's cost on a table with 1M published rows and 1,000
/// pending ones: EXPLAIN (ANALYZE, BUFFERS) of the query poll mode runs.
async fn poll_query_cost(stack: &Stack) -> String {
    let db = TestDb::new(stack).await;
    let config = db.write_config("");
    db.migrate(&config);
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, kind, payload, published_at, kafka_topic, kafka_partition, kafka_offset, attempts)
             SELECT 'entity', 'e' || (g % 1000), 'Changed', 'event', jsonb_build_object('seq', g, 'pad', repeat('x', 250)), now(), 't', 0, g, 1
             FROM generate_series(1, 1000000) g;
             INSERT INTO outbox (aggregate_type, aggregate_id, event_type, kind, payload)
             SELECT 'entity', 'e' || (g % 1000), 'Changed', 'event', jsonb_build_object('seq', g) FROM generate_series(1, 1000) g;",
        )
        .await
        .expect("fill table");
    // Not in the batch above: VACUUM cannot run inside a transaction block.
    client.batch_execute("VACUUM ANALYZE outbox").await.expect("vacuum");
    let relay_config = relay::Config::from_toml_str(&db.config_toml("")).expect("config");
    // The columns the relay itself would select from this table.
    let store = relay::store::Store::new(&relay_config);
    let table = store.table_layout(&client).await.expect("outbox columns");
    let sql = relay::store::RowQuery::poll(store.sql(), &table.columns)
        .replace("$1", "1000")
        .replace("$2", "1048576")
        .replace("$3", "'{}'")
        .replace("$4", "'{}'");
    let plan: Vec<String> = client
        .query(&format!("EXPLAIN (ANALYZE, BUFFERS) {sql}"), &[])
        .await
        .expect("explain")
        .iter()
        .map(|r| r.get(0))
        .collect();
    db.cleanup().await;
    plan.join("\n")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let stack = Stack::from_env();
    if std::env::var_os("BENCH_SCALE").is_some() {
        return scale::run(&stack).await;
    }
    let db = TestDb::new(&stack).await;

    // Baseline: Kafka's own producer tool, same record size and guarantees.
    let baseline_topic = format!("{}.baseline", db.topic_prefix);
    let libs = std::env::var("RELAY_KAFKA_LIBS").expect("RELAY_KAFKA_LIBS");
    let created = Command::new("java")
        .args([
            "-cp",
            &format!("{libs}/*"),
            "org.apache.kafka.tools.TopicCommand",
            "--bootstrap-server",
            &stack.bootstrap,
        ])
        .args(["--create", "--topic", &baseline_topic, "--partitions", "6", "--replication-factor", "1"])
        .output()
        .expect("create baseline topic");
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    let baseline = baseline_records_per_sec(&stack.bootstrap, &baseline_topic);
    db.cleanup().await;

    let schemas = stack.repo.join("benches/schemas");
    let scenarios = [
        Scenario {
            name: "logical, JSON",
            extra_toml: String::new(),
            avro: false,
            publish_state: PublishState::OutboxRow,
            plain_postgres: false,
        },
        Scenario {
            name: "logical, JSON, no publish state (bench only)",
            extra_toml: String::new(),
            avro: false,
            publish_state: PublishState::Skipped,
            plain_postgres: false,
        },
        Scenario {
            name: "logical, JSON, side table",
            extra_toml: String::new(),
            avro: false,
            publish_state: PublishState::SideTable,
            plain_postgres: false,
        },
        Scenario {
            name: "logical, JSON, side table, no TLS to Postgres",
            extra_toml: String::new(),
            avro: false,
            publish_state: PublishState::SideTable,
            plain_postgres: true,
        },
        // The latency side of `kafka.linger_ms`: 1 instead of 5.
        Scenario {
            name: "logical, JSON, side table, no TLS to Postgres, linger 1 ms",
            extra_toml: "kafka.linger_ms = 1".into(),
            avro: false,
            publish_state: PublishState::SideTable,
            plain_postgres: true,
        },
        Scenario {
            name: "logical, JSON, exactly-once",
            extra_toml: "kafka.delivery = \"exactly_once\"".into(),
            avro: false,
            publish_state: PublishState::OutboxRow,
            plain_postgres: false,
        },
        Scenario {
            name: "poll, JSON",
            extra_toml: "source.mode = \"poll\"".into(),
            avro: false,
            publish_state: PublishState::OutboxRow,
            plain_postgres: false,
        },
        Scenario {
            name: "logical, Avro",
            extra_toml: format!(
                "codec.format = \"avro\"\ncodec.schemas_dir = \"{}\"\ncodec.schemas.entity = \"EntityChanged.avsc\"",
                schemas.display()
            ),
            avro: true,
            publish_state: PublishState::OutboxRow,
            plain_postgres: false,
        },
    ];
    let only = std::env::var("BENCH_SCENARIOS").ok();
    let mut rows = String::new();
    for scenario in &scenarios {
        // Prefixes separated by `;` (scenario names contain commas).
        if only.as_deref().is_some_and(|o| !o.split(';').any(|n| scenario.name.starts_with(n.trim()))) {
            continue;
        }
        eprintln!("bench: {}", scenario.name);
        let f = run_scenario(&stack, scenario).await;
        let row = format!(
            "| {} | {:.0} msg/s ({:.2} x baseline) | {:.2} s / {:.2} s / {:.2} s | {:.2} s / {:.2} s / {:.2} s | {:.1} ms / {:.1} ms ({} samples) | {} / {} | {} / {} | {:.0} MiB / {:.0} MiB | {:.0} rows/s |\n",
            scenario.name,
            f.drain_rate,
            f.drain_rate / baseline,
            f.drain_cpu[0],
            f.drain_cpu[1],
            f.drain_cpu[2],
            f.drain_postgres.walsender,
            f.drain_postgres.backends,
            f.drain_postgres.other,
            percentile(&f.live, 0.50) * 1000.0,
            percentile(&f.live, 0.99) * 1000.0,
            f.live.len(),
            bucket_quantile(&f.live_relay[0], 0.50),
            bucket_quantile(&f.live_relay[0], 0.99),
            bucket_quantile(&f.live_relay[1], 0.99),
            bucket_quantile(&f.live_relay[2], 0.99),
            f.drain_rss,
            f.live_rss,
            f.write_rate,
        );
        eprint!("{row}");
        rows.push_str(&row);
    }
    let plan = if only.is_none() { poll_query_cost(&stack).await } else { String::from("(skipped)") };
    let live = live_rate();
    let report = format!(
        "Baseline (Kafka ProducerPerformance, {ROWS} records of 300 B, acks=all, idempotent, lz4, linger 5 ms): **{baseline:.0} records/s**\n\n\
         | relay | drain of a {ROWS}-row backlog | drain CPU per 100k rows: relay / Postgres / broker | Postgres's part: walsender / relay's SQL backends / rest | commit -> consumer latency at {live} rows/s, p50 / p99 | the relay's own commit -> Kafka ack, p50 / p99 (histogram bucket) | its outer parts, p99: commit -> read from the slot (Postgres) / producer -> ack (Kafka) | peak RSS (drain / after live) | writers alone |\n\
         |---|---|---|---|---|---|---|---|---|\n{rows}\n\
         Poll query on 1,000,000 published + 1,000 pending rows (`EXPLAIN (ANALYZE, BUFFERS)`):\n\n```\n{plan}\n```\n"
    );
    println!("{report}");
    let _ = std::fs::write(stack.repo.join("target/bench-throughput.md"), &report);
}

/// The relay's latency histograms the harness reports: the whole commit ->
/// acknowledgement, and its Postgres and Kafka parts.
const RELAY_HISTOGRAMS: [&str; 3] =
    ["outbox_relay_publish_latency_seconds", "outbox_relay_source_delay_seconds", "outbox_relay_kafka_ack_seconds"];

/// Each of [`RELAY_HISTOGRAMS`] from one scrape: per bucket bound
/// (seconds), the samples at or below it so far.
async fn relay_histograms(relay: &RelayProcess) -> [Vec<(f64, f64)>; 3] {
    let url = format!("{}/metrics", relay.http_base().await);
    let body = reqwest::get(url).await.expect("scrape /metrics").text().await.expect("metrics body");
    RELAY_HISTOGRAMS.map(|name| buckets_of(&body, name))
}

fn buckets_of(body: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    body.lines()
        .filter_map(|line| {
            let (bound, count) = line.strip_prefix(prefix.as_str())?.split_once("\"} ")?;
            let bound = if bound == "+Inf" { f64::INFINITY } else { bound.parse().ok()? };
            Some((bound, count.trim().parse().ok()?))
        })
        .collect()
}

/// The rows each bucket gained between two scrapes.
fn bucket_delta(before: &[(f64, f64)], after: &[(f64, f64)]) -> Vec<(f64, f64)> {
    after
        .iter()
        .map(|&(bound, count)| {
            let earlier = before.iter().find(|(b, _)| *b == bound).map_or(0.0, |(_, c)| *c);
            (bound, count - earlier)
        })
        .collect()
}

/// The smallest bucket bound holding at least the `q` share of the rows,
/// as "<= N ms".
fn bucket_quantile(buckets: &[(f64, f64)], q: f64) -> String {
    let total = buckets.iter().map(|(_, c)| *c).fold(0.0, f64::max);
    match buckets.iter().find(|(_, c)| total > 0.0 && *c >= q * total) {
        Some((bound, _)) if bound.is_finite() => format!("<= {:.1} ms", bound * 1000.0),
        Some(_) => "> largest bucket".into(),
        None => "no samples".into(),
    }
}

/// Joins a fresh group at the end of `topic`, signals `ready` once
/// partitions are assigned, then returns for each of the next `count`
/// records (or fewer, see the loop) the seconds from its `occurred_at` header to its receipt.
fn consume_new_with_latency(
    bootstrap: &str,
    topic: &str,
    count: usize,
    done: &std::sync::atomic::AtomicBool,
    ready: std::sync::mpsc::Sender<()>,
) -> Vec<f64> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("bench-{}", uuid::Uuid::new_v4()))
        .set("auto.offset.reset", "latest")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut signalled = false;
    let mut out = Vec::with_capacity(count);
    let mut last_record = Instant::now();
    // Until every record arrived, or the rows are all published and nothing
    // more came for 3 s.
    while out.len() < count
        && !(done.load(std::sync::atomic::Ordering::Relaxed) && last_record.elapsed() > Duration::from_secs(3))
    {
        let polled = consumer.poll(Duration::from_millis(50));
        if !signalled && consumer.assignment().map(|a| a.count() > 0).unwrap_or(false) {
            // Make the "latest" position concrete before the writers start.
            let _ = consumer.position();
            signalled = true;
            let _ = ready.send(());
        }
        if let Some(Ok(msg)) = polled {
            last_record = Instant::now();
            let now = chrono::Utc::now();
            let occurred = msg
                .headers()
                .and_then(|h| h.iter().find(|h| h.key == "occurred_at").and_then(|h| h.value.map(|v| v.to_vec())))
                .and_then(|v| String::from_utf8(v).ok())
                .and_then(|s| chrono::DateTime::parse_from_rfc3339(&s).ok());
            if let Some(occurred) = occurred {
                out.push((now - occurred.with_timezone(&chrono::Utc)).num_microseconds().unwrap_or(0) as f64 / 1e6);
            }
        }
    }
    out
}
