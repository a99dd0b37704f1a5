//! `relay check`: one line per component, non-zero exit if any fails.

use std::sync::Mutex;
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseProducer, Producer, ProducerContext};

use crate::config::{Config, PayloadFormat, SourceMode};
use crate::database;
use crate::sink;
use crate::store::Store;
use crate::telemetry::ErrorChain;

/// The verdict on one component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub component: &'static str,
    /// `None` when healthy, else what is wrong and how to fix it.
    pub problem: Option<String>,
    pub detail: String,
    /// Works, but something will not (printed as a second `WARN` line; the
    /// exit code stays 0).
    pub warning: Option<String>,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.problem {
            None => write!(f, "{:<9} ok    {}", self.component, self.detail)?,
            Some(problem) => write!(f, "{:<9} FAIL  {}", self.component, problem)?,
        }
        if let Some(warning) = &self.warning {
            write!(f, "\n{:<9} WARN  {}", self.component, warning)?;
        }
        Ok(())
    }
}

/// Checks every component the relay needs.
pub async fn check(config: &Config) -> Vec<Verdict> {
    let (postgres, kafka, registry) = tokio::join!(check_postgres(config), check_kafka(config), check_registry(config));
    vec![postgres, kafka, registry]
}

/// Deployment conditions of poll mode that can be seen from here and are
/// not met: one line each, for operators (they do not fail the check). A
/// pooling proxy is told in the postgres verdict's warning.
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
    warnings
}

async fn check_postgres(config: &Config) -> Verdict {
    let fail = |problem: String| Verdict {
        component: "postgres",
        problem: Some(problem),
        detail: String::new(),
        warning: None,
    };
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
    let warning = pooling_warning(config, &client).await;
    match Store::new(config).status(&client, false).await {
        Ok(status) => Verdict {
            component: "postgres",
            problem: None,
            detail: format!("wal_level={wal_level}, {table} has {} pending rows", status.pending),
            warning,
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

/// A warning when `postgres.url` seems to go through a pooling proxy, which
/// breaks what the relay needs from a session: LISTEN (a released lease
/// wakes the standbys at once; poll mode's wake-ups), session settings (the
/// publish-state session's `idle_in_transaction_session_timeout`, see
/// README "Leadership and fencing"), prepared statements, and replication.
/// A transaction-pooling proxy (PgBouncer's `pool_mode = transaction`) shows
/// as statements of one connection running on different server sessions; any
/// proxy shows, possibly, as a server port that is not the one connected to.
async fn pooling_warning(config: &Config, client: &tokio_postgres::Client) -> Option<String> {
    let mut pids = std::collections::BTreeSet::new();
    let mut server_port = None;
    for _ in 0..5 {
        let row = client.query_one("SELECT pg_backend_pid(), inet_server_port()", &[]).await.ok()?;
        pids.insert(row.try_get::<_, i32>(0).ok()?);
        server_port = row.try_get::<_, Option<i32>>(1).ok()?;
    }
    let url: tokio_postgres::Config = secrecy::ExposeSecret::expose_secret(&config.postgres.url).parse().ok()?;
    let url_port = match url.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(_)) => Some(url.get_ports().first().copied().unwrap_or(5432)),
        _ => None,
    };
    pooling_verdict(pids.len(), server_port, url_port)
}

/// The judgement of [`pooling_warning`]: `sessions` distinct server sessions
/// answered five consecutive statements; the server listens on
/// `server_port` (`None` over a Unix socket); the URL names `url_port`.
fn pooling_verdict(sessions: usize, server_port: Option<i32>, url_port: Option<u16>) -> Option<String> {
    const WHY: &str = "LISTEN, session settings and prepared statements do not work through one, and the lease fence relies on them; point postgres.url at Postgres itself or at a session-pooling port (see README, Leadership and fencing)";
    if sessions > 1 {
        return Some(format!(
            "postgres.url goes through a transaction-pooling proxy: 5 consecutive statements ran on {sessions} server sessions; {WHY}"
        ));
    }
    match (server_port, url_port) {
        (Some(server), Some(url)) if server != i32::from(url) => Some(format!(
            "postgres.url may go through a proxy (connected to port {url}, the server listens on {server}); if it pools by transaction, {WHY}"
        )),
        _ => None,
    }
}

/// The errors librdkafka reports while `relay check` connects. A failed
/// metadata request only says "transport failure"; the cause (SASL
/// authentication, TLS handshake, connection refused) arrives as an error
/// event, with a code, which only polling the client's queue delivers
/// (hence a producer, which polls that queue and sends nothing).
#[derive(Default)]
struct CheckContext {
    errors: Mutex<Vec<(RDKafkaErrorCode, String)>>,
}

impl ClientContext for CheckContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if let (Some(code), Ok(mut errors)) = (error.rdkafka_error_code(), self.errors.lock()) {
            errors.push((code, reason.to_string()));
        }
    }
}

