#!/usr/bin/env python3
"""The relay against Debezium, one system at a time, same stack and workload.

Run by `scripts/bench compare [--quick] [--no-docs]`, which brings the stack
up, builds the relay (release) and the Java side (benches/debezium, `mvn
package`), exports the stack's addresses and runs this script with a Python
that has matplotlib.

For each system (the relay in logical mode, then Debezium's embedded engine
with the outbox EventRouter and a sink shaped like Debezium Server 3.x's
Kafka sink, see src/main/java/bench/Engine.java):

1. a fresh database with the relay's outbox table (`relay migrate`); for
   Debezium the relay's slot and publication are dropped and Debezium's own
   are created, and its topic (6 partitions, as the relay creates them);
2. a backlog of ROWS one-row transactions written with the system stopped
   (the workload of benches/throughput.rs: 8 writers, 1,000 entities, ~250 B
   JSON payload, per-entity seq);
3. the drain: a sampler reads the sum of the topic's end offsets every 50 ms
   from before the system is launched until every row is in Kafka; CPU of the
   system's process, of Postgres (split as in benches/throughput.rs) and of the
   broker from /proc at launch, first message, half-way and done;
4. latency: with the system still running, for each offered rate a paced
   writer runs for PHASE seconds and a consumer records, per message, the
   seconds from the row's occurred_at (its transaction's start; the
   transactions are short) to receipt;
5. the system is stopped; a verifier reads the topic to its end offsets and
   fails the harness unless every outbox row's event_id is there and, per key,
   the first occurrences come in seq order 1..n.

Writes target/bench-compare/{figures.md,figures.json,compare-debezium.png}
and, unless --no-docs, the block between the compare markers of
docs/benchmarks.md and docs/compare-debezium.png.
"""
import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import uuid

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
HERE = os.path.join(REPO, "benches", "debezium")
OUT = os.path.join(REPO, "target", "bench-compare")
CLASSPATH = f"{HERE}/target/debezium-bench.jar:{HERE}/target/lib/*"
TICKS = os.sysconf("SC_CLK_TCK")
ENTITIES = 1000
WRITERS = 8
PARTITIONS = 6
BEGIN = "<!-- compare:begin (written by `scripts/bench compare`) -->"
END = "<!-- compare:end -->"

# Producer settings both systems use: the relay's defaults (relay.example.toml),
# given to Debezium's KafkaProducer by their Java names.
PRODUCER = {
    "acks": "all",
    "enable.idempotence": "true",
    "linger.ms": "5",
    "compression.type": "lz4",
    "batch.size": "1000000",
}
# How often Debezium's queue hands a partial batch to the sink (its default
# is 500 ms, which would add up to half a second at low rates); 5 ms, like
# the producers' linger.
DEBEZIUM_POLL_INTERVAL_MS = 5


def log(msg):
    print(f"compare: {msg}", file=sys.stderr, flush=True)


class Failure(Exception):
    """A run that must not give a figure (lost messages, disorder, timeouts)."""


# ---------------------------------------------------------------- /proc

