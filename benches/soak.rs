//! Soak: the relay under a steady write rate for a long while, its resident
//! memory (RSS) and CPU sampled every 10 s, run twice: once with nothing
//! scraping `/metrics` and once with a scrape every 15 s (memory must stay
//! flat either way: the histograms' upkeep must not wait for a scrape).
//!
//! Run: `scripts/bench soak [--quick] [--duration 30m] [--rate 1000] [--variant nothing|scraped] [--warm-up 1m] [--no-docs]`
//! (the stack up, then `cargo bench --bench soak -- ARGS`). Defaults: 1,000
//! rows/s for 30 minutes per variant; `--quick` makes it 5 minutes.
//!
//! Fails (exit code 1) when, in either variant, the RSS rises more than
//! 1 MiB above its value at the end of the first minute (`--warm-up 5m`
//! takes the value at 5 minutes instead). Writes, whatever the
//! verdict, `target/bench-soak.csv`, `target/bench-soak.md` and
//! `target/bench-soak-rss.png`, and (unless `--no-docs`) puts the figures
//! into docs/benchmarks.md between the `soak:begin` / `soak:end` markers and
//! the plot into docs/soak-rss.png.

#[path = "../tests/it/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const SAMPLE_EVERY: Duration = Duration::from_secs(10);
const SCRAPE_EVERY: Duration = Duration::from_secs(15);
/// By default the RSS at the end of the first minute is the reference
/// (`--warm-up` changes it).
const WARM_UP: Duration = Duration::from_secs(60);
/// Allowed rise of the RSS above the reference, in KiB.
const BOUND_KIB: u64 = 1024;
const ENTITIES: usize = 1_000;
/// Paced writers: each has WRITERS / rate seconds per transaction.
const WRITERS: usize = 16;

struct Options {
    duration: Duration,
    rate: f64,
    quick: bool,
    docs: bool,
    /// Only the variant whose name starts with this (`nothing`, `scraped`).
    only: Option<String>,
    /// The RSS at the end of this is the reference for the bound.
    warm_up: Duration,
}

fn parse_duration(text: &str) -> Duration {
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let n: u64 = number.parse().unwrap_or_else(|_| panic!("bad duration {text:?}: use e.g. 300, 300s, 5m, 1h"));
    match unit {
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => panic!("bad duration {text:?}: use e.g. 300, 300s, 5m, 1h"),
    }
}

fn options() -> Options {
    let mut options = Options {
        duration: Duration::from_secs(30 * 60),
        rate: 1_000.0,
        quick: false,
        docs: true,
        only: None,
        warm_up: WARM_UP,
    };
    let mut explicit_duration = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => options.quick = true,
            "--duration" => explicit_duration = Some(parse_duration(&args.next().expect("--duration VALUE"))),
            "--rate" => options.rate = args.next().and_then(|v| v.parse().ok()).expect("--rate ROWS_PER_SEC"),
            "--no-docs" => options.docs = false,
            "--warm-up" => options.warm_up = parse_duration(&args.next().expect("--warm-up VALUE")),
            "--variant" => options.only = Some(args.next().expect("--variant nothing|scraped")),
            // What cargo bench passes to every bench binary.
            "--bench" => {}
            other => panic!(
                "unknown argument {other:?}: --quick, --duration D, --rate R, --variant V, --warm-up D, --no-docs"
            ),
        }
    }
    if options.quick {
        options.duration = Duration::from_secs(5 * 60);
    }
    if let Some(duration) = explicit_duration {
        options.duration = duration;
    }
    assert!(options.duration > options.warm_up, "the duration must be longer than the warm-up");
    options
}

/// (RSS in KiB, user + system CPU time in clock ticks) of a process now.
fn sample_process(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces), 1-based in proc(5):
    // utime is field 14, stime field 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((rss, utime + stime))
}

fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

fn clock_ticks_per_sec() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

struct Sample {
    secs: f64,
    rss_kib: u64,
    /// Percent of one core over the interval before this sample.
    cpu_percent: f64,
    /// Rows written so far and rows not yet published.
    written: i64,
    pending: i64,
    /// The machine's 1-minute load average (other work on the same cores).
    load: f64,
}

