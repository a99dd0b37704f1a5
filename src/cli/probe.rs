//! `relay probe PATH`: one HTTP GET against the relay's own endpoint, for a
//! container healthcheck in an image that has no shell and no curl (the
//! image holds the relay and its shared libraries only).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use crate::config::Config;

/// The address to reach the endpoint at from inside its own network
/// namespace: `telemetry.http_listen`, with an unspecified address
/// (`0.0.0.0`, `[::]`) replaced by the matching loopback address.
pub fn local_addr(config: &Config) -> Option<SocketAddr> {
    let mut addr: SocketAddr = config.telemetry.http_listen.parse().ok()?;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    Some(addr)
}

/// Runs `relay probe`: prints `ok` or `FAIL` with the summary line; exit 1
/// unless the endpoint answered 2xx.
pub async fn run(config: &Config, path: &str, timeout: Duration) -> ExitCode {
    match probe(config, path, timeout).await {
        Ok(line) => {
            println!("ok    {line}");
            ExitCode::SUCCESS
        }
        Err(line) => {
            println!("FAIL  {line}");
            ExitCode::FAILURE
        }
    }
}

/// GETs `path` (e.g. `/readyz`) from the configured endpoint within
/// `timeout`: `Ok` with a one-line summary on a 2xx answer, `Err` with the
/// status or the connection error otherwise.
pub async fn probe(config: &Config, path: &str, timeout: Duration) -> Result<String, String> {
    let addr = local_addr(config)
        .ok_or_else(|| format!("telemetry.http_listen `{}` is not an address", config.telemetry.http_listen))?;
    let path = if path.starts_with('/') { path.to_string() } else { format!("/{path}") };
    let url = format!("http://{addr}{path}");
    let client = reqwest::Client::builder().timeout(timeout).build().map_err(|e| format!("{url}: {e}"))?;
    let response = client.get(&url).send().await.map_err(|e| format!("{url}: {e}"))?;
    let status = response.status();
    if status.is_success() {
        Ok(format!("{url}: {status}"))
    } else {
        Err(format!("{url}: {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_listening_on(addr: &str) -> Config {
        let minimal = "postgres.url = \"postgres://relay@db/outbox\"\nkafka.bootstrap_servers = \"kafka:9092\"";
        let mut config = Config::from_toml_str(minimal).expect("minimal config");
        config.telemetry.http_listen = addr.to_string();
        config
    }

    #[test]
    fn unspecified_listen_addresses_are_probed_on_loopback() {
        let cases = [("0.0.0.0:9187", "127.0.0.1:9187"), ("[::]:9187", "[::1]:9187"), ("10.1.2.3:80", "10.1.2.3:80")];
        for (listen, probed) in cases {
            assert_eq!(local_addr(&config_listening_on(listen)).unwrap().to_string(), probed, "{listen}");
        }
        assert!(local_addr(&config_listening_on("not an address")).is_none());
    }
}
