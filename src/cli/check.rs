//! `relay check`: one line per component, non-zero exit if any fails.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

use secrecy::ExposeSecret;

use crate::config::{Config, PayloadFormat, SourceMode};
use crate::database;
use crate::store::Store;
use crate::telemetry::ErrorChain;

/// The verdict on one component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub component: &'static str,
    /// `None` when healthy, else what is wrong and how to fix it.
    pub problem: Option<String>,
    pub detail: String,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.problem {
            None => write!(f, "{:<9} ok    {}", self.component, self.detail),
            Some(problem) => write!(f, "{:<9} FAIL  {}", self.component, problem),
        }
    }
}

/// Checks every component the relay needs.
pub async fn check(config: &Config) -> Vec<Verdict> {
    let (postgres, kafka, registry) = tokio::join!(check_postgres(config), check_kafka(config), check_registry(config));
    vec![postgres, kafka, registry]
}

/// Deployment conditions the guarantees need that can be seen from here
/// and are not met: one line each, for operators (they do not fail the check).
pub async fn warnings(config: &Config) -> Vec<String> {
    let mut warnings = Vec::new();
    let Ok(client) = database::connect(&config.postgres).await else { return warnings };
    if config.source.mode == SourceMode::Poll {
        if let Ok(Some(cache)) = Store::new(config).id_sequence_cache(&client).await {
            if cache > 1 {
                warnings.push(format!(
                    "the outbox id sequence has CACHE {cache}: poll mode needs ids taken in commit order per entity; ALTER SEQUENCE ... CACHE 1"
                ));
            }
        }
    }
    // A pooler in between answers on its own port and gives each
    // transaction any server session: advisory locks and LISTEN break.
    let url_port = config
        .postgres
        .url
        .expose_secret()
        .parse::<tokio_postgres::Config>()
        .ok()
        .and_then(|pg| pg.get_ports().first().copied());
    if let (Some(url_port), Ok(row)) = (url_port, client.query_one("SELECT inet_server_port()", &[]).await) {
        if let Ok(Some(server_port)) = row.try_get::<_, Option<i32>>(0) {
            if i32::from(url_port) != server_port {
                warnings.push(format!(
                    "postgres.url names port {url_port} but the server listens on {server_port}: a connection pooler in between? The relay needs session semantics (no transaction pooling)"
                ));
            }
        }
    }
    warnings
}

async fn check_postgres(config: &Config) -> Verdict {
    let fail = |problem: String| Verdict { component: "postgres", problem: Some(problem), detail: String::new() };
    let client = match database::connect(&config.postgres).await {
        Ok(client) => client,
        Err(err) => return fail(format!("{}; check postgres.url and that Postgres is running", ErrorChain(&err))),
    };
    let wal_level: String = match client.query_one("SHOW wal_level", &[]).await {
        Ok(row) => match row.try_get(0) {
            Ok(level) => level,
            Err(err) => return fail(format!("query failed: {}", ErrorChain(&err))),
        },
        Err(err) => return fail(format!("query failed: {}", ErrorChain(&err))),
    };
    if config.source.mode == SourceMode::Logical && wal_level != "logical" {
        return fail(format!(
            "wal_level is `{wal_level}`; logical mode needs wal_level=logical (or set source.mode = \"poll\")"
        ));
    }
    let table = config.outbox_table_sql();
    match Store::new(config).status(&client, false).await {
        Ok(status) => Verdict {
            component: "postgres",
            problem: None,
            detail: format!("wal_level={wal_level}, {table} has {} pending rows", status.pending),
        },
        Err(err) => {
            let hint = match err.sql_state() {
                Some(code) if *code == tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE => {
                    "grant the relay's role SELECT and UPDATE on it (see README, Security)"
                }
                _ => "run `relay migrate`",
            };
            fail(format!("cannot read {table}: {}; {hint}", ErrorChain(&err)))
        }
    }
}

async fn check_kafka(config: &Config) -> Verdict {
    let servers = config.kafka.bootstrap_servers.clone();
    let mut client_config = ClientConfig::new();
    for (key, value) in &config.kafka.librdkafka {
        client_config.set(key, value);
    }
    client_config.set("bootstrap.servers", &servers);
    let result = tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = client_config.create()?;
        consumer.fetch_metadata(None, Duration::from_secs(5)).map(|md| (md.brokers().len(), md.topics().len()))
    })
    .await;
    match result {
        Ok(Ok((brokers, topics))) => Verdict {
            component: "kafka",
            problem: None,
            detail: format!("{servers}: {brokers} broker(s), {topics} topic(s)"),
        },
        Ok(Err(err)) => Verdict {
            component: "kafka",
            problem: Some(format!(
                "Kafka at {servers} is unreachable ({err}); check kafka.bootstrap_servers and that the broker is running"
            )),
            detail: String::new(),
        },
        Err(err) => Verdict { component: "kafka", problem: Some(err.to_string()), detail: String::new() },
    }
}

async fn check_registry(config: &Config) -> Verdict {
    let url = config.registry.url.trim_end_matches('/');
    if url.is_empty() {
        let problem = (config.codec.format == PayloadFormat::Avro)
            .then(|| "codec.format = \"avro\" needs registry.url".to_string());
        return Verdict { component: "registry", problem, detail: "not used (codec.format = \"json\")".into() };
    }
    let client = match reqwest::Client::builder().timeout(Duration::from_secs(5)).build() {
        Ok(client) => client,
        Err(err) => return Verdict { component: "registry", problem: Some(err.to_string()), detail: String::new() },
    };
    let mut request = client.get(format!("{url}/subjects"));
    if let Some(user) = &config.registry.username {
        use secrecy::ExposeSecret;
        request = request.basic_auth(user, config.registry.password.as_ref().map(|p| p.expose_secret().to_string()));
    }
    match request.send().await {
        Ok(response) if response.status().is_success() => {
            let subjects = response.json::<Vec<String>>().await.map(|s| s.len()).unwrap_or(0);
            Verdict { component: "registry", problem: None, detail: format!("{url}: {subjects} subject(s)") }
        }
        Ok(response) => Verdict {
            component: "registry",
            problem: Some(format!(
                "{url}/subjects answered {}; check registry.url (the Confluent-compatible API base)",
                response.status()
            )),
            detail: String::new(),
        },
        Err(err) => Verdict {
            component: "registry",
            problem: Some(format!(
                "schema registry at {url} is unreachable ({err}); check registry.url and that it is running"
            )),
            detail: String::new(),
        },
    }
}