struct Run {
    name: &'static str,
    samples: Vec<Sample>,
    scrapes: usize,
    rows: i64,
    elapsed: Duration,
    /// WARN and ERROR lines in the relay's log: an outage of Kafka or
    /// Postgres during the run (e.g. another test stopping them) shows here.
    trouble: usize,
    warm_up: Duration,
}

impl Run {
    /// The RSS at the end of the warm-up (by default the first minute).
    fn reference(&self) -> &Sample {
        self.samples.iter().find(|s| s.secs >= self.warm_up.as_secs_f64()).unwrap_or_else(|| &self.samples[0])
    }
    fn after_warm_up(&self) -> impl Iterator<Item = &Sample> {
        self.samples.iter().filter(|s| s.secs >= self.warm_up.as_secs_f64())
    }
    fn max_rise_kib(&self) -> i64 {
        let reference = self.reference().rss_kib as i64;
        self.after_warm_up().map(|s| s.rss_kib as i64 - reference).max().unwrap_or(0)
    }
    fn end_rise_kib(&self) -> i64 {
        self.samples.last().map(|s| s.rss_kib as i64).unwrap_or(0) - self.reference().rss_kib as i64
    }
    /// Least-squares slope of the RSS after the warm-up, KiB per minute.
    fn slope_kib_per_min(&self) -> f64 {
        let points: Vec<(f64, f64)> = self.after_warm_up().map(|s| (s.secs / 60.0, s.rss_kib as f64)).collect();
        let n = points.len() as f64;
        if n < 2.0 {
            return 0.0;
        }
        let (mx, my) = (points.iter().map(|p| p.0).sum::<f64>() / n, points.iter().map(|p| p.1).sum::<f64>() / n);
        let num: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
        let den: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
        if den == 0.0 {
            0.0
        } else {
            num / den
        }
    }
    fn cpu_mean(&self) -> f64 {
        let after: Vec<f64> = self.samples.iter().skip(1).map(|s| s.cpu_percent).collect();
        after.iter().sum::<f64>() / after.len().max(1) as f64
    }
    fn load_mean(&self) -> f64 {
        self.samples.iter().map(|s| s.load).sum::<f64>() / self.samples.len().max(1) as f64
    }
    fn passed(&self) -> bool {
        self.max_rise_kib() <= BOUND_KIB as i64
    }
}

async fn soak(stack: &Stack, options: &Options, name: &'static str, scrape: bool) -> Run {
    let db = TestDb::new(stack).await;
    let config = db.write_config("");
    db.migrate(&config);
    let client = db.client().await;
    let relay = RelayProcess::start(&config);
    let pid = relay.child.id();
    let base = relay.http_base().await;
    let ticks = clock_ticks_per_sec();

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scraper = scrape.then(|| {
        let (stop, url) = (stop.clone(), format!("{base}/metrics"));
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut scrapes = 0;
            let mut ticker = tokio::time::interval(SCRAPE_EVERY);
            ticker.tick().await;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                ticker.tick().await;
                if let Ok(response) = http.get(&url).send().await {
                    if response.text().await.is_ok() {
                        scrapes += 1;
                    }
                }
            }
            scrapes
        })
    });

    let total = (options.rate * options.duration.as_secs_f64()).round() as usize;
    let started = Instant::now();
    let workload = spawn_paced_workload(&db.url, total, ENTITIES, WRITERS, Some(options.rate));
    let mut samples = Vec::new();
    let mut ticker = tokio::time::interval(SAMPLE_EVERY);
    let mut last_cpu: Option<(Instant, u64)> = None;
    loop {
        ticker.tick().await;
        let now = Instant::now();
        let (rss_kib, cpu) = sample_process(pid).expect("the relay is running");
        let cpu_percent = match last_cpu {
            Some((at, before)) => (cpu - before) as f64 / ticks / (now - at).as_secs_f64() * 100.0,
            None => 0.0,
        };
        last_cpu = Some((now, cpu));
        let row = client
            .query_one(
                "SELECT coalesce(max(id), 0), (SELECT count(*) FROM outbox WHERE published_at IS NULL) FROM outbox",
                &[],
            )
            .await
            .expect("progress");
        let sample = Sample {
            secs: (now - started).as_secs_f64(),
            rss_kib,
            cpu_percent,
            written: row.get(0),
            pending: row.get(1),
            load: load_average(),
        };
        eprintln!(
            "soak {name}: {:>5.0} s  RSS {:>6} KiB  CPU {:>5.1} %  written {:>8}  pending {:>6}  load {:.1}",
            sample.secs, sample.rss_kib, sample.cpu_percent, sample.written, sample.pending, sample.load
        );
        samples.push(sample);
        if workload.is_finished() {
            break;
        }
    }
    workload.await.expect("workload");
    let elapsed = started.elapsed();
    wait_all_published(&client, Duration::from_secs(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let scrapes = match scraper {
        Some(task) => task.await.expect("scraper"),
        None => 0,
    };
    let mut relay = relay;
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0), "{}", relay.log_text());
    let trouble = relay.log_text().lines().filter(|l| l.contains(" WARN ") || l.contains(" ERROR ")).count();
    db.cleanup().await;
    Run { name, samples, scrapes, rows: total as i64, elapsed, trouble, warm_up: options.warm_up }
}

