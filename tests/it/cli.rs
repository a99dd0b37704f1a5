//! The binary's behaviour on bad input: clear one-line errors, no panics.

use std::process::Command;

fn relay() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_relay"));
    for (key, _) in std::env::vars() {
        if key.starts_with("RELAY") {
            command.env_remove(key);
        }
    }
    command
}

fn write(dir: &tempfile::TempDir, text: &str) -> std::path::PathBuf {
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

const VALID: &str = r#"
[postgres]
url = "postgres://relay:relay@127.0.0.1:1/outbox"
[kafka]
bootstrap_servers = "127.0.0.1:1"
"#;

#[test]
fn missing_config_file_is_one_line() {
    let output = relay().args(["--config", "/nonexistent/relay.toml", "check"]).output().expect("run");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("/nonexistent/relay.toml") && !stderr.contains("panicked"), "{stderr}");
}

#[test]
fn misspelled_key_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(&dir, &VALID.replace("bootstrap_servers", "bootstrap_server"));
    let output = relay().arg("--config").arg(&path).arg("check").output().expect("run");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("kafka.bootstrap_server"), "{stderr}");
}

#[test]
fn misspelled_environment_override_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(&dir, VALID);
    let output =
        relay().env("RELAY__KAFKA__LINGER", "5").arg("--config").arg(&path).arg("check").output().expect("run");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("kafka.linger"), "{stderr}");
}

#[test]
fn environment_overrides_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(&dir, VALID);
    // An invalid override must be what fails, proving the override is read.
    let output = relay()
        .env("RELAY__KAFKA__COMPRESSION", "brotli")
        .arg("--config")
        .arg(&path)
        .arg("check")
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("kafka.compression") && stderr.contains("brotli"), "{stderr}");
}

#[test]
fn check_reports_every_unreachable_component() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(&dir, &format!("{VALID}\n[registry]\nurl = \"http://127.0.0.1:1/apis/ccompat/v7\""));
    let output = relay().arg("--config").arg(&path).arg("check").output().expect("run");
    assert!(!output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    for component in ["postgres", "kafka", "registry"] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(component))
            .unwrap_or_else(|| panic!("no {component} line: {stdout}"));
        assert!(line.contains("FAIL"), "{line}");
    }
}

#[test]
fn help_lists_the_subcommands() {
    let output = relay().arg("--help").output().expect("run");
    let stdout = String::from_utf8_lossy(&output.stdout);
    for sub in ["migrate", "check", "status", "--config"] {
        assert!(stdout.contains(sub), "{sub} missing from --help");
    }
}

/// `relay --version`: the crate version and the git revision of the build
/// (build.rs), `unknown` only where the build had no git checkout.
#[test]
fn version_names_the_git_revision() {
    let output = relay().arg("--version").output().expect("run");
    assert!(output.status.success());
    let printed = String::from_utf8_lossy(&output.stdout).trim().to_string();
    let revision = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    assert_eq!(printed, format!("relay {} (git {revision})", env!("CARGO_PKG_VERSION")));
}

/// `relay probe` (the image's healthcheck) fails when nothing answers on
/// `telemetry.http_listen`: exit 1 and a FAIL line naming the URL.
#[test]
fn probe_fails_when_the_endpoint_does_not_answer() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A port that was free a moment ago: nothing listens on it.
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let config = write(&dir, &format!("{VALID}[telemetry]\nhttp_listen = \"0.0.0.0:{port}\"\n"));
    let output = relay().arg("--config").arg(&config).args(["probe", "/readyz"]).output().expect("run");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(stdout.starts_with(&format!("FAIL  http://127.0.0.1:{port}/readyz")), "{stdout}");
}
