//! A consumer that keeps a local copy of a compacted state topic
//! (event-carried state transfer): the latest state per key, by the
//! record's `entity_version` header, with tombstones removing keys.
//!
//! It reads the topic from the beginning, so a restart rebuilds the same
//! cache from what compaction kept. Rules, per key:
//! - a record whose `entity_version` is older than or equal to the version
//!   the cache holds for the key is skipped (a duplicate, or a replay);
//! - a tombstone (null value) removes the key; the cache remembers the
//!   deleted version, so an older state arriving after it (a duplicate from
//!   an at-least-once resend) does not bring the entity back;
//! - a record without the header is applied as it comes (Kafka order).
//!
//! Values are decoded as `relay tail` decodes them: Confluent-framed Avro
//! through the registry, else JSON.
//!
//! ```text
//! cargo run --example state_cache -- --config relay.toml --topic outbox.order.state --until-caught-up
//! cargo run --example state_cache -- --brokers 127.0.0.1:59092 --topic outbox.order.state --listen 127.0.0.1:8088
//! ```
//!
//! `--until-caught-up` reads to the end offsets seen at start and prints the
//! cache as JSON lines sorted by key, `{"key":..,"entity_version":..,"value":{..}}`,
//! then exits (1 if some record could not be decoded). Otherwise it keeps
//! following: one line per change on stdout, and with `--listen` the cache
//! as JSON on `GET /cache` (and one key on `GET /cache/{key}`).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use clap::Parser;
use rdkafka::message::{Headers, Message, OwnedMessage};
use relay::codec::decode::{Decoded, PayloadDecoder};
use relay::config::{Config, RegistryConfig};
use relay::sink::consumer::{consumer_config, plain_consumer_config, ReadError, Start, TopicReader};
use serde::Serialize;
use serde_json::Value as JsonValue;

/// Keeps a local cache of a compacted state topic.
#[derive(Debug, Parser)]
#[command(name = "state_cache")]
struct Args {
    /// The state topic to read.
    #[arg(long)]
    topic: String,
    /// Kafka bootstrap servers (overrides the config's).
    #[arg(long)]
    brokers: Option<String>,
    /// Schema registry URL, for Avro values (overrides the config's).
    #[arg(long)]
    registry: Option<String>,
    /// A relay config to take the brokers (with TLS and SASL settings) and
    /// the registry from.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Read to the end offsets seen at start, print the cache and exit.
    #[arg(long)]
    until_caught_up: bool,
    /// Serve the cache as JSON on GET /cache at this address (follow mode).
    #[arg(long)]
    listen: Option<SocketAddr>,
}

/// One cached entity, as printed and served.
#[derive(Debug, Clone, Serialize)]
struct Entry {
    key: String,
    entity_version: Option<i64>,
    value: JsonValue,
}

/// What applying one record did.
#[derive(Debug)]
enum Change {
    Put { key: String, version: Option<i64> },
    Delete { key: String, version: Option<i64> },
    Stale { key: String, version: i64, held: i64 },
}

/// The latest state per key.
#[derive(Debug, Default)]
struct Cache {
    entries: BTreeMap<String, Entry>,
    /// The version each deleted key was deleted at.
    deleted: HashMap<String, Option<i64>>,
}

impl Cache {
    /// Applies one record: `value` `None` is a tombstone.
    fn apply(&mut self, key: String, version: Option<i64>, value: Option<JsonValue>) -> Change {
        let held = match self.entries.get(&key) {
            Some(entry) => entry.entity_version,
            None => self.deleted.get(&key).copied().flatten(),
        };
        if let (Some(version), Some(held)) = (version, held) {
            if version <= held {
                return Change::Stale { key, version, held };
            }
        }
        match value {
            Some(value) => {
                self.deleted.remove(&key);
                self.entries.insert(key.clone(), Entry { key: key.clone(), entity_version: version, value });
                Change::Put { key, version }
            }
            None => {
                self.entries.remove(&key);
                self.deleted.insert(key.clone(), version);
                Change::Delete { key, version }
            }
        }
    }

