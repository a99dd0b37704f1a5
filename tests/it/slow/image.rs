//! The container image, built and run the way the sidecar runs it, with
//! podman against the real stack (`scripts/image test`, or within
//! `scripts/test`): config mounted read-only, the Postgres URL from an
//! environment variable, host network, read-only root filesystem, every
//! capability dropped. Checks `/readyz`, rows arriving in Kafka, uid 10001,
//! the relay as PID 1 (`podman stop` -> SIGTERM -> exit 0 with the publish
//! state recorded), `relay check` inside the container (also against the
//! SASL_SSL listener: OpenSSL as the image carries it), and that
//! docker-compose.yml (validated by Debian's docker-compose) and
//! deploy/kubernetes/pod.yaml name the image, command, port and probes the
//! image really has.
//!
//! What is built: `scripts/image build --from target/debug`, the Dockerfile's
//! runtime stage (same base, same library gathering, same user, paths,
//! entrypoint) around the *debug* relay this test run already has,
//! stripped. A release build from scratch would add a second full compile
//! to the suite; the image's contents other than the binary's code are the
//! same either way (the debug and release binaries load the same shared
//! libraries: the build fails on any that `ldd` cannot find in the base).
//! `scripts/image build` builds the release image whose size the README
//! reports.
//!
//! Podman missing and not installable (no apt, not root) fails these tests
//! with the installer's message: they never skip.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use crate::common::{consume, insert_row, wait_for, Stack, TestDb};
use serde_norway::Value as Yaml;

/// The tag of the image these tests build.
const IMAGE: &str = "localhost/outbox-relay:test";

/// Where the sidecar finds its config, as in the Kubernetes example.
const CONFIG_IN_CONTAINER: &str = "/etc/relay/relay.toml";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// podman with the options scripts/image uses, which says why (runc,
/// cgroupfs, rlimits).
fn podman() -> Command {
    let mut command = Command::new("podman");
    command.args(["--runtime", "runc", "--cgroup-manager=cgroupfs"]);
    command
}

/// `podman run` options of a sidecar on this machine.
const RUN_OPTIONS: [&str; 10] = [
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=1024:1024",
    "--network",
    "host",
    "--read-only",
    "--read-only-tmpfs=false",
    "--cap-drop=ALL",
    "--security-opt=no-new-privileges",
];

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

fn run(command: &mut Command, what: &str) -> Output {
    command.output().unwrap_or_else(|e| panic!("{what}: cannot run {command:?}: {e}"))
}

/// Builds the image once per test binary (the tests share it); panics with
/// scripts/image's output when podman is missing or the build fails.
fn image() -> &'static str {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let debug_dir = Path::new(env!("CARGO_BIN_EXE_relay")).parent().expect("bin dir").to_path_buf();
        let output = run(
            Command::new(repo().join("scripts/image")).args(["build", "--from"]).arg(&debug_dir).args(["--tag", IMAGE]),
            "scripts/image build",
        );
        if output.status.success() {
            Ok(())
        } else {
            Err(format!("scripts/image build failed ({}):\n{}", output.status, text(&output)))
        }
    });
    if let Err(message) = built {
        panic!("{message}");
    }
    IMAGE
}

/// The image's config as podman reports it (`.Config` of `image inspect`).
fn image_config() -> serde_json::Value {
    let output = run(podman().args(["image", "inspect", image()]), "podman image inspect");
    assert!(output.status.success(), "podman image inspect: {}", text(&output));
    let inspect: serde_json::Value = serde_json::from_slice(&output.stdout).expect("inspect JSON");
    inspect[0]["Config"].clone()
}

fn strings(value: &serde_json::Value) -> Vec<String> {
    value.as_array().map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect()).unwrap_or_default()
}

/// The one TCP port the image exposes.
fn exposed_port(config: &serde_json::Value) -> u16 {
    let ports: Vec<&String> = config["ExposedPorts"].as_object().map(|o| o.keys().collect()).unwrap_or_default();
    assert_eq!(ports.len(), 1, "one exposed port: {ports:?}");
    ports[0].trim_end_matches("/tcp").parse().expect("numeric port")
}

