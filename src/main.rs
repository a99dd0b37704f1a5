//! The `relay` binary: parses arguments, loads the config, sets up logs and
//! hands over to the library.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use relay::cli::{self, Cli, Command};
use relay::config::{Config, LogFormat};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One thread for every task: the stages hand each message from task to
    // task, and across threads each hand-over is a futex wake-up (the
    // comparison is in docs/benchmarks.md). Blocking calls (librdkafka's
    // transactions and metadata) run on the blocking pool, never on this
    // thread.
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
    Ok(match cli.command.unwrap_or(Command::Run) {
        Command::Run => {
            relay::run(config, shutdown_signal()).await?;
            ExitCode::SUCCESS
        }
        Command::Migrate { print_grants } => cli::migrate::run(&config, print_grants.as_deref()).await?,
        Command::Check => cli::check::run(&config, &path).await,
        Command::Schemas { action } => cli::schemas::run(&config, action).await?,
        Command::Replay { since, from_id, to_id, aggregate_type } => {
            let filter = cli::replay::ReplayFilter { since, from_id, to_id, aggregate_type };
            cli::replay::run(&config, &filter).await?
        }
        Command::Probe { path, timeout_ms } => cli::probe::run(&config, &path, Duration::from_millis(timeout_ms)).await,
        Command::Held { action } => cli::held::run(&config, action).await?,
        Command::Tail { topic, from_beginning, max, follow, json } => {
            let options = cli::tail::TailOptions { topic, from_beginning, max, follow, json };
            cli::tail::run(&config, &options, shutdown_signal()).await?
        }
        Command::Status { json, max_lag_seconds } => cli::status::run(&config, json, max_lag_seconds).await?,
    })
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
