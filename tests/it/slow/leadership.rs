//! Leadership among sidecars against the real stack: three relays on one
//! outbox under steady writes, and the lease's fence on its own.
//!
//! Leases are short here (renewed every 500 ms, 3 s long), so failovers take
//! seconds. An audit trigger records every publish-state write (every UPDATE
//! of an outbox row) with the writing session's `application_name` (one per
//! relay) and the lease holder its transaction sees. A write by a relay that
//! is not that holder is a write of an ended term, which the fence must make
//! impossible. The group tests run one at a time: they stop processes and
//! measure failovers on two shared cores. Failover times are printed
//! (`leadership figure:`) and appended to `target/leadership-figures.md` for
//! docs/benchmarks.md; no assertion is on time.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use crate::common::*;
use chrono::{DateTime, Utc};
use relay::store::{PgPublishState, PublishStateStore, Published, Store, StoreError};
use tokio_postgres::Client;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const RELAYS: usize = 3;
const LEASE: &str = "leader.renew_interval_ms = 500\nleader.lease_timeout_ms = 3000";
/// Rows per second the writers commit, in all.
const RATE: f64 = 300.0;
/// Poll mode's in-flight window: one batch.
const POLL_BATCH: usize = 200;
/// Logical mode's in-flight window: deliveries awaiting acknowledgement.
const MAX_IN_FLIGHT: usize = 1_000;
/// How long a wait may take before the test fails. Generous: tests of other
/// binaries share the cluster, and some stall every commit for a while
/// (an absent synchronous standby).
const PATIENCE: Duration = Duration::from_secs(180);

const AUDIT: &str = "
CREATE TABLE publish_audit (
    row_id bigint NOT NULL,
    app    text NOT NULL,
    holder text,
    at     timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE FUNCTION audit_publish_state() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO publish_audit (row_id, app, holder)
    SELECT NEW.id, current_setting('application_name'), (SELECT holder FROM outbox_relay_leader LIMIT 1);
    RETURN NULL;
END
$$;
CREATE TRIGGER audit_publish_state AFTER UPDATE ON outbox FOR EACH ROW EXECUTE FUNCTION audit_publish_state();
";

/// A config per relay, each with its own `application_name` (`relay-N`;
/// its lease session is `relay-N-lease`).
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

/// `/readyz` of a relay.
async fn readyz(relay: &RelayProcess) -> Option<serde_json::Value> {
    reqwest::get(format!("{}/readyz", relay.http_base().await)).await.ok()?.json().await.ok()
}

fn signal(relay: &RelayProcess, name: &str) {
    let status = std::process::Command::new("kill").arg(format!("-{name}")).arg(relay.child.id().to_string()).status();
    assert!(status.is_ok_and(|s| s.success()), "kill -{name}");
}

fn seconds_since(start: DateTime<Utc>, at: DateTime<Utc>) -> f64 {
    (at - start).num_milliseconds() as f64 / 1000.0
}

/// Prints a measured figure and appends it to target/leadership-figures.md.
fn figure(text: &str) {
    eprintln!("leadership figure: {text}");
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/leadership-figures.md");
    if let Ok(mut file) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
        let _ = writeln!(file, "- {} {text}", Utc::now().format("%Y-%m-%d %H:%M"));
    }
}

/// Three relays on one outbox, with the audit trigger.
struct Group {
    db: TestDb,
    client: Client,
    configs: Vec<PathBuf>,
    relays: Vec<RelayProcess>,
    /// Every relay process started: pid -> relay number.
    pids: HashMap<u32, usize>,
}

/// The lease row.
struct Lease {
    holder: String,
    epoch: i64,
    holder_pid: Option<i32>,
    acquired_at: DateTime<Utc>,
    renewed_at: DateTime<Utc>,
}

impl Group {
    async fn start(stack: &Stack, extra: &str) -> Self {
        let db = TestDb::new(stack).await;
        let configs = relay_configs(&db, &format!("{LEASE}\n{extra}"));
        db.migrate(&configs[0]);
        let client = db.client().await;
        client.batch_execute(AUDIT).await.expect("audit trigger");
        let mut group = Self { db, client, configs, relays: Vec::new(), pids: HashMap::new() };
        for n in 0..RELAYS {
            let relay = group.spawn(n);
            group.relays.push(relay);
        }
        group
    }

