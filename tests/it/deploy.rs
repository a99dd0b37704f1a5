//! Validates `deploy/`: every YAML and JSON file parses, the alerting rules
//! are the documented ones, every metric the dashboard and the rules use is
//! listed in METRICS.md, the Kubernetes example wires the probes to the
//! right endpoints and mounts a relay.toml the relay itself accepts, and the
//! READMEs state the example's memory limit.
//! No services needed: `cargo test --test it deploy::`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_norway::Value as Yaml;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn deploy_dir() -> PathBuf {
    root().join("deploy")
}

/// Every file under `dir`, recursively, sorted.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("read {}: {e}", d.display())) {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn ext(path: &Path) -> &str {
    path.extension().and_then(|e| e.to_str()).unwrap_or("")
}

/// All documents of a (possibly multi-document) YAML file; empty documents skipped.
fn yaml_docs(path: &Path) -> Vec<Yaml> {
    let text = read(path);
    let mut docs = Vec::new();
    for (i, de) in serde_norway::Deserializer::from_str(&text).enumerate() {
        let doc =
            Yaml::deserialize(de).unwrap_or_else(|e| panic!("{} document {i}: invalid YAML: {e}", path.display()));
        if !doc.is_null() {
            docs.push(doc);
        }
    }
    docs
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&read(path)).unwrap_or_else(|e| panic!("{}: invalid JSON: {e}", path.display()))
}

fn rules_path() -> PathBuf {
    deploy_dir().join("prometheus/outbox-relay-rules.yaml")
}

fn dashboard_path() -> PathBuf {
    deploy_dir().join("grafana/outbox-relay-dashboard.json")
}

fn pod_path() -> PathBuf {
    deploy_dir().join("kubernetes/pod.yaml")
}

fn s<'a>(v: &'a Yaml, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Yaml::as_str)
}

// ---------------------------------------------------------------- parsing

#[test]
fn every_yaml_and_json_file_under_deploy_parses() {
    let files = files_under(&deploy_dir());
    let mut parsed = 0;
    for path in &files {
        match ext(path) {
            "yaml" | "yml" => {
                let docs = yaml_docs(path);
                assert!(!docs.is_empty(), "{}: no YAML document", path.display());
                parsed += 1;
            }
            "json" => {
                json(path);
                parsed += 1;
            }
            _ => {}
        }
    }
    for required in [rules_path(), dashboard_path(), pod_path(), deploy_dir().join("README.md")] {
        assert!(files.contains(&required), "missing {}", required.display());
    }
    assert!(parsed >= 3, "expected at least the rules, the dashboard and the pod, parsed {parsed}");
}

// ---------------------------------------------------------------- rules

/// (alert, a metric or function its expression must use, its `for`).
const ALERTS: [(&str, &str, &str); 7] = [
    ("OutboxRelayLagHigh", "outbox_relay_oldest_unpublished_age_seconds", "5m"),
    ("OutboxRelayDown", "up{job=\"outbox-relay\"}", "5m"),
    ("OutboxRelaySlotRetainingWal", "outbox_relay_slot_retained_wal_bytes", "5m"),
    ("OutboxRelayNoPublishWhilePending", "outbox_relay_last_publish_timestamp_seconds", "10m"),
    ("OutboxRelayHeldRows", "outbox_relay_held_rows", "1m"),
    ("OutboxRelayNoActiveInstance", "outbox_relay_leader", "1m"),
    ("OutboxRelayMoreThanOneActive", "outbox_relay_leader", "1m"),
];

fn alert_rules() -> Vec<Yaml> {
    let docs = yaml_docs(&rules_path());
    assert_eq!(docs.len(), 1, "the rules file is one document");
    let groups = docs[0].get("groups").and_then(Yaml::as_sequence).expect("top-level `groups` list");
    assert!(!groups.is_empty(), "no rule groups");
    let mut alerts = Vec::new();
    for group in groups {
        assert!(s(group, "name").is_some_and(|n| !n.is_empty()), "a group without a name: {group:?}");
        let rules = group.get("rules").and_then(Yaml::as_sequence).expect("group `rules` list");
        for rule in rules {
            assert!(
                rule.get("alert").is_some() ^ rule.get("record").is_some(),
                "a rule is either `alert` or `record`: {rule:?}"
            );
            if rule.get("alert").is_some() {
                alerts.push(rule.clone());
            }
        }
    }
    alerts
}

