//! Scale runs of the throughput harness (`scripts/bench scale`): does the
//! drain rate or the relay's memory move with the backlog's size, the
//! number of distinct entities, or the number of topics? Each case fills a
//! fresh outbox with the relay stopped (transactions of 1,000 rows, ~250 B
//! payloads), then times the relay's drain until every row's publish state
//! is recorded, sampling its RSS every 500 ms. Ratios are against the first
//! case, measured in the same run. `BENCH_SCALE_PUBLISH_STATE=side_table`
//! runs every case with publish state in the side table.
//!
//! The many-topics case has a second baseline: librdkafka alone
//! (`librdkafka_baseline.py`, Python's confluent-kafka with the relay's
//! producer settings) over one topic and over the same 100, paced at the
//! rate the relay drained them and unpaced, so the report says how much of
//! the relay's growth is the client library's. A last case repeats the
//! 100 topics with a 50 ms linger.

use super::*;

struct Case {
    name: &'static str,
    rows: usize,
    entities: usize,
    /// Aggregate types, one topic each.
    types: usize,
    /// `kafka.linger_ms`, when not the default.
    linger_ms: Option<u64>,
}

const CASES: [Case; 5] = [
    Case {
        name: "100k rows, 1,000 entities, 1 topic (reference)",
        rows: 100_000,
        entities: 1_000,
        types: 1,
        linger_ms: None,
    },
    Case { name: "1M rows, 1,000 entities, 1 topic", rows: 1_000_000, entities: 1_000, types: 1, linger_ms: None },
    Case { name: "1M rows, 1M entities, 1 topic", rows: 1_000_000, entities: 1_000_000, types: 1, linger_ms: None },
    Case { name: "1M rows, 1,000 entities, 100 topics", rows: 1_000_000, entities: 1_000, types: 100, linger_ms: None },
    // Over 600 partitions a 5 ms linger leaves about one record per
    // batch at these rates; librdkafka's cost is per batch.
    Case {
        name: "1M rows, 1,000 entities, 100 topics, linger_ms 50",
        rows: 1_000_000,
        entities: 1_000,
        types: 100,
        linger_ms: Some(50),
    },
];

struct ScaleFigures {
    drain_rate: f64,
    relay_cpu_per_100k: f64,
    /// RSS when a tenth of the backlog was published, and the peak.
    rss_at_tenth: f64,
    peak_rss: f64,
    /// WAL written during the drain, MiB per 100k rows, and the checkpoints
    /// Postgres ran meanwhile (what a larger backlog costs Postgres).
    wal_mib_per_100k: f64,
    checkpoints: i64,
}

/// The server's WAL position (bytes) and its checkpoint count so far.
async fn wal_and_checkpoints(client: &tokio_postgres::Client) -> (f64, i64) {
    let row = client
        .query_one(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::float8, \
                    (SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter)",
            &[],
        )
        .await
        .expect("wal position and checkpoints");
    (row.get(0), row.get(1))
}

fn rss_mib(pid: u32) -> f64 {
    status_mib(pid, "VmRSS:")
}

async fn fill(client: &tokio_postgres::Client, case: &Case) {
    let chunks = case.rows / 1_000;
    let aggregate = if case.types > 1 { format!("'entity' || (g % {})", case.types) } else { "'entity'".into() };
    client
        .batch_execute(&format!(
            "DO $$ BEGIN FOR c IN 0..{last} LOOP
               INSERT INTO outbox (aggregate_type, aggregate_id, event_type, kind, entity_version, payload)
               SELECT {aggregate}, 'e-' || (g % {entities}), 'Changed', 'event', g / {entities} + 1,
                      jsonb_build_object('seq', g / {entities} + 1, 'pad', repeat('x', 200))
               FROM generate_series(c * 1000, c * 1000 + 999) g;
               COMMIT;
             END LOOP; END $$",
            last = chunks - 1,
            entities = case.entities,
        ))
        .await
        .expect("fill the outbox");
}

