//! `relay check`: one line per component, non-zero exit if any fails.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use crate::codec::registry::{self, RegistryError};
use crate::config::{Config, PayloadFormat, SourceMode};
use crate::database;
use crate::routing::{RouteTable, TopicKind};
use crate::sink;
use crate::store::grants::{self, PrivilegeReport};
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

/// Runs `relay check`: prints the config file's line, one verdict per
/// component and the deployment warnings; exit 1 if any component fails.
pub async fn run(config: &Config, path: &Path) -> ExitCode {
    let verdicts = check(config).await;
    println!("{:<9} ok    {}", "config", path.display());
    for verdict in &verdicts {
        println!("{verdict}");
    }
    for warning in warnings(config).await {
        println!("{:<9} WARN  {warning}", "postgres");
    }
    if verdicts.iter().all(|v| v.problem.is_none()) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
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
    let mut client = match database::connect(&config.postgres).await {
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
    match grants::check(&client, config).await {
        Ok(PrivilegeReport::Complete) => {}
        Ok(report) => return fail(privilege_problem(&report)),
        Err(err) => return fail(format!("cannot check the role's privileges: {}", ErrorChain(&err))),
    }
    let table = config.outbox_table_sql();
    let warning = pooling_warning(config, &client).await;
    match Store::new(config).status(&mut client, false).await {
        Ok(status) => Verdict {
            component: "postgres",
            problem: None,
            detail: format!("wal_level={wal_level}, {table} has {} pending rows", status.pending),
            warning,
        },
        Err(err) => fail(format!("cannot read {table}: {}", ErrorChain(&err))),
    }
}

/// The problem line(s) of a privilege report that is not complete: tables
/// that do not exist (run `relay migrate`), else one line per missing
/// grant, which a migration never gives.
fn privilege_problem(report: &PrivilegeReport) -> String {
    match report {
        PrivilegeReport::Complete => String::new(),
        PrivilegeReport::MissingTables(tables) => {
            format!("table(s) {} do not exist; run `relay migrate` as the outbox table's owner", tables.join(", "))
        }
        PrivilegeReport::Missing { role, missing } => {
            let mut text = format!(
                "role \"{role}\" lacks {} privilege(s) the relay needs; as the table's owner run (all of them: `relay migrate --print-grants {role}`):",
                missing.len()
            );
            for privilege in missing {
                text.push_str(&format!(
                    "\n{:<9}       missing {}: {}",
                    "",
                    privilege.describe(),
                    privilege.grant(role)
                ));
            }
            text
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

async fn check_kafka(config: &Config) -> Verdict {
    let servers = &config.kafka.bootstrap_servers;
    match sink::probe(&config.kafka, Duration::from_secs(5)).await {
        Ok(reached) => {
            // With ACLs the metadata lists only the topics the principal may describe.
            let whose = match config.kafka.security_protocol.uses_sasl() {
                true => format!(" visible to {}", config.kafka.principal()),
                false => String::new(),
            };
            let problems = topic_kind_problems(config, &reached.topics).await;
            Verdict {
                component: "kafka",
                problem: (!problems.is_empty()).then(|| problems.join("\n          ")),
                detail: format!("{servers}: {} broker(s), {} topic(s){whose}", reached.brokers, reached.topics.len()),
                warning: None,
            }
        }
        Err(err) => Verdict {
            component: "kafka",
            problem: Some(format!("{}; {}", ErrorChain(&err), err.fix())),
            detail: String::new(),
            warning: None,
        },
    }
}

/// Existing topics the config routes rows to whose cleanup policy does not
/// fit their kind, one line each with the fix: an event topic that is
/// compacted loses events, a state topic that is not grows without bound
/// (and the relay holds the rows bound for either).
async fn topic_kind_problems(config: &Config, topics: &[String]) -> Vec<String> {
    let routing = &config.routing;
    let routed: Vec<(String, TopicKind, String)> = topics
        .iter()
        .filter(|t| !t.starts_with("__") && **t != config.kafka.progress_topic)
        .filter(|t| routing.dead_letter_topic.as_deref() != Some(t.as_str()))
        .filter_map(|t| routing.kind_of_topic(t).map(|(kind, aggregate_type)| (t.clone(), kind, aggregate_type)))
        .collect();
    let names: Vec<String> = routed.iter().map(|(t, _, _)| t.clone()).collect();
    let compacted = match sink::topics::compacted(&config.kafka, &names).await {
        Ok(compacted) => compacted,
        Err(err) => {
            return vec![format!(
                "cannot read the cleanup.policy of the outbox topics: {err}; grant DESCRIBE_CONFIGS on them"
            )]
        }
    };
    let mut problems = Vec::new();
    for (topic, kind, aggregate_type) in routed {
        match (kind, compacted.get(&topic)) {
            (TopicKind::Event, Some(true)) => problems.push(format!(
                "event topic `{topic}` (aggregate type `{aggregate_type}`) is compacted: compaction deletes events (data loss); set its cleanup.policy=delete"
            )),
            (TopicKind::State, Some(false)) => problems.push(format!(
                "state topic `{topic}` (aggregate type `{aggregate_type}`) is not compacted: it grows without bound (or expires state); set its cleanup.policy=compact"
            )),
            _ => {}
        }
    }
    problems
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
    let fail = |problem: String| Verdict {
        component: "registry",
        problem: Some(problem),
        detail: String::new(),
        warning: None,
    };
    // The relay's own client set-up, so registry.tls_ca_file is checked too.
    let client = match registry::client_builder(&config.registry)
        .and_then(|b| b.timeout(Duration::from_secs(5)).build().map_err(|e| RegistryError::from_http(&e)))
    {
        Ok(client) => client,
        Err(err) => return fail(ErrorChain(&err).to_string()),
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
        Err(err) => match RegistryError::from_http(&err) {
            // A rejected certificate is not an outage: name the key that fixes it.
            certificate @ RegistryError::Certificate { .. } => fail(format!("{url}: {certificate}")),
            _ => fail(format!(
                "schema registry at {url} is unreachable ({}); check registry.url and that it is running",
                ErrorChain(&err)
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