/// Brackets, braces and parentheses balance outside string literals: catches
/// the commonest PromQL slip without a PromQL parser.
fn assert_balanced(what: &str, expr: &str) {
    let mut stack = Vec::new();
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in expr.chars() {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '"' | '\'' | '`' => quote = Some(c),
            '(' | '[' | '{' => stack.push(c),
            ')' | ']' | '}' => {
                let open = stack.pop();
                let want = match c {
                    ')' => '(',
                    ']' => '[',
                    _ => '{',
                };
                assert_eq!(open, Some(want), "{what}: unbalanced `{c}` in {expr}");
            }
            _ => {}
        }
    }
    assert!(quote.is_none(), "{what}: unterminated string in {expr}");
    assert!(stack.is_empty(), "{what}: unclosed {stack:?} in {expr}");
}

#[test]
fn rules_file_has_the_documented_alerts() {
    let alerts = alert_rules();
    let names: Vec<&str> = alerts.iter().filter_map(|r| s(r, "alert")).collect();
    let unique: BTreeSet<&str> = names.iter().copied().collect();
    assert_eq!(unique.len(), names.len(), "duplicate alert names: {names:?}");

    for (name, uses, for_) in ALERTS {
        let rule = alerts
            .iter()
            .find(|r| s(r, "alert") == Some(name))
            .unwrap_or_else(|| panic!("alert {name} missing; have {names:?}"));
        let expr = s(rule, "expr").unwrap_or_else(|| panic!("{name}: no expr"));
        assert!(expr.contains(uses), "{name}: expr should use {uses}: {expr}");
        assert_eq!(s(rule, "for"), Some(for_), "{name}: `for`");
    }

    for rule in &alerts {
        let name = s(rule, "alert").unwrap();
        let expr = s(rule, "expr").unwrap_or_else(|| panic!("{name}: no expr"));
        assert_balanced(name, expr);
        let severity = rule.get("labels").and_then(|l| s(l, "severity"));
        assert!(
            matches!(severity, Some("critical" | "warning" | "info")),
            "{name}: labels.severity must be critical, warning or info, is {severity:?}"
        );
        let annotations = rule.get("annotations").unwrap_or_else(|| panic!("{name}: no annotations"));
        for key in ["summary", "description", "runbook"] {
            let text = s(annotations, key).unwrap_or_else(|| panic!("{name}: no {key} annotation"));
            assert!(!text.trim().is_empty(), "{name}: empty {key}");
            assert_eq!(
                text.matches("{{").count(),
                text.matches("}}").count(),
                "{name}: unbalanced template braces in {key}"
            );
        }
        let runbook = s(annotations, "runbook").unwrap();
        assert!(runbook.contains("relay"), "{name}: the runbook should name a relay command: {runbook}");
    }

    // The specific thresholds of the issue.
    let expr_of =
        |name: &str| s(alerts.iter().find(|r| s(r, "alert") == Some(name)).unwrap(), "expr").unwrap().to_string();
    assert!(expr_of("OutboxRelayLagHigh").contains("> 60"));
    assert!(expr_of("OutboxRelayDown").contains("absent(up{job=\"outbox-relay\"})"));
    assert!(expr_of("OutboxRelayDown").contains("== 0"));
    assert!(expr_of("OutboxRelaySlotRetainingWal").contains("> 5 * 1024 * 1024 * 1024"));
    let pending = expr_of("OutboxRelayNoPublishWhilePending");
    assert!(pending.contains("outbox_relay_unpublished_rows") && pending.contains("> 0"), "{pending}");
    assert!(pending.contains("time() -") && pending.contains("> 600"), "{pending}");
    assert!(expr_of("OutboxRelayHeldRows").contains("> 0"));
    let active = expr_of("OutboxRelayNoActiveInstance");
    assert!(active.contains("sum") && active.contains("== 0"), "{active}");
    let several = expr_of("OutboxRelayMoreThanOneActive");
    assert!(several.contains("sum") && several.contains("> 1"), "{several}");
}

// ---------------------------------------------------------------- metric names

/// Names in METRICS.md's table (first column, in backticks).
fn documented_metrics() -> BTreeSet<String> {
    let text = read(&root().join("METRICS.md"));
    let names: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .filter(|n| n.starts_with("outbox_relay_"))
        .map(str::to_string)
        .collect();
    assert!(names.len() >= 15, "METRICS.md table not found or too short: {names:?}");
    names
}

