//! The `relay` binary: parses arguments, loads the config, sets up logs and
//! hands over to the library.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use relay::cli::{Cli, Command, SchemasAction};
use relay::config::{Config, LogFormat};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One thread for every task: the stages hand each message from task to
    // task, and across threads each hand-over is a futex wake-up. Measured
    // (100k one-row transactions drained, docs/benchmarks.md run 8): 25-30%
    // less relay CPU and a faster drain than the multi-threaded runtime, in
    // both delivery modes. Blocking calls (librdkafka's transactions and
    // metadata) run on the blocking pool, never on this thread.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let path = cli.config.context("no configuration: pass --config FILE (see relay.example.toml)")?;
    let config = Config::load(&path)?;
    relay::preflight(&config)?;
    let format = if cli.log_json { LogFormat::Json } else { config.telemetry.log_format };
    relay::telemetry::init_tracing(format);
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => {
            relay::run(config, shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate { print_grants: Some(role) } => {
            print!("{}", relay::store::grants::grants_sql(&config, &role));
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate { print_grants: None } => {
            let mut client = relay::database::connect(&config.postgres).await?;
            let applied = relay::migrate::migrate(&mut client, &config).await?;
            if applied.is_empty() {
                println!("migrations: up to date");
            } else {
                println!("migrations: applied {}", applied.join(", "));
            }
            if config.kafka.delivery == relay::config::Delivery::ExactlyOnce && config.routing.create_topics {
                // The administrator's run, so the relay's own principal
                // needs no CREATE on the cluster for it.
                relay::sink::progress::ensure_topic(&config).await?;
                println!("progress topic: {} (compacted)", config.kafka.progress_topic);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Check => {
            let verdicts = relay::cli::check::check(&config).await;
            println!("{:<9} ok    {}", "config", path.display());
            for verdict in &verdicts {
                println!("{verdict}");
            }
            for warning in relay::cli::check::warnings(&config).await {
                println!("{:<9} WARN  {warning}", "postgres");
            }
            Ok(if verdicts.iter().all(|v| v.problem.is_none()) { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Schemas { action } => {
            let report = match action {
                SchemasAction::Register => relay::cli::schemas::register(&config).await?,
                SchemasAction::Check => relay::cli::schemas::check(&config).await?,
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
        Command::Replay { since, from_id, to_id, aggregate_type } => {
            let filter = relay::cli::replay::ReplayFilter { since, from_id, to_id, aggregate_type };
            let summary = relay::cli::replay::replay(&config, &filter).await?;
            println!("{summary}");
            Ok(if summary.failed > 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS })
        }
        Command::Probe { path, timeout_ms } => {
            match relay::cli::probe::probe(&config, &path, std::time::Duration::from_millis(timeout_ms)).await {
                Ok(line) => {
                    println!("ok    {line}");
                    Ok(ExitCode::SUCCESS)
                }
                Err(line) => {
                    println!("FAIL  {line}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::Held { action } => {
            print!("{}", relay::cli::held::run(&config, action).await?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Tail { topic, from_beginning, max, follow, json } => {
            let options = relay::cli::tail::TailOptions { topic, from_beginning, max, follow, json };
            let mut out = std::io::stdout().lock();
            relay::cli::tail::run(&config, &options, &mut out, shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { json, max_lag_seconds } => {
            let mut client = relay::database::connect(&config.postgres).await?;
            let logical = config.source.mode == relay::config::SourceMode::Logical;
            let status = relay::store::Store::new(&config).status(&mut client, logical).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{status}");
            }
            let lagging =
                matches!((max_lag_seconds, status.oldest_pending_age_seconds), (Some(max), Some(age)) if age > max);
            Ok(if lagging { ExitCode::from(2) } else { ExitCode::SUCCESS })
        }
    }
}

/// Resolves on SIGTERM (how Kubernetes stops a container) or Ctrl-C.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