/// A container removed (`podman rm -f`) when the test ends, however it ends.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman().args(["rm", "-f", "-t", "0", &self.0]).output();
    }
}

/// A free port on 127.0.0.1 for the relay's HTTP endpoint (host network).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// The config file the container mounts: the test database's config without
/// the Postgres URL (a placeholder without a password; the real one comes
/// from RELAY__POSTGRES__URL, as from a Kubernetes Secret).
fn sidecar_config(db: &TestDb) -> PathBuf {
    let toml = db.config_toml("");
    let placeholder = "postgres.url = \"postgres://relay@unreachable.invalid:1/none\"";
    let toml: String = toml
        .lines()
        .map(|line| if line.starts_with("postgres.url") { placeholder } else { line })
        .collect::<Vec<_>>()
        .join("\n");
    assert!(toml.contains(placeholder), "the config sets postgres.url: {toml}");
    let path = db.dir.path().join("relay.toml");
    std::fs::write(&path, toml).expect("write config");
    path
}

/// Environment and mounts of one `podman run` beyond the sidecar's own.
#[derive(Default)]
struct Extra {
    env: Vec<(&'static str, String)>,
    volumes: Vec<String>,
}

/// `podman run` of the image as the sidecar, with `args` after the image
/// (none: the image's default command, `--config /etc/relay/relay.toml`).
fn sidecar_run(
    db: &TestDb,
    config: &Path,
    http_port: u16,
    detach_name: Option<&str>,
    extra: Extra,
    args: &[&str],
) -> Command {
    let mut command = podman();
    command.arg("run").args(RUN_OPTIONS);
    match detach_name {
        Some(name) => command.args(["-d", "--name", name]),
        None => command.arg("--rm"),
    };
    command.arg("-v").arg(format!("{}:{CONFIG_IN_CONTAINER}:ro", config.display()));
    for volume in &extra.volumes {
        command.arg("-v").arg(volume);
    }
    let mut env = vec![
        ("RELAY__POSTGRES__URL", db.url.clone()),
        ("RELAY__TELEMETRY__HTTP_LISTEN", format!("127.0.0.1:{http_port}")),
    ];
    env.extend(extra.env);
    for (name, value) in env {
        // `-e NAME` without a value: taken from podman's own environment, so
        // the URL with its password is not on a command line.
        command.args(["-e", name]).env(name, value);
    }
    command.arg(image()).args(args);
    command
}

fn container_state(name: &str, field: &str) -> String {
    let output =
        run(podman().args(["inspect", "--format", &format!("{{{{.State.{field}}}}}"), name]), "podman inspect");
    assert!(output.status.success(), "podman inspect {name}: {}", text(&output));
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

fn container_logs(name: &str) -> String {
    podman().args(["logs", name]).output().map(|o| text(&o)).unwrap_or_default()
}

/// Field `key` of /proc/PID/status on the host (rootful podman: no user
/// namespace, host uids are the container's).
fn proc_status(pid: &str, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("{key} in /proc/{pid}/status"))
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// docker-compose.yml as Debian's docker-compose resolves and validates it
/// (`docker-compose config`; installed by `scripts/image compose-config`).
fn compose_config() -> Yaml {
    let output = run(Command::new(repo().join("scripts/image")).arg("compose-config"), "scripts/image compose-config");
    assert!(output.status.success(), "docker-compose config refused docker-compose.yml:\n{}", text(&output));
    serde_norway::from_slice(&output.stdout).expect("docker-compose config prints YAML")
}

fn yaml_strings(value: &Yaml) -> Vec<String> {
    value.as_sequence().map(|s| s.iter().filter_map(|v| v.as_str().map(String::from)).collect()).unwrap_or_default()
}

/// The image every deployment example names: outbox-relay:<crate version>.
fn released_image_name() -> String {
    format!("outbox-relay:{}", env!("CARGO_PKG_VERSION"))
}

fn pod_relay_container() -> serde_json::Value {
    let text = std::fs::read_to_string(repo().join("deploy/kubernetes/pod.yaml")).expect("read pod.yaml");
    for de in serde_norway::Deserializer::from_str(&text) {
        let doc: serde_json::Value = serde::Deserialize::deserialize(de).expect("pod.yaml parses");
        if doc["kind"] == "Deployment" {
            let containers = doc["spec"]["template"]["spec"]["containers"].as_array().expect("containers").clone();
            return containers.into_iter().find(|c| c["name"] == "outbox-relay").expect("an outbox-relay container");
        }
    }
    panic!("no Deployment in pod.yaml");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_runs_as_the_sidecar_and_stops_cleanly_on_sigterm() {
    let stack = Stack::from_env();
    let db = TestDb::new(&stack).await;
    let config = sidecar_config(&db);
    let http_port = free_port();

    // Migrations from the image too (as a Kubernetes Job would run them).
    let output = run(
        &mut sidecar_run(
            &db,
            &config,
            http_port,
            None,
            Extra::default(),
            &["--config", CONFIG_IN_CONTAINER, "migrate"],
        ),
        "migrate",
    );
    assert!(output.status.success(), "relay migrate in the container failed: {}", text(&output));

    // `relay check` inside the container: every component ok. No --config:
    // the image's RELAY_CONFIG names the mounted file.
    let output = run(&mut sidecar_run(&db, &config, http_port, None, Extra::default(), &["check"]), "check");
    let report = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(output.status.success(), "relay check in the container failed:\n{}", text(&output));
    for component in ["config", "postgres", "kafka", "registry"] {
        assert!(
            report.lines().any(|l| l.starts_with(component) && l.split_whitespace().nth(1) == Some("ok")),
            "relay check: {component} not ok:\n{report}"
        );
    }
    assert!(!report.contains("FAIL"), "relay check:\n{report}");

    // And over the stack's SASL_SSL listener: librdkafka's TLS is OpenSSL,
    // loaded from the libraries and CA bundle the image carries; this
    // handshake is what a missing or mismatched one would break.
    let var = crate::common::env_var;
    let sasl_bootstrap = var("RELAY_KAFKA_SASL_BOOTSTRAP");
    let extra = Extra {
        env: vec![
            ("RELAY__KAFKA__BOOTSTRAP_SERVERS", sasl_bootstrap.clone()),
            ("RELAY__KAFKA__SECURITY_PROTOCOL", "sasl_ssl".into()),
            ("RELAY__KAFKA__TLS_CA_FILE", "/etc/relay/kafka-ca.crt".into()),
            ("RELAY__KAFKA__SASL__USERNAME", var("RELAY_KAFKA_SASL_USER")),
            ("RELAY__KAFKA__SASL__PASSWORD", var("RELAY_KAFKA_SASL_PASSWORD")),
        ],
        volumes: vec![format!("{}:/etc/relay/kafka-ca.crt:ro", var("RELAY_STACK_CA_FILE"))],
    };
    let mut tls = sidecar_run(&db, &config, http_port, None, extra, &["check"]);
    let output = run(&mut tls, "check over SASL_SSL");
    let report = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(output.status.success(), "relay check over SASL_SSL in the container failed:\n{}", text(&output));
    assert!(
        report.lines().any(|l| l.starts_with("kafka") && l.contains("ok") && l.contains(&sasl_bootstrap)),
        "relay check over SASL_SSL:\n{report}"
    );

    // The sidecar: the image's default command.
    let name = format!("relay-test-{}", &db.slot);
    let output = run(&mut sidecar_run(&db, &config, http_port, Some(&name), Extra::default(), &[]), "podman run -d");
    assert!(output.status.success(), "podman run failed: {}", text(&output));
    let container = Container(name.clone());

    let base = format!("http://127.0.0.1:{http_port}");
    let ready = wait_for("/readyz of the relay in the container", Duration::from_secs(60), || async {
        assert_eq!(container_state(&name, "Status"), "running", "the container stopped:\n{}", container_logs(&name));
        let response = reqwest::get(format!("{base}/readyz")).await.ok()?;
        if response.status() != 200 {
            return None;
        }
        response.json::<serde_json::Value>().await.ok()
    })
    .await;
    assert_eq!(ready["role"], "active", "{ready}");
    let healthz = reqwest::get(format!("{base}/healthz")).await.expect("GET /healthz");
    assert_eq!(healthz.status(), 200, "/healthz");

    // The relay runs as uid/gid 10001 and is the container's PID 1 (no shell
    // in front of it to swallow SIGTERM).
    let pid = container_state(&name, "Pid");
    assert_eq!(proc_status(&pid, "Uid"), "10001 10001 10001 10001", "uids of the relay process");
    assert_eq!(proc_status(&pid, "Gid"), "10001 10001 10001 10001", "gids of the relay process");
    assert_eq!(proc_status(&pid, "NSpid").split(' ').next_back(), Some("1"), "PID in the container");
    let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).expect("cmdline");
    assert!(cmdline.starts_with("/usr/local/bin/relay\0"), "PID 1 is the relay: {cmdline:?}");

    // docker-compose.yml's healthcheck command, run in the container.
    let compose = compose_config();
    let healthcheck = yaml_strings(&compose["services"]["relay"]["healthcheck"]["test"]);
    assert_eq!(healthcheck.first().map(String::as_str), Some("CMD"), "healthcheck without a shell: {healthcheck:?}");
    let output = run(podman().args(["exec", &name]).args(&healthcheck[1..]), "podman exec healthcheck");
    assert!(
        output.status.success(),
        "the compose healthcheck {healthcheck:?} fails in the container: {}",
        text(&output)
    );

    // Rows written to the outbox arrive in Kafka, keyed by entity.
    let client = db.client().await;
    let mut ids = Vec::new();
    for seq in 0..20 {
        ids.push(insert_row(&client, "order", &format!("order-{}", seq % 4), seq).await);
    }
    let topic = db.topic("order");
    let records = tokio::task::spawn_blocking({
        let bootstrap = stack.bootstrap.clone();
        move || consume(&bootstrap, &[&topic], 20, Duration::from_secs(60))
    })
    .await
    .expect("consumer");
    let keys: std::collections::BTreeSet<&str> = records.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(keys.len(), 4, "keys {keys:?}");

    // podman stop: SIGTERM (the image's STOPSIGNAL) to PID 1, SIGKILL only
    // after 30 s. The relay drains, records publish state, exits 0.
    let output = run(podman().args(["stop", "-t", "30", &name]), "podman stop");
    assert!(output.status.success(), "podman stop: {}", text(&output));
    let logs = container_logs(&name);
    assert_eq!(container_state(&name, "ExitCode"), "0", "exit code after podman stop; logs:\n{logs}");
    let unpublished: i64 = client
        .query_one("SELECT count(*) FROM outbox WHERE id = ANY($1) AND published_at IS NULL", &[&ids])
        .await
        .expect("count unpublished")
        .get(0);
    assert_eq!(unpublished, 0, "rows without publish state after the stop; logs:\n{logs}");

    drop(container);
    drop(client);
    db.cleanup().await;
}

#[test]
fn the_image_has_no_shell_and_knows_its_version() {
    let config = image_config();
    assert_eq!(config["User"], "10001:10001");
    assert_eq!(strings(&config["Entrypoint"]), ["/usr/local/bin/relay"]);
    assert_eq!(strings(&config["Cmd"]), ["--config", CONFIG_IN_CONTAINER]);
    assert_eq!(config["StopSignal"], "SIGTERM");
    let env = strings(&config["Env"]);
    assert!(env.contains(&format!("RELAY_CONFIG={CONFIG_IN_CONTAINER}")), "image env {env:?}");
    assert_eq!(exposed_port(&config), 9187);

    let mut version = podman();
    version.arg("run").arg("--rm").args(RUN_OPTIONS).arg(image()).arg("--version");
    let output = run(&mut version, "relay --version");
    assert!(output.status.success(), "relay --version: {}", text(&output));
    let printed = String::from_utf8_lossy(&output.stdout).trim().to_string();
    let revision = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(repo())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    assert_eq!(printed, format!("relay {} (git {revision})", env!("CARGO_PKG_VERSION")));

    // Nothing but the relay to run: no shell for an attacker or a wrapper.
    for shell in ["/bin/sh", "/bin/bash", "/usr/bin/sh"] {
        let mut command = podman();
        command
            .arg("run")
            .arg("--rm")
            .args(RUN_OPTIONS)
            .args(["--entrypoint", shell])
            .arg(image())
            .args(["-c", "true"]);
        let output = run(&mut command, "shell");
        assert!(!output.status.success(), "{shell} exists in the image");
    }
}

#[test]
fn compose_and_kubernetes_name_what_the_image_serves() {
    let image_config = image_config();
    let port = exposed_port(&image_config);
    let compose = compose_config();
    let services = &compose["services"];

    for service in ["migrate", "schemas", "relay"] {
        assert_eq!(
            services[service]["image"].as_str(),
            Some(released_image_name().as_str()),
            "docker-compose.yml service {service}'s image"
        );
        assert_eq!(services[service]["read_only"], Yaml::Bool(true), "service {service} runs read-only");
    }
    // The example order service is not in the relay's image: the Dockerfile's `demo` target adds it.
    let order_service = &services["order-service"];
    assert_eq!(order_service["build"]["target"].as_str(), Some("demo"), "order-service builds the demo target");
    assert_eq!(order_service["read_only"], Yaml::Bool(true), "service order-service runs read-only");
    let relay = &services["relay"];
    assert_eq!(yaml_strings(&relay["command"]), strings(&image_config["Cmd"]), "relay command = the image's CMD");
    let listen = relay["environment"]["RELAY__TELEMETRY__HTTP_LISTEN"].as_str().expect("http_listen set");
    assert_eq!(listen, format!("0.0.0.0:{port}"), "the relay listens on the exposed port, on all interfaces");
    let published: Vec<u64> = relay["ports"]
        .as_sequence()
        .expect("ports")
        .iter()
        .filter_map(|p| {
            p["target"].as_u64().or_else(|| p.as_str()?.rsplit(':').next()?.trim_end_matches("/tcp").parse().ok())
        })
        .collect();
    assert_eq!(published, [u64::from(port)], "relay ports: {:?}", relay["ports"]);
    let healthcheck = yaml_strings(&relay["healthcheck"]["test"]);
    assert_eq!(
        healthcheck,
        ["CMD", "/usr/local/bin/relay", "--config", CONFIG_IN_CONTAINER, "probe", "/readyz"],
        "relay healthcheck (the_image_runs_as_the_sidecar_... runs it in the container)"
    );
    let grace = relay["stop_grace_period"].as_str().unwrap_or("10s");
    assert!(
        grace.ends_with('s') && grace.trim_end_matches('s').parse::<u64>().unwrap_or(0) > 10,
        "stop_grace_period {grace} must exceed shutdown_timeout_ms (10 s)"
    );

    let pod = pod_relay_container();
    assert_eq!(pod["image"].as_str(), Some(released_image_name().as_str()), "pod.yaml relay image");
    assert_eq!(pod["ports"][0]["containerPort"].as_u64(), Some(u64::from(port)), "pod.yaml relay port");
    assert_eq!(strings(&pod["args"]), strings(&image_config["Cmd"]), "pod.yaml relay args = the image's CMD");
    let env_listen = pod["env"]
        .as_array()
        .and_then(|e| e.iter().find(|v| v["name"] == "RELAY__TELEMETRY__HTTP_LISTEN"))
        .and_then(|v| v["value"].as_str());
    assert_eq!(env_listen, Some(format!("0.0.0.0:{port}").as_str()), "pod.yaml http_listen");
    assert_eq!(pod["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(pod["readinessProbe"]["httpGet"]["path"], "/readyz");
    let user = image_config["User"].as_str().expect("the image names its user");
    let (uid, gid) = user.split_once(':').expect("USER uid:gid");
    let pod_user = |key: &str| pod["securityContext"][key].as_u64().map(|id| id.to_string());
    assert_eq!(pod_user("runAsUser").as_deref(), Some(uid), "pod.yaml runAsUser = the image's user {user}");
    assert_eq!(pod_user("runAsGroup").as_deref(), Some(gid), "pod.yaml runAsGroup = the image's group {user}");
    assert_eq!(pod["securityContext"]["readOnlyRootFilesystem"], true);
}