def cpu_seconds(pid, children=False):
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(") ", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    own = int(rest[11]) + int(rest[12])
    reaped = int(rest[13]) + int(rest[14]) if children else 0
    return (own + reaped) / TICKS


def peak_rss_mib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def stack_dir():
    return os.environ.get("RELAY_STACK_DIR") or os.path.join(REPO, ".stack")


def postgres_cpu():
    """CPU seconds so far of the stack's Postgres: walsenders (logical
    decoding), client backends (SQL), and the rest (postmaster, workers, and
    every backend that already exited), as benches/throughput.rs splits it."""
    with open(os.path.join(stack_dir(), "pg/data/postmaster.pid")) as f:
        postmaster = int(f.readline().strip())
    cpu = {"walsender": 0.0, "backends": 0.0, "other": cpu_seconds(postmaster, True)}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                parent = int(f.read().rsplit(") ", 1)[1].split()[1])
            if parent != postmaster:
                continue
            with open(f"/proc/{name}/cmdline", "rb") as f:
                title = f.read().decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        seconds = cpu_seconds(int(name))
        if "walsender" in title:
            cpu["walsender"] += seconds
        elif "(" in title:
            cpu["backends"] += seconds
        else:
            cpu["other"] += seconds
    return cpu


def broker_cpu():
    with open(os.path.join(stack_dir(), "kafka/kafka.pid")) as f:
        return cpu_seconds(int(f.read().strip()))


def machine_busy():
    """CPU seconds the whole machine spent busy so far (all cores)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / TICKS


def snapshot(pid):
    return {"t": time.time(), "proc": cpu_seconds(pid), "pg": postgres_cpu(), "broker": broker_cpu(),
            "busy": machine_busy()}


# ---------------------------------------------------------------- Postgres

class Postgres:
    def __init__(self, url):
        u = urllib.parse.urlparse(url)
        self.host, self.port = u.hostname, u.port or 5432
        self.user, self.password = urllib.parse.unquote(u.username), urllib.parse.unquote(u.password or "")
        self.admin_db = u.path.lstrip("/") or "postgres"

    def url(self, db):
        return f"postgres://{self.user}:{urllib.parse.quote(self.password)}@{self.host}:{self.port}/{db}"

    def jdbc(self, db):
        # The shared tools (writers, verifier) talk plain text: they are not measured.
        q = urllib.parse.urlencode({"user": self.user, "password": self.password, "sslmode": "disable"})
        return f"jdbc:postgresql://{self.host}:{self.port}/{db}?{q}"

    def sql(self, db, statement):
        out = subprocess.run(
            ["psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-c", statement, self.url(db) + "?sslmode=disable"],
            capture_output=True, text=True)
        if out.returncode != 0:
            raise Failure(f"psql on {db}: {statement}: {out.stderr.strip()}")
        return out.stdout.strip()


# ---------------------------------------------------------------- helpers

def java(*args, **kw):
    return ["java", "-Xmx512m", "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn", "-cp", CLASSPATH, "bench.Main", *args]


def run_tool(args, what, timeout):
    out = subprocess.run(java(*args), capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise Failure(f"{what} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return out.stdout


# Every process this harness started, stopped at the end whatever happens.
STARTED = []


def start_ready(args, log_path):
    """Starts a Java tool that prints "ready" once positioned; waits for it."""
    p = subprocess.Popen(java(*args), stdout=subprocess.PIPE, stderr=open(log_path, "w"), text=True)
    STARTED.append(p)
    line = p.stdout.readline()
    if line.strip() != "ready":
        p.kill()
        raise Failure(f"{args[0]} did not start; see {log_path}")
    return p


def stop(proc, deadline=20):
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(deadline)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def percentile(sorted_values, p):
    if not sorted_values:
        return float("nan")
    return sorted_values[round((len(sorted_values) - 1) * p)]


# ---------------------------------------------------------------- systems

class System:
    """One system under test on its own database; subclasses launch it."""

    name = ""

    def __init__(self, pg, bootstrap, run_id):
        self.pg, self.bootstrap = pg, bootstrap
        self.db = f"cmp_{self.key}_{run_id}"
        self.slot = f"cmp_{self.key}_{run_id}"
        self.prefix = f"cmp{self.key}{run_id}"
        # The workload's rows are events (as in benches/throughput.rs): the
        # relay sends them to its event topic (cleanup.policy=delete);
        # Debezium's go to the same name, created the same way.
        self.topic = f"{self.prefix}.entity"
        self.dir = os.path.join(OUT, self.key)
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir)
        self.proc = None

    def relay_config(self):
        path = os.path.join(self.dir, "relay.toml")
        with open(path, "w") as f:
            f.write(
                "shutdown_timeout_ms = 10000\n"
                f'postgres.url = "{self.pg.url(self.db)}"\n'
                f'kafka.bootstrap_servers = "{self.bootstrap}"\n'
                f'source.slot_name = "{self.slot}"\n'
                f'source.publication_name = "{self.slot}_pub"\n'
                f'routing.topic_template = "{self.prefix}.{{aggregate_type}}"\n'
                f'routing.state_topic_template = "{self.prefix}.{{aggregate_type}}.state"\n'
                f"routing.topic_partitions = {PARTITIONS}\n"
                f'checkpoint.publish_state = "{RELAY_PUBLISH_STATE}"\n'
                'telemetry.http_listen = "127.0.0.1:0"\n')
        return path

    def relay_env(self):
        env = dict(os.environ)
        # The stack's env would override the config's database.
        env["RELAY__POSTGRES__URL"] = self.pg.url(self.db)
        env["RUST_LOG"] = "info"
        env["NO_COLOR"] = "1"
        return env

    def setup(self):
        self.pg.sql(self.pg.admin_db, f"CREATE DATABASE {self.db}")
        out = subprocess.run([os.path.join(REPO, "target/release/relay"), "--config", self.relay_config(), "migrate"],
                             env=self.relay_env(), capture_output=True, text=True)
        if out.returncode != 0:
            raise Failure(f"relay migrate: {out.stderr[-2000:]}")

    def cleanup(self):
        for p in STARTED:
            stop(p, 10)
        try:
            self.pg.sql(self.pg.admin_db,
                        f"SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                        f"WHERE slot_name LIKE '{self.slot}%' AND NOT active")
            self.pg.sql(self.pg.admin_db, f"DROP DATABASE IF EXISTS {self.db} WITH (FORCE)")
        except Failure as err:
            log(f"cleanup of {self.db}: {err}")


class Relay(System):
    name, key = "relay", "relay"

    def launch(self):
        self.proc = subprocess.Popen([os.path.join(REPO, "target/release/relay"), "--config",
                                     os.path.join(self.dir, "relay.toml")], env=self.relay_env(),
                                    stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.dir, "relay.log"), "w"))
        STARTED.append(self.proc)
        return self.proc


class Debezium(System):
    name, key = "Debezium", "dbz"

    def setup(self):
        super().setup()
        db = self.db
        # Debezium reads its own slot and publication; the relay's would only retain WAL.
        self.pg.sql(db, f"SELECT pg_drop_replication_slot('{self.slot}')")
        self.pg.sql(db, f"DROP PUBLICATION IF EXISTS {self.slot}_pub")
        self.pg.sql(db, f"CREATE PUBLICATION {self.slot}_dbz FOR TABLE public.outbox")
        self.pg.sql(db, f"SELECT pg_create_logical_replication_slot('{self.slot}_dbz', 'pgoutput')")
        run_tool(["topic", "--bootstrap", self.bootstrap, "--topic", self.topic, "--partitions", str(PARTITIONS)],
                 "create the topic", 120)
        props = {
            "name": "dbz-bench",
            "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
            "offset.storage": "org.apache.kafka.connect.storage.FileOffsetBackingStore",
            "offset.storage.file.filename": os.path.join(self.dir, "offsets.dat"),
            # Offsets (and with them the slot's confirmed position) after every batch.
            "offset.flush.interval.ms": "0",
            "database.hostname": self.pg.host,
            "database.port": str(self.pg.port),
            "database.user": self.pg.user,
            "database.password": self.pg.password,
            "database.dbname": db,
            "database.sslmode": "prefer",
            "topic.prefix": "dbz",
            "plugin.name": "pgoutput",
            "slot.name": f"{self.slot}_dbz",
            "publication.name": f"{self.slot}_dbz",
            "publication.autocreate.mode": "disabled",
            "snapshot.mode": "no_data",
            "table.include.list": "public.outbox",
            "poll.interval.ms": str(DEBEZIUM_POLL_INTERVAL_MS),
            "extended.headers.enabled": "false",
            "header.converter.schemas.enable": "false",
            "transforms": "outbox",
            "transforms.outbox.type": "io.debezium.transforms.outbox.EventRouter",
            "transforms.outbox.table.field.event.id": "event_id",
            "transforms.outbox.table.field.event.key": "aggregate_id",
            "transforms.outbox.table.field.event.payload": "payload",
            "transforms.outbox.route.by.field": "aggregate_type",
            "transforms.outbox.route.topic.replacement": self.prefix + ".${routedByValue}",
            "transforms.outbox.table.fields.additional.placement":
                "event_id:header,event_type:header,kind:header,aggregate_type:header,occurred_at:header,entity_version:header",
            "producer.bootstrap.servers": self.bootstrap,
        }
        props.update({f"producer.{k}": v for k, v in PRODUCER.items()})
        with open(os.path.join(self.dir, "debezium.properties"), "w") as f:
            for k, v in props.items():
                f.write(f"{k}={v}\n")

    def launch(self):
        cmd = ["java", "-Xmx512m", "-Dorg.slf4j.simpleLogger.defaultLogLevel=info", "-cp", CLASSPATH,
               "bench.Main", "engine", "--props", os.path.join(self.dir, "debezium.properties")]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                     stderr=open(os.path.join(self.dir, "debezium.log"), "w"))
        STARTED.append(self.proc)
        return self.proc



# ---------------------------------------------------------------- one run

def write(system, rows, rate=None):
    args = ["write", "--jdbc", system.pg.jdbc(system.db), "--rows", str(rows), "--entities", str(ENTITIES),
            "--writers", str(WRITERS)]
    if rate:
        args += ["--rate", str(rate)]
    out = run_tool(args, "the writers", 1800)
    return float(out.split("rate=")[1].split()[0])


def wait_sessions_gone(system, deadline=60):
    end = time.time() + deadline
    while time.time() < end:
        n = system.pg.sql(system.pg.admin_db, "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                                              f"'{system.db}'")
        if n == "0":
            return
        time.sleep(0.2)
    raise Failure("the writers' sessions did not end")


def measure(system, rows, rates, phase_secs):
    r = {"system": system.name}
    system.setup()
    log(f"{system.name}: writing a backlog of {rows} rows")
    r["backlog_write_rate"] = write(system, rows)
    wait_sessions_gone(system)

    csv = os.path.join(system.dir, "drain.csv")
    watcher = start_ready(["watch", "--bootstrap", system.bootstrap, "--topic", system.topic, "--expect", str(rows),
                           "--out", csv, "--timeout-s", "900"], os.path.join(system.dir, "watch.log"))
    # Idle baseline: what Postgres and the broker burn per second with the
    # sampler running and no system, over 3 s.
    idle0 = (time.time(), postgres_cpu(), broker_cpu())
    time.sleep(3)
    before = {"t": time.time(), "proc": 0.0, "pg": postgres_cpu(), "broker": broker_cpu(), "busy": machine_busy()}
    r["loadavg_at_launch"] = open("/proc/loadavg").read().split()[0]
    r["idle_cpu_per_s"] = (sum(before["pg"].values()) - sum(idle0[1].values()) + before["broker"] - idle0[2]) \
        / (before["t"] - idle0[0])
    log(f"{system.name}: draining")
    proc = system.launch()
    t0 = time.time()
    before["t"] = t0
    snaps = {}
    samples = []
    with open(csv) as f:  # created by the sampler before it says ready
        pending = ""
        while True:
            chunk = f.read()
            pending += chunk
            *lines, pending = pending.split("\n")
            for line in lines:
                ms, count = line.split(",")
                samples.append((int(ms) / 1000.0 - t0, int(count)))
                if int(count) > 0 and "first" not in snaps:
                    snaps["first"] = snapshot(proc.pid) | {"count": int(count)}
                if int(count) >= rows // 2 and "half" not in snaps:
                    snaps["half"] = snapshot(proc.pid) | {"count": int(count)}
            if watcher.poll() is not None:
                if samples and samples[-1][1] >= rows:
                    break
                raise Failure(f"{system.name}: the drain did not finish (end offsets {samples[-1:]}); "
                              f"see {system.dir}")
            if proc.poll() is not None:
                raise Failure(f"{system.name} exited during the drain; see {system.dir}")
            time.sleep(0.02)
    done = snapshot(proc.pid)
    r["peak_rss_drain"] = peak_rss_mib(proc.pid)
    t_first = next(t for t, c in samples if c > 0)
    t_half = next(t for t, c in samples if c >= rows // 2)
    t_done = next(t for t, c in samples if c >= rows)
    half_count = next(c for t, c in samples if c >= rows // 2)
    r.update({
        "rows": rows,
        "first_s": t_first,
        "done_s": t_done,
        "rate": rows / t_done,
        "steady_rate": (rows - half_count) / (t_done - t_half) if t_done > t_half else float("nan"),
        "progress": samples,
    })
    per = 100_000 / rows
    half_per = 100_000 / max(1, rows - snaps["half"]["count"])
    pg_all = {k: (done["pg"][k] - before["pg"][k]) * per for k in done["pg"]}
    pg_half = {k: (done["pg"][k] - snaps["half"]["pg"][k]) * half_per for k in done["pg"]}
    # What everything else on the machine (the sampler, this script, and
    # whatever else runs here) used during the drain, in cores.
    measured = done["proc"] + sum(done["pg"].values()) - sum(before["pg"].values()) + done["broker"] - before["broker"]
    r["other_cores"] = (done["busy"] - before["busy"] - measured) / (done["t"] - before["t"])
    r["cpu"] = {
        "proc": done["proc"] * per,
        "proc_startup": snaps["first"]["proc"],
        "proc_half": (done["proc"] - snaps["half"]["proc"]) * half_per,
        "pg": pg_all,
        "pg_half": pg_half,
        "broker": (done["broker"] - before["broker"]) * per,
        "broker_half": (done["broker"] - snaps["half"]["broker"]) * half_per,
    }
    if isinstance(system, Relay):
        # Kafka has every row; the relay's own bookkeeping is done when every
        # row's publish state is recorded (not counted in the CPU above).
        end = time.time() + 120
        # The view reads either publish-state layout.
        while system.pg.sql(system.db, "SELECT count(*) FROM outbox_publish_state WHERE published_at IS NULL") != "0":
            if time.time() > end:
                raise Failure("the relay did not record every row's publish state")
            time.sleep(0.05)
        r["publish_state_s"] = time.time() - t0

    r["latency"] = []
    for rate in rates:
        count = int(rate * phase_secs)
        log(f"{system.name}: latency at {rate} rows/s offered, {count} rows")
        lat_file = os.path.join(system.dir, f"latency-{rate}.txt")
        consumer = start_ready(["latency", "--bootstrap", system.bootstrap, "--topic", system.topic, "--expect",
                                str(count), "--out", lat_file, "--timeout-s", str(int(phase_secs * 4 + 120))],
                               os.path.join(system.dir, f"latency-{rate}.log"))
        achieved = write(system, count, rate)
        try:
            consumer.wait(phase_secs * 4 + 180)
        except subprocess.TimeoutExpired:
            consumer.kill()
        if consumer.returncode != 0:
            raise Failure(f"{system.name}: the latency consumer missed records at {rate} rows/s; "
                          f"see {system.dir}/latency-{rate}.log")
        if proc.poll() is not None:
            raise Failure(f"{system.name} exited during the latency phase")
        values = sorted(float(v) for v in open(lat_file))
        r["latency"].append({"offered": rate, "achieved": achieved, "samples": len(values),
                             "p50": percentile(values, 0.50), "p99": percentile(values, 0.99),
                             "max": values[-1] if values else float("nan")})
    r["peak_rss_end"] = peak_rss_mib(proc.pid)
    r["cpu_total_end"] = cpu_seconds(proc.pid)
    stop(proc)
    r["exit_code"] = proc.returncode
    log(f"{system.name}: verifying completeness and per-key order")
    out = run_tool(["verify", "--bootstrap", system.bootstrap, "--topic", system.topic, "--jdbc",
                    system.pg.jdbc(system.db)], f"{system.name}: verification (lost or reordered messages)", 900)
    r["verify"] = json.loads(out.strip().splitlines()[-1])
    return r


# ---------------------------------------------------------------- report

def fmt_ratio(a, b):
    return f"{a / b:.2f}" if b and b == b and a == a else "n/a"


def report(results, args, wall):
    rel, dbz = results
    rows = rel["rows"]
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cores = os.cpu_count()
    cpu_model = ""
    try:
        cpu_model = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass

    def pg_total(r, k="pg"):
        return sum(r["cpu"][k].values())

    def row(label, a, b, unit_fmt, ratio=True):
        return f"| {label} | {unit_fmt(a)} | {unit_fmt(b)} | {fmt_ratio(a, b) if ratio else ''} |"

    s = lambda v: f"{v:.2f} s"
    rate = lambda v: f"{v:,.0f} msg/s"
    mib = lambda v: f"{v:.0f} MiB"
    pgsplit = lambda r, k: "{:.2f} s ({:.2f} / {:.2f} / {:.2f})".format(
        sum(r["cpu"][k].values()), r["cpu"][k]["walsender"], r["cpu"][k]["backends"], r["cpu"][k]["other"])
    lines = [
        f"Run of {when}: {cores} cores ({cpu_model}), {platform.system()} {platform.release()}; "
        f"Postgres, Kafka, the writers and the system under test share the machine. "
        f"Wall time {wall / 60:.1f} min. Command: `scripts/bench compare{' --quick' if args.quick else ''}"
        f"{' --relay-publish-state ' + RELAY_PUBLISH_STATE if RELAY_PUBLISH_STATE != 'outbox_row' else ''}`. "
        f"The relay records publish state with `checkpoint.publish_state = \"{RELAY_PUBLISH_STATE}\"`.",
        "",
        f"Backlog: {rows:,} one-row transactions written with the system stopped "
        f"(relay run: {rel['backlog_write_rate']:,.0f} rows/s, Debezium run: {dbz['backlog_write_rate']:,.0f} rows/s), "
        "then the system is launched; rates count messages in Kafka (sum of end offsets, sampled every 50 ms) "
        "from the launch of the process.",
        "",
        "| | relay | Debezium | relay / Debezium |",
        "|---|---|---|---|",
        row(f"launch -> all {rows:,} in Kafka (start-to-done rate)", rel["rate"], dbz["rate"], rate),
        f"| ... in seconds | {rel['done_s']:.2f} s | {dbz['done_s']:.2f} s | {fmt_ratio(rel['done_s'], dbz['done_s'])} |",
        row("steady rate (second half of the backlog)", rel["steady_rate"], dbz["steady_rate"], rate),
        row("time to first message (from process launch)", rel["first_s"], dbz["first_s"], s),
        row("process CPU per 100k, launch -> done", rel["cpu"]["proc"], dbz["cpu"]["proc"], s),
        row("process CPU per 100k, second half only", rel["cpu"]["proc_half"], dbz["cpu"]["proc_half"], s),
        row("process CPU before the first message (start-up)", rel["cpu"]["proc_startup"],
            dbz["cpu"]["proc_startup"], s),
        f"| Postgres CPU per 100k (walsender / SQL backends / rest) | {pgsplit(rel, 'pg')} | {pgsplit(dbz, 'pg')} | "
        f"{fmt_ratio(pg_total(rel), pg_total(dbz))} |",
        row("broker CPU per 100k", rel["cpu"]["broker"], dbz["cpu"]["broker"], s),
        row("**Postgres + broker CPU per 100k**", pg_total(rel) + rel["cpu"]["broker"],
            pg_total(dbz) + dbz["cpu"]["broker"], s),
        row("Postgres + broker CPU per 100k, second half only", pg_total(rel, "pg_half") + rel["cpu"]["broker_half"],
            pg_total(dbz, "pg_half") + dbz["cpu"]["broker_half"], s),
        f"| Postgres + broker CPU per second while idle (before the launch, sampler running) | "
        f"{rel['idle_cpu_per_s']:.3f} s/s | {dbz['idle_cpu_per_s']:.3f} s/s | |",
        f"| load average at launch; CPU of everything else on the machine during the drain | "
        f"{rel['loadavg_at_launch']}; {rel['other_cores']:.2f} cores | {dbz['loadavg_at_launch']}; "
        f"{dbz['other_cores']:.2f} cores | |",
        row("peak RSS at the end of the drain", rel["peak_rss_drain"], dbz["peak_rss_drain"], mib),
        row("peak RSS after the latency phases", rel["peak_rss_end"], dbz["peak_rss_end"], mib),
    ]
    for a, b in zip(rel["latency"], dbz["latency"]):
        lines.append(
            f"| commit -> consumer at {a['offered']:,} rows/s offered (achieved {a['achieved']:,.0f} / "
            f"{b['achieved']:,.0f}), p50 / p99 | {a['p50'] * 1000:.1f} ms / {a['p99'] * 1000:.1f} ms | "
            f"{b['p50'] * 1000:.1f} ms / {b['p99'] * 1000:.1f} ms | {fmt_ratio(a['p50'], b['p50'])} / "
            f"{fmt_ratio(a['p99'], b['p99'])} |")
    for label, key in (("records read back / distinct / duplicates", None),):
        lines.append(f"| {label} (all phases) | {rel['verify']['records']:,} / {rel['verify']['distinct']:,} / "
                     f"{rel['verify']['duplicates']} | {dbz['verify']['records']:,} / {dbz['verify']['distinct']:,} / "
                     f"{dbz['verify']['duplicates']} | |")
    lines += [
        "",
        f"The relay recorded every row's publish state {rel['publish_state_s']:.2f} s after its launch "
        f"({rel['publish_state_s'] - rel['done_s']:.2f} s after the last message reached Kafka); Debezium "
        "records nothing per row. Both runs passed the checks: every outbox row's `event_id` read back from "
        "the topic (read to its end offsets), per-key `seq` order of first occurrences, key = the payload's "
        "entity.",
        "",
        "![drain progress and latency, relay and Debezium](compare-debezium.png)",
    ]
    return "\n".join(lines)


NOTES = """\
How the two are run (benches/debezium/compare.py, benches/debezium/src/main/java/bench/):

- **Debezium**: the embedded engine of Debezium 3.6.1.Final (`debezium-embedded`, the async engine,
  `debezium-connector-postgres`, pgoutput) with the outbox `EventRouter` SMT (from
  `debezium-connect-plugins`; route by `aggregate_type` to the relay's topic name, key =
  `aggregate_id`, value = `payload` as a string, `event_id`, `occurred_at` and the relay's other
  columns as headers), String converters for key and value, JSON (schemas off) for headers, and a
  sink that does what Debezium Server 3.x's Kafka sink does: `send` the whole batch asynchronously,
  wait for every acknowledgement, `markProcessed` each, `markBatchFinished`. Its own slot and
  publication, created before the backlog is written; `snapshot.mode=no_data`; offsets in a file,
  flushed after every batch (`offset.flush.interval.ms=0`, which also confirms the slot position);
  `poll.interval.ms=5` (default 500: a partial batch would wait up to half a second);
  `max.batch.size` / `max.queue.size` at their defaults (2,048 / 8,192); `-Xmx512m`; TLS to
  Postgres (`database.sslmode=prefer`), as the relay.
- **The relay**: `target/release/relay`, logical mode, JSON, at-least-once, the defaults of
  `relay.example.toml` except the topic template and 6 partitions; `RUST_LOG=info`.
- **Same producer settings** for both: `acks=all`, idempotence on, `linger.ms=5`, `compression.type=lz4`,
  `batch.size=1000000` (the relay's defaults; Java's `batch.size` is per partition, librdkafka's
  `batch.size` per request: equal numbers, not the same limit).
- **Same workload and tools**: the writers (JDBC, 8 connections, one row per transaction, entity row
  locked and bumped in the same transaction), the end-offset sampler, the latency consumer and the
  verifier are the same Java programs for both systems. Latency phases run with the system still up
  (Debezium's JVM is warm by then).

Unfair to Debezium:
- It is the embedded engine with a thin sink written here, not Debezium Server (which is not served by
  the package registry on this machine): no Quarkus, no health endpoints, no metrics exporter. Debezium
  Server would use more memory and start later; its sink loop is the same.
- Time to first message and launch -> done include JVM start-up and JIT warm-up; the second-half rate
  and CPU show it warm.
- Every message carries 7 headers from Debezium (the EventRouter's `id` plus the 6 the relay sends),
  the JSON header converter quotes strings; slightly more bytes than the relay.

Unfair to the relay:
- Debezium records no per-row publish state in Postgres: the relay's writes of `published_at`,
  partition and offset (an `UPDATE` of each outbox row, or with `checkpoint.publish_state =
  "side_table"` an `INSERT` of a narrow row) are Postgres CPU Debezium does not spend, and
  `relay status` / held rows / the per-row audit have no Debezium counterpart.
- The relay's catch-up, leadership lease and lag sampler run their SQL during the drain (relay
  defaults); Debezium runs no SQL besides the replication stream (and its heartbeat-free default).
- The relay's CPU per 100k is counted until the last message is in Kafka; the relay's last publish-state
  writes (after that) are not counted, nor Debezium's last offset flush.

Neither:
- CPU per 100k is counted over each system's own drain window, so the slower one also carries more of
  Postgres's and the broker's idle CPU (the idle row gives the rate to subtract) and of the end-offset
  sampler's requests (20 a second).
- The JVM's RSS follows its heap limit (`-Xmx512m`) more than its needs; the relay's is its working set.
- Offered rates stop at 2,000 rows/s: on this machine the paced writers (8 connections, three statements
  and a commit per row) reach about 4,000-5,000 rows/s with nothing else running, and the system under
  test, the consumer and the broker share the same two cores; the plot uses the achieved rate.
- One run of each, one after the other, on a machine others use at the same time (their test suites
  and builds): the "everything else" row says how much CPU that took during each drain. Two full runs
  minutes apart gave relay 26.5k and 13.9k msg/s start-to-done, Debezium 8.9k and 6.6k (load average
  8 on 2 cores during the second); compare ratios from the same run, and rerun on a quiet machine
  before quoting absolute rates.
"""


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"relay": "tab:blue", "Debezium": "tab:red"}
    for r in results:
        # From the launch (the sampler also ran through the idle baseline before it).
        t = [x for x, _ in r["progress"] if x >= 0]
        c = [y for x, y in r["progress"] if x >= 0]
        a.plot(t, c, label=r["system"], color=colors[r["system"]])
    a.set_xlabel("seconds since the process was launched")
    a.set_xlim(left=0)
    a.set_ylabel("messages in Kafka")
    a.set_title(f"(a) drain of a {results[0]['rows']:,}-row backlog")
    a.grid(alpha=0.3)
    a.legend()
    for r in results:
        x = [p["achieved"] for p in r["latency"]]
        b.plot(x, [p["p99"] * 1000 for p in r["latency"]], "o-", color=colors[r["system"]],
               label=f"{r['system']} p99")
        b.plot(x, [p["p50"] * 1000 for p in r["latency"]], "s--", color=colors[r["system"]],
               label=f"{r['system']} p50")
    b.set_yscale("log")
    b.set_xlabel("rows/s written (paced writers, achieved)")
    b.set_ylabel("commit -> consumer, ms")
    b.set_title("(b) latency against offered rate")
    b.grid(alpha=0.3, which="both")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_docs(block):
    docs = os.path.join(REPO, "docs", "benchmarks.md")
    text = open(docs).read()
    head, found, rest = text.partition(BEGIN)
    if not found:
        raise SystemExit("docs/benchmarks.md has no compare markers")
    _, found, tail = rest.partition(END)
    if not found:
        raise SystemExit("docs/benchmarks.md has no compare end marker")
    with open(docs, "w") as f:
        f.write(head + BEGIN + "\n" + block + "\n" + END + tail)


# checkpoint.publish_state of the relay's run (--relay-publish-state).
RELAY_PUBLISH_STATE = "outbox_row"


def main():
    global RELAY_PUBLISH_STATE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="20k rows, two short latency phases (for iterating)")
    ap.add_argument("--no-docs", action="store_true", help="leave docs/ alone")
    ap.add_argument("--rows", type=int)
    ap.add_argument("--rates", help="offered rates, rows/s, comma-separated")
    ap.add_argument("--phase-secs", type=float)
    ap.add_argument("--relay-publish-state", choices=["outbox_row", "side_table"], default="outbox_row",
                    help="where the relay records publish state (checkpoint.publish_state)")
    args = ap.parse_args()
    RELAY_PUBLISH_STATE = args.relay_publish_state
    rows = args.rows or (20_000 if args.quick else 100_000)
    rates = [int(x) for x in (args.rates or ("1000,2000" if args.quick else "500,1000,2000")).split(",")]
    phase = args.phase_secs or (6 if args.quick else 25)
    os.makedirs(OUT, exist_ok=True)
    pg = Postgres(os.environ["RELAY__POSTGRES__URL"])
    bootstrap = os.environ["RELAY__KAFKA__BOOTSTRAP_SERVERS"]
    run_id = uuid.uuid4().hex[:8]
    # SIGTERM (e.g. a timeout) unwinds through the cleanups.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.time()
    results = []
    for cls in (Relay, Debezium):
        system = cls(pg, bootstrap, run_id)
        try:
            results.append(measure(system, rows, rates, phase))
        except Failure as err:
            log(f"FAILED: {err}")
            sys.exit(1)
        finally:
            system.cleanup()
        r = results[-1]
        log(f"{r['system']}: {r['rate']:,.0f} msg/s start-to-done, steady {r['steady_rate']:,.0f} msg/s, "
            f"first message {r['first_s']:.2f} s, verify {r['verify']}")
    wall = time.time() - started
    block = report(results, args, wall) + "\n\n" + NOTES
    with open(os.path.join(OUT, "figures.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(OUT, "figures.md"), "w") as f:
        f.write(block + "\n")
    png = os.path.join(OUT, "compare-debezium.png")
    try:
        plot(results, png)
    except ImportError:
        log("no matplotlib: no plot")
        png = None
    print(block)
    if not args.no_docs:
        if png is None:
            raise SystemExit("compare: the docs need the plot; run through scripts/bench compare (matplotlib)")
        shutil.copy(png, os.path.join(REPO, "docs", "compare-debezium.png"))
        write_docs(block)
        log("wrote docs/benchmarks.md (compare section) and docs/compare-debezium.png")
    log(f"wall time {wall:.0f} s")


if __name__ == "__main__":
    main()