/// Every `outbox_relay_[a-z_]+` in `text`, histogram series suffixes stripped.
fn metric_names_in(text: &str) -> BTreeSet<String> {
    const PREFIX: &str = "outbox_relay_";
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut from = 0;
    while let Some(at) = text[from..].find(PREFIX) {
        let start = from + at;
        let preceded_by_ident = start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start + PREFIX.len();
        while end < bytes.len() && (bytes[end].is_ascii_lowercase() || bytes[end] == b'_') {
            end += 1;
        }
        let followed_by_other = end < bytes.len() && (bytes[end].is_ascii_alphanumeric());
        if !preceded_by_ident && end > start + PREFIX.len() {
            let mut name = &text[start..end];
            assert!(!followed_by_other, "metric-like name followed by a digit or capital: {}", &text[start..=end]);
            for suffix in ["_bucket", "_sum", "_count"] {
                if let Some(base) = name.strip_suffix(suffix) {
                    name = base;
                    break;
                }
            }
            names.insert(name.to_string());
        }
        from = end;
    }
    names
}

#[test]
fn metric_name_scanner_strips_histogram_suffixes() {
    let found = metric_names_in(
        "rate(outbox_relay_publish_latency_seconds_bucket[5m]) + outbox_relay_x_count{a=\"b\"} - outbox_relay_active",
    );
    let want: BTreeSet<String> =
        ["outbox_relay_publish_latency_seconds", "outbox_relay_x", "outbox_relay_active"].map(String::from).into();
    assert_eq!(found, want);
}

#[test]
fn every_metric_in_the_dashboard_and_rules_is_documented() {
    let documented = documented_metrics();
    let mut checked = 0;
    for path in [dashboard_path(), rules_path()] {
        let used = metric_names_in(&read(&path));
        assert!(!used.is_empty(), "{}: no outbox_relay_ metric used", path.display());
        let unknown: Vec<&String> = used.difference(&documented).collect();
        assert!(unknown.is_empty(), "{} uses metrics not listed in METRICS.md: {unknown:?}", path.display());
        checked += used.len();
    }
    // Anything else under deploy/ (README, scrape config) may name metrics too.
    for path in files_under(&deploy_dir()) {
        let used = metric_names_in(&read(&path));
        let unknown: Vec<&String> = used.difference(&documented).collect();
        assert!(unknown.is_empty(), "{} names metrics not in METRICS.md: {unknown:?}", path.display());
    }
    assert!(checked > 10, "too few metric references found ({checked})");
}

// ---------------------------------------------------------------- dashboard

fn exprs_of(panel: &serde_json::Value) -> Vec<String> {
    panel["targets"]
        .as_array()
        .map(|ts| ts.iter().filter_map(|t| t["expr"].as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

#[test]
fn dashboard_has_variables_and_the_panels() {
    let d = json(&dashboard_path());
    assert_eq!(d["schemaVersion"], 39, "schemaVersion");
    let vars = d["templating"]["list"].as_array().expect("templating.list");
    let var = |name: &str| vars.iter().find(|v| v["name"] == name);
    let ds = var("datasource").expect("a `datasource` variable");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    assert!(var("pod").or_else(|| var("instance")).is_some(), "a `pod` or `instance` variable");

    let panels: Vec<&serde_json::Value> =
        d["panels"].as_array().expect("panels").iter().filter(|p| p["type"] != "row").collect();
    let mut ids = BTreeSet::new();
    for p in &panels {
        let title = p["title"].as_str().unwrap_or("?");
        assert!(ids.insert(p["id"].as_i64().expect("panel id")), "duplicate panel id in {title}");
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}: datasource must be the variable");
        let exprs = exprs_of(p);
        assert!(!exprs.is_empty(), "{title}: no query");
        for (t, e) in p["targets"].as_array().unwrap().iter().zip(&exprs) {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}: target datasource");
            assert_balanced(title, e);
            assert!(e.contains("$pod") || e.contains("$instance"), "{title}: query ignores the pod variable: {e}");
        }
    }

    let all: Vec<String> = panels.iter().flat_map(|p| exprs_of(p)).collect();
    let uses = |needle: &str| all.iter().any(|e| e.contains(needle));
    for needle in [
        "outbox_relay_oldest_unpublished_age_seconds",
        "outbox_relay_unpublished_rows",
        "outbox_relay_published_total",
        "outbox_relay_slot_retained_wal_bytes",
        "outbox_relay_held_rows{",
        "outbox_relay_publish_errors_total",
        "outbox_relay_pipeline_restarts_total",
        "outbox_relay_in_flight",
        "outbox_relay_producer_queue_full_total",
        "outbox_relay_active",
        "time() - max by (namespace, app) (outbox_relay_last_publish_timestamp_seconds",
        "histogram_quantile(0.5, sum by (le) (rate(outbox_relay_publish_latency_seconds_bucket",
        "histogram_quantile(0.99, sum by (le) (rate(outbox_relay_publish_latency_seconds_bucket",
        "sum by (topic)",
        "sum by (class)",
        "sum by (component)",
    ] {
        assert!(uses(needle), "no dashboard query uses `{needle}`");
    }
}

// ---------------------------------------------------------------- kubernetes

fn docs_of_kind<'a>(docs: &'a [Yaml], kind: &str) -> Vec<&'a Yaml> {
    docs.iter().filter(|d| s(d, "kind") == Some(kind)).collect()
}