    fn spawn(&mut self, n: usize) -> RelayProcess {
        let relay = RelayProcess::start(&self.configs[n]);
        self.pids.insert(relay.child.id(), n);
        relay
    }

    fn restart(&mut self, n: usize) {
        self.relays[n] = self.spawn(n);
    }

    async fn lease(&self) -> Option<Lease> {
        let row = self
            .client
            .query_opt("SELECT holder, epoch, holder_pid, acquired_at, renewed_at FROM outbox_relay_leader", &[])
            .await
            .ok()??;
        Some(Lease {
            holder: row.get(0),
            epoch: row.get(1),
            holder_pid: row.get(2),
            acquired_at: row.get(3),
            renewed_at: row.get(4),
        })
    }

    /// The relay number of a lease holder id (`host:pid:random`).
    fn relay_of(&self, holder: &str) -> Option<usize> {
        let pid: u32 = holder.split(':').nth(1)?.parse().ok()?;
        self.pids.get(&pid).copied()
    }

    /// Waits until a relay holds a live lease with an epoch above `after`,
    /// and reports `active` on `/readyz`; returns its number and the lease.
    async fn wait_leader(&self, what: &str, after: i64) -> (usize, Lease) {
        wait_for(what, PATIENCE, || async {
            let lease = self.lease().await.filter(|l| l.epoch > after)?;
            let n = self.relay_of(&lease.holder)?;
            let ready = readyz(&self.relays[n]).await?;
            (ready["role"] == "active" && ready["epoch"] == lease.epoch).then_some((n, lease))
        })
        .await
    }

    async fn published(&self) -> i64 {
        self.client
            .query_one("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL", &[])
            .await
            .expect("count")
            .get(0)
    }

    /// Waits until `more` rows more than now are published (or all `total`).
    async fn wait_progress(&self, more: i64, total: usize) {
        let before = self.published().await;
        wait_for("more rows to be published", PATIENCE, || async {
            let now = self.published().await;
            (now >= before + more || now == total as i64).then_some(())
        })
        .await;
    }

    /// The first publish-state write of relay `n` as `holder`.
    async fn first_write_by(&self, n: usize, holder: &str) -> DateTime<Utc> {
        wait_for("the new leader's first publish-state write", PATIENCE, || async {
            let row = self
                .client
                .query_one(
                    "SELECT min(at) FROM publish_audit WHERE app = $1 AND holder = $2",
                    &[&format!("relay-{n}"), &holder],
                )
                .await
                .ok()?;
            row.get::<_, Option<DateTime<Utc>>>(0)
        })
        .await
    }

    /// The last publish-state write of relay `n`.
    async fn last_write_by(&self, n: usize) -> Option<DateTime<Utc>> {
        self.client
            .query_one("SELECT max(at) FROM publish_audit WHERE app = $1", &[&format!("relay-{n}")])
            .await
            .expect("audit")
            .get(0)
    }

    /// Audited writes by a relay that was not the lease holder its own
    /// transaction saw: `app (holder): rows`.
    async fn writes_outside_their_term(&self) -> Vec<String> {
        let rows = self
            .client
            .query("SELECT app, holder, count(*) FROM publish_audit GROUP BY 1, 2", &[])
            .await
            .expect("audit");
        rows.iter()
            .filter_map(|r| {
                let (app, holder, count): (String, Option<String>, i64) = (r.get(0), r.get(1), r.get(2));
                let owner = holder.as_deref().and_then(|h| self.relay_of(h)).map(|n| format!("relay-{n}"));
                (owner.as_deref() != Some(app.as_str()))
                    .then(|| format!("{app} wrote {count} rows while {holder:?} held the lease"))
            })
            .collect()
    }