impl ProducerContext for CheckContext {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &DeliveryResult<'_>, _: Self::DeliveryOpaque) {}
}

async fn check_kafka(config: &Config) -> Verdict {
    let servers = config.kafka.bootstrap_servers.clone();
    let client_config = sink::client_config(&config.kafka);
    let result = tokio::task::spawn_blocking(move || {
        let client: BaseProducer<CheckContext> = client_config.create_with_context(CheckContext::default())?;
        let metadata = client.client().fetch_metadata(None, Duration::from_secs(5));
        if metadata.is_err() {
            // The error events queued while the request waited.
            client.poll(Duration::from_millis(200));
        }
        let causes = client.context().errors.lock().map(|e| e.clone()).unwrap_or_default();
        Ok::<_, KafkaError>((metadata.map(|md| (md.brokers().len(), md.topics().len())), causes))
    })
    .await;
    let fail =
        |problem: String| Verdict { component: "kafka", problem: Some(problem), detail: String::new(), warning: None };
    match result {
        Ok(Ok((Ok((brokers, topics)), _))) => {
            // With ACLs the metadata lists only the topics the principal may describe.
            let whose = match config.kafka.security_protocol.uses_sasl() {
                true => format!(" visible to {}", config.kafka.principal()),
                false => String::new(),
            };
            Verdict {
                component: "kafka",
                problem: None,
                detail: format!("{servers}: {brokers} broker(s), {topics} topic(s){whose}"),
                warning: None,
            }
        }
        Ok(Ok((Err(err), causes))) => fail(kafka_problem(&servers, &err, &causes)),
        Ok(Err(err)) => fail(format!("cannot create a Kafka client ({err}); check the kafka.* settings")),
        Err(err) => fail(err.to_string()),
    }
}

/// Tells why the brokers could not be asked for metadata, by librdkafka's
/// error codes (never by message text): the credentials were refused, the
/// TLS handshake failed, or the brokers could not be reached. Each names
/// the keys to check, since the fixes differ.
fn kafka_problem(servers: &str, err: &KafkaError, causes: &[(RDKafkaErrorCode, String)]) -> String {
    let cause = |code: RDKafkaErrorCode| causes.iter().find(|(c, _)| *c == code).map(|(_, reason)| reason.as_str());
    if let Some(reason) = cause(RDKafkaErrorCode::Authentication) {
        return format!(
            "authentication to Kafka at {servers} failed ({reason}); check kafka.sasl.username, kafka.sasl.password and kafka.sasl.mechanism against the broker's SASL users"
        );
    }
    if let Some(reason) = cause(RDKafkaErrorCode::SSL) {
        return format!(
            "TLS handshake with Kafka at {servers} failed ({reason}); check kafka.tls_ca_file (the CA that signed the broker's certificate) and kafka.security_protocol (the listener's protocol)"
        );
    }
    let reason = causes
        .iter()
        .find(|(c, _)| *c == RDKafkaErrorCode::BrokerTransportFailure)
        .map_or_else(|| err.to_string(), |(_, reason)| reason.clone());
    format!(
        "Kafka at {servers} is unreachable ({reason}); check kafka.bootstrap_servers, kafka.security_protocol (the listener's protocol) and that the broker is running"
    )
}

