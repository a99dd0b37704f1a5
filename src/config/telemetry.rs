//! `[telemetry]`: metrics, health endpoints and logs.

use serde::Deserialize;

use super::{at_least_one, defaults, invalid, ConfigError};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// How strict `/readyz` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Readiness {
    /// Ready once started (active or standby), and stays ready through Kafka
    /// or Postgres outages: a sidecar's failing probe would take the
    /// application's pod out of service.
    Lenient,
    /// Ready only while the pipeline is connected and running.
    Strict,
}

/// Metrics, health endpoints and logs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Address of the HTTP endpoint (`/metrics`, `/healthz`, `/readyz`);
    /// use `0.0.0.0:9187` inside a pod so the kubelet and Prometheus reach it.
    #[serde(default = "defaults::http_listen")]
    pub http_listen: String,
    /// `text` or `json`.
    #[serde(default = "defaults::log_format")]
    pub log_format: LogFormat,
    /// `lenient` (default, safe for sidecars) or `strict`.
    #[serde(default = "defaults::readiness")]
    pub readiness: Readiness,
    /// `/health/progress` fails when rows are pending and nothing was
    /// published for this long, in seconds.
    #[serde(default = "defaults::progress_timeout_secs")]
    pub progress_timeout_secs: u64,
    /// How often the lag gauges are sampled from Postgres, in milliseconds.
    #[serde(default = "defaults::lag_sample_interval_ms")]
    pub lag_sample_interval_ms: u64,
}

impl TelemetryConfig {
    /// The sampling interval, and `http_listen` is a socket address.
    pub fn validate(&self) -> Result<(), ConfigError> {
        at_least_one(&[("telemetry.lag_sample_interval_ms", self.lag_sample_interval_ms)])?;
        if self.http_listen.parse::<std::net::SocketAddr>().is_err() {
            return invalid(
                "telemetry.http_listen",
                format!("`{}` is not an address such as 127.0.0.1:9187", self.http_listen),
            );
        }
        Ok(())
    }
}