    /// The longest gap between consecutive publish-state writes after `from`.
    async fn longest_pause_since(&self, from: DateTime<Utc>) -> f64 {
        let row = self
            .client
            .query_one(
                "SELECT coalesce(max(gap), 0)::float8 FROM (SELECT extract(epoch FROM at - lag(at) OVER (ORDER BY at)) AS gap \
                 FROM publish_audit WHERE at >= $1) AS gaps",
                &[&from],
            )
            .await
            .expect("pauses");
        row.get(0)
    }

    /// Everything delivered, in order, publish state complete and matching
    /// Kafka, no write outside its term, and at most `window` duplicates per
    /// interruption. Then stops the relays and drops the database.
    async fn finish(mut self, stack: &Stack, total: usize, window: usize, interruptions: usize) {
        assert_eq!(wait_all_published(&self.client, Duration::from_secs(180)).await, total as i64);
        let records = consume(&stack.bootstrap, &[&self.db.topic("entity")], total, Duration::from_secs(120));
        assert_all_present(&self.client, &records).await;
        assert_per_key_order(&records);
        let at: HashMap<(i32, i64), &str> = records
            .iter()
            .map(|r| ((r.partition, r.offset), r.headers.get("event_id").map(String::as_str).unwrap_or("")))
            .collect();
        let rows = self
            .client
            .query("SELECT event_id::text, kafka_partition, kafka_offset FROM outbox", &[])
            .await
            .expect("publish state");
        let wrong = rows
            .iter()
            .filter(|r| at.get(&(r.get::<_, i32>(1), r.get::<_, i64>(2))) != Some(&r.get::<_, String>(0).as_str()))
            .count();
        assert_eq!(wrong, 0, "rows whose recorded partition and offset do not hold their message");
        let outside = self.writes_outside_their_term().await;
        assert!(outside.is_empty(), "publish-state writes outside their term: {outside:?}");
        let duplicates = records.len() - total;
        figure(&format!(
            "  duplicates: {duplicates} of {total} rows over {interruptions} takeover(s), in-flight window {window} rows"
        ));
        assert!(
            duplicates <= window * interruptions.max(1),
            "{duplicates} duplicates: more than one in-flight window ({window}) per interruption ({interruptions})"
        );
        for relay in &mut self.relays {
            assert_eq!(relay.terminate(Duration::from_secs(20)), Some(0), "{}", relay.log_text());
        }
        self.db.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ending_the_lease_session_never_makes_two_actives() {
    let _serial = SERIAL.lock().await;
    let stack = Stack::from_env();
    let group = Group::start(&stack, &format!("source.mode = \"poll\"\nsource.batch_rows = {POLL_BATCH}")).await;
    let (first, lease) = group.wait_leader("a relay to lead", 0).await;
    const TOTAL: usize = 7_000;
    let workload = spawn_paced_workload(&group.db.url, TOTAL, 50, 4, Some(RATE));
    group.wait_progress(1_000, TOTAL).await;

    // Once, as an idle-session reaper or a proxy failover does: the relay
    // renews on a new session and stays the leader, in the same term.
    let pid = lease.holder_pid.expect("the lease names its session");
    group.client.execute("SELECT pg_terminate_backend($1)", &[&pid]).await.expect("terminate");
    wait_for("the lease to be renewed on a new session", Duration::from_secs(30), || async {
        let now = group.lease().await?;
        assert_eq!(
            (now.holder.as_str(), now.epoch),
            (lease.holder.as_str(), lease.epoch),
            "no takeover after one kill"
        );
        (now.holder_pid.is_some_and(|p| p != pid)).then_some(())
    })
    .await;

    // Then every time it comes back, as a partition between the leader and
    // Postgres does for its lease session: it cannot renew, stops producing
    // when its lease runs out, and a standby takes over.
    let app = format!("relay-{first}-lease");
    let killer = {
        let (url, app) = (group.db.url.clone(), app.clone());
        tokio::spawn(async move {
            let admin = connect(&url).await;
            loop {
                let _ = admin
                    .execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
                        &[&app],
                    )
                    .await;
            }
        })
    };
    // The old term's last renewal (a renewal may still slip in between two
    // kills, and extends the lease legitimately).
    let mut last_renewal = lease.renewed_at;
    let waiting = std::time::Instant::now();
    while let Some(now) = group.lease().await.filter(|now| now.epoch == lease.epoch) {
        last_renewal = now.renewed_at;
        assert!(waiting.elapsed() < PATIENCE, "timed out waiting for a standby to take over");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (next, taken) = group.wait_leader("the new leader to be active", lease.epoch).await;
    let resumed = group.first_write_by(next, &taken.holder).await;
    wait_for("the old leader to stand by", Duration::from_secs(30), || async {
        (readyz(&group.relays[first]).await?["role"] == "standby").then_some(())
    })
    .await;
    killer.abort();
    assert_ne!(next, first);
    // The fence orders every write of the old term before the takeover.
    let last_old = group.last_write_by(first).await.expect("the old leader wrote");
    assert!(
        last_old < taken.acquired_at,
        "the old leader wrote at {last_old}, after the takeover at {}",
        taken.acquired_at
    );
    figure(&format!(
        "lease session ended continually (poll mode, lease 3 s): after its last renewal the old leader wrote for {:.2} s more, a standby took over after {:.2} s and wrote after {:.2} s",
        seconds_since(last_renewal, last_old),
        seconds_since(last_renewal, taken.acquired_at),
        seconds_since(last_renewal, resumed),
    ));
    assert!(group.relays[first].log_text().contains("lost the leader lease"), "{}", group.relays[first].log_text());

    workload.await.expect("workload");
    let interruptions = (group.lease().await.expect("lease").epoch - 1) as usize;
    group.finish(&stack, TOTAL, POLL_BATCH, interruptions).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_active_relay_records_nothing_after_a_standby_took_over() {
    let _serial = SERIAL.lock().await;
    let stack = Stack::from_env();
    let group = Group::start(&stack, &format!("checkpoint.max_in_flight = {MAX_IN_FLIGHT}")).await;
    let (first, lease) = group.wait_leader("a relay to lead", 0).await;
    const TOTAL: usize = 7_000;
    let workload = spawn_paced_workload(&group.db.url, TOTAL, 50, 4, Some(RATE));
    group.wait_progress(1_000, TOTAL).await;

    let stopped = Utc::now();
    signal(&group.relays[first], "STOP");
    let (next, taken) = group.wait_leader("a standby to take over from the paused relay", lease.epoch).await;
    let resumed = group.first_write_by(next, &taken.holder).await;
    // The paused relay wakes up only once the new leader has moved well past
    // the rows the paused one still has in flight.
    group.wait_progress(1_000, TOTAL).await;
    let continued = Utc::now();
    signal(&group.relays[first], "CONT");
    wait_for("the resumed relay to stand by", Duration::from_secs(30), || async {
        (readyz(&group.relays[first]).await?["role"] == "standby").then_some(())
    })
    .await;
    figure(&format!(
        "SIGSTOP of the active relay (logical mode, lease 3 s): takeover {:.2} s, first write by the new leader {:.2} s",
        seconds_since(stopped, taken.acquired_at),
        seconds_since(stopped, resumed),
    ));
    // Nothing recorded by the resumed relay after it woke up.
    let last_old = group.last_write_by(first).await.expect("the paused relay wrote before");
    assert!(
        last_old < continued,
        "the resumed relay recorded publish state at {last_old}, after SIGCONT at {continued}"
    );
    let log = group.relays[first].log_text();
    assert!(log.contains("lost the leader lease"), "{log}");

    workload.await.expect("workload");
    let interruptions = (group.lease().await.expect("lease").epoch - 1) as usize;
    group.finish(&stack, TOTAL, MAX_IN_FLIGHT, interruptions).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_dash_nine_of_the_active_relay_five_times_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let stack = Stack::from_env();
    let mut group = Group::start(&stack, &format!("checkpoint.max_in_flight = {MAX_IN_FLIGHT}")).await;
    let (_, mut lease) = group.wait_leader("a relay to lead", 0).await;
    const TOTAL: usize = 12_000;
    let workload = spawn_paced_workload(&group.db.url, TOTAL, 50, 4, Some(RATE));
    let mut takeovers = Vec::new();
    for _ in 0..5 {
        // A random moment: after 100 to 700 more rows were published.
        group.wait_progress(rand::random_range(100..700), TOTAL).await;
        let (active, current) = group.wait_leader("the current leader", lease.epoch - 1).await;
        let killed = Utc::now();
        group.relays[active].kill9();
        let (next, taken) = group.wait_leader("a standby to take over", current.epoch).await;
        let resumed = group.first_write_by(next, &taken.holder).await;
        takeovers.push((seconds_since(killed, taken.acquired_at), seconds_since(killed, resumed)));
        group.restart(active);
        lease = taken;
    }
    let mut times: Vec<f64> = takeovers.iter().map(|t| t.1).collect();
    times.sort_by(f64::total_cmp);
    figure(&format!(
        "kill -9 of the active relay x5 (logical mode, lease 3 s): takeover / first write by the new leader, seconds: {}; first write p50 {:.2} s, max {:.2} s",
        takeovers.iter().map(|(t, w)| format!("{t:.2}/{w:.2}")).collect::<Vec<_>>().join(", "),
        times[times.len() / 2],
        times[times.len() - 1],
    ));
    workload.await.expect("workload");
    let interruptions = (group.lease().await.expect("lease").epoch - 1) as usize;
    group.finish(&stack, TOTAL, MAX_IN_FLIGHT, interruptions).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_sigterm_of_all_three_hands_over() {
    let _serial = SERIAL.lock().await;
    let stack = Stack::from_env();
    let mut group = Group::start(&stack, &format!("checkpoint.max_in_flight = {MAX_IN_FLIGHT}")).await;
    group.wait_leader("a relay to lead", 0).await;
    const TOTAL: usize = 6_000;
    let workload = spawn_paced_workload(&group.db.url, TOTAL, 50, 4, Some(RATE));
    group.wait_progress(500, TOTAL).await;
    let started = Utc::now();
    // Each relay is replaced once, the active one first whenever it is one
    // not yet replaced, so the lease is handed over as often as it can be.
    let mut replaced = [false; RELAYS];
    let mut handovers = 0;
    for _ in 0..RELAYS {
        let leader = group.lease().await.and_then(|l| group.relay_of(&l.holder));
        let n = match leader {
            Some(n) if !replaced[n] => n,
            _ => (0..RELAYS).find(|n| !replaced[*n]).expect("a relay not replaced yet"),
        };
        let code = group.relays[n].terminate(Duration::from_secs(20));
        assert_eq!(code, Some(0), "{}", group.relays[n].log_text());
        if leader == Some(n) {
            handovers += 1;
            assert!(group.relays[n].log_text().contains("leader lease released"), "{}", group.relays[n].log_text());
        }
        replaced[n] = true;
        group.restart(n);
        group.wait_progress(500, TOTAL).await;
    }
    let pause = group.longest_pause_since(started).await;
    figure(&format!(
        "rolling SIGTERM of all three relays (logical mode, {RATE} rows/s, {handovers} hand-overs): longest pause between publish-state writes {pause:.2} s"
    ));
    workload.await.expect("workload");
    let interruptions = (group.lease().await.expect("lease").epoch - 1) as usize;
    group.finish(&stack, TOTAL, MAX_IN_FLIGHT, interruptions).await;
}

/// The fence on its own, through the library: a takeover waits for a
/// publish-state transaction in flight, and a write of the ended term after
/// it is refused and writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_waits_for_writes_in_flight_and_fences_later_ones() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let path = db.write_config(LEASE);
    db.migrate(&path);
    // From the text: Config::load would take the stack's RELAY__* overrides.
    let config = relay::Config::from_toml_str(&db.config_toml(LEASE)).expect("config");
    let client = db.client().await;
    let ids: Vec<i64> = vec![
        insert_row(&client, "entity", "a", 1).await,
        insert_row(&client, "entity", "a", 2).await,
        insert_row(&client, "entity", "a", 3).await,
    ];
    let published = |id: i64| Published { id, topic: "t".into(), partition: 0, offset: id, xid: None };
    let store = Store::new(&config);
    let lease = store.lease();
    let old = relay::database::connect(&config.postgres).await.expect("connect");
    let term = lease.try_acquire(&old, "old", 200).await.expect("acquire").expect("first lease");
    let writes = relay::database::connect(&config.postgres).await.expect("connect");
    let state = PgPublishState::new(writes, store.sql(), lease.fence("old", term.epoch, 3_000)).await.expect("store");
    assert_eq!(state.record_published(&[&published(ids[0])]).await.expect("record"), vec![ids[0]]);

    // A write of the old term in flight: its transaction holds the lease row.
    let open = relay::database::connect(&config.postgres).await.expect("connect");
    let fence = lease.fence("old", term.epoch, 3_000).prepare(&open).await.expect("prepare");
    fence.begin(&open).await.expect("the old term is current");
    wait_for("the old term's 200 ms lease to run out", Duration::from_secs(10), || async {
        let row = client
            .query_one("SELECT bool_and(lease_until <= clock_timestamp()) FROM outbox_relay_leader", &[])
            .await
            .expect("read the lease");
        row.get::<_, Option<bool>>(0).unwrap_or(false).then_some(())
    })
    .await;
    let takeover = tokio::spawn({
        let (lease, config) = (lease.clone(), config.clone());
        async move {
            let new = relay::database::connect(&config.postgres).await.expect("connect");
            lease.try_acquire(&new, "new", 3_000).await.expect("acquire")
        }
    });
    // The takeover reaches Postgres and waits there on the old term's row lock.
    wait_for("the takeover to wait on the lease row's lock", Duration::from_secs(10), || async {
        let row = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE '%relay_leader%'",
                &[],
            )
            .await
            .expect("read pg_stat_activity");
        (row.get::<_, i64>(0) > 0).then_some(())
    })
    .await;
    assert!(!takeover.is_finished(), "a takeover must wait for the old term's write in flight");
    open.execute("UPDATE outbox SET published_at = now() WHERE id = $1", &[&ids[1]]).await.expect("write");
    fence.commit(&open).await.expect("commit");
    let taken = takeover.await.expect("takeover").expect("the lease ran out");
    assert_eq!(taken.epoch, term.epoch + 1);

    // After the takeover the old term writes nothing.
    let refused = state.record_published(&[&published(ids[2])]).await;
    assert!(matches!(refused, Err(StoreError::Fenced { .. })), "{refused:?}");
    let row = client.query_one("SELECT published_at IS NULL FROM outbox WHERE id = $1", &[&ids[2]]).await.expect("row");
    assert!(row.get::<_, bool>(0), "a refused write wrote nothing");
    assert!(!lease.renew(&old, "old", term.epoch, 3_000).await.expect("renew"), "the old term cannot renew");
    db.cleanup().await;
}

/// `relay check` warns when Postgres is reached through a proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_warns_when_postgres_is_reached_through_a_proxy() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let direct = db.write_config("");
    db.migrate(&direct);
    let target: tokio_postgres::Config = db.url.parse().expect("url");
    let port = target.get_ports().first().copied().expect("port");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let proxy_port = listener.local_addr().expect("addr").port();
    let proxy = tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    let proxied = db.dir.path().join("proxied.toml");
    let toml = db.config_toml("").replace(&format!(":{port}/"), &format!(":{proxy_port}/"));
    std::fs::write(&proxied, toml).expect("write config");
    let output = tokio::task::spawn_blocking(move || relay_command(&proxied).arg("check").output().expect("check"))
        .await
        .expect("check");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "a warning does not fail the check: {stdout}");
    let warning = stdout.lines().find(|l| l.starts_with("postgres") && l.contains("WARN")).expect("a warning");
    assert!(warning.contains(&format!("port {proxy_port}")) && warning.contains("proxy"), "{warning}");
    let output = relay_command(&direct).arg("check").output().expect("check");
    assert!(!String::from_utf8_lossy(&output.stdout).contains("WARN"), "no warning when connected directly");
    proxy.abort();
    db.cleanup().await;
}
