//! `relay schemas register|check`.

use std::process::ExitCode;

use crate::codec::registry::{Registry, RegistryError};
use crate::codec::{SchemaError, SchemaSet};
use crate::config::Config;
use crate::telemetry::ErrorChain;

/// What `relay schemas` does.
#[derive(Debug, clap::Subcommand)]
pub enum SchemasAction {
    /// Register every schema under its subject (idempotent) and set the
    /// subject's compatibility level to codec.compatibility.
    Register,
    /// Check every schema against its subject's compatibility rule; exit 1
    /// naming each subject that fails, and why.
    Check,
}

/// Runs `relay schemas ACTION`: one `ok` or `FAIL` line per subject; exit 1
/// if any subject failed.
pub async fn run(config: &Config, action: SchemasAction) -> Result<ExitCode, SchemaError> {
    let report = match action {
        SchemasAction::Register => register(config).await?,
        SchemasAction::Check => check(config).await?,
    };
    let mut failed = false;
    for (subject, outcome) in &report {
        match outcome {
            Ok(text) => println!("ok    {subject}: {text}"),
            Err(text) => {
                failed = true;
                println!("FAIL  {subject}: {text}");
            }
        }
    }
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

/// One line of output per subject: `(subject, problem)`; `problem` is
/// `None` when all is well, and the text says what happened either way.
pub type Report = Vec<(String, Result<String, String>)>;

/// Registers every configured schema and sets each subject's compatibility.
pub async fn register(config: &Config) -> Result<Report, SchemaError> {
    let set = SchemaSet::load(config)?;
    let registry = Registry::new(&config.registry)?;
    let mut report = Vec::new();
    for (subject, schema) in set.unique_subjects(config) {
        let outcome = async {
            // A new subject takes the level before its first version; an
            // existing one keeps being checked under the configured level.
            registry.set_compatibility(&subject, config.codec.compatibility.as_str()).await?;
            let id = registry.register(&subject, &schema.text, &schema.full_name).await?;
            Ok::<_, RegistryError>(format!("id {id}, {} ({})", schema.file, config.codec.compatibility))
        }
        .await;
        report.push((subject, outcome.map_err(|e| ErrorChain(&e).to_string())));
    }
    if config.codec.key_format == crate::config::KeyFormat::Avro {
        for topic in crate::codec::key_topics(config) {
            let subject = format!("{topic}-key");
            let outcome = async {
                registry.set_compatibility(&subject, config.codec.compatibility.as_str()).await?;
                let id = registry.register(&subject, crate::codec::KEY_SCHEMA, "string").await?;
                Ok::<_, RegistryError>(format!("id {id}, key schema \"string\""))
            }
            .await;
            report.push((subject, outcome.map_err(|e| ErrorChain(&e).to_string())));
        }
    }
    Ok(report)
}

/// Checks every configured schema against its subject.
pub async fn check(config: &Config) -> Result<Report, SchemaError> {
    let set = SchemaSet::load(config)?;
    let registry = Registry::new(&config.registry)?;
    let mut report = Vec::new();
    for (subject, schema) in set.unique_subjects(config) {
        let outcome = match registry.has_subject(&subject).await {
            Ok(false) => Ok(format!("{}: new subject, nothing to be compatible with", schema.file)),
            Ok(true) => match registry.check(&subject, &schema.text, &schema.full_name).await {
                Ok(None) => Ok(format!("{}: compatible", schema.file)),
                Ok(Some(reason)) => Err(format!("{} is not compatible: {reason}", schema.file)),
                Err(err) => Err(ErrorChain(&err).to_string()),
            },
            Err(err) => Err(ErrorChain(&err).to_string()),
        };
        report.push((subject, outcome));
    }
    Ok(report)
}
