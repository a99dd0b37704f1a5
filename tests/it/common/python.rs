//! Clients nobody here wrote: Confluent's Python `confluent-kafka`, run from
//! the virtualenv that `scripts/python-env` makes (scripts/test exports it as
//! `RELAY_PYTHON`), through the scripts in `tests/interop/`.

use std::path::Path;
use std::process::Command;

use super::{env_var, Stack};

/// A command running the interop Python with `tests/interop/<script>`.
pub fn python(stack: &Stack, script: &str) -> Command {
    let mut command = Command::new(env_var("RELAY_PYTHON"));
    command.arg(stack.repo.join("tests/interop").join(script));
    command
}

/// Runs a Python consumer and parses its stdout, one JSON value per line.
pub fn json_lines<T: serde::de::DeserializeOwned>(command: &mut Command) -> Vec<T> {
    let output = command.output().expect("run the python consumer");
    assert!(output.status.success(), "python consumer failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect()
}

/// `count` records of `topics` decoded by Confluent's Avro deserializer with
/// the registry at `registry` (trusting `ca` when it is HTTPS).
pub fn python_consume_avro<T: serde::de::DeserializeOwned>(
    stack: &Stack,
    registry: &str,
    ca: Option<&Path>,
    topics: &[String],
    count: usize,
) -> Vec<T> {
    let mut command = python(stack, "consume_avro.py");
    command.arg(&stack.bootstrap).arg(registry).arg(count.to_string()).args(topics);
    if let Some(ca) = ca {
        command.env("REGISTRY_CA_FILE", ca);
    }
    json_lines(&mut command)
}

/// Every record of `topic` up to its end offsets, read with `isolation`
/// (`read_committed` or `read_uncommitted`).
pub fn python_consume_to_end<T: serde::de::DeserializeOwned>(stack: &Stack, isolation: &str, topic: &str) -> Vec<T> {
    json_lines(python(stack, "consume_to_end.py").args([&stack.bootstrap, isolation, topic]))
}