/// The container's port number for `port` (a number or a port name).
fn resolve_port(container: &Yaml, port: &Yaml) -> u64 {
    if let Some(n) = port.as_u64() {
        return n;
    }
    let name = port.as_str().expect("probe port is a number or a name");
    container
        .get("ports")
        .and_then(Yaml::as_sequence)
        .and_then(|ps| ps.iter().find(|p| s(p, "name") == Some(name)))
        .and_then(|p| p.get("containerPort"))
        .and_then(Yaml::as_u64)
        .unwrap_or_else(|| panic!("probe port `{name}` is not a port of the container"))
}

fn env_value<'a>(container: &'a Yaml, name: &str) -> Option<&'a Yaml> {
    container.get("env").and_then(Yaml::as_sequence).and_then(|env| env.iter().find(|e| s(e, "name") == Some(name)))
}

#[test]
fn pod_wires_probes_and_a_config_the_relay_accepts() {
    let docs = yaml_docs(&pod_path());
    let deployments = docs_of_kind(&docs, "Deployment");
    assert_eq!(deployments.len(), 1, "one Deployment");
    let deployment = deployments[0];
    assert_eq!(deployment["metadata"]["name"].as_str(), Some("order-service"));
    let template = &deployment["spec"]["template"];
    let pod = &template["spec"];
    let containers = pod["containers"].as_sequence().expect("containers");
    assert!(containers.len() >= 2, "the service plus the relay sidecar");

    let relay =
        containers.iter().find(|c| s(c, "name") == Some("outbox-relay")).expect("a container named outbox-relay");
    assert_eq!(s(relay, "image"), Some("outbox-relay:0.1.0"));
    let args: Vec<&str> = relay["args"].as_sequence().unwrap().iter().filter_map(Yaml::as_str).collect();
    assert_eq!(args, ["--config", "/etc/relay/relay.toml"]);

    // Probes: liveness on /healthz, readiness on /readyz, both on the metrics port.
    let listen = env_value(relay, "RELAY__TELEMETRY__HTTP_LISTEN")
        .and_then(|e| s(e, "value"))
        .expect("RELAY__TELEMETRY__HTTP_LISTEN set");
    let listen: std::net::SocketAddr = listen.parse().expect("HTTP_LISTEN is host:port");
    assert!(listen.ip().is_unspecified(), "the kubelet cannot reach {listen}");
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &relay[probe]["httpGet"];
        assert_eq!(s(get, "path"), Some(path), "{probe} path");
        assert_eq!(resolve_port(relay, &get["port"]), listen.port() as u64, "{probe} port");
    }
    let metrics_port = relay["ports"]
        .as_sequence()
        .and_then(|ps| ps.iter().find(|p| s(p, "name") == Some("metrics")))
        .expect("a port named metrics");
    assert_eq!(metrics_port["containerPort"].as_u64(), Some(listen.port() as u64));
    let annotations = &template["metadata"]["annotations"];
    assert_eq!(s(annotations, "prometheus.io/scrape"), Some("true"));
    assert_eq!(s(annotations, "prometheus.io/port"), Some(listen.port().to_string().as_str()));
    assert_eq!(s(annotations, "prometheus.io/path"), Some("/metrics"));

    // The Postgres URL comes from a Secret, never inline.
    let url = env_value(relay, "RELAY__POSTGRES__URL").expect("RELAY__POSTGRES__URL");
    assert!(url.get("value").is_none(), "the Postgres URL must not be inline");
    assert!(url["valueFrom"]["secretKeyRef"]["name"].as_str().is_some(), "URL from a Secret");

    // Security and resources.
    let sc = &relay["securityContext"];
    assert_eq!(sc["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(sc["runAsUser"].as_u64(), Some(10001));
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    for kind in ["requests", "limits"] {
        assert!(relay["resources"][kind]["memory"].as_str().is_some(), "resources.{kind}.memory");
    }

    // The mounted config: the ConfigMap behind the volume at the --config directory.
    let config_dir = Path::new(args[1]).parent().unwrap().to_str().unwrap();
    let mount = relay["volumeMounts"]
        .as_sequence()
        .and_then(|ms| ms.iter().find(|m| s(m, "mountPath") == Some(config_dir)))
        .unwrap_or_else(|| panic!("no volume mounted at {config_dir}"));
    let volume = pod["volumes"]
        .as_sequence()
        .and_then(|vs| vs.iter().find(|v| v.get("name") == mount.get("name")))
        .expect("the mounted volume is declared");
    let cm_name = volume["configMap"]["name"].as_str().expect("the config volume is a ConfigMap");
    let cm = docs_of_kind(&docs, "ConfigMap")
        .into_iter()
        .find(|c| c["metadata"]["name"].as_str() == Some(cm_name))
        .unwrap_or_else(|| panic!("ConfigMap {cm_name} not in pod.yaml"));
    let file = Path::new(args[1]).file_name().unwrap().to_str().unwrap();
    let toml = cm["data"][file].as_str().unwrap_or_else(|| panic!("ConfigMap {cm_name} has no {file}"));
    let config = relay::config::Config::from_toml_str(toml)
        .unwrap_or_else(|e| panic!("the ConfigMap's {file} is refused by the relay: {e}"));

    // The grace period must leave room for the relay's graceful stop.
    let grace = pod["terminationGracePeriodSeconds"].as_u64().expect("terminationGracePeriodSeconds");
    assert_eq!(grace, 30);
    assert!(
        grace * 1000 > config.shutdown_timeout_ms,
        "terminationGracePeriodSeconds ({grace}s) must exceed shutdown_timeout_ms ({} ms)",
        config.shutdown_timeout_ms
    );
}

#[test]
fn readme_and_deploy_readme_state_the_example_memory_limit() {
    // The memory figures and the limit stated next to the README's
    // Kubernetes example must be the example's own.
    let docs = yaml_docs(&pod_path());
    let deployment = docs_of_kind(&docs, "Deployment")[0];
    let containers = deployment["spec"]["template"]["spec"]["containers"].as_sequence().expect("containers");
    let relay = containers.iter().find(|c| s(c, "name") == Some("outbox-relay")).expect("the relay container");
    let limit = relay["resources"]["limits"]["memory"].as_str().expect("limits.memory");
    let request = relay["resources"]["requests"]["memory"].as_str().expect("requests.memory");
    let readme = read(&root().join("README.md"));
    assert!(readme.contains(&format!("memory: {limit} }}")), "the README's example sets limits.memory {limit}");
    assert!(readme.contains(&format!("memory: {request} }}")), "the README's example sets requests.memory {request}");
    assert!(
        readme.contains(&format!("`resources.limits.memory: {limit}`")),
        "the README states the relay's memory use next to the example's limit {limit}"
    );
    let deploy_readme = read(&deploy_dir().join("README.md"));
    assert!(deploy_readme.contains(&format!("`limits.memory: {limit}`")), "deploy/README.md names the limit {limit}");
}

#[test]
fn relay_toml_typo_would_be_caught() {
    // The check above is only as good as the loader's strictness: a misspelled
    // key in the ConfigMap must be refused, not ignored.
    let docs = yaml_docs(&pod_path());
    let cm = docs_of_kind(&docs, "ConfigMap")[0];
    let toml = cm["data"]["relay.toml"].as_str().expect("relay.toml");
    let broken = toml.replace("bootstrap_servers", "bootstrap_server");
    assert_ne!(broken, toml, "relay.toml should set kafka.bootstrap_servers");
    assert!(relay::config::Config::from_toml_str(&broken).is_err());
}