    fn sorted(&self) -> Vec<Entry> {
        self.entries.values().cloned().collect()
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    relay::telemetry::init_tracing(relay::config::LogFormat::Text);
    match run(args).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<ExitCode, String> {
    let config = args.config.as_deref().map(Config::load).transpose().map_err(|e| e.to_string())?;
    if let Some(config) = &config {
        relay::preflight(config).map_err(|e| e.to_string())?;
    }
    let client = match (&config, &args.brokers) {
        (Some(config), brokers) => {
            let mut kafka = config.kafka.clone();
            if let Some(brokers) = brokers {
                kafka.bootstrap_servers = brokers.clone();
            }
            consumer_config(&kafka)
        }
        (None, Some(brokers)) => plain_consumer_config(brokers),
        (None, None) => return Err("pass --brokers or --config".into()),
    };
    let decoder = match (&args.registry, &config) {
        (Some(url), config) => {
            let base = config.as_ref().map(|c| c.registry.clone()).unwrap_or_default();
            PayloadDecoder::new(Some(&RegistryConfig { url: url.clone(), ..base }))
        }
        (None, Some(config)) => PayloadDecoder::for_config(config),
        (None, None) => PayloadDecoder::new(None),
    }
    .map_err(|e| e.to_string())?;
    let mut reader = TopicReader::open(client, &args.topic, Start::Beginning).await.map_err(error_chain)?;
    let cache = Arc::new(RwLock::new(Cache::default()));

    if args.until_caught_up {
        let mut undecodable = 0u64;
        while !reader.caught_up() {
            if let Some(message) = reader.next(Duration::from_millis(200)).await.map_err(error_chain)? {
                if apply(&cache, &decoder, &message).await.is_none() {
                    undecodable += 1;
                }
            }
        }
        let entries = cache.read().map_err(|e| e.to_string())?.sorted();
        for entry in entries {
            println!("{}", serde_json::to_string(&entry).map_err(|e| e.to_string())?);
        }
        if undecodable > 0 {
            eprintln!("{undecodable} records could not be applied (see above)");
            return Ok(ExitCode::FAILURE);
        }
        return Ok(ExitCode::SUCCESS);
    }

    if let Some(addr) = args.listen {
        let listener =
            tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        let local = listener.local_addr().map_err(|e| e.to_string())?;
        let app = Router::new()
            .route("/cache", get(all_entries))
            .route("/cache/{key}", get(one_entry))
            .with_state(cache.clone());
        tokio::spawn(async move {
            if let Err(err) = axum::serve(listener, app).await {
                eprintln!("error: the HTTP endpoint stopped: {err}");
            }
        });
        println!("listening on http://{local}/cache");
    }
    let mut announced = false;
    loop {
        if !announced && reader.caught_up() {
            announced = true;
            println!("caught up: {} keys", size(&cache));
        }
        let message = tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
            next = reader.next(Duration::from_millis(200)) => next.map_err(error_chain)?,
        };
        let Some(message) = message else { continue };
        if let Some(change) = apply(&cache, &decoder, &message).await {
            if announced {
                let size = size(&cache);
                match change {
                    Change::Put { key, version } => println!("put {key} v{} (keys: {size})", shown(version)),
                    Change::Delete { key, version } => println!("delete {key} v{} (keys: {size})", shown(version)),
                    Change::Stale { key, version, held } => println!("skip {key} v{version}: holding v{held}"),
                }
            }
        }
    }
}

/// Decodes `message` and applies it; `None` when it cannot be applied
/// (no key, a value that is neither JSON nor decodable Avro), with the
/// reason on stderr.
async fn apply(cache: &RwLock<Cache>, decoder: &PayloadDecoder, message: &OwnedMessage) -> Option<Change> {
    let at = format!("{}/{}@{}", message.topic(), message.partition(), message.offset());
    let key = match decoder.decode_key(message.key()).await {
        Decoded::Text(text) => text,
        Decoded::Avro { value: JsonValue::String(text), .. } => text,
        other => {
            eprintln!("skipping {at}: unusable key {}", other.text());
            return None;
        }
    };
    let version = message.headers().and_then(|headers| {
        headers
            .iter()
            .filter(|h| h.key == "entity_version")
            .filter_map(|h| h.value.and_then(|v| std::str::from_utf8(v).ok()).and_then(|v| v.parse::<i64>().ok()))
            .last()
    });
    let value = match decoder.decode(message.payload()).await.to_json() {
        Ok(value) => value,
        Err(reason) => {
            eprintln!("skipping {at} (key {key}): {reason}");
            return None;
        }
    };
    let mut cache = cache.write().ok()?;
    Some(cache.apply(key, version, value))
}

fn size(cache: &RwLock<Cache>) -> usize {
    cache.read().map(|c| c.entries.len()).unwrap_or(0)
}

fn shown(version: Option<i64>) -> String {
    version.map_or_else(|| "?".into(), |v| v.to_string())
}

fn error_chain(err: ReadError) -> String {
    relay::telemetry::ErrorChain(&err).to_string()
}

async fn all_entries(State(cache): State<Arc<RwLock<Cache>>>) -> Result<Json<Vec<Entry>>, StatusCode> {
    cache.read().map(|c| Json(c.sorted())).map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)
}

async fn one_entry(
    State(cache): State<Arc<RwLock<Cache>>>,
    Path(key): Path<String>,
) -> Result<Json<Entry>, StatusCode> {
    let cache = cache.read().map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
    cache.entries.get(&key).cloned().map(Json).ok_or(StatusCode::NOT_FOUND)
}