fn write_csv(runs: &[Run], path: &Path) {
    let mut csv = String::from("variant,seconds,rss_kib,cpu_percent,written,pending,load\n");
    for run in runs {
        for s in &run.samples {
            csv.push_str(&format!(
                "{},{:.1},{},{:.2},{},{},{:.2}\n",
                run.name, s.secs, s.rss_kib, s.cpu_percent, s.written, s.pending, s.load
            ));
        }
    }
    std::fs::write(path, csv).expect("write csv");
}

/// Renders the plot with matplotlib (from `scripts/python-env --plots`).
fn plot(repo: &Path, csv: &Path, png: &Path, title: &str, warm_up: Duration) -> Result<(), String> {
    let python = match std::env::var("RELAY_PLOT_PYTHON") {
        Ok(python) => python,
        Err(_) => {
            let output = Command::new(repo.join("scripts/python-env"))
                .arg("--plots")
                .output()
                .map_err(|e| format!("scripts/python-env: {e}"))?;
            if !output.status.success() {
                return Err(format!("scripts/python-env --plots: {}", String::from_utf8_lossy(&output.stderr)));
            }
            String::from_utf8_lossy(&output.stdout).trim().to_string()
        }
    };
    let output = Command::new(python)
        .arg(repo.join("benches/soak_plot.py"))
        .arg(csv)
        .arg(png)
        .arg(title)
        .arg(format!("{}", warm_up.as_secs_f64() / 60.0))
        .output()
        .map_err(|e| format!("run soak_plot.py: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn report(runs: &[Run], options: &Options, plot_ref: &str) -> String {
    let minutes = options.duration.as_secs_f64() / 60.0;
    let mut rows = String::new();
    for run in runs {
        let first = run.samples.first().map(|s| s.rss_kib).unwrap_or(0);
        let reference = run.reference().rss_kib;
        let last = run.samples.last().map(|s| s.rss_kib).unwrap_or(0);
        let peak = run.samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
        let max_pending = run.samples.iter().map(|s| s.pending).max().unwrap_or(0);
        rows.push_str(&format!(
            "| {} | {:.0} rows/s ({} rows in {:.0} s) | {:.1} / {:.1} / {:.1} / {:.1} MiB | {:+} KiB / {:+} KiB | {:+.1} KiB/min | {:.1} % | {} | {:.1} | {} | {} |\n",
            run.name,
            run.rows as f64 / run.elapsed.as_secs_f64(),
            run.rows,
            run.elapsed.as_secs_f64(),
            mib(first),
            mib(reference),
            mib(last),
            mib(peak),
            run.max_rise_kib(),
            run.end_rise_kib(),
            run.slope_kib_per_min(),
            run.cpu_mean(),
            max_pending,
            run.load_mean(),
            run.trouble,
            if run.passed() { "**pass**" } else { "**FAIL**" },
        ));
    }
    let scrapes: Vec<String> =
        runs.iter().filter(|r| r.scrapes > 0).map(|r| format!("{} scrapes in `{}`", r.scrapes, r.name)).collect();
    format!(
        "Soak{quick}: {rate:.0} rows/s of single-row transactions ({WRITERS} writers, {ENTITIES} entities) for {minutes:.0} min \
         per variant, release build, logical mode, JSON; RSS and CPU of the relay sampled every {sample} s{scrapes}. \
         Bound: the RSS may rise at most {BOUND_KIB} KiB above its value after {warm} s (the warm-up).\n\n\
         | variant | achieved write rate | RSS first sample / after warm-up / last / peak | rise after warm-up, max / at the end | RSS trend after warm-up | relay CPU (mean, of one core) | most rows pending at a sample | machine load average (mean) | WARN/ERROR lines in the relay's log | verdict |\n\
         |---|---|---|---|---|---|---|---|---|---|\n{rows}\n{plot_ref}\n",
        quick = if options.quick { " (quick mode)" } else { "" },
        warm = options.warm_up.as_secs(),
        rate = options.rate,
        sample = SAMPLE_EVERY.as_secs(),
        scrapes = if scrapes.is_empty() { String::new() } else { format!(" ({})", scrapes.join(", ")) },
    )
}

/// Replaces what stands between the soak markers of docs/benchmarks.md.
fn update_docs(path: &Path, body: &str) -> Result<(), String> {
    const BEGIN: &str = "<!-- soak:begin (written by `scripts/bench soak`) -->";
    const END: &str = "<!-- soak:end -->";
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let start = text.find(BEGIN).ok_or("no soak:begin marker")? + BEGIN.len();
    let end = text[start..].find(END).ok_or("no soak:end marker")? + start;
    let updated = format!("{}\n{}\n{}", &text[..start], body.trim_end(), &text[end..]);
    std::fs::write(path, updated).map_err(|e| e.to_string())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let options = options();
    let stack = Stack::from_env();
    let started = chrono::Utc::now();
    let mut runs = Vec::new();
    for (name, scrape) in [("nothing scraping /metrics", false), ("scraped every 15 s", true)] {
        if options.only.as_deref().is_some_and(|only| !name.starts_with(only)) {
            continue;
        }
        eprintln!("soak: {name}, {:.0} rows/s for {:?}", options.rate, options.duration);
        runs.push(soak(&stack, &options, name, scrape).await);
    }

    let target = stack.repo.join("target");
    let csv = target.join("bench-soak.csv");
    let png = target.join("bench-soak-rss.png");
    write_csv(&runs, &csv);
    let title = format!(
        "relay RSS, {:.0} rows/s, {} ({})",
        options.rate,
        if options.quick { "quick mode" } else { "soak" },
        started.format("%Y-%m-%d")
    );
    let plotted = plot(&stack.repo, &csv, &png, &title, options.warm_up);
    if let Err(err) = &plotted {
        eprintln!("soak: no plot: {err}");
    }
    let plot_ref = if plotted.is_ok() {
        "![Relay RSS over time, both variants](soak-rss.png)"
    } else {
        "(no plot: matplotlib unavailable in this run)"
    };
    let body = report(&runs, &options, plot_ref);
    println!("{body}");
    let _ = std::fs::write(target.join("bench-soak.md"), &body);
    if options.docs {
        let docs = stack.repo.join("docs");
        if plotted.is_ok() {
            std::fs::copy(&png, docs.join("soak-rss.png")).expect("copy the plot into docs/");
        }
        let dated = format!("Run of {} ({}).\n\n{body}", started.format("%Y-%m-%d %H:%M UTC"), machine());
        match update_docs(&docs.join("benchmarks.md"), &dated) {
            Ok(()) => eprintln!("soak: figures written into docs/benchmarks.md"),
            Err(err) => eprintln!("soak: docs/benchmarks.md not updated: {err}"),
        }
    }
    let failed: Vec<&str> = runs.iter().filter(|r| !r.passed()).map(|r| r.name).collect();
    if !failed.is_empty() {
        eprintln!(
            "soak FAILED: the RSS rose more than {BOUND_KIB} KiB after the warm-up ({:?}) in: {failed:?}",
            options.warm_up
        );
        std::process::exit(1);
    }
}

/// A short description of the machine: cores and memory.
fn machine() -> String {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    format!("{cores} cores, {mem_gib:.0} GiB, shared with Postgres, Kafka, the registry and the writers")
}