async fn check_registry(config: &Config) -> Verdict {
    let url = config.registry.url.trim_end_matches('/');
    if url.is_empty() {
        let problem = (config.codec.format == PayloadFormat::Avro)
            .then(|| "codec.format = \"avro\" needs registry.url".to_string());
        return Verdict {
            component: "registry",
            problem,
            detail: "not used (codec.format = \"json\")".into(),
            warning: None,
        };
    }
    let client = match reqwest::Client::builder().timeout(Duration::from_secs(5)).build() {
        Ok(client) => client,
        Err(err) => {
            return Verdict {
                component: "registry",
                problem: Some(err.to_string()),
                detail: String::new(),
                warning: None,
            }
        }
    };
    let mut request = client.get(format!("{url}/subjects"));
    if let Some(user) = &config.registry.username {
        use secrecy::ExposeSecret;
        request = request.basic_auth(user, config.registry.password.as_ref().map(|p| p.expose_secret().to_string()));
    }
    match request.send().await {
        Ok(response) if response.status().is_success() => {
            let subjects = response.json::<Vec<String>>().await.map(|s| s.len()).unwrap_or(0);
            Verdict {
                component: "registry",
                problem: None,
                detail: format!("{url}: {subjects} subject(s)"),
                warning: None,
            }
        }
        Ok(response) => Verdict {
            component: "registry",
            problem: Some(format!(
                "{url}/subjects answered {}; check registry.url (the Confluent-compatible API base)",
                response.status()
            )),
            detail: String::new(),
            warning: None,
        },
        Err(err) => Verdict {
            component: "registry",
            problem: Some(format!(
                "schema registry at {url} is unreachable ({err}); check registry.url and that it is running"
            )),
            detail: String::new(),
            warning: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_failures_are_told_apart_by_code() {
        let err = KafkaError::MetadataFetch(RDKafkaErrorCode::BrokerTransportFailure);
        let refused = [(RDKafkaErrorCode::BrokerTransportFailure, "Connection refused".to_string())];
        let auth = [
            (RDKafkaErrorCode::AllBrokersDown, "1/1 brokers are down".to_string()),
            (RDKafkaErrorCode::Authentication, "SASL authentication error".to_string()),
        ];
        let tls = [(RDKafkaErrorCode::SSL, "certificate verify failed".to_string())];
        let text = kafka_problem("b:1", &err, &refused);
        assert!(text.contains("unreachable") && text.contains("Connection refused"), "{text}");
        let text = kafka_problem("b:1", &err, &auth);
        assert!(text.contains("authentication") && text.contains("kafka.sasl.password"), "{text}");
        assert!(!text.contains("unreachable"), "{text}");
        let text = kafka_problem("b:1", &err, &tls);
        assert!(text.contains("TLS handshake") && text.contains("kafka.tls_ca_file"), "{text}");
        let text = kafka_problem("b:1", &err, &[]);
        assert!(text.contains("unreachable"), "{text}");
    }

    #[test]
    fn pooling_is_told_by_sessions_and_ports() {
        assert_eq!(pooling_verdict(1, Some(5432), Some(5432)), None);
        assert_eq!(pooling_verdict(1, None, None), None);
        let pooled = pooling_verdict(3, Some(5432), Some(6432)).expect("a warning");
        assert!(pooled.contains("transaction-pooling proxy") && pooled.contains("3 server sessions"), "{pooled}");
        let proxied = pooling_verdict(1, Some(5432), Some(6432)).expect("a warning");
        assert!(proxied.contains("port 6432") && proxied.contains("5432"), "{proxied}");
    }
}
