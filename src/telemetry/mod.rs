//! Logs, metrics and the HTTP endpoint (`/metrics`, `/healthz`, `/readyz`).

pub mod http;
pub mod lag;
pub mod metrics;

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, Readiness};

/// Installs the global tracing subscriber: text or JSON on stderr, filtered
/// by `RUST_LOG` (default `info`).
pub fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only on a terminal: a sidecar's log collector wants plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    // A second call (tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// How often the recorder's upkeep runs (see [`install_metrics`]).
pub const METRICS_UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Installs the Prometheus recorder once per process and returns its handle.
///
/// Histogram observations (one per published row) pile up in the recorder
/// until something drains them into the fixed buckets. A scrape of
/// `/metrics` does, but nothing guarantees a scrape: a relay nobody scrapes
/// would grow by every row it ever published. So a thread of its own runs
/// the recorder's upkeep every [`METRICS_UPKEEP_INTERVAL`] for the life of
/// the process (the recorder is process-wide, like this thread), whether or
/// not anyone scrapes and whichever runtime is running.
pub fn install_metrics() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                // 15 ms: the latency the relay aims to stay under at p99.
                .set_buckets(&[
                    0.001, 0.0025, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                ])
                .map(|b| b.install_recorder())
                .and_then(|r| r)
                .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder().handle());
            metrics::describe();
            let upkeep = handle.clone();
            let spawned = std::thread::Builder::new().name("metrics-upkeep".into()).spawn(move || loop {
                std::thread::sleep(METRICS_UPKEEP_INTERVAL);
                upkeep.run_upkeep();
            });
            if let Err(err) = spawned {
                tracing::warn!(error = %err, "cannot start the metrics upkeep thread; histograms are drained only by scrapes of /metrics");
            }
            handle
        })
        .clone()
}

/// Displays an error with its whole chain of causes, `outer: inner: root`,
/// for log lines (`error = %ErrorChain(&err)`): a variant names its layer,
/// its source says why.
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

/// What the health endpoints report, shared with the pipeline and the lag
/// sampler.
#[derive(Debug, Clone)]
pub struct Health(Arc<HealthInner>);

#[derive(Debug)]
struct HealthInner {
    readiness: Readiness,
    started: AtomicBool,
    connected: AtomicBool,
    active: AtomicBool,
    progressing: AtomicBool,
    /// The lease epoch this instance holds; 0 when standby.
    epoch: AtomicI64,
    /// This relay's instance id, as the lease row names its holder.
    instance: OnceLock<String>,
}

impl Health {
    pub fn new(readiness: Readiness) -> Self {
        Self(Arc::new(HealthInner {
            readiness,
            started: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            active: AtomicBool::new(false),
            progressing: AtomicBool::new(true),
            epoch: AtomicI64::new(0),
            instance: OnceLock::new(),
        }))
    }

    /// The pipeline is connected and streaming (or a standby is waiting).
    pub fn set_ready(&self, ready: bool) {
        if ready {
            self.0.started.store(true, Ordering::Relaxed);
        }
        self.0.connected.store(ready, Ordering::Relaxed);
    }

    /// What `/readyz` answers, by the configured strictness.
    pub fn ready(&self) -> bool {
        match self.0.readiness {
            Readiness::Lenient => self.0.started.load(Ordering::Relaxed),
            Readiness::Strict => self.0.connected.load(Ordering::Relaxed),
        }
    }

    /// Whether the pipeline is connected right now.
    pub fn connected(&self) -> bool {
        self.0.connected.load(Ordering::Relaxed)
    }

    /// This instance holds the lease and streams.
    pub fn set_active(&self, active: bool) {
        self.0.active.store(active, Ordering::Relaxed);
        metrics::active(active);
    }

    /// The lease epoch this instance holds (`None`: standby), for `/readyz`
    /// and the `outbox_relay_leader` gauge.
    pub fn set_epoch(&self, epoch: Option<i64>) {
        self.0.epoch.store(epoch.unwrap_or(0), Ordering::Relaxed);
        metrics::leader(epoch.is_some());
    }

    pub fn epoch(&self) -> Option<i64> {
        Some(self.0.epoch.load(Ordering::Relaxed)).filter(|e| *e > 0)
    }

    /// This relay's instance id (set once).
    pub fn set_instance(&self, id: &str) {
        let _ = self.0.instance.set(id.to_string());
    }

    pub fn instance(&self) -> Option<&str> {
        self.0.instance.get().map(String::as_str)
    }

    pub fn active(&self) -> bool {
        self.0.active.load(Ordering::Relaxed)
    }

    /// False when rows are pending and nothing was published for
    /// `telemetry.progress_timeout_secs`.
    pub fn set_progressing(&self, progressing: bool) {
        self.0.progressing.store(progressing, Ordering::Relaxed);
    }

    pub fn progressing(&self) -> bool {
        self.0.progressing.load(Ordering::Relaxed)
    }
}