/// Deletes the case's topics: 600 partitions left behind per run slow the
/// broker for every run after it on the same stack.
async fn delete_topics(stack: &Stack, db: &TestDb, case: &Case) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let names: Vec<String> = if case.types > 1 {
        (0..case.types).map(|i| db.topic(&format!("entity{i}"))).collect()
    } else {
        vec![db.topic("entity")]
    };
    let admin: AdminClient<DefaultClientContext> =
        rdkafka::ClientConfig::new().set("bootstrap.servers", &stack.bootstrap).create().expect("admin client");
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let results = admin.delete_topics(&names, &AdminOptions::new()).await.expect("delete the case's topics");
    for result in results {
        if let Err((topic, code)) = result {
            eprintln!("bench scale: could not delete topic {topic}: {code}");
        }
    }
}

async fn run_case(stack: &Stack, case: &Case, publish_state: PublishState) -> ScaleFigures {
    let db = TestDb::new(stack).await;
    let linger = case.linger_ms.map(|ms| format!("kafka.linger_ms = {ms}\n")).unwrap_or_default();
    let config = db.write_config(&format!("{}\n{linger}", publish_state.toml()));
    db.migrate(&config);
    let client = db.client().await;
    fill(&client, case).await;
    let (wal_before, checkpoints_before) = wal_and_checkpoints(&client).await;
    let relay = RelayProcess::start(&config);
    let started = Instant::now();
    let pid = relay.child.id();
    let (mut rss_at_tenth, mut peak_rss) = (f64::NAN, 0.0f64);
    // Progress from the relay's own count of acknowledged rows: counting the
    // published rows of the whole outbox every 500 ms would be Postgres work
    // that grows with the backlog, inside the measurement.
    loop {
        let acknowledged = relay_acknowledged(&relay).await.unwrap_or(0.0) as usize;
        let rss = rss_mib(pid);
        peak_rss = peak_rss.max(rss);
        if rss_at_tenth.is_nan() && acknowledged >= case.rows / 10 {
            rss_at_tenth = rss;
        }
        if acknowledged >= case.rows {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(1_800), "the drain of {} took over 30 min", case.name);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    wait_recorded_in_postgres(&client, publish_state, case.rows, Duration::from_secs(600)).await;
    let drain_rate = case.rows as f64 / started.elapsed().as_secs_f64();
    let (wal_after, checkpoints_after) = wal_and_checkpoints(&client).await;
    let wal_mib_per_100k = (wal_after - wal_before) / 1_048_576.0 * 100_000.0 / case.rows as f64;
    let relay_cpu_per_100k = cpu_seconds(pid, false) * 100_000.0 / case.rows as f64;
    peak_rss = peak_rss.max(peak_rss_mib(pid));
    drop(relay);
    delete_topics(stack, &db, case).await;
    db.cleanup().await;
    ScaleFigures {
        drain_rate,
        relay_cpu_per_100k,
        rss_at_tenth,
        peak_rss,
        wal_mib_per_100k,
        checkpoints: checkpoints_after - checkpoints_before,
    }
}

/// What librdkafka alone did in one run of `librdkafka_baseline.py`.
#[derive(serde::Deserialize)]
struct ClientFigures {
    rate: f64,
    cpu_per_100k: f64,
    peak_rss_mib: f64,
}

/// Runs librdkafka alone over `topics` fresh topics of six partitions:
/// `messages` records at `rate` per second (0: as fast as it goes).
fn librdkafka_alone(stack: &Stack, topics: usize, messages: usize, rate: f64) -> ClientFigures {
    let python = std::env::var("RELAY_PYTHON").expect("RELAY_PYTHON: run the scale bench with scripts/bench scale");
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let prefix = format!("bench-scale-client-{}-{nanos}", std::process::id());
    let output = Command::new(python)
        .arg(stack.repo.join("benches/support/librdkafka_baseline.py"))
        .args([&stack.bootstrap, &prefix, &topics.to_string(), &messages.to_string(), &format!("{rate:.0}")])
        .output()
        .expect("run benches/support/librdkafka_baseline.py");
    assert!(output.status.success(), "librdkafka baseline failed: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("librdkafka baseline: one JSON line")
}

/// The relay's growth from one topic to 100 next to librdkafka's own, as
/// a markdown table.
fn many_topics_against_the_client(stack: &Stack, reference: &ScaleFigures, topics: &ScaleFigures) -> String {
    const MESSAGES: usize = 300_000;
    let rate = topics.drain_rate;
    eprintln!("bench scale: librdkafka alone, 1 and 100 topics, paced at {rate:.0} msg/s and unpaced");
    let paced_one = librdkafka_alone(stack, 1, MESSAGES, rate);
    let paced_many = librdkafka_alone(stack, 100, MESSAGES, rate);
    let free_one = librdkafka_alone(stack, 1, MESSAGES, 0.0);
    let free_many = librdkafka_alone(stack, 100, MESSAGES, 0.0);
    // One row of the table: a figure for 1 and for 100 topics, and the
    // growth as a ratio (rates) or a difference (costs).
    let row = |what: &str, unit: &str, digits: usize, one: f64, many: f64, ratio: bool| {
        let growth = if ratio { format!("{:.2} x", many / one) } else { format!("{:+.digits$} {unit}", many - one) };
        format!("| {what} | {one:.digits$} {unit} | {many:.digits$} {unit} | {growth} |\n")
    };
    format!(
        "\nOne topic against 100 (600 partitions): the relay's growth next to librdkafka's alone \
         (Python confluent-kafka, the relay's producer settings, 300k records of the same shape; \
         paced at the relay's 100-topic drain rate, {rate:.0} msg/s, and unpaced).\n\n\
         | | 1 topic | 100 topics | growth |\n|---|---|---|---|\n{}{}{}{}{}{}",
        row("relay: drain rate", "msg/s", 0, reference.drain_rate, topics.drain_rate, true),
        row("relay: CPU per 100k", "s", 2, reference.relay_cpu_per_100k, topics.relay_cpu_per_100k, false),
        row("relay: peak RSS", "MiB", 0, reference.peak_rss, topics.peak_rss, false),
        row("librdkafka alone, unpaced: rate", "msg/s", 0, free_one.rate, free_many.rate, true),
        row("librdkafka alone, paced: CPU per 100k", "s", 2, paced_one.cpu_per_100k, paced_many.cpu_per_100k, false),
        row("librdkafka alone, unpaced: peak RSS", "MiB", 0, free_one.peak_rss_mib, free_many.peak_rss_mib, false),
    )
}

/// Runs every case and writes the table to stdout and `target/bench-scale.md`.
pub async fn run(stack: &Stack) {
    let publish_state = match std::env::var("BENCH_SCALE_PUBLISH_STATE").as_deref() {
        Ok("side_table") => PublishState::SideTable,
        Ok("outbox_row") | Err(_) => PublishState::OutboxRow,
        Ok(other) => panic!("BENCH_SCALE_PUBLISH_STATE: `{other}` is neither outbox_row nor side_table"),
    };
    let mut rows = String::new();
    let mut reference: Option<ScaleFigures> = None;
    let mut many_topics = String::new();
    for case in &CASES {
        eprintln!("bench scale: {}", case.name);
        let f = run_case(stack, case, publish_state).await;
        let (rate_ratio, rss_ratio) =
            reference.as_ref().map_or((1.0, 1.0), |r| (f.drain_rate / r.drain_rate, f.peak_rss / r.peak_rss));
        let row = format!(
            "| {} | {:.0} msg/s ({:.2} x) | {:.2} s | {:.0} MiB / {:.0} MiB ({:.2} x) | {:.0} MiB; {} |\n",
            case.name,
            f.drain_rate,
            rate_ratio,
            f.relay_cpu_per_100k,
            f.rss_at_tenth,
            f.peak_rss,
            rss_ratio,
            f.wal_mib_per_100k,
            f.checkpoints
        );
        eprint!("{row}");
        rows.push_str(&row);
        match &reference {
            Some(first) if case.types > 1 && case.linger_ms.is_none() => {
                many_topics = many_topics_against_the_client(stack, first, &f)
            }
            Some(_) => {}
            None => reference = Some(f),
        }
    }
    let layout = match publish_state {
        PublishState::SideTable => "publish state in the side table",
        PublishState::OutboxRow | PublishState::Skipped => "publish state in the outbox row",
    };
    let report = format!(
        "Logical mode, JSON, at-least-once, {layout}.\n\n\
         | backlog | drain rate (x the reference) | relay CPU per 100k rows | relay RSS at 10% of the drain / peak (peak x the reference) | Postgres during the drain: WAL per 100k rows; checkpoints |\n\
         |---|---|---|---|---|\n{rows}{many_topics}"
    );
    println!("{report}");
    let _ = std::fs::write(stack.repo.join("target/bench-scale.md"), &report);
}
